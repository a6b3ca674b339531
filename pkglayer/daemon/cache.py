"""The daemon's shared, content-addressed layer cache.

Layout under the state directory::

    cache/blobs/sha256/<hex>     compressed layer blobs (a BlobDir: atomic temp+rename)
    cache/.pkglayer-tmp/         writers' temp files, flock()ed while alive
    cache/index.sqlite           (content key, compression spec) -> digest, diff_id, size,
                                 media type, last use
    cache/locks/<key>.lock       one per key being written (flock), so concurrent builds
                                 of roots holding the same package write its layer once
    cache/gc.lock                builds hold it shared, eviction takes it exclusively

Invariants, also across `kill -9`:
- A blob is visible under its final name only complete and fsynced (BlobWriter).
- An index row is inserted only after its blob is in place, and deleted before its blob
  is unlinked, so a row never names a missing blob. A crash between the two steps leaves
  at most an orphan blob, which `open()` removes; it also drops rows whose blob is
  missing or has the wrong size (someone deleted files by hand) and removes the temp
  files of dead writers.

The key identifies the layer's uncompressed content exactly (see tarwriter.content_key);
with the compression spec ("gzip-6") it decides the compressed bytes, since compression
is deterministic for a pinned library. So a cached blob is valid for any root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..blobstore import BlobDir, shareable
from ..errors import PkglayerError
from ..fsutil import fsync_dir
from ..history import LayerRecord

log = logging.getLogger(__name__)

# 2: the compressor that made each blob (what history.json records of it)
_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    content_key TEXT NOT NULL,
    compression TEXT NOT NULL,
    digest TEXT NOT NULL,
    diff_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    compressor TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (content_key, compression)
)
"""


@dataclass
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    added: int
    evicted: int


class LayerCache:
    """Implements pkglayer.prior.LayerCache. Thread-safe; several processes may share it."""

    def __init__(self, root: str, max_bytes: int):
        self.root = os.path.abspath(root)
        self.max_bytes = max_bytes
        os.makedirs(os.path.join(self.root, "locks"), mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(self.root, "blobs", "sha256"), exist_ok=True)
        self.blobs = BlobDir(self.root)  # dead writers' temp files go in check()
        self._db_lock = threading.Lock()
        self._db = sqlite3.connect(os.path.join(self.root, "index.sqlite"), timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._db:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version != _SCHEMA_VERSION:
                self._db.execute("DROP TABLE IF EXISTS layers")
                self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            self._db.execute(_SCHEMA)
        self.hits = self.misses = self.added = self.evicted = 0
        self._used: dict[tuple[str, str], float] = {}
        self.last_check: dict[str, int] = {}

    def close(self) -> None:
        self._flush_uses()
        with self._db_lock:
            self._db.close()

    def _flush_uses(self) -> None:
        with self._db_lock:
            used, self._used = self._used, {}
            if used:
                with self._db:
                    self._db.executemany(
                        "UPDATE layers SET last_used = max(last_used, ?) WHERE content_key = ? AND compression = ?",
                        [(t, k, c) for (k, c), t in used.items()],
                    )

    # ------------------------------------------------------------ consistency

    def check(self) -> dict[str, int]:
        """Make the index and the blob directory agree (see the module docstring).
        Runs at start-up, under the exclusive gc lock when no build is running."""
        with self._gc_lock(exclusive=True, wait=True):
            temps = len(self.blobs.remove_stale_temps())
            with self._db_lock:
                rows = self._db.execute("SELECT content_key, compression, digest, size FROM layers").fetchall()
            bad = []
            for key, comp, digest, size in rows:
                try:
                    ok = self.blobs.has(digest) and self.blobs.size(digest) == size
                except (PkglayerError, OSError):
                    ok = False
                if not ok:
                    bad.append((key, comp))
            if bad:
                with self._db_lock, self._db:
                    self._db.executemany("DELETE FROM layers WHERE content_key = ? AND compression = ?", bad)
            with self._db_lock:
                known = {d for (d,) in self._db.execute("SELECT digest FROM layers")}
            orphans = 0
            try:
                names = os.listdir(self.blobs.blobs)
            except FileNotFoundError:
                names = []
            for name in names:
                if "sha256:" + name not in known:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.blobs.blobs, name))
                    orphans += 1
            if orphans:
                fsync_dir(self.blobs.blobs)
        self.last_check = {"entries": len(rows) - len(bad), "dropped": len(bad), "orphans": orphans, "temps": temps}
        return self.last_check

    # ------------------------------------------------------ prior.LayerCache

    def lookup(self, content_key: str, compression: str) -> LayerRecord | None:
        with self._db_lock:
            row = self._db.execute(
                "SELECT digest, diff_id, size, media_type, compressor FROM layers"
                " WHERE content_key = ? AND compression = ?",
                (content_key, compression),
            ).fetchone()
            if row is not None:
                # Written in one transaction later (_flush_uses): a commit per hit would
                # cost an fsync per layer. Losing some after a crash only blurs the LRU order.
                self._used[(content_key, compression)] = time.time()
        if row is None or not self.blobs.has(row[0]):
            self.misses += 1
            return None
        self.hits += 1
        digest, diff_id, size, media_type, compressor = row
        return LayerRecord(
            name="cached",
            packages=(),
            content_key=content_key,
            digest=digest,
            diff_id=diff_id,
            size=size,
            media_type=media_type,
            compression=compression,
            compressor=compressor,
        )

    @contextlib.contextmanager
    def claim(self, content_key: str, compression: str) -> Iterator[None]:
        name = hashlib.sha256(f"{content_key} {compression}".encode()).hexdigest()[:32]
        fd = os.open(os.path.join(self.root, "locks", f"{name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a separate open file description per claim: threads exclude too
            yield
        finally:
            os.close(fd)

    def add(self, record: LayerRecord, source: BlobDir) -> None:
        if os.path.realpath(source.root) != self.root:
            _link_in(source, self.blobs, record.digest, record.size)
        now = time.time()
        with self._db_lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.content_key, record.compression, record.digest, record.diff_id, record.size,
                 record.media_type, now, now, record.compressor),
            )
        self.added += 1

    def export(self, digest: str, dest: BlobDir, size: int | None = None) -> None:
        _link_in(self.blobs, dest, digest, size, overwrite=True)

    # ---------------------------------------------------------------- bounds

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Held (shared) for the length of a build: eviction never runs under a build
        that may be about to link a blob it looked up."""
        with self._gc_lock(exclusive=False, wait=True):
            yield

    def evict(self) -> int:
        """Drop least-recently-used layers until the cache fits `max_bytes`. Skipped (0)
        while any build holds a session; the next call catches up."""
        self._flush_uses()
        with self._gc_lock(exclusive=True, wait=False) as got:
            if not got:
                return 0
            with self._db_lock:
                rows = self._db.execute(
                    "SELECT content_key, compression, digest, size FROM layers ORDER BY last_used, created"
                ).fetchall()
            total = sum(r[3] for r in rows)
            gone = 0
            for key, comp, digest, size in rows:
                if total <= self.max_bytes:
                    break
                with self._db_lock, self._db:
                    self._db.execute("DELETE FROM layers WHERE content_key = ? AND compression = ?", (key, comp))
                    still = self._db.execute("SELECT 1 FROM layers WHERE digest = ?", (digest,)).fetchone()
                if not still:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.blobs.path(digest))
                total -= size
                gone += 1
            if gone:
                fsync_dir(self.blobs.blobs)
                log.info("layer cache: evicted %d least recently used layers, %d bytes left", gone, total)
            self.evicted += gone
            return gone

    def stats(self) -> CacheStats:
        with self._db_lock:
            n, size = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM layers").fetchone()
        return CacheStats(n, size, self.max_bytes, self.hits, self.misses, self.added, self.evicted)

    def entries(self) -> list[tuple[str, str, str]]:
        """(content key, compression, digest) of every layer, for tests and `ctl`."""
        with self._db_lock:
            return self._db.execute("SELECT content_key, compression, digest FROM layers ORDER BY 1, 2").fetchall()

    @contextlib.contextmanager
    def _gc_lock(self, exclusive: bool, wait: bool) -> Iterator[bool]:
        fd = os.open(os.path.join(self.root, "gc.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, flags if wait else flags | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _link_in(source: BlobDir, dest: BlobDir, digest: str, size: int | None = None, overwrite: bool = False) -> None:
    """Put a blob this process has just written and hashed into `dest` without hashing
    it again: a hard link, published by rename. Only a file that is `shareable` (ours,
    read-only) is linked: anything else under that name (a file someone swapped into an
    output directory they can write) is copied and verified instead, as is a blob on
    another filesystem. With `overwrite`, a file already under that name (maybe damaged)
    is replaced."""
    if not overwrite and dest.has(digest):
        return
    try:
        st = os.lstat(source.path(digest))
    except FileNotFoundError:
        raise PkglayerError(f"blob {digest} is missing from {source.root}") from None
    if not shareable(st):
        dest.import_blob(source, digest, size)  # copies and verifies
        return
    tmp = os.path.join(dest.tmp, f"link-{os.urandom(16).hex()}.tmp")
    os.makedirs(dest.tmp, exist_ok=True)
    try:
        os.link(source.path(digest), tmp, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
            raise PkglayerError(f"cannot add blob {digest} to the layer cache: {e.strerror}") from e
        dest.import_blob(source, digest, size)  # copies and verifies
        return
    try:
        linked = os.lstat(tmp)
        if (linked.st_dev, linked.st_ino) != (st.st_dev, st.st_ino):  # swapped meanwhile
            os.unlink(tmp)
            dest.import_blob(source, digest, size)
            return
        os.replace(tmp, dest.path(digest))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.blobs)
