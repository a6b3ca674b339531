"""Errors the user can act on. The CLI prints them as one line and exits non-zero."""


class PkglayerError(Exception):
    """Bad input or an environment problem, with a message meant for a person."""


class RootfsError(PkglayerError):
    """The root filesystem is missing, unreadable, or changed while being read."""


class TreeChangedError(RootfsError):
    """A file changed, shrank or disappeared while a build read it: the tree is still
    being written, and a later build may well succeed (the daemon tries again)."""


class DatabaseError(PkglayerError):
    """A package database is unreadable, corrupt, or in an unsupported format."""


class HistoryError(PkglayerError):
    """history.json or the /layers directory is malformed or hostile."""


class DigestError(PkglayerError):
    """A blob digest is malformed (anything but "sha256:" and 64 lower-case hex digits)."""


class ConfigError(PkglayerError):
    """A configuration file or option is invalid."""
