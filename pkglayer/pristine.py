"""Reading an earlier build's layer blob through: to recognise the pristine form of a
package whose files were edited, and to check that a reused blob holds the layer its
history says (`--verify-reused`).

When a file of package P was changed after installation (an edited conffile), P's layer
must stay the one a pristine install gives, and the edited file goes to the "modified"
layer above it. The pristine bytes of the edited file are not on disk any more, but a
previous build's layer of the same package may hold them. That layer is accepted only
after reading it through: every other member must be exactly what this build would
write, each edited path must hold content matching the package database's digest, and
the whole tar must hash to the recorded diff_id.

The blobs are untrusted (input/ may come from anywhere): the tar is read with
tarread's bounds, and a member is compared by its header (name, size) before its data
is read.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tarfile
from collections.abc import Iterator

from .blobstore import BlobDir
from .digests import CONTENT_HASH, new_hasher
from .history import LayerRecord
from .layout import DEFAULT_LIMITS
from .scan import FsObject
from .sources import FileRecord
from .tarread import Checked, TarReadError, check_member, open_stream
from .tarwriter import Member, content_key

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


def _prior_member(ti: tarfile.TarInfo, checked: Checked, content_hash: str) -> Member:
    return Member(
        name=ti.name,
        type=ti.type,
        mode=ti.mode,
        uid=ti.uid,
        gid=ti.gid,
        mtime=checked.mtime_ns // 1_000_000_000,
        size=ti.size if ti.type == tarfile.REGTYPE else 0,
        linkname=ti.linkname,
        devmajor=ti.devmajor if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) else 0,
        devminor=ti.devminor if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) else 0,
        xattrs=tuple(sorted(checked.xattrs)),
        content_hash=content_hash,
    )


def _pristine(ti: tarfile.TarInfo, checked: Checked, digests: dict[str, str], rec: FileRecord) -> bool:
    if ti.type != tarfile.REGTYPE:
        return False
    if rec.digest and rec.digest_algo and digests.get(rec.digest_algo) != rec.digest.lower():
        return False
    if rec.mode is not None and (rec.mode & 0o7777) != ti.mode:
        return False
    return rec.mtime is None or rec.mtime == checked.mtime_ns // 1_000_000_000


class _Unreadable(Exception):
    pass


def _digests(tf: tarfile.TarFile, ti: tarfile.TarInfo, algos) -> dict[str, str]:
    """The member's data hashed; a blob cut short or corrupt there is _Unreadable."""
    import zstandard  # here and in _members: it loads platform too, ~5 ms of every start

    hashers = {a: new_hasher(a) for a in algos}
    data = tf.extractfile(ti)
    assert data is not None
    try:
        while chunk := data.read(1024 * 1024):
            for h in hashers.values():
                h.update(chunk)
    except (OSError, EOFError, tarfile.TarError, zstandard.ZstdError) as e:
        raise _Unreadable(str(e)) from None
    return {a: h.hexdigest() for a, h in hashers.items()}


def _members(blobs: BlobDir, record: LayerRecord, stream: list) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The members of the record's blob, its uncompressed hash kept in `stream[0]`
    (complete once the iteration ends). Raises _Unreadable."""
    import zstandard

    try:
        fd = os.open(blobs.path(record.digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise _Unreadable(e.strerror) from None
    with os.fdopen(fd, "rb") as f:
        if record.media_type.endswith("+gzip"):
            raw = gzip.GzipFile(fileobj=f, mode="rb")
        elif record.media_type.endswith("+zstd"):
            # zstd:chunked blobs are many frames (and skippable ones, which libzstd skips)
            raw = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        else:
            raw = f
        reader = _HashingReader(raw)
        stream.append(reader)
        try:
            with open_stream(reader) as tf:
                for ti in tf:
                    yield tf, ti
            reader.drain()
        except (OSError, EOFError, tarfile.TarError, zstandard.ZstdError, TarReadError) as e:
            raise _Unreadable(str(e)) from None


def is_pristine_layer(
    blobs: BlobDir,
    record: LayerRecord,
    expected: list[Member],
    edited: dict[str, tuple[FsObject, FileRecord]],
) -> bool:
    """True when the prior blob is `expected` with pristine content at the edited paths."""
    algos = {CONTENT_HASH} | {rec.digest_algo for _, rec in edited.values() if rec.digest_algo}
    want = iter(expected)
    stream: list[_HashingReader] = []
    try:
        for tf, ti in _members(blobs, record, stream):
            exp = next(want, None)
            if exp is None or exp.name != ti.name:
                return False
            # The header first: a member of another size is not read at all.
            if ti.name not in edited and (ti.type != exp.type or ti.size != exp.size):
                return False
            checked = check_member(ti, exp.size if ti.name not in edited else DEFAULT_LIMITS.image_bytes)
            digests = _digests(tf, ti, algos) if ti.type == tarfile.REGTYPE else {}
            if ti.name in edited:
                if not _pristine(ti, checked, digests, edited[ti.name][1]):
                    return False
            elif _prior_member(ti, checked, digests.get(CONTENT_HASH, "")).key_line() != exp.key_line():
                return False
    except (_Unreadable, TarReadError) as e:
        log.warning("prior layer %s (%s) is unreadable: %s", record.name, record.digest, e)
        return False
    if next(want, None) is not None:
        return False
    return "sha256:" + stream[0].hash.hexdigest() == record.diff_id


def blob_identity(blobs: BlobDir, record: LayerRecord) -> tuple[str, str] | None:
    """(content key, diff_id) of the layer the record's blob really holds, read through
    once; None when it is no readable layer."""
    members = []
    stream: list[_HashingReader] = []
    budget = DEFAULT_LIMITS.image_bytes  # the bound on an image's uncompressed size
    try:
        for tf, ti in _members(blobs, record, stream):
            checked = check_member(ti, budget)
            budget -= ti.size if ti.isreg() else 0
            digests = _digests(tf, ti, (CONTENT_HASH,)) if ti.type == tarfile.REGTYPE else {}
            members.append(_prior_member(ti, checked, digests.get(CONTENT_HASH, "")))
    except (_Unreadable, TarReadError) as e:
        log.warning("layer %s (%s) is unreadable: %s", record.name, record.digest, e)
        return None
    key = content_key(members)
    return (key, "sha256:" + stream[0].hash.hexdigest()) if key else None
