"""zstd:chunked layers: a zstd-compressed tar in which every regular file's content is a
zstd frame of its own, followed by a table of contents (TOC) that says where each file's
frame is and what it holds. A client that knows the format (containers-storage, under
podman, buildah, skopeo and CRI-O) reads the TOC, takes the files it already has from its
other layers, and fetches only the frames of the others with HTTP range requests. Every
other client decompresses the blob as the ordinary tar: the TOC, the tar-split and the
footer are zstd skippable frames, which zstd decoders skip.

Blob layout, in order:

  frames         tar headers, padding and the end-of-archive blocks in "metadata"
                 frames; each regular file's content (size > 0) in a frame of its own,
                 whose header carries the content size
  TOC            skippable frame: zstd-compressed JSON {"version":1,"entries":[...],
                 "tarSplitDigest":...}, one entry per tar member in tar order
  tar-split      skippable frame: zstd-compressed tar-split JSON lines (vbatts/tar-split):
                 per member, its raw header bytes (with the previous file's padding in
                 front) and its name, size and CRC-64/ISO; then the trailing zero blocks.
                 Newer clients rebuild the exact tar from it to check the diff_id.
  footer         skippable frame of 64 bytes, little-endian u64s: TOC offset, compressed
                 and uncompressed length, type 1; tar-split offset, compressed and
                 uncompressed length; then the magic "GNUlInUx". No containers-storage
                 version reads it while the annotations are there; other readers do.

Which client reads what (containers-storage sources, read for this module):

- containers-storage 1.43 (podman 4.3.1 and skopeo 1.9.3 in Debian 12): the layer
  annotations `io.containers.zstd-chunked.manifest-checksum` (sha256 of the compressed
  TOC) and `...manifest-position` ("offset:length:uncompressed length:1"). Its TOC parser
  matches the keys "UID", "GID" and "ModTime" case-sensitively, while its own writer (and
  skopeo's) emits "uid", "gid", "modtime": partially pulled files end up owned by root
  with the pull time as mtime. We write both spellings; 1.48 and later lower-case every
  key, so both readers see the same value. It needs no tar-split.
- containers-storage 1.44 and later: the same annotations under
  `io.github.containers.zstd-chunked.`; 1.48 to 1.53 also read the tar-split from
  `...tarsplit-position` ("offset:length:uncompressed length"), checked against
  `...tarsplit-checksum`; 1.54 and later check it against the TOC's "tarSplitDigest"
  and, from 1.57, pull partially only when a tar-split is there (else they download the
  whole layer) and check that the tar rebuilt from it hashes to the config's diff_id.

Entries are written the way containers-storage's own writer would describe the same tar
(names as in the tar header, so directories end in "/"; mode is the tar mode field;
xattr values base64; digest "sha256:<hex>" of the content; empty files have no digest
and no frame); pkglayer does not split files into rolling-checksum chunks.

Determinism: the bytes depend on the tar members and the zstd level only, given the
pinned zstandard (single-threaded, one compressor per stream, content size pledged for
file frames). JSON is written with a fixed key order and no floats or timestamps of the
build; the tar-split JSON has no map either.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import struct
import tarfile
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, BinaryIO

import anycrc
import zstandard

from .errors import PkglayerError, RootfsError
from .mediatypes import NEW_PREFIX, OLD_PREFIX, TARSPLIT_CHECKSUM, TARSPLIT_POSITION, TOC_CHECKSUM, TOC_POSITION
from .timings import charge

if TYPE_CHECKING:
    from .tarwriter import Member

MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"

SKIPPABLE_MAGIC = struct.pack("<I", 0x184D2A50)
FOOTER_MAGIC = b"GNUlInUx"
FOOTER_SIZE = 64
TOC_TYPE_CRFS = 1
# containers-storage refuses a TOC larger than this (compressed or not) and then
# downloads the whole layer: fail the build instead of writing a layer that cannot work.
MAX_TOC = 50 << 20
# Bytes of a file read at a time (space()).
_SCRATCH = 1 << 20

_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_SEGMENT = 2  # tar-split entry types
_FILE = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_crc64 = anycrc.Model("CRC64-GO-ISO")  # hash/crc64 with the ISO table, as tar-split uses


class _JsonStream:
    """Compresses JSON text as it is produced, so only the compressed form is held."""

    def __init__(self, level: int) -> None:
        self._c = zstandard.ZstdCompressor(level=level, threads=0).compressobj()
        self.compressed = bytearray()
        self.size = 0

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        self.size += len(data)
        self.compressed += self._c.compress(data)

    def close(self) -> bytes:
        self.compressed += self._c.flush()
        return bytes(self.compressed)


def _json(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _utf8(text: str, what: str, m: Member) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RootfsError(
            f"/{m.name.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')}: {what} is not "
            "UTF-8, which a zstd:chunked table of contents cannot hold; use --compression zstd"
        ) from None
    return text


@functools.lru_cache(maxsize=4096)  # a layer's files share few mtimes
def _rfc3339(mtime: int) -> str | None:
    try:
        return (_EPOCH + timedelta(seconds=mtime)).strftime("%Y-%m-%dT%H:%M:%SZ")
    except OverflowError:
        return None


def _toc_entry(m: Member) -> dict[str, object]:
    """The TOC entry of a tar member, without the location of its content."""
    name = m.name + "/" if m.type == tarfile.DIRTYPE else m.name
    entry: dict[str, object] = {"type": _TYPES[m.type], "name": _utf8(name, "file name", m)}
    if m.linkname:
        entry["linkName"] = _utf8(m.linkname, "link target", m)
    if m.mode:
        entry["mode"] = m.mode
    if m.type == tarfile.REGTYPE and m.size:
        entry["size"] = m.size
    mtime = _rfc3339(m.mtime)
    if mtime is None:
        raise RootfsError(f"/{m.name}: mtime {m.mtime} is outside the years 1-9999")
    # Lower case for the current spelling, capitalised for containers-storage 1.43.
    for lower, upper, value in (("uid", "UID", m.uid), ("gid", "GID", m.gid), ("modtime", "ModTime", mtime)):
        if value:
            entry[lower] = entry[upper] = value
    if m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        if m.devmajor:
            entry["devMajor"] = m.devmajor
        if m.devminor:
            entry["devMinor"] = m.devminor
    if m.xattrs:
        entry["xattrs"] = {
            _utf8(k, "xattr name", m): base64.b64encode(v).decode("ascii") for k, v in sorted(m.xattrs)
        }
    return entry


class ChunkedEncoder:
    """Writes one zstd:chunked layer to `out` from the tar stream, driven member by member:

        add_member(m, header)      each member's header block(s), in tar order
        write_data(chunk) ...      a regular file's content (size > 0), or in place:
                                   space(), read into it, filled(n); then
        end_file()
        write(padding)             any other tar bytes: padding, end-of-archive blocks
        finish() -> annotations

    Memory use does not grow with file sizes; the compressed TOC and tar-split grow with
    the number of members. `tar_hash` and `tar_size` describe the uncompressed tar.
    """

    def __init__(self, level: int, out: BinaryIO) -> None:
        self._out = out
        self._pos = 0  # bytes written to out
        self._cctx = zstandard.ZstdCompressor(level=level, threads=0)
        self._frame = None  # the open zstd frame's compressobj
        self.tar_hash = hashlib.sha256()
        self.tar_size = 0
        self._toc = _JsonStream(level)
        self._toc.add('{"version":1,"entries":[')
        self._first_entry = True
        self._split = _JsonStream(level)
        self._split_position = 0
        self._pending = bytearray()  # tar bytes since the last header: the next segment's start
        self._file: dict[str, object] | None = None  # TOC entry of the file being written
        self._file_left = 0
        self._file_hash = hashlib.sha256()
        self._file_crc = 0
        self._file_start = 0
        self._scratch: memoryview | None = None  # space() for file data, taken at the first file

    @property
    def offset(self) -> int:
        """Uncompressed tar bytes so far."""
        return self.tar_size

    # -- tar stream

    def add_member(self, m: Member, header: bytes) -> None:
        if self._file is not None:
            raise ValueError(f"add_member before end_file of {self._file['name']}")
        entry = _toc_entry(m)
        self._split_segment(bytes(self._pending) + header)
        self._pending.clear()
        self._tar(header)
        self._compress(header)
        if m.type == tarfile.REGTYPE and m.size:
            self._end_frame()
            self._file = entry
            self._file_left = m.size
            self._file_hash = hashlib.sha256()
            self._file_crc = 0
            self._file_start = self._pos
            self._frame = self._cctx.compressobj(size=m.size)
        else:
            self._toc_add(entry)
            self._split_file(entry["name"])

    def write_data(self, chunk) -> None:
        if self._file is None:
            raise ValueError("write_data outside a regular file")
        if len(chunk) > self._file_left:
            raise ValueError(f"{self._file['name']}: more data than its size")
        self._file_left -= len(chunk)
        self._file_hash.update(chunk)
        self._file_crc = _crc64.calc(chunk, self._file_crc)
        self._tar(chunk)
        self._compress(chunk)

    def space(self) -> memoryview:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_SCRATCH))
        return self._scratch

    def filled(self, n: int) -> None:
        assert self._scratch is not None
        self.write_data(self._scratch[:n])

    def end_file(self) -> None:
        entry = self._file
        if entry is None or self._file_left:
            raise ValueError("end_file without a complete regular file")
        self._end_frame()
        entry["digest"] = "sha256:" + self._file_hash.hexdigest()
        entry["offset"] = self._file_start
        entry["endOffset"] = self._pos
        self._toc_add(entry)
        self._split_file(entry["name"], entry["size"], self._file_crc)
        self._file = None

    def write(self, data) -> None:
        if self._file is not None:
            raise ValueError("tar bytes inside a regular file's content")
        self._pending += data
        self._tar(data)
        self._compress(data)

    def finish(self) -> dict[str, str]:
        """Close the tar stream, append TOC, tar-split and footer; return the annotations."""
        if self._file is not None:
            raise ValueError("finish inside a regular file")
        if self._pending:
            self._split_segment(bytes(self._pending))
            self._pending.clear()
        self._end_frame()
        split = self._split.close()
        split_digest = "sha256:" + hashlib.sha256(split).hexdigest()
        self._toc.add(f'],"tarSplitDigest":"{split_digest}"}}')
        toc = self._toc.close()
        if max(len(toc), self._toc.size) > MAX_TOC:
            raise PkglayerError(
                f"zstd:chunked table of contents of {self._toc.size} bytes is larger than clients accept "
                f"({MAX_TOC}); split the layer or use --compression zstd"
            )
        toc_offset = self._skippable(toc)
        split_offset = self._skippable(split)
        self._skippable(
            struct.pack(
                "<7Q8s", toc_offset, len(toc), self._toc.size, TOC_TYPE_CRFS,
                split_offset, len(split), self._split.size, FOOTER_MAGIC,
            )
        )
        toc_digest = "sha256:" + hashlib.sha256(toc).hexdigest()
        toc_position = f"{toc_offset}:{len(toc)}:{self._toc.size}:{TOC_TYPE_CRFS}"
        return {
            OLD_PREFIX + TOC_CHECKSUM: toc_digest,
            OLD_PREFIX + TOC_POSITION: toc_position,
            NEW_PREFIX + TOC_CHECKSUM: toc_digest,
            NEW_PREFIX + TOC_POSITION: toc_position,
            NEW_PREFIX + TARSPLIT_CHECKSUM: split_digest,
            NEW_PREFIX + TARSPLIT_POSITION: f"{split_offset}:{len(split)}:{self._split.size}",
        }

    # -- internals

    def _tar(self, data) -> None:
        self.tar_hash.update(data)
        self.tar_size += len(data)

    def _compress(self, data) -> None:
        if self._frame is None:
            self._frame = self._cctx.compressobj()
        with charge("compress"):
            out = self._frame.compress(data)
        self._emit(out)

    def _end_frame(self) -> None:
        if self._frame is not None:
            with charge("compress"):
                out = self._frame.flush()
            self._emit(out)
            self._frame = None

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self._pos += len(data)

    def _skippable(self, payload: bytes) -> int:
        """Write a skippable frame; returns the offset of its payload."""
        self._emit(SKIPPABLE_MAGIC + struct.pack("<I", len(payload)))
        offset = self._pos
        self._emit(payload)
        return offset

    def _toc_add(self, entry: dict[str, object]) -> None:
        self._toc.add(_json(entry) if self._first_entry else "," + _json(entry))
        self._first_entry = False

    def _split_segment(self, payload: bytes) -> None:
        self._split_add(f'{{"type":{_SEGMENT},"payload":"{base64.b64encode(payload).decode("ascii")}"')

    def _split_file(self, name: str, size: int = 0, crc: int | None = None) -> None:
        # Fields in the order of tar-split's JSON packer; size only when set, payload
        # (the CRC, base64) null for entries without content.
        text = f'{{"type":{_FILE},"name":{_json(name)}'
        if size:
            text += f',"size":{size},"payload":"{base64.b64encode(crc.to_bytes(8, "big")).decode("ascii")}"'
        else:
            text += ',"payload":null'
        self._split_add(text)

    def _split_add(self, text: str) -> None:
        self._split.add(f'{text},"position":{self._split_position}}}\n')
        self._split_position += 1


def read_annotations(f: BinaryIO, size: int) -> dict[str, str]:
    """The annotations of a zstd:chunked blob `f` of `size` bytes, found from its footer;
    PkglayerError when the blob is not one. For layers reused without their records."""
    if size < FOOTER_SIZE + 8:
        raise PkglayerError("blob too small for a zstd:chunked footer")
    f.seek(size - FOOTER_SIZE - 8)
    frame = f.read(FOOTER_SIZE + 8)
    if frame[:8] != SKIPPABLE_MAGIC + struct.pack("<I", FOOTER_SIZE):
        raise PkglayerError("no zstd:chunked footer at the end of the blob")
    toc_offset, toc_len, toc_size, kind, split_offset, split_len, split_size, magic = struct.unpack(
        "<7Q8s", frame[8:]
    )
    if magic != FOOTER_MAGIC or kind != TOC_TYPE_CRFS:
        raise PkglayerError("unknown zstd:chunked footer")
    digests = []
    for offset, length in ((toc_offset, toc_len), (split_offset, split_len)):
        if offset + length > size - FOOTER_SIZE - 8:
            raise PkglayerError("zstd:chunked footer points past the blob")
        f.seek(offset)
        digests.append("sha256:" + hashlib.sha256(f.read(length)).hexdigest())
    toc_position = f"{toc_offset}:{toc_len}:{toc_size}:{TOC_TYPE_CRFS}"
    return {
        OLD_PREFIX + TOC_CHECKSUM: digests[0],
        OLD_PREFIX + TOC_POSITION: toc_position,
        NEW_PREFIX + TOC_CHECKSUM: digests[0],
        NEW_PREFIX + TOC_POSITION: toc_position,
        NEW_PREFIX + TARSPLIT_CHECKSUM: digests[1],
        NEW_PREFIX + TARSPLIT_POSITION: f"{split_offset}:{split_len}:{split_size}",
    }
