"""Give every object of the rootfs exactly one home.

A home is a package key, or one of the special homes: files owned by no package, files a
package installed but that were changed since, and the package database itself. The
rootfs is walked once, never following a symlink. Package files are hashed with the
database's own digest so that edited files can be told apart from pristine ones.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from wcmatch import glob

from .digests import CONTENT_HASH, new_hasher
from .errors import RootfsError
from .hashcache import HashCache
from .rootfs import FileOpener, Rootfs
from .sources import FileRecord, Package, PackageSource

log = logging.getLogger(__name__)

HOME_UNOWNED = "unowned"
HOME_MODIFIED = "modified"
HOME_PKGDB = "pkgdb"
# Bottom to top: the database changes on every package transaction, so it goes last.
SPECIAL_HOMES = (HOME_UNOWNED, HOME_MODIFIED, HOME_PKGDB)

_READ_CHUNK = 1024 * 1024

#: progress(phase, done, total), as in pkglayer.build
Progress = Callable[[str, int, int], None]


@dataclass
class FsObject:
    """One object of the rootfs, with what a layer needs to reproduce it."""

    path: str
    st: os.stat_result
    home: str = HOME_UNOWNED
    linkname: str | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    content_hash: str | None = None  # CONTENT_HASH of a regular file's data


@dataclass
class Ownership:
    rootfs: Rootfs
    source_format: str | None
    architecture: str | None
    packages: dict[str, Package]
    objects: dict[str, FsObject]
    homes: dict[str, list[FsObject]]
    excluded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    # package key -> its files that were changed since installation, with what the
    # database recorded for them (used to recognise a prior pristine layer)
    modified_by_package: dict[str, list[tuple[FsObject, FileRecord]]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    shared: dict[str, list[str]] = field(default_factory=dict)

    def home_bytes(self, home: str) -> int:
        return sum(o.st.st_size for o in self.homes.get(home, ()) if stat.S_ISREG(o.st.st_mode))

    @property
    def unowned(self) -> list[str]:
        return [o.path for o in self.homes.get(HOME_UNOWNED, ())]


def _rel(path: str) -> str:
    return path.lstrip("/")


def _owner_map(
    rootfs: Rootfs, packages: list[Package]
) -> tuple[dict[str, tuple[Package, FileRecord]], dict[str, list[str]]]:
    """Map real rootfs paths to (package, record).

    Listed paths are resolved through the rootfs's own directory symlinks, because
    merged-/usr systems list /lib/... while the file lives in /usr/lib/... A path listed
    by several packages goes to the first by (name, arch): stable across upgrades.
    """
    owners: dict[str, tuple[Package, FileRecord]] = {}
    shared: dict[str, list[str]] = {}
    for pkg in sorted(packages, key=lambda p: (p.name, p.arch, p.key)):
        for rec in pkg.files:
            rel = _rel(rec.path)
            if not rel:
                continue
            real = rootfs.resolve(rel, follow_final=False)
            first = owners.get(real)
            if first is None:
                owners[real] = (pkg, rec)
            elif first[0] is not pkg and not (rec.mode is not None and stat.S_ISDIR(rec.mode)):
                shared.setdefault(real, [first[0].key]).append(pkg.key)
    return owners, shared


def _is_modified(obj: FsObject, rec: FileRecord, digests: dict[str, str]) -> bool:
    st = obj.st
    if stat.S_ISDIR(st.st_mode):
        return False  # directory attributes are normalised, never a package difference
    if rec.mode is not None:
        if stat.S_IFMT(rec.mode) != stat.S_IFMT(st.st_mode):
            return True
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(rec.mode) != stat.S_IMODE(st.st_mode):
            return True
    if stat.S_ISLNK(st.st_mode):
        return rec.linkto is not None and rec.linkto != obj.linkname
    if stat.S_ISREG(st.st_mode):
        if rec.digest and rec.digest_algo and digests.get(rec.digest_algo) != rec.digest.lower():
            return True
        if rec.mtime is not None and rec.mtime != int(st.st_mtime):
            return True
    return False


def _hash_chunk(
    rootfs: Rootfs, chunk: list[tuple[FsObject, tuple[str, ...]]]
) -> list[dict[str, str]]:
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


def scan(
    rootfs: Rootfs,
    source: PackageSource | None,
    excludes: Iterable[str],
    drop_xattrs: Iterable[str],
    one_file_system: bool = True,
    jobs: int = 1,
    hash_content: bool = True,
    cache: HashCache | None = None,
    progress: Progress | None = None,
) -> Ownership:
    packages = source.packages() if source else []
    owners, shared = _owner_map(rootfs, packages)
    db_paths = [rootfs.resolve(p) for p in source.database_paths()] if source else []
    excluded_matcher = _glob_regex(excludes, glob.GLOBSTAR | glob.DOTGLOB)
    drop_matcher = _glob_regex(drop_xattrs, glob.DOTGLOB)

    excluded: list[str] = []
    skipped: list[tuple[str, str]] = []

    def prune(path: str, is_dir: bool) -> bool:
        if excluded_matcher.fullmatch(path):
            excluded.append(path)
            return True
        return False

    # Hash, while walking, what must be known before layers are written: the database's
    # digest of each package file (to spot edits) and, when earlier layers may be
    # reused, the content hash that keys are made of (otherwise it is taken while
    # writing).
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
                algos = {CONTENT_HASH} if hash_content else set()
                owner = owners.get(entry.path)
                if owner and owner[1].digest_algo and owner[1].digest:
                    algos.add(owner[1].digest_algo)
                if algos:
                    hasher.add(obj, tuple(sorted(algos)))
            xattrs = rootfs.getxattrs(entry.path)
            if xattrs:
                obj.xattrs = tuple(sorted((k, v) for k, v in xattrs.items() if not drop_matcher.fullmatch(k)))
            objects[entry.path] = obj
    except BaseException:
        hasher.abandon()
        raise
    digests_of = hasher.results(progress)
    for path, digests in digests_of.items():
        objects[path].content_hash = digests.get(CONTENT_HASH)

    modified: list[str] = []
    modified_by_package: dict[str, list[tuple[FsObject, FileRecord]]] = defaultdict(list)
    for obj in objects.values():
        if any(obj.path == d or obj.path.startswith(d + "/") for d in db_paths):
            obj.home = HOME_PKGDB
            continue
        owner = owners.get(obj.path)
        if owner is None:
            continue
        pkg, rec = owner
        if rec.ghost:
            continue  # a %ghost file's content is the system's, not the package's
        if _is_modified(obj, rec, digests_of.get(obj.path, {})):
            obj.home = HOME_MODIFIED
            modified.append(obj.path)
            modified_by_package[pkg.key].append((obj, rec))
        else:
            obj.home = pkg.key

    _claim_bytecode(objects)
    _keep_hardlinks_together(objects.values())

    missing: dict[str, list[str]] = defaultdict(list)
    for real, (pkg, rec) in owners.items():
        if real not in objects and not rec.ghost and not any(
            real == e or real.startswith(e + "/") for e in excluded
        ):
            missing[pkg.key].append(real)

    homes: dict[str, list[FsObject]] = defaultdict(list)
    for obj in objects.values():
        homes[obj.home].append(obj)

    return Ownership(
        rootfs=rootfs,
        source_format=source.format if source else None,
        architecture=source.architecture() if source else None,
        packages={p.key: p for p in packages},
        objects=objects,
        homes=dict(homes),
        excluded=sorted(excluded),
        skipped=sorted(skipped),
        modified=sorted(modified),
        modified_by_package=dict(modified_by_package),
        missing={k: sorted(v) for k, v in sorted(missing.items())},
        shared=dict(sorted(shared.items())),
    )


def _glob_regex(patterns: Iterable[str], flags: int) -> re.Pattern[str]:
    """All patterns as one regex: one match per path instead of one per pattern."""
    included, _ = glob.translate(list(patterns), flags=flags)
    return re.compile("|".join(f"(?:{p})" for p in included) or "(?!)")


# dir/__pycache__/NAME.cpython-311.pyc, NAME.cpython-311.opt-1.pyc (PEP 3147, PEP 488)
_BYTECODE_RE = re.compile(r"(?P<dir>(?:.*/)?)__pycache__/(?P<name>[^/]+?)\.[a-z]+-\d+(?:\.opt-\d+)?\.pyc")


def _claim_bytecode(objects: dict[str, FsObject]) -> None:
    """Give unowned Python bytecode to the package whose source file it was compiled from.

    Debian packages ship .py files and compile them in postinst (py3compile), so the
    .pyc files are owned by no package and would otherwise sit in the unowned layer,
    which every update re-ships. They change exactly when their package does. A
    __pycache__ directory goes along when everything in it went to one package."""
    claimed_dirs: dict[str, set[str]] = defaultdict(set)
    for obj in objects.values():
        if obj.home != HOME_UNOWNED or not stat.S_ISREG(obj.st.st_mode):
            continue
        m = _BYTECODE_RE.fullmatch(obj.path)
        if m is None:
            continue
        src = objects.get(f"{m['dir']}{m['name']}.py")
        cache_dir = f"{m['dir']}__pycache__"
        if src is not None and src.home not in SPECIAL_HOMES:
            obj.home = src.home
            claimed_dirs[cache_dir].add(src.home)
        else:
            claimed_dirs[cache_dir].add(HOME_UNOWNED)
    for obj in objects.values():  # anything else in those directories also counts
        parent = obj.path.rpartition("/")[0]
        if parent in claimed_dirs:
            claimed_dirs[parent].add(obj.home)
    for path, homes in claimed_dirs.items():
        d = objects.get(path)
        if d is not None and d.home == HOME_UNOWNED and len(homes) == 1 and HOME_UNOWNED not in homes:
            d.home = next(iter(homes))


def _home_rank(home: str) -> tuple[int, str]:
    if home in SPECIAL_HOMES:
        return (1 + SPECIAL_HOMES.index(home), home)
    return (0, home)


def _keep_hardlinks_together(objects: Iterable[FsObject]) -> None:
    """A hard-link set split over layers breaks podman's overlay driver; move a split set
    to the highest of its homes (special homes above packages)."""
    sets: dict[tuple[int, int], list[FsObject]] = defaultdict(list)
    for obj in objects:
        if stat.S_ISREG(obj.st.st_mode) and obj.st.st_nlink > 1:
            sets[(obj.st.st_dev, obj.st.st_ino)].append(obj)
    for members in sets.values():
        homes = {m.home for m in members}
        if len(homes) > 1:
            top = max(homes, key=_home_rank)
            for m in members:
                m.home = top
