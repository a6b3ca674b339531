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
# What the fixed parts of a plain header add to its checksum: the checksum field itself
# counts as eight spaces.
_FIXED_SUM = 8 * ord(" ") + sum(_USTAR_MAGIC_AND_NAMES)


# Not frozen: a frozen dataclass's __init__ cost three times as much, once per object of
# the tree in every build. Members are values all the same: nothing changes one once made.
@dataclass(slots=True)
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
            name_b = name.encode("ascii")
            link_b = self.linkname.encode("ascii")
            size = self.size if self.type == REGTYPE else 0
            numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (self.mode, self.uid, self.gid, size, self.mtime)
            if self.type in (CHRTYPE, BLKTYPE):
                dev = b"%07o\0%07o\0" % (self.devmajor, self.devminor)
                checksum = sum(dev)
            else:
                dev, checksum = _NO_DEV, 0
            # The checksum sums the block's bytes: those of its variable fields, plus the
            # constant rest (summing the 512 bytes was half the cost of a header).
            checksum += _FIXED_SUM + sum(name_b) + sum(numbers) + self.type[0] + sum(link_b)
            return b"".join(
                (
                    name_b.ljust(100, b"\0"),
                    numbers,
                    b"%06o\0 " % checksum,
                    self.type,
                    link_b.ljust(100, b"\0"),
                    _USTAR_MAGIC_AND_NAMES,
                    dev,
                    _PREFIX_AND_PAD,
                )
            )
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
    perm = stat.S_IMODE(mode)
    if stat.S_ISDIR(mode):
        return Member(obj.path, DIRTYPE, perm, st.st_uid, st.st_gid, dir_mtime, xattrs=obj.xattrs)
    mtime = dir_mtime if obj.fixed_mtime else int(st.st_mtime)
    if stat.S_ISREG(mode):
        return Member(
            obj.path, REGTYPE, perm, st.st_uid, st.st_gid, mtime, st.st_size,
            xattrs=obj.xattrs, content_hash=obj.content_hash or "", source=obj,
        )
    if stat.S_ISLNK(mode):
        return Member(
            obj.path, SYMTYPE, perm, st.st_uid, st.st_gid, mtime, linkname=obj.linkname or "", xattrs=obj.xattrs
        )
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return Member(
            obj.path, CHRTYPE if stat.S_ISCHR(mode) else BLKTYPE, perm, st.st_uid, st.st_gid, mtime,
            devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev), xattrs=obj.xattrs,
        )
    if stat.S_ISFIFO(mode):
        return Member(obj.path, FIFOTYPE, perm, st.st_uid, st.st_gid, mtime, xattrs=obj.xattrs)
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


class _Stream:
    """The tar stream into a compressor (compress.Blocks), hashing the tar (diff_id) one
    block at a time as the compressor takes it. Driven like a ChunkedEncoder; a plain
    stream needs no member boundaries."""

    def __init__(self, compression: str, level: int, out):
        self.tar_hash = hashlib.sha256()
        self._blocks = compressor(compression, level, out, observe=self._observe)
        self.write = self._blocks.write
        self.space = self._blocks.space
        self.filled = self._blocks.filled

    @property
    def tar_size(self) -> int:
        return self._blocks.size

    @property
    def offset(self) -> int:
        return self._blocks.size

    def _observe(self, block: memoryview) -> None:
        with charge("hash"):
            self.tar_hash.update(block)

    def add_member(self, m: Member, header: bytes) -> None:
        self._blocks.write(header)

    def end_file(self) -> None:
        pass

    def finish(self) -> dict[str, str]:
        self._blocks.finish()
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
    c: _Stream | ChunkedEncoder
    if compression == "zstd:chunked":
        # Here, and only for it: its imports (anycrc, ctypes) cost each writer process 9 ms.
        from .zstd_chunked import ChunkedEncoder

        c = ChunkedEncoder(level, out)
    else:
        c = _Stream(compression, level, out)
    hashes: dict[str, str] = {}
    spent = [0.0, 0.0]  # CPU s reading and hashing files, charged once for the layer
    with FileOpener(rootfs) as opener:
        for m in members:
            c.add_member(m, m.header())
            if m.type == REGTYPE and m.size:
                taken = _copy_file(opener, m, c, spent)
                if taken is not None:
                    hashes[m.name] = taken
                c.end_file()
                pad = -m.size % _BLOCK
                if pad:
                    c.write(_ZEROS[:pad])
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
_ZEROS = bytes(_BLOCK)


def _copy_file(opener: FileOpener, m: Member, c: _Stream | ChunkedEncoder, spent: list[float]) -> str | None:
    """Copy one file's data into the layer, read straight into the stream's free space;
    its content hash if it had none yet. Adds the CPU time of reading and hashing to
    `spent` (read, hash)."""
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
            space = c.space()
            started = thread_time()
            n = os.readv(fd, [space[:remaining]])
            read = thread_time()
            spent[0] += read - started
            if not n:
                raise TreeChangedError(f"/{obj.path} shrank during the build; nothing was written, rerun")
            remaining -= n
            if hasher is not None:
                hasher.update(space[:n])
                spent[1] += thread_time() - read
            c.filled(n)
    finally:
        os.close(fd)
    return hasher.hexdigest() if hasher is not None else None
