"""Give every object of the rootfs exactly one home.

A home is a package key, or one of the special homes: files owned by no package, files a
package installed but that were changed since, and the package database itself. Homes
are assigned by an ordered list of small rules (`RULES`), each of which may claim
objects that earlier rules left unowned, or move objects between homes; a new kind of
claim (a `user.component` xattr, pip's records) is one more rule.
"""

from __future__ import annotations

import re
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .digests import CONTENT_HASH
from .hashcache import HashCache
from .rootfs import Rootfs
from .scan import FsObject, Progress, Scan, walk
from .sources import FileRecord, Package, PackageSource

HOME_UNOWNED = "unowned"
HOME_MODIFIED = "modified"
HOME_PKGDB = "pkgdb"
# Bottom to top: the database changes on every package transaction, so it goes last.
SPECIAL_HOMES = (HOME_UNOWNED, HOME_MODIFIED, HOME_PKGDB)


@dataclass
class Ownership:
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


def _is_modified(obj: FsObject, rec: FileRecord, digests: dict[str, str], compare_mtimes: bool = True) -> bool:
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
        if compare_mtimes and rec.mtime is not None and rec.mtime != int(st.st_mtime):
            return True
    return False


# dir/__pycache__/NAME.cpython-311.pyc, NAME.cpython-311.opt-1.pyc (PEP 3147, PEP 488)
_BYTECODE_RE = re.compile(r"(?P<dir>(?:.*/)?)__pycache__/(?P<name>[^/]+?)\.[a-z]+-\d+(?:\.opt-\d+)?\.pyc")


def _home_rank(home: str) -> tuple[int, str]:
    if home in SPECIAL_HOMES:
        return (1 + SPECIAL_HOMES.index(home), home)
    return (0, home)


@dataclass
class Claims:
    """What the rules work on: the scan's objects (each with its home so far), the
    digests taken, and what the package databases list."""

    objects: dict[str, FsObject]
    digests: dict[str, dict[str, str]]
    owners: dict[str, tuple[Package, FileRecord]]  # real path -> the package listing it first
    db_paths: list[str]
    excluded: list[str]
    compare_mtimes: bool = True
    modified: list[str] = field(default_factory=list)
    modified_by_package: dict[str, list[tuple[FsObject, FileRecord]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    missing: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))


Rule = Callable[[Claims], None]


def claim_database(c: Claims) -> None:
    """The package database's own files and directories."""
    for obj in c.objects.values():
        if any(obj.path == d or obj.path.startswith(d + "/") for d in c.db_paths):
            obj.home = HOME_PKGDB


def claim_package_files(c: Claims) -> None:
    """A listed file goes to its package if it is as the package installed it, else to
    `modified` (remembered, so a prior pristine layer of the package can be reused)."""
    for obj in c.objects.values():
        if obj.home != HOME_UNOWNED:
            continue
        owner = c.owners.get(obj.path)
        if owner is None:
            continue
        pkg, rec = owner
        if rec.ghost:
            continue  # a %ghost file's content is the system's, not the package's
        if _is_modified(obj, rec, c.digests.get(obj.path, {}), c.compare_mtimes):
            obj.home = HOME_MODIFIED
            c.modified.append(obj.path)
            c.modified_by_package[pkg.key].append((obj, rec))
        else:
            obj.home = pkg.key


def claim_bytecode(c: Claims) -> None:
    """Give unowned Python bytecode to the package whose source file it was compiled from.

    Debian packages ship .py files and compile them in postinst (py3compile), so the
    .pyc files are owned by no package and would otherwise sit in the unowned layer,
    which every update re-ships. They change exactly when their package does. A
    __pycache__ directory goes along when everything in it went to one package."""
    objects = c.objects
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


def keep_hardlinks_together(c: Claims) -> None:
    """A hard-link set split over layers breaks podman's overlay driver; move a split set
    to the highest of its homes (special homes above packages)."""
    sets: dict[tuple[int, int], list[FsObject]] = defaultdict(list)
    for obj in c.objects.values():
        if stat.S_ISREG(obj.st.st_mode) and obj.st.st_nlink > 1:
            sets[(obj.st.st_dev, obj.st.st_ino)].append(obj)
    for members in sets.values():
        homes = {m.home for m in members}
        if len(homes) > 1:
            top = max(homes, key=_home_rank)
            for m in members:
                m.home = top


def find_missing(c: Claims) -> None:
    """Files a package lists that are not in the tree (and not excluded): reported only."""
    for real, (pkg, rec) in c.owners.items():
        if real not in c.objects and not rec.ghost and not any(
            real == e or real.startswith(e + "/") for e in c.excluded
        ):
            c.missing[pkg.key].append(real)


# In this order: each rule sees the homes the ones before it gave.
RULES: tuple[Rule, ...] = (claim_database, claim_package_files, claim_bytecode, keep_hardlinks_together, find_missing)


def assign_homes(
    scan: Scan,
    packages: Sequence[Package],
    owners: dict[str, tuple[Package, FileRecord]],
    shared: dict[str, list[str]],
    db_paths: list[str],
    source: PackageSource | None,
    rules: Sequence[Rule] = RULES,
    compare_mtimes: bool = True,
) -> Ownership:
    claims = Claims(scan.objects, scan.digests, owners, db_paths, scan.excluded, compare_mtimes)
    for rule in rules:
        rule(claims)
    homes: dict[str, list[FsObject]] = defaultdict(list)
    for obj in scan.objects.values():
        homes[obj.home].append(obj)
    return Ownership(
        source_format=source.format if source else None,
        architecture=source.architecture() if source else None,
        packages={p.key: p for p in packages},
        objects=scan.objects,
        homes=dict(homes),
        excluded=scan.excluded,
        skipped=scan.skipped,
        modified=sorted(claims.modified),
        modified_by_package=dict(claims.modified_by_package),
        missing={k: sorted(v) for k, v in sorted(claims.missing.items())},
        shared=dict(sorted(shared.items())),
    )


def scan_ownership(
    rootfs: Rootfs,
    source: PackageSource | None,
    excludes: Iterable[str],
    drop_xattrs: Iterable[str],
    one_file_system: bool = True,
    jobs: int = 1,
    hash_content: bool = True,
    cache: HashCache | None = None,
    progress: Progress | None = None,
    compare_mtimes: bool = True,
) -> Ownership:
    """Read the package database, walk the tree and give every object its home.

    Files are hashed while walking with what must be known before layers are written:
    the database's digest of each package file (to spot edits) and, when earlier layers
    may be reused (`hash_content`), the content hash that keys are made of (otherwise
    it is taken while writing)."""
    packages = source.packages() if source else []
    owners, shared = _owner_map(rootfs, packages)
    db_paths = [rootfs.resolve(p) for p in source.database_paths()] if source else []

    def algos_for(path: str) -> list[str]:
        algos = [CONTENT_HASH] if hash_content else []
        owner = owners.get(path)
        if owner and owner[1].digest_algo and owner[1].digest:
            algos.append(owner[1].digest_algo)
        return algos

    scan = walk(rootfs, algos_for, excludes, drop_xattrs, one_file_system, jobs, cache, progress)
    return assign_homes(scan, packages, owners, shared, db_paths, source, compare_mtimes=compare_mtimes)
