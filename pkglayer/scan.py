"""The single walk over a rootfs: every object once, never following a symlink, with the
digests later stages need.

Which digests a file needs is the caller's decision (`algos_for`): the package
database's own algorithm for package files, so edits can be told apart from pristine
files, and the content hash of layer keys when earlier layers may be reused. Hashing
runs on worker threads while the walk goes on; a digest cache (hashcache.py) spares
files unchanged since they were last hashed.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from wcmatch import glob

from .digests import CONTENT_HASH, new_hasher
from .errors import RootfsError
from .hashcache import HashCache
from .rootfs import FileOpener, Rootfs

_READ_CHUNK = 1024 * 1024

#: progress(phase, done, total): called as long work advances (scan, hashing, layers)
Progress = Callable[[str, int, int], None]


@dataclass
class FsObject:
    """One object of the rootfs, with what a layer needs to reproduce it."""

    path: str
    st: os.stat_result
    home: str = "unowned"  # set by ownership.assign_homes
    linkname: str | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    content_hash: str | None = None  # CONTENT_HASH of a regular file's data, when the scan took it


@dataclass
class Scan:
    objects: dict[str, FsObject]  # by rootfs-relative path, in walk order (parents first)
    digests: dict[str, dict[str, str]]  # path -> {algorithm: hex digest}, for the files hashed
    excluded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    hashed_at: float = 0.0  # when hashing started: files changed after it are not cached


def glob_regex(patterns: Iterable[str], flags: int) -> re.Pattern[str]:
    """All patterns as one regex: one match per path instead of one per pattern."""
    included, _ = glob.translate(list(patterns), flags=flags)
    return re.compile("|".join(f"(?:{p})" for p in included) or "(?!)")


def walk(
    rootfs: Rootfs,
    algos_for: Callable[[str], Iterable[str]],
    excludes: Iterable[str],
    drop_xattrs: Iterable[str],
    one_file_system: bool = True,
    jobs: int = 1,
    cache: HashCache | None = None,
    progress: Progress | None = None,
) -> Scan:
    """Every object of the rootfs but the excluded ones; regular files hashed with the
    algorithms `algos_for(path)` names."""
    excluded_matcher = glob_regex(excludes, glob.GLOBSTAR | glob.DOTGLOB)
    drop_matcher = glob_regex(drop_xattrs, glob.DOTGLOB)
    excluded: list[str] = []
    skipped: list[tuple[str, str]] = []

    def prune(path: str, is_dir: bool) -> bool:
        if excluded_matcher.fullmatch(path):
            excluded.append(path)
            return True
        return False

    hasher = _Hasher(rootfs, cache or HashCache(None), jobs)
    objects: dict[str, FsObject] = {}
    try:
        for entry in rootfs.walk(prune=prune, one_file_system=one_file_system):
            mode = entry.st.st_mode
            if stat.S_ISSOCK(mode):
                skipped.append((entry.path, "socket (tar cannot store sockets)"))
                continue
            if stat.S_ISDIR(mode) and one_file_system and entry.st.st_dev != rootfs.dev:
                skipped.append((entry.path, "mount point: contents on another filesystem not included"))
            obj = FsObject(entry.path, entry.st)
            if stat.S_ISLNK(mode):
                obj.linkname = rootfs.readlink(entry.path)
            elif stat.S_ISREG(mode):
                algos = tuple(sorted(set(algos_for(entry.path))))
                if algos:
                    hasher.add(obj, algos)
            xattrs = rootfs.getxattrs(entry.path)
            if xattrs:
                obj.xattrs = tuple(sorted((k, v) for k, v in xattrs.items() if not drop_matcher.fullmatch(k)))
            objects[entry.path] = obj
    except BaseException:
        hasher.abandon()
        raise
    digests = hasher.results(progress)
    for path, found in digests.items():
        objects[path].content_hash = found.get(CONTENT_HASH)
    return Scan(objects, digests, sorted(excluded), sorted(skipped), hasher.started)


def _hash_chunk(rootfs: Rootfs, chunk: list[tuple[FsObject, tuple[str, ...]]]) -> list[dict[str, str]]:
    out = []
    buf = memoryview(bytearray(_READ_CHUNK))  # reused: no allocation per read
    with FileOpener(rootfs) as opener:
        for obj, algos in chunk:
            hashers = [new_hasher(a) for a in algos]
            try:
                fd, st = opener.open_fd(obj.path)
            except FileNotFoundError:
                raise RootfsError(f"/{obj.path} disappeared while being read") from None
            try:
                if (st.st_ino, st.st_size) != (obj.st.st_ino, obj.st.st_size):
                    raise RootfsError(f"/{obj.path} changed while being read")
                remaining = st.st_size
                while remaining:
                    n = os.readv(fd, [buf[: min(remaining, _READ_CHUNK)]])
                    if not n:
                        raise RootfsError(f"/{obj.path} shrank while being read")
                    remaining -= n
                    for h in hashers:
                        h.update(buf[:n])
            finally:
                os.close(fd)
            out.append({a: h.hexdigest() for a, h in zip(algos, hashers)})
    return out


class _Hasher:
    """Hashes files on worker threads while the walk goes on finding more.

    Files are handed over in runs of `_CHUNK` in walk order: neighbours share directories
    (see FileOpener), and many small runs keep every worker busy to the end.
    """

    _CHUNK = 128

    def __init__(self, rootfs: Rootfs, cache: HashCache, jobs: int):
        self.rootfs = rootfs
        self.cache = cache
        self.pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        self.pending: list[tuple[FsObject, tuple[str, ...]]] = []
        self.running: list[tuple[list[tuple[FsObject, tuple[str, ...]]], Future[list[dict[str, str]]]]] = []
        self.digests_of: dict[str, dict[str, str]] = {}
        self.started = time.time()

    def add(self, obj: FsObject, algos: tuple[str, ...]) -> None:
        cached = self.cache.get(obj.st, algos)
        if cached is not None:
            self.digests_of[obj.path] = cached
            return
        self.pending.append((obj, algos))
        if len(self.pending) >= self._CHUNK:
            self._submit()

    def _submit(self) -> None:
        chunk, self.pending = self.pending, []
        self.running.append((chunk, self.pool.submit(_hash_chunk, self.rootfs, chunk)))

    def abandon(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def results(self, progress: Progress | None = None) -> dict[str, dict[str, str]]:
        if self.pending:
            self._submit()
        total = sum(len(chunk) for chunk, _ in self.running)
        done = 0
        try:
            for chunk, fut in self.running:
                for (obj, _), digests in zip(chunk, fut.result()):
                    self.digests_of[obj.path] = digests
                    self.cache.put(obj.st, digests, self.started)
                done += len(chunk)
                if progress:
                    progress("hashing", done, total)
        finally:
            self.pool.shutdown(cancel_futures=True)
        return self.digests_of
