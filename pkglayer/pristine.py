"""Recognise a prior layer that is the pristine form of a package whose files were edited.

When a file of package P was changed after installation (an edited conffile), P's layer
must stay the one a pristine install gives, and the edited file goes to the "modified"
layer above it. The pristine bytes of the edited file are not on disk any more, but a
previous build's layer of the same package may hold them. That layer is accepted only
after reading it through: every other member must be exactly what this build would
write, each edited path must hold content matching the package database's digest, and
the whole tar must hash to the recorded diff_id.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tarfile

import zstandard

from .blobstore import BlobDir
from .digests import CONTENT_HASH, new_hasher
from .history import LayerRecord
from .ownership import FsObject
from .sources import FileRecord
from .tarwriter import Member

log = logging.getLogger(__name__)


class _HashingReader:
    def __init__(self, raw):
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(1024 * 1024):
            pass


def _prior_member(ti: tarfile.TarInfo, content_hash: str) -> Member:
    xattrs = tuple(
        sorted(
            (k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
            for k, v in ti.pax_headers.items()
            if k.startswith("SCHILY.xattr.")
        )
    )
    return Member(
        name=ti.name,
        type=ti.type,
        mode=ti.mode,
        uid=ti.uid,
        gid=ti.gid,
        mtime=int(ti.mtime),
        size=ti.size if ti.type == tarfile.REGTYPE else 0,
        linkname=ti.linkname,
        devmajor=ti.devmajor if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) else 0,
        devminor=ti.devminor if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) else 0,
        xattrs=xattrs,
        content_hash=content_hash,
    )


def _pristine(ti: tarfile.TarInfo, digests: dict[str, str], rec: FileRecord) -> bool:
    if ti.type != tarfile.REGTYPE:
        return False
    if rec.digest and rec.digest_algo and digests.get(rec.digest_algo) != rec.digest.lower():
        return False
    if rec.mode is not None and (rec.mode & 0o7777) != ti.mode:
        return False
    return rec.mtime is None or rec.mtime == int(ti.mtime)


def is_pristine_layer(
    blobs: BlobDir,
    record: LayerRecord,
    expected: list[Member],
    edited: dict[str, tuple[FsObject, FileRecord]],
) -> bool:
    """True when the prior blob is `expected` with pristine content at the edited paths."""
    algos = {CONTENT_HASH} | {rec.digest_algo for _, rec in edited.values() if rec.digest_algo}
    try:
        fd = os.open(blobs.path(record.digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        if record.media_type.endswith("+gzip"):
            raw = gzip.GzipFile(fileobj=f, mode="rb")
        elif record.media_type.endswith("+zstd"):
            raw = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        else:
            raw = f
        stream = _HashingReader(raw)
        try:
            with tarfile.open(
                fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as tf:
                want = iter(expected)
                for ti in tf:
                    exp = next(want, None)
                    if exp is None or exp.name != ti.name:
                        return False
                    digests: dict[str, str] = {}
                    if ti.type == tarfile.REGTYPE:
                        hashers = {a: new_hasher(a) for a in algos}
                        data = tf.extractfile(ti)
                        assert data is not None
                        while chunk := data.read(1024 * 1024):
                            for h in hashers.values():
                                h.update(chunk)
                        digests = {a: h.hexdigest() for a, h in hashers.items()}
                    if ti.name in edited:
                        if not _pristine(ti, digests, edited[ti.name][1]):
                            return False
                    elif _prior_member(ti, digests.get(CONTENT_HASH, "")).key_line() != exp.key_line():
                        return False
                if next(want, None) is not None:
                    return False
            stream.drain()
        except (OSError, EOFError, tarfile.TarError, zstandard.ZstdError) as e:
            log.warning("prior layer %s (%s) is unreadable: %s", record.name, record.digest, e)
            return False
    return "sha256:" + stream.hash.hexdigest() == record.diff_id
