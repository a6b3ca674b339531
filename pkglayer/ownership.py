"""Give every object of the rootfs exactly one home.

A home is a package key, or one of the special homes: files owned by no package, files a
package installed but that were changed since, and the package database itself. Homes
are assigned by an ordered list of small rules (`RULES`), each of which may claim
objects that earlier rules left unowned, or move objects between homes. The distro's
package database comes first, then pip's records, then what users declare
(`user.component` xattrs, `[[component]]` globs), then big files: each claims only what
the ones before it left.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter

from .digests import CONTENT_HASH
from .errors import ConfigError
from .globs import PathGlobs
from .hashcache import HashCache
from .rootfs import Rootfs
from .scan import FsObject, Progress, Scan, walk
from .sources import FileRecord, Package, PackageSource
from .sources.pip import PipSource
from .usercomponents import (
    ORIGIN_BIG_FILE,
    ORIGIN_CONFIG,
    ORIGIN_XATTR,
    XATTR_COMPONENT,
    XATTR_INTERVAL,
    ComponentSpec,
    big_file_name,
    fingerprint,
    interval_days,
    name_problem,
    shown,
)

log = logging.getLogger(__name__)

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
    # package key -> where it came from: the distro format, "pip", "xattr", "config", "big file"
    origins: dict[str, str] = field(default_factory=dict)
    # user component -> (update interval in days, how it was given)
    intervals: dict[str, tuple[int, str]] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (pip package key, why)
    warnings: list[str] = field(default_factory=list)
    # home -> home_bytes, as asked (a kept scan's, for the homes that did not change)
    sizes: dict[str, int] = field(default_factory=dict)

    def origin(self, key: str) -> str:
        return self.origins.get(key, self.source_format or "")

    def home_bytes(self, home: str) -> int:
        size = self.sizes.get(home)
        if size is None:
            size = self.sizes[home] = sum(o.st.st_size for o in self.homes.get(home, ()) if stat.S_ISREG(o.st.st_mode))
        return size

    @property
    def unowned(self) -> list[str]:
        return [o.path for o in self.homes.get(HOME_UNOWNED, ())]


def _rel(path: str) -> str:
    return path.lstrip("/")


@dataclass
class _RealPaths:
    """The real paths of each distro package's listed paths, and the directory
    resolutions they were made with (see _owner_map)."""

    parents: dict[str, str]  # listed directory -> its real path
    trace: dict | None  # that of the Rootfs read through (see Rootfs.holding)
    # id(package) -> (the package, the listed directories its paths are in, the real
    # path of each of its records, None for a record of the root itself)
    packages: dict[int, tuple[Package, tuple[str, ...], tuple[str | None, ...]]]


# What _owner_map made of the last read of each root (the last _MAX_ROOTS_KNOWN roots).
# The daemon reads a database after every transaction, which changes a few packages
# of hundreds, and the dpkg reader hands back the very Package of an unchanged one.
_REAL_PATHS: dict[str, _RealPaths] = {}
_MAX_ROOTS_KNOWN = 16


def _owner_map(
    rootfs: Rootfs, packages: list[Package]
) -> tuple[dict[str, tuple[Package, FileRecord]], dict[str, list[str]]]:
    """Map real rootfs paths to (package, record).

    Listed paths are resolved through the rootfs's own directory symlinks, because
    merged-/usr systems list /lib/... while the file lives in /usr/lib/... A path listed
    by several packages goes to the first by (name, arch): stable across upgrades.

    Every listed directory is resolved on every read (a symlink may have changed, and
    the rootfs notes what it looked up), unless the rootfs vouches that every
    resolution of the last read still holds (Rootfs.holding); a package read before
    whose directories all resolve as they did then keeps the real paths made then, unbuilt.
    """
    known = _REAL_PATHS.pop(rootfs.path, None)
    known_parents = known.parents if known is not None else {}
    known_packages = known.packages if known is not None else {}
    holds = known is not None and known.trace is not None and known.trace is rootfs.holding
    parents: dict[str, str] = dict(known_parents) if holds else {}

    def real_dir(head: str) -> str:
        # A listed directory's resolution, looked up once per read by name (thousands
        # of paths, a few hundred directories).
        parent = parents.get(head)
        if parent is None:
            parent = rootfs.resolve(head)
            # The listed name itself when nothing in it is a link: one string kept, not two.
            parent = parents[head] = head if parent == head else parent
        return parent

    remembered: dict[int, tuple[Package, tuple[str, ...], tuple[str | None, ...]]] = {}
    reals_of: dict[int, tuple[str | None, ...]] = {}
    for pkg in packages:
        entry = known_packages.get(id(pkg))
        if entry is not None and entry[0] is pkg and (holds or all(real_dir(h) == known_parents[h] for h in entry[1])):
            remembered[id(pkg)] = entry
            reals_of[id(pkg)] = entry[2]
            continue
        heads, reals = _real_paths(rootfs, pkg, real_dir)
        if heads is not None:
            remembered[id(pkg)] = (pkg, heads, reals)
        reals_of[id(pkg)] = reals
    _REAL_PATHS[rootfs.path] = _RealPaths(parents, rootfs.trace, remembered)
    while len(_REAL_PATHS) > _MAX_ROOTS_KNOWN:
        del _REAL_PATHS[next(iter(_REAL_PATHS))]

    owners: dict[str, tuple[Package, FileRecord]] = {}
    shared: dict[str, list[str]] = {}
    keys = {id(p): p.key for p in packages}  # a property, made anew on each call
    for pkg in sorted(packages, key=lambda p: (p.name, p.arch, keys[id(p)])):
        for real, rec in zip(reals_of[id(pkg)], pkg.files):
            if real is None:
                continue
            first = owners.get(real)
            if first is None:
                owners[real] = (pkg, rec)
            elif first[0] is not pkg and not (rec.mode is not None and stat.S_ISDIR(rec.mode)):
                listers = shared.get(real)
                if listers is None:
                    shared[real] = [keys[id(first[0])], keys[id(pkg)]]
                else:
                    listers.append(keys[id(pkg)])
    return owners, shared


def _real_paths(
    rootfs: Rootfs, pkg: Package, real_dir: Callable[[str], str]
) -> tuple[tuple[str, ...] | None, tuple[str | None, ...]]:
    """The real path of each of the package's records (None for the root itself), with
    the listed directories they were made from; None for those when a path ending in
    "/", "." or ".." had to be resolved whole, which no directory's resolution vouches for.
    Any other path is its directory's resolution and its last name, as
    `rootfs.resolve(path, follow_final=False)` would make it."""
    heads: dict[str, None] = {}
    reals: list[str | None] = []
    whole = False
    for rec in pkg.files:
        rel = _rel(rec.path)
        head, _, last = rel.rpartition("/")
        if not rel:
            reals.append(None)
        elif last in ("", ".", ".."):
            reals.append(rootfs.resolve(rel, follow_final=False))
            whole = True
        elif head:
            heads[head] = None
            parent = real_dir(head)
            reals.append(f"{parent}/{last}" if parent else last)
        else:
            reals.append(last)
    return (None if whole else tuple(heads)), tuple(reals)


def _pip_owner_map(
    rootfs: Rootfs,
    pip_packages: list[Package],
    owners: dict[str, tuple[Package, FileRecord]],
    shared: dict[str, list[str]],
) -> tuple[dict[str, tuple[Package, FileRecord]], list[Package], list[tuple[str, str]]]:
    """Map real rootfs paths to pip's (package, record) where the distro database lists
    nothing: the distro wins. A pip package whose dist-info the distro lists is the
    distro's own (dropped whole); a path several list goes to the first lister, and is
    reported in `shared` unless it is a directory. Returns the map, the packages kept
    and the ones dropped with why."""
    pip_owners: dict[str, tuple[Package, FileRecord]] = {}
    kept: list[Package] = []
    dropped: list[tuple[str, str]] = []
    for pkg in pip_packages:
        resolved = [(rootfs.resolve(_rel(rec.path), follow_final=False), rec) for rec in pkg.files]
        distro_info = next(
            (real for real, _ in resolved if real in owners and ".dist-info/" in real + "/"), None
        )
        if distro_info is not None:
            dropped.append((pkg.key, f"/{distro_info} is {owners[distro_info][0].key}'s"))
            continue
        kept.append(pkg)
        for real, rec in resolved:
            first = owners.get(real) or pip_owners.get(real)
            if first is None:
                pip_owners[real] = (pkg, rec)
            elif first[0] is not pkg and rootfs.is_file(real):
                shared.setdefault(real, [first[0].key]).append(pkg.key)
    for key, why in dropped:
        log.info("pip package %s left to the distro: %s", key, why)
    return pip_owners, kept, dropped


def vouched_for(pkg: Package, rec: FileRecord, st: os.stat_result, hash_package_files: bool = False) -> bool:
    """Whether the database's own timestamps say the regular file at `st` is as `pkg`
    installed it, so that its content need not be read to tell (Package.files_settled_ns:
    neither ctime nor mtime later than when the package manager recorded the package's
    files). Not for conffiles (dpkg writes them after the file list, and they are there
    to be edited) nor ghosts; never with `hash_package_files` (every file judged by its
    content, as debsums does).

    In a copied tree (Package.files_copied: an extracted image, cp -a, an ostree
    checkout) every ctime is the copy's, so the mtime alone must be earlier than the
    record's. Strictly earlier: tools that set every mtime to one value (ostree's 0,
    buildah --timestamp, a SOURCE_DATE_EPOCH clamp) leave edited files with the record's
    own mtime, and those are read. An edit there whose mtime was set back before the
    install is taken on trust.

    Trust misplaced (that, or an edit made before dpkg rewrote the package's list, as
    it does when another package's Replaces: takes a path from it) costs update economy
    only, never image content: the file's real bytes go into the package's layer, whose
    content key then differs from a pristine install's."""
    settled = pkg.files_settled_ns
    if settled is None or hash_package_files or rec.config or rec.ghost:
        return False
    if pkg.files_copied:
        return st.st_mtime_ns < settled
    return st.st_ctime_ns <= settled and st.st_mtime_ns <= settled


def _is_modified(
    obj: FsObject, rec: FileRecord, digests: dict[str, str], compare_mtimes: bool = True, vouched: bool = False
) -> bool:
    """Whether the object differs from the record; `vouched` (see vouched_for): its
    content is the package's, and was not read."""
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
        if not vouched and rec.digest and rec.digest_algo and digests.get(rec.digest_algo) != rec.digest.lower():
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
class Declared:
    """A component users declared (xattr, config) or a big file, while rules run."""

    origins: set[str] = field(default_factory=set)
    intervals: dict[int, str] = field(default_factory=dict)  # days -> where it was given (first)


@dataclass
class Claims:
    """What the rules work on: the scan's objects (each with its home so far), the
    digests taken, what the package databases list and what users declare; and what
    the rules found."""

    objects: dict[str, FsObject]
    digests: dict[str, dict[str, str]]
    owners: dict[str, tuple[Package, FileRecord]]  # real path -> the distro package listing it first
    db_paths: list[str]
    excluded: list[str]
    compare_mtimes: bool = True
    hash_package_files: bool = False  # see vouched_for
    records: Mapping[str, str] = field(default_factory=dict)  # Databases.records
    pip_owners: dict[str, tuple[Package, FileRecord]] = field(default_factory=dict)
    specs: Sequence[ComponentSpec] = ()
    big_file_size: int | None = None
    reserved: frozenset[str] = frozenset()  # names user components cannot take
    linked: Sequence[str] | None = None  # Scan.linked_paths (None: look through the objects)
    spans: Mapping[str, tuple[int, int]] | None = None  # Scan.spans (None: not known)
    modified: list[str] = field(default_factory=list)
    modified_by_package: dict[str, list[tuple[FsObject, FileRecord]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    missing: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    declared: dict[str, Declared] = field(default_factory=lambda: defaultdict(Declared))
    made: dict[str, Package] = field(default_factory=dict)  # key -> a package the rules made
    origins: dict[str, str] = field(default_factory=dict)
    intervals: dict[str, tuple[int, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)


Rule = Callable[[Claims], None]


def claim_database(c: Claims) -> None:
    """The package database's own files and directories."""
    objects = c.objects
    if c.spans is not None:
        # Each directory's contents are a range of the objects (Scan.spans).
        values: list[FsObject] | None = None
        for path in c.db_paths:
            obj = objects.get(path)
            if obj is not None:
                obj.home = HOME_PKGDB
            span = c.spans.get(path)
            if span is not None:
                values = values if values is not None else list(objects.values())
                for obj in values[span[0] : span[1]]:
                    obj.home = HOME_PKGDB
        return
    exact, below = frozenset(c.db_paths), tuple(f"{d}/" for d in c.db_paths)
    for obj in objects.values():
        if obj.path in exact or obj.path.startswith(below):
            obj.home = HOME_PKGDB


def claim_package_records(c: Claims) -> None:
    """A package's own records in the database (dpkg's info/NAME.*) go with its files,
    so that a transaction changes the layers of the packages it touched and a small
    `pkgdb` (dpkg's status: tens of kB compressed, not hundreds) instead of a layer of
    every package's records. Records are written at install time: their mtime is fixed
    in layers (FsObject.fixed_mtime), so a reinstall of the same package makes the same
    layer. A package none of whose files is in its layer (all excluded or edited)
    leaves its records to `pkgdb`: no layer of records alone."""
    if not c.records:
        return
    homes = {obj.home for obj in c.objects.values()}
    for path, key in c.records.items():
        obj = c.objects.get(path)
        if obj is not None and obj.home == HOME_PKGDB and key in homes and stat.S_ISREG(obj.st.st_mode):
            obj.home = key
            obj.fixed_mtime = True


def claim_package_files(c: Claims) -> None:
    """A listed file goes to its package if it is as the package installed it, else to
    `modified` (remembered, so a prior pristine layer of the package can be reused)."""
    vouched = _claim_listed(c, c.owners)
    if vouched:
        log.info("%d package files taken as installed, unread: the package database's timestamps vouch for them",
                 vouched)


def claim_pip_files(c: Claims) -> None:
    """The same for pip's records (RECORD's sha256 tells edited files), where the distro
    database lists nothing."""
    _claim_listed(c, c.pip_owners)


def _claim_listed(c: Claims, owners: dict[str, tuple[Package, FileRecord]]) -> int:
    """Returns how many files were judged now without their content (vouched_for)."""
    vouched_files = 0
    digests, no_digests = c.digests, {}
    is_reg = stat.S_ISREG
    for obj in c.objects.values() if owners else ():
        if obj.home != HOME_UNOWNED:
            continue
        owner = owners.get(obj.path)
        if owner is None:
            continue
        pkg, rec = owner
        if obj.unmodified_as is rec:
            obj.home = pkg.key  # judged so before, and neither has changed since (a kept scan's)
            continue
        if rec.ghost:
            continue  # a %ghost file's content is the system's, not the package's
        vouched = is_reg(obj.st.st_mode) and vouched_for(pkg, rec, obj.st, c.hash_package_files)
        vouched_files += vouched
        if _is_modified(obj, rec, digests.get(obj.path, no_digests), c.compare_mtimes, vouched):
            obj.home = HOME_MODIFIED
            c.modified.append(obj.path)
            c.modified_by_package[pkg.key].append((obj, rec))
        else:
            obj.home = pkg.key
            obj.unmodified_as = rec
    return vouched_files


def claim_bytecode(c: Claims) -> None:
    """Give unowned Python bytecode to the package whose source file it was compiled from.

    Debian packages ship .py files and compile them in postinst (py3compile), so the
    .pyc files are owned by no package and would otherwise sit in the unowned layer,
    which every update re-ships. They change exactly when their package does. A
    __pycache__ directory goes along when everything in it went to one package.

    py3compile writes them at install time: their content is the package's (it holds
    the .py's mtime, which Python checks; the .pyc's own mtime is never read), their
    mtime the install time. Layers fix it (FsObject.fixed_mtime), or every fresh
    install of the same package (a new builder stage) would make a new layer."""
    objects = c.objects
    claimed_dirs: dict[str, set[str]] = defaultdict(set)
    # Bytecode, and what else is in a __pycache__ directory: a few of the tree's objects.
    cached = [obj for obj in objects.values() if "__pycache__/" in obj.path]
    for obj in cached:
        if obj.home != HOME_UNOWNED or not stat.S_ISREG(obj.st.st_mode):
            continue
        m = _BYTECODE_RE.fullmatch(obj.path)
        if m is None:
            continue
        src = objects.get(f"{m['dir']}{m['name']}.py")
        cache_dir = f"{m['dir']}__pycache__"
        # bytecode left unowned counts below, with everything else in its directory
        if src is not None and src.home not in SPECIAL_HOMES:
            obj.home = src.home
            obj.fixed_mtime = True
            claimed_dirs[cache_dir].add(src.home)
    for obj in cached if claimed_dirs else ():  # anything else in those directories also counts
        parent = obj.path.rpartition("/")[0]
        if parent in claimed_dirs:
            claimed_dirs[parent].add(obj.home)
    for path, homes in claimed_dirs.items():
        d = objects.get(path)
        if d is not None and d.home == HOME_UNOWNED and len(homes) == 1 and HOME_UNOWNED not in homes:
            d.home = next(iter(homes))


def claim_xattr_components(c: Claims) -> None:
    """An unowned object tagged `user.component=NAME`, or below a directory so tagged
    (the nearest tag wins), goes to component NAME. A `user.update-interval` on an
    object the component claims, or on a directory tagged for it, is the component's
    (not one on a package's file: tags take nothing from packages). An unusable tag is
    warned about and ignored (what is below it inherits from further up)."""
    if not any(_tag(obj, XATTR_COMPONENT) is not None for obj in filter(_XATTRS, c.objects.values())):
        return  # nothing is tagged (as most trees): nothing to claim, no interval to take
    tagged: dict[str, str] = {}  # directory -> the component it hands down
    for obj in c.objects.values():  # walk order: parents first
        own = _tag(obj, XATTR_COMPONENT) if obj.xattrs else None
        name = _component_name(c, own, obj.path) if own is not None else None
        effective = name or tagged.get(obj.path.rpartition("/")[0])
        if effective is None:
            continue
        is_dir = stat.S_ISDIR(obj.st.st_mode)
        if is_dir:
            tagged[obj.path] = effective
        claimed = obj.home == HOME_UNOWNED
        if claimed:
            obj.home = effective
            c.declared[effective].origins.add(ORIGIN_XATTR)
        interval = _tag(obj, XATTR_INTERVAL) if obj.xattrs and (claimed or (name and is_dir)) else None
        if interval is not None:
            days = interval_days(interval.decode("utf-8", "replace"))
            if days is None:
                c.warn(f"/{obj.path}: {XATTR_INTERVAL} {shown(interval)} is not an interval; ignored")
            else:
                c.declared[effective].intervals.setdefault(days, f"{XATTR_INTERVAL} on /{obj.path}")


_XATTRS = attrgetter("xattrs")


def _tag(obj: FsObject, name: str) -> bytes | None:
    return next((v for k, v in obj.xattrs if k == name), None)


def _component_name(c: Claims, value: bytes, path: str) -> str | None:
    """The component a tag names, or None (warned) when it cannot be one."""
    try:
        name = value.decode("utf-8")
    except UnicodeDecodeError:
        problem = "not UTF-8"
    else:
        problem = name_problem(name)
        if problem is None and name in c.reserved:
            problem = "the name of a package component or a top layer"
        if problem is None:
            return name
    c.warn(f"/{path}: {XATTR_COMPONENT} {shown(value)} is {problem}; ignored")
    return None


def claim_config_components(c: Claims) -> None:
    """Unowned objects matching a `[[component]]` or `--component` glob, or below a
    matching directory (the nearest match wins; for one path, the first component
    listed), go to that component."""
    if not c.specs:
        return
    matchers = []
    for spec in c.specs:
        if spec.name in c.reserved:
            raise ConfigError(f"{spec.where}: component {spec.name!r} has the name of a package component "
                              "or a top layer; choose another")
        if spec.interval is not None:
            days = interval_days(spec.interval)
            assert days is not None  # checked when the configuration was read
            c.declared[spec.name].intervals.setdefault(days, spec.where)
        matchers.append((spec.name, PathGlobs(spec.paths, globstar=True)))
    assigned: dict[str, str] = {}  # directory -> the component it hands down
    for obj in c.objects.values():
        own = next((name for name, globs in matchers if globs.matches(obj.path)), None)
        effective = own or assigned.get(obj.path.rpartition("/")[0])
        if effective is None:
            continue
        if stat.S_ISDIR(obj.st.st_mode):
            assigned[obj.path] = effective
        if obj.home == HOME_UNOWNED:
            obj.home = effective
            c.declared[effective].origins.add(ORIGIN_CONFIG)


# The planner weighs every pair of components: beyond this many, big files stay unowned.
MAX_BIG_FILES = 256


def claim_big_files(c: Claims) -> None:
    """Each unowned regular file of at least `big_file_size` becomes a component of its
    own, so that a changed model or archive re-ships alone, and an unchanged one never
    with the small unowned files. Hard links to one file are one component; a file
    with links elsewhere is left to keep_hardlinks_together. The largest first, at most
    MAX_BIG_FILES."""
    if not c.big_file_size:
        return
    inodes: dict[tuple[int, int], list[FsObject]] = defaultdict(list)
    for obj in c.objects.values():
        st = obj.st
        if obj.home == HOME_UNOWNED and stat.S_ISREG(st.st_mode) and st.st_size >= c.big_file_size:
            inodes[(st.st_dev, st.st_ino)].append(obj)
    found = sorted(
        (links for links in inodes.values() if len(links) == links[0].st.st_nlink),
        key=lambda links: (-links[0].st.st_size, links[0].path),
    )
    if len(found) > MAX_BIG_FILES:
        log.info("%d big unowned files; the %d largest get components of their own", len(found), MAX_BIG_FILES)
    for links in found[:MAX_BIG_FILES]:
        name = big_file_name(min(o.path for o in links))
        for obj in links:
            obj.home = name
        c.declared[name].origins.add(ORIGIN_BIG_FILE)


def keep_hardlinks_together(c: Claims) -> None:
    """A hard-link set split over layers breaks podman's overlay driver; move a split set
    to the highest of its homes (special homes above packages)."""
    sets: dict[tuple[int, int], list[FsObject]] = defaultdict(list)
    objects = c.objects
    linked = c.linked if c.linked is not None else objects
    for path in linked:
        obj = objects[path]
        if stat.S_ISREG(obj.st.st_mode) and obj.st.st_nlink > 1:
            sets[(obj.st.st_dev, obj.st.st_ino)].append(obj)
    for members in sets.values():
        homes = {m.home for m in members}
        if len(homes) > 1:
            top = max(homes, key=_home_rank)
            for m in members:
                m.home = top


_ORIGIN_ORDER = (ORIGIN_XATTR, ORIGIN_CONFIG, ORIGIN_BIG_FILE)


def version_declared(c: Claims) -> None:
    """Give each declared component (xattr, config, big file) the key a package has:
    its name, and as version a fingerprint of its layer, so that the planner's history
    sees it change as it sees a package upgraded. Its update intervals must agree."""
    members: dict[str, list[FsObject]] = defaultdict(list)
    for obj in c.objects.values():
        if obj.home in c.declared:
            members[obj.home].append(obj)
    for name in sorted(members):
        declared = c.declared[name]
        if len(declared.intervals) > 1:
            given = "; ".join(f"{days} days from {where}" for days, where in sorted(declared.intervals.items()))
            raise ConfigError(f"component {name!r} has conflicting update intervals: {given}")
        pkg = Package(name=name, version=fingerprint(members[name], c.objects), arch="", source=name)
        for obj in members[name]:
            obj.home = pkg.key
        c.made[pkg.key] = pkg
        c.origins[pkg.key] = ", ".join(o for o in _ORIGIN_ORDER if o in declared.origins)
        if declared.intervals:
            ((days, where),) = declared.intervals.items()
            c.intervals[name] = (days, where)


def find_missing(c: Claims) -> None:
    """Files a package lists that are not in the tree (and not excluded): reported only."""
    objects, excluded, below = c.objects, frozenset(c.excluded), tuple(f"{e}/" for e in c.excluded)
    for owners in (c.owners, c.pip_owners):
        for real in owners.keys() - objects.keys():  # (a set difference: tens of thousands of paths)
            pkg, rec = owners[real]
            if not rec.ghost and real not in excluded and not real.startswith(below):
                c.missing[pkg.key].append(real)


# In this order: each rule sees the homes the ones before it gave.
RULES: tuple[Rule, ...] = (
    claim_database,
    claim_package_files,
    claim_pip_files,
    claim_package_records,
    claim_bytecode,
    claim_xattr_components,
    claim_config_components,
    claim_big_files,
    keep_hardlinks_together,
    version_declared,
    find_missing,
)


def assign_homes(
    scan: Scan,
    claims: Claims,
    packages: Sequence[Package],
    origins: dict[str, str],
    shared: dict[str, list[str]],
    databases: Databases,
    rules: Sequence[Rule] = RULES,
) -> Ownership:
    for rule in rules:
        rule(claims)
    homes: dict[str, list[FsObject]] = defaultdict(list)
    for obj in scan.objects.values():
        homes[obj.home].append(obj)
    return Ownership(
        source_format=databases.source_format,
        architecture=databases.architecture,
        packages={**{p.key: p for p in packages}, **claims.made},
        objects=scan.objects,
        homes=dict(homes),
        excluded=scan.excluded,
        skipped=scan.skipped,
        modified=sorted(claims.modified),
        modified_by_package=dict(claims.modified_by_package),
        missing={k: sorted(v) for k, v in sorted(claims.missing.items())},
        shared=dict(sorted(shared.items())),
        origins={**origins, **claims.origins},
        intervals=claims.intervals,
        dropped=databases.dropped,
        warnings=claims.warnings,
    )


@dataclass
class Databases:
    """What the package databases say, with their paths resolved in the tree.

    Only the owner maps say which package lists which path: a kept scan (keptscan.py)
    keeps packages without their file lists."""

    source_format: str | None
    architecture: str | None
    distro: list[Package]
    pip: list[Package]  # pip's packages that are not the distro's
    owners: Mapping[str, tuple[Package, FileRecord]]  # real path -> the distro package listing it first
    pip_owners: Mapping[str, tuple[Package, FileRecord]]
    shared: dict[str, list[str]]  # real path -> every package listing it (files only)
    dropped: list[tuple[str, str]]  # (pip package key, why it was left to the distro)
    db_paths: list[str]  # the distro database's own files and directories
    # real path -> the package whose own record in the database it is (Package.records)
    records: dict[str, str] = field(default_factory=dict)

    @property
    def packages(self) -> list[Package]:
        return [*self.distro, *self.pip]

    def algos_for(
        self, hash_content: bool, hash_package_files: bool = False
    ) -> Callable[[str, os.stat_result], tuple[str, ...]]:
        """The digests the scan takes of a regular file (path, lstat): the database's, to
        spot edits, unless the database vouches for the file (vouched_for), and the
        content hash layer keys are made of when `hash_content`."""
        base = (CONTENT_HASH,) if hash_content else ()
        combined: dict[str, tuple[str, ...]] = {}
        owners, pip_owners = self.owners, self.pip_owners

        def algos_for(path: str, st: os.stat_result) -> tuple[str, ...]:
            # The distro's record wins, as in the rules, even one without a digest.
            found = owners.get(path) or pip_owners.get(path)
            if found is None:
                return base
            pkg, rec = found
            algo = rec.digest_algo
            if not (algo and rec.digest) or vouched_for(pkg, rec, st, hash_package_files):
                return base
            algos = combined.get(algo)
            if algos is None:
                algos = combined[algo] = tuple(sorted({*base, algo}))
            return algos

        return algos_for


def read_databases(rootfs: Rootfs, source: PackageSource | None) -> Databases:
    """The distro's package database, then pip's records, mapped onto the tree's real paths."""
    return with_pip(rootfs, read_distro_database(rootfs, source), PipSource(rootfs).packages())


def read_distro_database(rootfs: Rootfs, source: PackageSource | None) -> Databases:
    """The distro's package database alone (see with_pip)."""
    distro = source.packages() if source else []
    owners, shared = _owner_map(rootfs, distro)
    return Databases(
        source_format=source.format if source else None,
        architecture=source.architecture() if source else None,
        distro=distro,
        pip=[],
        owners=owners,
        pip_owners={},
        shared=shared,
        dropped=[],
        db_paths=[rootfs.resolve(p) for p in source.database_paths()] if source else [],
        # Not through a final symlink: a record is the object at its own path (and the
        # files themselves need no lookup: thousands of them, all in the database's directory).
        records={rootfs.resolve(path, follow_final=False): p.key for p in distro for path in p.records},
    )


def with_pip(rootfs: Rootfs, distro: Databases, pip_packages: list[Package]) -> Databases:
    """`distro` (read_distro_database) with pip's packages (PipSource.packages) mapped
    where the distro lists nothing."""
    shared = {path: list(keys) for path, keys in distro.shared.items()}
    pip_owners, pip, dropped = _pip_owner_map(rootfs, pip_packages, distro.owners, shared)
    return replace(distro, pip=pip, pip_owners=pip_owners, shared=shared, dropped=dropped)


def claim_homes(
    scan: Scan,
    databases: Databases,
    compare_mtimes: bool = True,
    *,
    hash_package_files: bool = False,
    components: Sequence[ComponentSpec] = (),
    big_file_size: int | None = None,
) -> Ownership:
    """Every object of the scan its home, by the rules (`RULES`). `hash_package_files`
    must be what the scan's `algos_for` was made with."""
    packages = databases.packages
    reserved = frozenset(SPECIAL_HOMES) | {p.source or p.name for p in packages} | {p.key for p in packages}
    claims = Claims(
        scan.objects, scan.digests, databases.owners, databases.db_paths, scan.excluded,
        compare_mtimes=compare_mtimes, hash_package_files=hash_package_files, pip_owners=databases.pip_owners,
        specs=components, big_file_size=big_file_size, reserved=reserved, records=databases.records,
        linked=scan.linked_paths(), spans=scan.spans,
    )
    origins = {p.key: PipSource.format for p in databases.pip}
    return assign_homes(scan, claims, packages, origins, databases.shared, databases)


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
    *,
    hash_package_files: bool = False,
    components: Sequence[ComponentSpec] = (),
    big_file_size: int | None = None,
) -> Ownership:
    """Read the package databases (the distro's, then pip's), walk the tree and give
    every object its home.

    Files are hashed after the walk with what must be known before layers are written:
    the database's digest of each package file the database does not vouch for (to spot
    edits; `vouched_for`) and, when earlier layers may be reused (`hash_content`), the
    content hash that keys are made of (otherwise it is taken while writing)."""
    databases = read_databases(rootfs, source)
    scan = walk(rootfs, databases.algos_for(hash_content, hash_package_files), excludes, drop_xattrs,
                one_file_system, jobs, cache, progress)
    return claim_homes(scan, databases, compare_mtimes, hash_package_files=hash_package_files,
                       components=components, big_file_size=big_file_size)
