"""A cache of file digests keyed by what a write would change, the way git's index is.

An entry is used only while the file's device, inode, size, mtime and ctime are all
unchanged. ctime cannot be set from user space, so an edit in place that restores size
and mtime still misses the cache. Files whose ctime is less than `_RACY_SECONDS` older
than the moment they were hashed are not cached: a write in the same clock tick would
not change ctime ("racy git").
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import closing

log = logging.getLogger(__name__)

_RACY_SECONDS = 2
# Lookups answered by a query each before a tree's entries are read at once: a rebuild
# after a package install looks up the few files that changed, out of many thousands.
_POINT_LOOKUPS = 256
_FORGET_AFTER_DAYS = 30
# Rows are grouped by tree (the rootfs path) so a build loads only its own tree's.
_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS digests (
    tree TEXT NOT NULL, ino INTEGER NOT NULL, algo TEXT NOT NULL, dev INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    digest TEXT NOT NULL, seen INTEGER NOT NULL,
    PRIMARY KEY (tree, ino, algo)
) WITHOUT ROWID
"""

Stamp = tuple[int, int, int, int]  # dev, size, mtime_ns, ctime_ns


class HashCache:
    def __init__(self, path: str | None):
        """path None: a cache that remembers nothing (--no-hash-cache)."""
        self.path = path
        self._entries: dict[tuple[int, str], tuple[Stamp, str]] = {}
        self._new: list[tuple[int, str, Stamp, str]] = []
        self._tree = ""
        self._loaded = True
        self._load_lock = threading.Lock()  # blob records are looked up from several threads
        self._lookups = 0
        self._db: sqlite3.Connection | None = None  # for lookups one by one
        self.hits = 0

    def load(self, tree: str) -> None:
        """Use the entries of one tree, read when first asked for (a rebuild that finds
        every file in its kept scan asks for none): the first _POINT_LOOKUPS one by one,
        then all at once. A cache that can't be read is ignored: it only ever saves work."""
        self._tree = tree
        self._loaded = False

    def _load(self) -> None:
        with self._load_lock:
            if not self._loaded:
                self._read(self._tree)
                self._loaded = True

    def _read(self, tree: str) -> None:
        if not self.path or not os.path.exists(self.path):
            return
        try:
            with closing(_connect(self.path)) as db:
                if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                    return
                rows = db.execute(
                    "SELECT ino, algo, dev, size, mtime_ns, ctime_ns, digest FROM digests WHERE tree = ?",
                    (tree,),
                ).fetchall()
        except sqlite3.Error as e:
            log.warning("ignoring unreadable hash cache %s: %s", self.path, e)
            return
        self._entries = {(ino, algo): ((dev, size, m, c), digest) for ino, algo, dev, size, m, c, digest in rows}

    def get(self, st: os.stat_result, algos: Iterable[str]) -> dict[str, str] | None:
        if not self._loaded:
            if self._lookups < _POINT_LOOKUPS:
                return self._get_one(st, algos)
            self._load()
        stamp = (st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        found = {}
        for algo in algos:
            entry = self._entries.get((st.st_ino, algo))
            if entry is None or entry[0] != stamp:
                return None
            found[algo] = entry[1]
        self.hits += 1
        return found

    def _get_one(self, st: os.stat_result, algos: Iterable[str]) -> dict[str, str] | None:
        """`get` by a query of its own (the few files of a rebuild that changed)."""
        with self._load_lock:
            self._lookups += 1
            try:
                if self._db is None:
                    if not self.path or not os.path.exists(self.path):
                        return None
                    self._db = _connect(self.path, check_same_thread=False)
                    if self._db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                        return None
                rows = self._db.execute(
                    "SELECT algo, dev, size, mtime_ns, ctime_ns, digest FROM digests WHERE tree = ? AND ino = ?",
                    (self._tree, st.st_ino),
                ).fetchall()
            except sqlite3.Error as e:
                log.warning("ignoring unreadable hash cache %s: %s", self.path, e)
                return None
        stamp = (st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = {algo: digest for algo, dev, size, m, c, digest in rows if (dev, size, m, c) == stamp}
        if not all(a in known for a in algos):
            return None
        self.hits += 1
        return {a: known[a] for a in algos}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def put(self, st: os.stat_result, digests: dict[str, str], hashed_at: float) -> None:
        if not self.path or st.st_ctime_ns >= (hashed_at - _RACY_SECONDS) * 1e9:
            return
        stamp = (st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        for algo, digest in digests.items():
            if self._entries.get((st.st_ino, algo)) != (stamp, digest):
                self._new.append((st.st_ino, algo, stamp, digest))

    def save(self) -> None:
        self.close()
        if not self.path or not self._new:
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            now = int(time.time())
            with closing(_connect(self.path)) as db, db:
                if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                    db.execute("DROP TABLE IF EXISTS digests")
                    db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                db.execute(_SCHEMA)
                # Forgetting old entries must not read every tree's (once per prebuild).
                db.execute("CREATE INDEX IF NOT EXISTS digests_seen ON digests (seen)")
                db.executemany(
                    "INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(self._tree, ino, algo, *stamp, digest, now) for ino, algo, stamp, digest in self._new],
                )
                db.execute("DELETE FROM digests WHERE seen < ?", (now - _FORGET_AFTER_DAYS * 86400,))
        except (OSError, sqlite3.Error) as e:
            log.warning("could not update hash cache %s: %s", self.path, e)
        self._new.clear()


class TreeRecords:
    """The HashCaches of several trees in one cache file, each read when first used and
    saved together; for blob directories, each its own tree (by real path), where a
    blob's checked digest is remembered like a file's."""

    def __init__(self, path: str | None):
        self.path = path
        self._trees: dict[str, HashCache] = {}
        self._real: dict[str, str] = {}  # root as given -> real path (one build asks per blob)
        self._lock = threading.Lock()

    def of(self, root: str) -> HashCache | None:
        """The record of the tree at `root`; None when nothing is remembered (no cache)."""
        if not self.path:
            return None
        tree = self._real.get(root)
        if tree is None:
            tree = self._real[root] = os.path.realpath(root)
        with self._lock:
            cache = self._trees.get(tree)
            if cache is None:
                cache = self._trees[tree] = HashCache(self.path)
                cache.load(tree)
            return cache

    def save(self) -> None:
        with self._lock:
            trees = list(self._trees.values())
        for cache in trees:
            cache.save()


def _connect(path: str, check_same_thread: bool = True) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, check_same_thread=check_same_thread)
    db.execute("PRAGMA journal_mode=WAL")
    # A commit need not wait for the disk: what a crash loses is only digests to take
    # again (WAL keeps the file consistent), and the daemon commits after every prebuild.
    db.execute("PRAGMA synchronous=NORMAL")
    return db
