"""Reading tar streams from untrusted places (a source image's layers, an earlier build's
layer blobs) with Python's tarfile, bounded and range-checked.

tarfile trusts what it reads: a PAX record may carry a 40-digit time or a 5,000-digit
length, extended headers may chain without end (its parser recurses once per header), a
sparse member expands to any size however few bytes it stores, an unreadable header in
the middle silently ends the archive, and a PAX number it cannot parse silently becomes
0 (uid 0!). `open_stream` bounds the header machinery and refuses sparse members (no
image build tool writes them); `check_member` range-checks every number and string a
member carries before anything acts on it. A caller sees sane members or a
`TarReadError`, whose message it prefixes with the layer and path.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass

# Extended headers (PAX records, GNU long names) of one member, in bytes and in number:
# real tars use one or two, with at most a few kB of xattrs.
MAX_EXTENDED_BYTES = 1 << 20
MAX_EXTENDED_CHAIN = 8
MAX_PAX_KEYS = 1024
# Linux: uid_t is 32 bits and (uid_t)-1 means "leave unchanged".
MAX_ID = 2**32 - 2
# A mode field holds 7 octal digits; some tools put the file type bits there too.
MAX_MODE = 0o7777777
# 1901-12-13 .. 2514-05-30: what a file system can be asked to store (ext4 keeps up to
# 2446 and clamps beyond; Python and the kernel take any of it).
MIN_MTIME = -(2**31)
MAX_MTIME = 2**34 - 1
# Linux dev_t as mknod(2) takes it: 12 bits of major, 20 of minor.
MAX_MAJOR = 2**12 - 1
MAX_MINOR = 2**20 - 1
NAME_MAX = 255  # bytes of one path component
LINK_MAX_BYTES = 4095  # a symlink target (PATH_MAX - 1)
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65536
MAX_SIZE = 2**63 - 1

REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
SUPPORTED = (*REGULAR, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
             tarfile.FIFOTYPE)
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
             tarfile.SOLARIS_XHDTYPE)
_PAX_INT = re.compile(r"[0-9]{1,20}")
# POSIX pax times: seconds, optionally negative, with an optional fraction.
_PAX_TIME = re.compile(r"(-?[0-9]{1,40})(?:\.([0-9]{0,40}))?")
XATTR_PREFIX = "SCHILY.xattr."


class TarReadError(Exception):
    """The stream or one member is malformed, out of range, or unsupported."""


class _Header(tarfile.TarInfo):
    """tarfile's header parser with bounds: converts what it would raise as ValueError,
    OverflowError or RecursionError, or swallow (an invalid header in mid-stream), into
    TarReadError."""

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        depth = getattr(tf, "_pkglayer_chain", 0)
        if depth > MAX_EXTENDED_CHAIN:
            raise TarReadError(f"more than {MAX_EXTENDED_CHAIN} extended headers in a row")
        tf._pkglayer_chain = depth + 1
        try:
            return super().fromtarfile(tf)
        except tarfile.InvalidHeaderError as e:
            raise TarReadError(f"invalid tar header at offset {tf.offset}: {e}") from None
        except (ValueError, OverflowError, UnicodeError) as e:
            # (Python's int-size message goes on to suggest a setting: not for users.)
            raise TarReadError(f"malformed tar header at offset {tf.offset}: {str(e).split(';')[0][:200]}") from None
        finally:
            tf._pkglayer_chain = depth

    def _proc_member(self, tf):
        if self.type in _EXTENDED:
            if not 0 <= self.size <= MAX_EXTENDED_BYTES:
                raise TarReadError(f"extended header of {self.size} bytes (at most {MAX_EXTENDED_BYTES})")
            if self.type == tarfile.XGLTYPE and len(tf.pax_headers) > MAX_PAX_KEYS:
                raise TarReadError(f"more than {MAX_PAX_KEYS} global PAX records")
        elif self.type == tarfile.GNUTYPE_SPARSE:
            raise TarReadError(f"{self.name[:200]!r} is a GNU sparse member; refusing it")
        elif self.size < 0:
            raise TarReadError(f"{self.name[:200]!r} has a negative size")
        return super()._proc_member(tf)

    # PAX sparse members (GNU formats 0.0, 0.1, 1.0): tarfile would expand them, reading a
    # map of any length first. Refused before either happens.
    def _proc_gnusparse_00(self, next, pax_headers, buf):  # noqa: A002
        raise TarReadError(f"{next.name[:200]!r} is a PAX sparse member; refusing it")

    def _proc_gnusparse_01(self, next, pax_headers):  # noqa: A002
        raise TarReadError(f"{next.name[:200]!r} is a PAX sparse member; refusing it")

    def _proc_gnusparse_10(self, next, pax_headers, tf):  # noqa: A002
        raise TarReadError(f"{next.name[:200]!r} is a PAX sparse member; refusing it")


def open_stream(fileobj) -> tarfile.TarFile:
    """A streaming reader ("r|") of `fileobj` that yields only bounded headers. Iterating
    it raises TarReadError, tarfile.TarError, or what `fileobj` raises."""
    return tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_Header, encoding="utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class Checked:
    """A member's values after check_member, ready to apply."""

    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]


def _pax_int(member: tarfile.TarInfo, key: str) -> None:
    text = member.pax_headers.get(key)
    if text is not None and not _PAX_INT.fullmatch(text):
        raise TarReadError(f"PAX {key} {text[:40]!r} is not a non-negative integer")


def mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, from its PAX record when it has one (sub-second
    precision), range-checked."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        m = _PAX_TIME.fullmatch(text)
        if not m:
            raise TarReadError(f"PAX mtime {text[:50]!r} is not a decimal number of seconds")
        seconds = int(m.group(1))
        fraction = (m.group(2) or "")[:9].ljust(9, "0")
        if not MIN_MTIME <= seconds <= MAX_MTIME:
            raise TarReadError(f"mtime {text[:50]} is out of range ({MIN_MTIME}..{MAX_MTIME} seconds)")
        sign = -1 if m.group(1).startswith("-") else 1
        return seconds * 1_000_000_000 + sign * int(fraction)
    if not isinstance(member.mtime, int) or not MIN_MTIME <= member.mtime <= MAX_MTIME:
        raise TarReadError(f"mtime {member.mtime} is out of range ({MIN_MTIME}..{MAX_MTIME} seconds)")
    return member.mtime * 1_000_000_000


def check_member(member: tarfile.TarInfo, max_size: int) -> Checked:
    """Range-check every field of `member` that a reader acts on; TarReadError names the
    field (the caller names the layer and path). A regular member may hold at most
    `max_size` bytes: the caller's budget, and also what keeps tarfile from skipping an
    absurd size block by block."""
    if member.type not in SUPPORTED:
        raise TarReadError(f"unsupported tar entry type {member.type!r}")
    if member.sparse is not None or any(k.startswith("GNU.sparse.") for k in member.pax_headers):
        raise TarReadError("sparse member; refusing it")
    if len(member.pax_headers) > MAX_PAX_KEYS:
        raise TarReadError(f"more than {MAX_PAX_KEYS} PAX records")
    for key in ("uid", "gid", "size"):
        _pax_int(member, key)
    if not 0 <= member.mode <= MAX_MODE:
        raise TarReadError(f"mode {member.mode:o} is out of range")
    for key in ("uid", "gid"):
        value = getattr(member, key)
        if not 0 <= value <= MAX_ID:
            raise TarReadError(f"{key} {value} is out of range (0..{MAX_ID})")
    if not 0 <= member.size <= MAX_SIZE:
        raise TarReadError(f"size {member.size} is out of range")
    if member.type in REGULAR and member.size > max_size:
        raise TarReadError(f"size {member.size} is more than the limit of {max_size} bytes (what is left of it)")
    if member.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) and not (
        0 <= member.devmajor <= MAX_MAJOR and 0 <= member.devminor <= MAX_MINOR
    ):
        raise TarReadError(f"device number {member.devmajor},{member.devminor} is out of range "
                           f"(major 0..{MAX_MAJOR}, minor 0..{MAX_MINOR})")
    if member.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        target = member.linkname.encode("utf-8", "surrogateescape")
        if not target or b"\0" in target or len(target) > LINK_MAX_BYTES:
            raise TarReadError(f"link target {member.linkname[:80]!r} is empty, holds NUL or is longer "
                               f"than {LINK_MAX_BYTES} bytes")
    xattrs = []
    for key, value in member.pax_headers.items():
        if not key.startswith(XATTR_PREFIX):
            continue
        name = key[len(XATTR_PREFIX):]
        raw = value.encode("utf-8", "surrogateescape")
        if not name or "\0" in name or len(name.encode("utf-8", "surrogateescape")) > XATTR_NAME_MAX:
            raise TarReadError(f"extended attribute name {name[:80]!r} is empty, holds NUL or is too long")
        if len(raw) > XATTR_VALUE_MAX:
            raise TarReadError(f"extended attribute {name[:80]!r} is {len(raw)} bytes (at most {XATTR_VALUE_MAX})")
        xattrs.append((name, raw))
    return Checked(mtime_ns(member), tuple(xattrs))
