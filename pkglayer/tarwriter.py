"""Byte-deterministic layer tarballs.

A layer is a list of `Member`s, a pure function of the objects assigned to it: entries
sorted by path bytes, every parent directory written explicitly with the same attributes
in every layer, directory mtimes set to one fixed value, numeric ids with empty names,
hard links inside the layer only. The tar bytes depend on nothing else, so a content key
over the members (plus `TAR_FORMAT`) identifies the uncompressed layer exactly, before
any of it is written.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from time import thread_time
from typing import TYPE_CHECKING

from .compress import compressor
from .digests import CONTENT_HASH, new_hasher
from .errors import RootfsError, TreeChangedError
from .rootfs import FileOpener, Rootfs
from .scan import FsObject
from .timings import charge, charged

if TYPE_CHECKING:
    import tarfile

    from .zstd_chunked import ChunkedEncoder

# Bump whenever the bytes written for the same members change: it is part of every
# content key, so old blobs are never reused for a different tar encoding.
TAR_FORMAT = 1

# The tar format's own constants (POSIX ustar): tarfile is imported only for the rare
# header its general PAX writer must make, so that a start that writes no layer skips it.
REGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_BLOCK = 512
_MAX_ID = 8**7  # largest uid/gid a ustar field holds, plus one
_MAX_NUM = 8**11  # same for size and mtime
_USTAR_MAGIC_AND_NAMES = b"ustar\x0000" + b"\0" * 64  # empty uname and gname
_NO_DEV = b"\0" * 16
_PREFIX_AND_PAD = b"\0" * (155 + 12)
_RECORD = 20 * _BLOCK
_FLUSH = 1024 * 1024


@dataclass(frozen=True)
class Member:
    name: str
    type: bytes  # REGTYPE, DIRTYPE, SYMTYPE, LNKTYPE, CHRTYPE, BLKTYPE, FIFOTYPE
    mode: int  # permission bits only
    uid: int
    gid: int
    mtime: int
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    content_hash: str = ""  # of a regular file's data; "" while not hashed yet
    source: FsObject | None = None  # where the data comes from (regular files)

    def key_line(self, content_hash: str | None = None) -> str:
        xa = ",".join(f"{k}={v.hex()}" for k, v in self.xattrs)
        return (
            f"{self.name.encode('utf-8', 'surrogateescape').hex()}\0{self.type.decode()}\0"
            f"{self.mode:o}\0{self.uid}\0{self.gid}\0{self.mtime}\0{self.size}\0"
            f"{self.linkname.encode('utf-8', 'surrogateescape').hex()}\0"
            f"{self.devmajor}\0{self.devminor}\0{xa}\0{content_hash or self.content_hash}\n"
        )

    def header(self) -> bytes:
        """The tar header block(s) of this member.

        The plain case (short ASCII names, small numbers, no xattrs) is packed here; it is
        most entries, and tarfile's general path costs more than compressing them. Anything
        else goes through tarfile's PAX writer. tests/test_tarwriter.py checks the two
        agree byte for byte.
        """
        name = self.name + "/" if self.type == DIRTYPE else self.name
        if (
            not self.xattrs
            and len(name) <= 100
            and len(self.linkname) <= 100
            and name.isascii()
            and self.linkname.isascii()
            and self.uid < _MAX_ID
            and self.gid < _MAX_ID
            and self.size < _MAX_NUM
            and 0 <= self.mtime < _MAX_NUM
        ):
            size = self.size if self.type == REGTYPE else 0
            is_dev = self.type in (CHRTYPE, BLKTYPE)
            dev = b"%07o\0%07o\0" % (self.devmajor, self.devminor) if is_dev else _NO_DEV
            block = b"".join(
                (
                    name.encode("ascii").ljust(100, b"\0"),
                    b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (self.mode, self.uid, self.gid, size, self.mtime),
                    b"        ",
                    self.type,
                    self.linkname.encode("ascii").ljust(100, b"\0"),
                    _USTAR_MAGIC_AND_NAMES,
                    dev,
                    _PREFIX_AND_PAD,
                )
            )
            return b"%s%06o\0 %s" % (block[:148], sum(block), block[156:])
        import tarfile

        return self.tarinfo().tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def tarinfo(self) -> tarfile.TarInfo:
        import tarfile

        ti = tarfile.TarInfo(self.name)
        ti.type = self.type
        ti.mode = self.mode
        ti.uid, ti.gid = self.uid, self.gid
        ti.uname = ti.gname = ""
        ti.mtime = self.mtime
        ti.size = self.size if self.type == REGTYPE else 0
        ti.linkname = self.linkname
        if self.type in (CHRTYPE, BLKTYPE):
            ti.devmajor, ti.devminor = self.devmajor, self.devminor
        if self.xattrs:
            ti.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in self.xattrs
            }
        return ti


def _sort_key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _member(obj: FsObject, dir_mtime: int) -> Member:
    st = obj.st
    mode = st.st_mode
    common = dict(
        name=obj.path,
        mode=stat.S_IMODE(mode),
        uid=st.st_uid,
        gid=st.st_gid,
        xattrs=obj.xattrs,
    )
    if stat.S_ISDIR(mode):
        return Member(type=DIRTYPE, mtime=dir_mtime, **common)
    mtime = dir_mtime if obj.fixed_mtime else int(st.st_mtime)
    if stat.S_ISREG(mode):
        return Member(
            type=REGTYPE, mtime=mtime, size=st.st_size, source=obj, content_hash=obj.content_hash or "",
            **common,
        )
    if stat.S_ISLNK(mode):
        return Member(type=SYMTYPE, mtime=mtime, linkname=obj.linkname or "", **common)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return Member(
            type=CHRTYPE if stat.S_ISCHR(mode) else BLKTYPE,
            mtime=mtime,
            devmajor=os.major(st.st_rdev),
            devminor=os.minor(st.st_rdev),
            **common,
        )
    if stat.S_ISFIFO(mode):
        return Member(type=FIFOTYPE, mtime=mtime, **common)
    raise RootfsError(f"/{obj.path}: cannot store file type {stat.S_IFMT(mode):o} in a layer")


def layer_members(
    objects: Iterable[FsObject], all_objects: dict[str, FsObject], dir_mtime: int, with_root: bool = False
) -> list[Member]:
    """The members of one layer: its objects plus every parent directory, sorted.

    `with_root` puts the layer's root directory first as "./" (0755, root-owned): clients
    that build a layer from a zstd:chunked table of contents otherwise leave the layer's
    root as their private staging directory, mode 0700, and with it the container's "/"
    (podman 4.3.1: non-root users can then run nothing)."""
    chosen: dict[str, FsObject] = {}
    for obj in objects:
        chosen[obj.path] = obj
        parent = obj.path.rpartition("/")[0]
        while parent and parent not in chosen:
            chosen[parent] = all_objects[parent]
            parent = parent.rpartition("/")[0]
    members: list[Member] = []
    if with_root:
        members.append(Member(name=".", type=DIRTYPE, mode=0o755, uid=0, gid=0, mtime=dir_mtime))
    first_of_inode: dict[tuple[int, int], str] = {}
    for path in sorted(chosen, key=_sort_key):
        obj = chosen[path]
        m = _member(obj, dir_mtime)
        if m.type == REGTYPE and obj.st.st_nlink > 1:
            ino = (obj.st.st_dev, obj.st.st_ino)
            first = first_of_inode.get(ino)
            if first is None:
                first_of_inode[ino] = path
            else:
                m = Member(
                    name=m.name, type=LNKTYPE, mode=m.mode, uid=m.uid, gid=m.gid,
                    mtime=m.mtime, linkname=first, xattrs=m.xattrs,
                )
        members.append(m)
    return members


def content_key(members: Iterable[Member], hashes: Mapping[str, str] | None = None) -> str | None:
    """sha256 over everything that decides the tar bytes (see module docstring); None
    while some file's data has not been hashed yet. `hashes` supplies the content
    hashes of members that lacked one (write_layer returns those it took)."""
    hashes = hashes or {}
    h = hashlib.sha256(f"pkglayer-tar-format-{TAR_FORMAT} {CONTENT_HASH}\n".encode())
    for m in members:
        data_hash = m.content_hash or hashes.get(m.name, "")
        if m.type == REGTYPE and not data_hash:
            return None
        h.update(m.key_line(data_hash).encode())
    return "sha256:" + h.hexdigest()


class _Compressor:
    """Streams tar bytes into a compressor, hashing the tar (diff_id) on the way."""

    def __init__(self, compression: str, level: int, out):
        self.tar_hash = hashlib.sha256()
        self.tar_size = 0
        self._c = compressor(compression, level, out)
        self._buf = bytearray()

    @property
    def offset(self) -> int:
        return self.tar_size + len(self._buf)

    def write(self, data) -> None:
        self._buf += data
        if len(self._buf) >= _FLUSH:
            self._flush()

    def write_large(self, data) -> None:
        self._flush()
        self._push(data)

    def _push(self, data) -> None:
        with charge("hash"):
            self.tar_hash.update(data)
        self.tar_size += len(data)
        self._c.write(data)

    def _flush(self) -> None:
        if self._buf:
            self._push(bytes(self._buf))
            self._buf.clear()

    # The tar writer drives this like a ChunkedEncoder; a plain stream needs no member boundaries.
    def add_member(self, m: Member, header: bytes) -> None:
        self.write(header)

    def write_data(self, chunk) -> None:
        if len(chunk) >= 64 * 1024:
            self.write_large(chunk)
        else:
            self.write(chunk)

    def end_file(self) -> None:
        pass

    def finish(self) -> dict[str, str]:
        self._flush()
        self._c.finish()
        return {}


@dataclass(frozen=True)
class WrittenLayer:
    diff_id: str  # sha256 of the uncompressed tar
    tar_size: int
    hashes: dict[str, str]  # member name -> content hash, for the members that had none
    annotations: dict[str, str]  # the layer descriptor's: those of zstd:chunked, else none


def write_layer(rootfs: Rootfs, members: list[Member], compression: str, level: int, out) -> WrittenLayer:
    """Write the layer to `out` (a binary writer).

    Files not hashed yet are hashed on the way and returned, so the content key can be
    taken afterwards. Each file is checked against what the scan saw (inode, size,
    mtime, ctime): a file changed since then would make the content key lie, so the
    build stops instead.
    """
    from .zstd_chunked import ChunkedEncoder  # here: anycrc and zstandard slow the start of every build

    c = ChunkedEncoder(level, out) if compression == "zstd:chunked" else _Compressor(compression, level, out)
    buf = memoryview(bytearray(_FLUSH))  # reused for every read of this layer
    hashes: dict[str, str] = {}
    spent = [0.0, 0.0]  # CPU s reading and hashing files, charged once for the layer
    with FileOpener(rootfs) as opener:
        for m in members:
            c.add_member(m, m.header())
            if m.type == REGTYPE and m.size:
                taken = _copy_file(opener, m, c, buf, spent)
                if taken is not None:
                    hashes[m.name] = taken
                c.end_file()
                pad = -m.size % _BLOCK
                if pad:
                    c.write(b"\0" * pad)
            elif m.type == REGTYPE and not m.content_hash:
                hashes[m.name] = _EMPTY_HASH
    # End of archive: two zero blocks, padded to a full record like tarfile and GNU tar.
    end = 2 * _BLOCK
    total = c.offset + end
    c.write(b"\0" * (end + (-total % _RECORD)))
    annotations = c.finish()
    charged("read", spent[0])
    charged("hash", spent[1])
    return WrittenLayer("sha256:" + c.tar_hash.hexdigest(), c.tar_size, hashes, annotations)


_EMPTY_HASH = new_hasher(CONTENT_HASH).hexdigest()


def _copy_file(
    opener: FileOpener, m: Member, c: _Compressor | ChunkedEncoder, buf: memoryview, spent: list[float]
) -> str | None:
    """Copy one file's data into the layer; its content hash if it had none yet. Adds
    the CPU time of reading and hashing to `spent` (read, hash)."""
    obj = m.source
    assert obj is not None
    try:
        fd, st = opener.open_fd(obj.path)
    except FileNotFoundError:
        raise TreeChangedError(f"/{obj.path} disappeared during the build; nothing was written, rerun") from None
    hasher = None if m.content_hash else new_hasher(CONTENT_HASH)
    try:
        seen = obj.st
        if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (
            seen.st_ino, seen.st_size, seen.st_mtime_ns, seen.st_ctime_ns
        ):
            raise TreeChangedError(f"/{obj.path} changed during the build; nothing was written, rerun")
        remaining = m.size
        while remaining:
            started = thread_time()
            n = os.readv(fd, [buf[: min(len(buf), remaining)]])
            read = thread_time()
            spent[0] += read - started
            if not n:
                raise TreeChangedError(f"/{obj.path} shrank during the build; nothing was written, rerun")
            remaining -= n
            chunk = buf[:n]
            if hasher is not None:
                hasher.update(chunk)
                spent[1] += thread_time() - read
            c.write_data(chunk)
    finally:
        os.close(fd)
    return hasher.hexdigest() if hasher is not None else None
