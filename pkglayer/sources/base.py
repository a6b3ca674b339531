"""The interface every package-database reader implements.

A reader turns a rootfs's package database into `Package` records. It reads through
`Rootfs` only and must not change the rootfs. Adding a format (apk, pacman...) means one
new module with a `PackageSource` subclass, listed in `pkglayer.sources.SOURCES` (pip's
reader, which runs beside a distro database rather than instead of one, is not listed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

from ..rootfs import Rootfs


class FileRecord(NamedTuple):
    """A path as the package database records it.

    `path` is absolute as the database says it ("/lib/x86_64-linux-gnu/libc.so.6"), after
    any database-level renaming such as dpkg diversions; resolving merged-/usr symlinks
    is the ownership stage's job. Fields the format does not record are None.

    A named tuple rather than a frozen dataclass: a database lists tens of thousands, and
    a first scan makes them in a child process and unpickles them here; a tuple is made
    three times faster and unpickled twice as fast.
    """

    path: str
    digest: str | None = None  # hex digest of the content the package installed
    digest_algo: str | None = None  # hashlib name: "md5", "sha256", ...
    mode: int | None = None  # full st_mode recorded by the database
    linkto: str | None = None  # symlink target recorded by the database
    mtime: int | None = None
    config: bool = False  # %config / dpkg conffile
    ghost: bool = False  # rpm %ghost: listed, but its content is not the package's


# A record (dpkg's PKG.list, pip's RECORD) is taken as copied when its ctime is later
# than its mtime by more than this: the package manager renames it into place right
# after writing it; a copy, an image layer's extraction or an ostree checkout keeps
# mtimes and sets every ctime anew.
COPIED_AFTER_NS = 2 * 10**9


def settled_times(stamp: tuple[int, ...] | None) -> tuple[int | None, bool]:
    """Package.files_settled_ns and files_copied from the Rootfs.stamp of the record the
    package manager writes after the package's files."""
    if stamp is None:
        return None, False
    mtime_ns, ctime_ns = stamp[4], stamp[5]
    return mtime_ns, ctime_ns - mtime_ns > COPIED_AFTER_NS


# Enough for several years of a busy package; older entries do not affect a weekly rate.
MAX_CHANGELOG_ENTRIES = 200
# Readers may skip entries older than this before the package's newest one: the planner
# looks one year back from the newest entry in the tree, the update benchmark two.
CHANGELOG_SPAN = 2 * 366 * 24 * 3600


@dataclass(frozen=True)
class Package:
    name: str
    version: str  # upstream version (rpm) or the full Debian version without epoch
    arch: str  # "" where the format has none (pip): the key then ends with the version
    epoch: str | None = None
    release: str | None = None  # rpm release; None for dpkg (the revision is in version)
    source: str | None = None  # source package (deb Source:, SRPM name)
    size: int = 0  # installed size the database records, in bytes
    # Files of the package whose ctime and mtime are both no later than this (ns) were
    # written by the package manager and not changed since (dpkg: the mtime of the
    # package's file list, written after its files; pip: that of RECORD, written last;
    # any later change of a file's content, mode, owner or links sets its ctime, which
    # user space cannot set back). None: the database gives no such evidence.
    files_settled_ns: int | None = None
    # The record that dates the files was copied since the package manager wrote it
    # (see settled_times): ctimes are the copy's, and only mtimes date the files.
    files_copied: bool = False
    # Unix times of the package's changelog entries, newest first (at most
    # MAX_CHANGELOG_ENTRIES): the planner's evidence of how often it changes.
    changelog: tuple[int, ...] = field(default=(), repr=False)
    files: tuple[FileRecord, ...] = field(default=(), repr=False)
    # The database's own files that are this package's alone (dpkg: info/NAME.list,
    # .md5sums, maintainer scripts...), rootfs-relative: they go to the package's layer,
    # not to the database's, which every transaction changes.
    records: tuple[str, ...] = field(default=(), repr=False)

    @cached_property  # asked for once per object of the tree by the ownership rules
    def key(self) -> str:
        """Stable name of this exact build: name-[epoch:]version[-release][-arch]."""
        evr = f"{self.epoch}:{self.version}" if self.epoch not in (None, "", "0") else self.version
        if self.release:
            evr = f"{evr}-{self.release}"
        return f"{self.name}-{evr}-{self.arch}" if self.arch else f"{self.name}-{evr}"


class PackageSource(ABC):
    """A package database found in a rootfs."""

    #: short format name shown to users ("rpm", "dpkg")
    format: str = ""

    def __init__(self, rootfs: Rootfs):
        self.rootfs = rootfs

    @classmethod
    @abstractmethod
    def detect(cls, rootfs: Rootfs) -> bool:
        """True when this format's database is present in the rootfs."""

    @abstractmethod
    def packages(self) -> list[Package]:
        """All installed packages, sorted by key. Raises DatabaseError on a corrupt database."""

    @abstractmethod
    def database_paths(self) -> list[str]:
        """Rootfs-relative paths (directories or files) that hold the database itself.
        They go to the package-database layer, not to any package."""

    @abstractmethod
    def architecture(self) -> str | None:
        """Native architecture in the distribution's own spelling ("amd64", "x86_64")."""
