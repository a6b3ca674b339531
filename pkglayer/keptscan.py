"""The last scan of a root, kept so that the next build reads only what changed.

Before a build writes anything it needs every object of the tree (lstat, link target,
xattrs, digests), what the package databases say, the home the rules give each object,
and each layer's members and content key. All of it is a function of the tree, so all of
it is kept with what it was made from, and reused while that is unchanged:

- an object's facts and a directory's listing while its lstat is the same (scan.walk:
  git's index rule, with its racy window);
- the databases while every path they were read from finds the same as then (each file
  read, each directory listed, each component of each path looked up, what was absent:
  rootfs.unchanged);
- the homes while neither the objects nor the databases changed;
- a layer's key while it holds the same homes and none of them changed (its members are
  made again when it must be written: keeping them cost more memory than making them).

The CLI keeps one per root on disk (`DiskScans`: beside the digest cache, per user,
bounded in number and size; a file that cannot be read is ignored); the daemon keeps them
in memory and knows from a file-change watch which paths may have changed
(daemon/changes.py). Nothing is kept with `--no-hash-cache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import marshal
import os
import stat
import struct
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import __version__
from .config import BuildSettings
from .digests import CONTENT_HASH
from .errors import PkglayerError
from .forked import Forked, single_threaded
from .fsutil import evict_least_recent, read_regular, seal, unseal, write_private
from .hashcache import HashCache
from .ownership import HOME_UNOWNED, Databases, Ownership, claim_homes, read_databases, read_distro_database, with_pip
from .plan import PlannedLayer
from .rootfs import Noted, Rootfs, noted, unchanged
from .scan import RACY_SECONDS, FsObject, Listing, Progress, Scan, walk
from .sources import FileRecord, Package, open_source
from .sources.pip import PipSource
from .tarwriter import Member, content_key, layer_members
from .timings import Timings

log = logging.getLogger(__name__)

# Bump when what is kept, or what the rules make of it, changes meaning.
KEPT_FORMAT = 6
_MAGIC = b"pkglayer-kept-scan\n"
# Disk store bounds: scans of this many roots (the least recently used go), each at most
# this big (a tree of about a million objects).
MAX_KEPT_ROOTS = 8
MAX_KEPT_BYTES = 256 << 20


def fingerprint(settings: BuildSettings) -> str:
    """What the kept facts depend on besides the tree: a scan kept under other settings
    is not used."""
    parts = (
        f"kept-{KEPT_FORMAT}", __version__, settings.all_excludes, settings.drop_xattrs, settings.one_file_system,
        settings.package_format, settings.compare_mtimes, settings.hash_package_files, settings.components,
        settings.big_file_size,
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()


@dataclass
class KeptLayer:
    homes: tuple[str, ...]
    dir_mtime: int
    with_root: bool
    key: str
    files: int


@dataclass
class KeptScan:
    fingerprint: str
    root: str
    scan: Scan
    databases: Databases
    trace: dict[str, Noted] | None  # what the databases were read from; None: read them again
    ownership: Ownership
    layers: dict[str, KeptLayer] = field(default_factory=dict)
    # homes whose objects changed since the scan before; None: any may have
    dirty_homes: set[str] | None = None
    # whether anything differs from the kept scan this one was made from (else a disk
    # store need not write it again)
    fresh: bool = True
    hash_content: bool = False  # whether the scan took every regular file's content hash
    # Something the trace notes changed within the racy window before it was read (dpkg
    # wrote it a second ago): a change in the same clock tick after the read would
    # leave its note as it is, so only a watch that saw nothing change on the trace's
    # paths vouches for it (the daemon's), never lstats (a disk store keeps no such trace).
    trace_racy: bool = False

    def took(self, hashes: Mapping[str, str], content_hash: str) -> None:
        """Content hashes taken while writing layers (of files as this scan saw them)."""
        digests = self.scan.digests
        self.fresh = self.fresh or bool(hashes)
        for path, value in hashes.items():
            digests[path] = {**digests.get(path, {}), content_hash: value}
            self.scan.objects[path].content_hash = value


class KeptScans(Protocol):
    """Where builds keep their scans (`DiskScans`; the daemon's in memory)."""

    def take(self, root: str, fingerprint: str) -> tuple[KeptScan | None, Collection[str] | None]:
        """The kept scan of `root`, and the only paths that may have changed since
        (None: any may have)."""

    def keep(self, kept: KeptScan) -> None:
        """The scan of a build that succeeded, for the next one."""


def scan_kept(
    rootfs: Rootfs,
    settings: BuildSettings,
    kept: KeptScan | None,
    check: Collection[str] | None = None,
    hash_content: bool = False,
    cache: HashCache | None = None,
    progress: Progress | None = None,
    timings: Timings | None = None,
) -> KeptScan:
    """Databases, scan and homes of the tree, reusing what `kept` (an earlier scan of
    the tree, with the paths that may have changed since: `check`) says still holds."""
    timings = timings or Timings()
    fp = fingerprint(settings)
    if kept is not None and (kept.fingerprint != fp or kept.root != rootfs.path):
        kept = None
    if kept is None and settings.jobs > 1 and single_threaded():
        databases, trace, racy, scan = _read_beside_walk(rootfs, settings, hash_content, cache, progress, timings)
    else:
        with timings.step("database"):
            known = holding = None
            if kept is not None and kept.trace is not None and check is not None:
                # Only the paths the watch saw change can find something else; the
                # others' notes hold, and answer the lookups of a new read.
                changed = {p: n for p, n in kept.trace.items() if p in check}
                same = not changed or (not kept.trace_racy and unchanged(rootfs.path, changed))
                if same and kept.trace_racy and time.time() > kept.scan.started + RACY_SECONDS:
                    # Settled since: read again (from the notes), so that the readers keep
                    # what they would not while it was racy (dpkg._PACKAGES), and the trace
                    # holds for lstats too.
                    same = False
                if not same:
                    known, alike = _known_notes(rootfs.path, kept.trace, changed, check)
                    holding = kept.trace if alike else None
            else:
                same = kept is not None and kept.trace is not None and not kept.trace_racy and unchanged(
                    rootfs.path, kept.trace)
            if same:
                databases, trace, racy = kept.databases, kept.trace, kept.trace_racy
            else:
                databases, trace, racy = _read_databases(
                    rootfs.path, settings.package_format, known=known, holding=holding
                )
        started = time.perf_counter()
        same_databases = kept is not None and databases is kept.databases
        recheck: Collection[str] | None = None
        if kept is not None and check is not None and (kept.hash_content or not hash_content):
            recheck = () if same_databases else _paths_of_changed_packages(rootfs, kept.databases, databases)
        scan = walk(
            rootfs, databases.algos_for(hash_content, settings.hash_package_files), settings.all_excludes,
            settings.drop_xattrs, settings.one_file_system, settings.jobs, cache, progress,
            kept.scan if kept else None, check, timings,
            trusted_needs=((CONTENT_HASH,) if hash_content else ()) if same_databases else None,
            recheck=recheck,
        )
        timings.steps["scan"] = time.perf_counter() - started - timings.steps.get("hash", 0.0)
    same_databases = kept is not None and databases is kept.databases
    with timings.step("ownership"):
        old = kept.scan if kept else None
        if (
            kept is not None and old is not None and same_databases and not scan.changed
            and not scan.removed and scan.excluded == old.excluded and scan.skipped == old.skipped
        ):
            # Every object is the kept one: so are their homes.
            ownership = replace(kept.ownership, objects=scan.objects)
            dirty: set[str] | None = set()
            fresh = trace is not kept.trace or scan.hashed > 0
        else:
            # The homes of the kept objects this scan took over, before the rules judge again.
            homes_before = [o.home for o in scan.objects.values()] if old is not None else None
            for obj in scan.objects.values():
                obj.home = HOME_UNOWNED
                obj.fixed_mtime = False
            ownership = claim_homes(
                scan, databases, settings.compare_mtimes, hash_package_files=settings.hash_package_files,
                components=settings.components, big_file_size=settings.big_file_size,
            )
            dirty = _dirty_homes(old, homes_before, scan) if old is not None and homes_before is not None else None
            if dirty is not None and kept is not None:
                # A home with the same objects, each as it was, has the same size.
                ownership.sizes.update((h, n) for h, n in kept.ownership.sizes.items() if h not in dirty)
            fresh = True
    return KeptScan(
        fp, rootfs.path, scan, databases, trace, ownership, dict(kept.layers) if kept else {}, dirty, fresh,
        hash_content, racy,
    )


def _paths_of_changed_packages(rootfs: Rootfs, old: Databases, new: Databases) -> set[str]:
    """The paths listed by a package of one of the databases that is not in the other:
    only for those can the digests a scan takes differ (a package read again unchanged
    is the same object, see DpkgSource.packages). As the owner maps resolve them, or a
    few more: a path another package lists first keeps its digests, and is checked
    all the same."""
    in_old = {id(p): p for p in old.packages}
    in_new = {id(p): p for p in new.packages}
    changed = [p for i, p in in_old.items() if i not in in_new] + [p for i, p in in_new.items() if i not in in_old]
    return {
        rootfs.resolve(rel, follow_final=False) for p in changed for rec in p.files if (rel := rec.path.lstrip("/"))
    }


def _read_beside_walk(
    rootfs: Rootfs, settings: BuildSettings, hash_content: bool, cache: HashCache | None,
    progress: Progress | None, timings: Timings,
) -> tuple[Databases, dict[str, Noted], bool, Scan]:
    """A first scan: the databases read in a child process (forked.py) while this one
    walks the tree, both holding the GIL for most of their work (each 0.3-0.4 s on the
    benchmark trees). The files the databases say must be hashed are known, and hashed,
    once both are done. Steps in `timings`: "database" is the time the walk did not hide
    (starting the child, then waiting for it, or reading here if it failed)."""
    started = time.perf_counter()
    child = Forked(_read_databases, rootfs.path, settings.package_format, False)
    forking = time.perf_counter() - started
    timings.steps["database"] = timings.steps["scan"] = 0.0  # in this order, as without a child
    read: list[tuple[Databases, dict[str, Noted], bool]] = []
    waited = 0.0

    def algos_later():
        # pip's records here, while the child reads the distro's (the longer part).
        nonlocal waited
        waiting = time.perf_counter()
        read_from = time.time()
        with Rootfs(rootfs.path) as traced:
            traced.trace = {}
            pip_packages = PipSource(traced).packages()
            found = child.result()
            distro, distro_trace, distro_racy = (
                found if found is not None else _read_databases(rootfs.path, settings.package_format, False)
            )
            databases = with_pip(traced, distro, pip_packages)
        read.append((databases, {**distro_trace, **traced.trace}, distro_racy or _racy(traced.trace, read_from)))
        waited = time.perf_counter() - waiting
        return databases.algos_for(hash_content, settings.hash_package_files)

    try:
        scan = walk(
            rootfs, None, settings.all_excludes, settings.drop_xattrs, settings.one_file_system, settings.jobs,
            cache, progress, timings=timings, algos_later=algos_later,
        )
    finally:
        child.cancel()
    timings.steps["database"] = forking + waited
    timings.steps["scan"] = time.perf_counter() - started - forking - waited - timings.steps.get("hash", 0.0)
    databases, trace, racy = read[0]
    return databases, trace, racy, scan


def _read_databases(
    root: str, package_format: str | None, with_pip_records: bool = True, known: Mapping[str, Noted] | None = None,
    holding: dict[str, Noted] | None = None,
) -> tuple[Databases, dict[str, Noted], bool]:
    """The databases (without pip's records: the distro's alone), read through a Rootfs
    that notes every path looked up, and whether something read changed within the racy
    window (KeptScan.trace_racy). `known`: notes known to hold still (Rootfs.known);
    with `holding` (Rootfs.holding), they are all of that read's and begin the trace: its
    resolutions are taken as they are, their lookups not made again."""
    started = time.time()
    with Rootfs(root) as traced:
        traced.trace = dict(known) if holding is not None and known is not None else {}
        traced.known = known
        traced.holding = holding
        source = open_source(traced, package_format)
        databases = read_databases(traced, source) if with_pip_records else read_distro_database(traced, source)
        trace = traced.trace
    return databases, trace, _racy(trace, started)


def _known_notes(
    root: str, trace: dict[str, Noted], changed: dict[str, Noted], check: Collection[str]
) -> tuple[dict[str, Noted] | None, bool]:
    """What each path of `trace` finds now, knowing that only the paths in `check` may
    find something else (the watch's): the notes of those among them (`changed`) taken
    again. None when a directory of `trace` is gone or another one now, unless every
    path of `trace` found below it is in `check` (one moved away takes its entries along
    unseen). And whether every resolution of the read that noted `trace` still holds:
    no symlink among the changed paths, before or now (changed or not, it may point
    elsewhere), and none in `check` below a path that was not there then (what was
    absent then was taken as written, without a lookup of what is below it)."""
    again: dict[str, Noted] = {}
    replaced: list[str] = []
    appeared: list[str] = []
    alike = True
    is_dir, is_link = stat.S_ISDIR, stat.S_ISLNK
    for path, was in changed.items():
        try:
            st = os.lstat(os.path.join(root, path))
        except (FileNotFoundError, NotADirectoryError):
            st = None
        again[path] = noted(st, listed=was is not None and was[0] == "f")
        if was is not None and (was[0] == "d" or is_dir(was[3])) and (
            st is None or not is_dir(st.st_mode) or (st.st_dev, st.st_ino) != (was[1], was[2])
        ):
            replaced.append(f"{path}/")
        if (st is not None and is_link(st.st_mode)) or (was is not None and was[0] == "f" and is_link(was[3])):
            alike = False
        elif was is None and st is not None:
            appeared.append(f"{path}/")
    if replaced and any(n is not None and p.startswith(tuple(replaced)) and p not in changed for p, n in trace.items()):
        return None, False  # (what was not there below it is not there now either)
    if alike and appeared:
        below = tuple(appeared)
        for path in check:
            if path.startswith(below):
                try:
                    if is_link(os.lstat(os.path.join(root, path)).st_mode):
                        alike = False
                        break
                except OSError:
                    continue
    return {p: again.get(p, n) for p, n in trace.items()}, alike


def _racy(trace: dict[str, Noted], started: float) -> bool:
    racy_ns = (started - RACY_SECONDS) * 1e9
    return any(n is not None and n[0] == "f" and n[6] >= racy_ns for n in trace.values())


def _dir_attributes(obj: FsObject) -> tuple[Any, ...]:
    # What a directory contributes to the layers below it (its mtime is normalised).
    st = obj.st
    return (st.st_mode, st.st_uid, st.st_gid, obj.xattrs)


def _dirty_homes(old: Scan, homes_before: list[str], scan: Scan) -> set[str] | None:
    """The homes whose layers may differ from the kept scan's: those of every object
    changed, added or removed, and both homes of an object that moved; None (all) when a
    directory's attributes changed, as every layer below it repeats them.
    `homes_before`: the home of each of the scan's objects before the rules ran (a kept
    object's is the one the kept scan gave it; an object changed or added is a new one,
    and the kept scan's own object for its path still has its home)."""
    dirty: set[str] = set()
    changed = scan.changed or set()
    for path in changed | scan.removed:
        before = old.objects.get(path)
        if before is not None:
            dirty.add(before.home)
        obj = scan.objects.get(path)
        if obj is None:
            continue
        dirty.add(obj.home)
        if before is not None and stat.S_ISDIR(obj.st.st_mode) and (
            not stat.S_ISDIR(before.st.st_mode) or _dir_attributes(before) != _dir_attributes(obj)
        ):
            return None
    for obj, was in zip(scan.objects.values(), homes_before):
        if was != obj.home and obj.path not in changed:
            dirty.update((was, obj.home))
    return dirty


class LayerContents:
    """Each planned layer's content key and members: kept ones while the layer holds the
    same homes and none of them changed, the others made (members only when asked for:
    a reused layer needs its key alone). Without `keys_first` (nothing could be reused)
    the new layers' keys are None until written, and their members are made by the
    thread that writes them, beside the compressing of other layers."""

    def __init__(self, kept: KeptScan, planned: list[PlannedLayer], dir_mtime: int, with_root: bool = False,
                 keys_first: bool = True):
        self.kept = kept
        self.dir_mtime = dir_mtime
        self.with_root = with_root
        self.planned = {layer.name: layer for layer in planned}
        self._members: dict[str, list[Member]] = {}
        self._files: dict[str, int] = {}  # of layers written elsewhere (another process)
        self.keys: dict[str, str | None] = {}
        self.known: dict[str, KeptLayer] = {}
        dirty = kept.dirty_homes
        for layer in planned:
            was = kept.layers.get(layer.name)
            if (
                dirty is not None and was is not None and was.homes == layer.homes and was.dir_mtime == dir_mtime
                and was.with_root == with_root and not dirty.intersection(layer.homes)
            ):
                self.known[layer.name] = was
                self.keys[layer.name] = was.key
            else:
                self.keys[layer.name] = content_key(self.members(layer.name)) if keys_first else None

    def members(self, name: str) -> list[Member]:
        found = self._members.get(name)
        if found is None:
            own = self.kept.ownership
            layer = self.planned[name]
            found = self._members[name] = layer_members(
                (o for h in layer.homes for o in own.homes.get(h, ())), own.objects, self.dir_mtime, self.with_root
            )
        return found

    def files(self, name: str) -> int:
        known = self.known.get(name)
        if known is not None:
            return known.files
        written = self._files.get(name)
        return written if written is not None else len(self.members(name))

    def wrote(self, name: str, files: int) -> None:
        """The layer was written with `files` members: not to be made again to count them."""
        self._files[name] = files

    def remember(self, keys: Mapping[str, str | None]) -> None:
        """Keep each layer's key (`keys`: those known after writing) for the next build."""
        kept: dict[str, KeptLayer] = {}
        for name, layer in self.planned.items():
            key = keys.get(name) or self.keys.get(name)
            if key is not None:
                kept[name] = KeptLayer(
                    layer.homes, self.dir_mtime, self.with_root, key, self.files(name)
                )
        if _shape(kept) != _shape(self.kept.layers):
            self.kept.fresh = True
        self.kept.layers = kept
        self.kept.dirty_homes = set()


def _shape(layers: dict[str, KeptLayer]) -> dict[str, tuple[Any, ...]]:
    return {n: (x.homes, x.dir_mtime, x.with_root, x.key, x.files) for n, x in layers.items()}


# -- on disk ---------------------------------------------------------------------------


class NoScans:
    """Keeps nothing (`--no-hash-cache`)."""

    def take(self, root: str, fingerprint: str) -> tuple[KeptScan | None, Collection[str] | None]:
        return None, None

    def keep(self, kept: KeptScan) -> None:
        pass


class LastKept:
    """Keeps scans where `inner` does, and holds the last one kept (a build's, for its
    memo: memo.py)."""

    def __init__(self, inner: KeptScans):
        self.inner = inner
        self.last: KeptScan | None = None

    def take(self, root: str, fingerprint: str) -> tuple[KeptScan | None, Collection[str] | None]:
        return self.inner.take(root, fingerprint)

    def keep(self, kept: KeptScan) -> None:
        self.last = kept
        self.inner.keep(kept)


class DiskScans:
    """One file per root and settings in `directory` (mode 0700, the user's own), the
    MAX_KEPT_ROOTS used last. A file is a header, the sha256 of the rest, and the rest
    in `marshal` format (plain data only: no code is ever loaded). Anything wrong with
    it, including another version's format, makes it ignored: the build then reads the
    whole tree, as without one."""

    def __init__(self, directory: str):
        self.directory = directory

    @staticmethod
    def for_settings(settings: BuildSettings) -> DiskScans | NoScans:
        path = settings.hash_cache_path
        return DiskScans(os.path.join(os.path.dirname(path), "scans")) if path else NoScans()

    def _path(self, root: str, fp: str) -> str:
        name = hashlib.sha256(f"{root}\0{fp}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return os.path.join(self.directory, f"{name}.scan")

    def take(self, root: str, fingerprint: str) -> tuple[KeptScan | None, Collection[str] | None]:
        path = self._path(root, fingerprint)
        try:
            data = read_regular(path, MAX_KEPT_BYTES, "kept scan", missing_ok=True)
        except PkglayerError as e:
            log.warning("ignoring %s", e)
            return None, None
        if data is None:
            return None, None
        try:
            kept = decode(data)
        except Exception as e:  # noqa: BLE001 - any damage at all: read the tree instead
            log.warning("ignoring the kept scan %s: %s", path, str(e) or type(e).__name__)
            return None, None
        if (kept.root, kept.fingerprint) != (root, fingerprint):
            return None, None
        return kept, None

    def keep(self, kept: KeptScan) -> None:
        if not kept.fresh:
            return  # the file holds this very scan
        data = encode(kept)
        if len(data) > MAX_KEPT_BYTES:
            log.info("not keeping the scan of %s: %d bytes is more than %d", kept.root, len(data), MAX_KEPT_BYTES)
            return
        path = self._path(kept.root, kept.fingerprint)
        try:
            # No fsync: a file torn by a crash fails its checksum and is ignored.
            write_private(path, data)
            evict_least_recent(self.directory, ".scan", MAX_KEPT_ROOTS, keep=path)
        except OSError as e:
            log.warning("could not keep the scan of %s in %s: %s", kept.root, self.directory, e.strerror)


# The field order of each record as stored (a changed dataclass changes these, and the
# checks in decode refuse files of the other shape).
_PKG_FIELDS = tuple(f.name for f in dataclasses.fields(Package) if f.name != "files")
_REC_FIELDS = FileRecord._fields


# os.stat_result's fields in its own order (the sequence, then the float and nanosecond
# times, blksize, blocks, rdev): one struct record per object.
_STAT = struct.Struct("<QQQQqqqqqqdddqqqqqQ")


def _stats(objects: Collection[FsObject]) -> bytes:
    return b"".join(
        _STAT.pack(*st, st.st_atime, st.st_mtime, st.st_ctime, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
                   st.st_blksize, st.st_blocks, st.st_rdev)
        for st in (o.st for o in objects)
    )


def _package(p: Package) -> tuple[Any, ...]:
    # Without its file list: the owner maps keep the records that matter.
    return tuple(getattr(p, f) for f in _PKG_FIELDS)


def _unpackage(t: tuple[Any, ...]) -> Package:
    if len(t) != len(_PKG_FIELDS):
        raise ValueError("package record of another shape")
    return Package(**dict(zip(_PKG_FIELDS, t)))


def _record(r: FileRecord) -> tuple[Any, ...]:
    return (r.path, r.digest, r.digest_algo, r.mode, r.linkto, r.mtime, r.config, r.ghost)


assert _REC_FIELDS == ("path", "digest", "digest_algo", "mode", "linkto", "mtime", "config", "ghost")


class _Owners(Mapping[str, tuple[Package, FileRecord]]):
    """An owner map as stored, made into records when first used: an unchanged rebuild
    needs none (scan.walk's `trusted_needs`)."""

    def __init__(self, rows: bytes, packages: list[Package]):
        self._rows: bytes | None = rows
        self._packages = packages
        self._map: dict[str, tuple[Package, FileRecord]] = {}

    def _made(self) -> dict[str, tuple[Package, FileRecord]]:
        if self._rows is not None:
            packages = self._packages
            self._map = {path: (packages[i], FileRecord(*rec)) for path, i, rec in marshal.loads(self._rows)}
            self._rows = None
        return self._map

    def __getitem__(self, path: str) -> tuple[Package, FileRecord]:
        return self._made()[path]

    def __iter__(self):  # noqa: ANN204
        return iter(self._made())

    def __len__(self) -> int:
        return len(self._made())


def encode(kept: KeptScan) -> bytes:
    scan, db, own = kept.scan, kept.databases, kept.ownership
    packages = db.packages
    pkg_index = {id(p): i for i, p in enumerate(packages)}

    def owner_rows(owners: Mapping[str, tuple[Package, FileRecord]]) -> bytes:
        # Loaded only when used (see _Owners).
        return marshal.dumps([(path, pkg_index[id(pkg)], _record(rec)) for path, (pkg, rec) in owners.items()])

    objects = scan.objects.values()
    data = {
        "format": KEPT_FORMAT,
        "version": __version__,
        "fingerprint": kept.fingerprint,
        "root": kept.root,
        "scan": {
            "paths": list(scan.objects),
            "stats": _stats(objects),
            "homes": [o.home for o in objects],
            "fixed_mtime": [o.path for o in objects if o.fixed_mtime],
            "links": {o.path: o.linkname for o in objects if o.linkname is not None},
            "xattrs": {o.path: o.xattrs for o in objects if o.xattrs},
            "digests": scan.digests,
            "listings": {d: (x.objects, x.excluded, x.sockets) for d, x in scan.listings.items()},
            "excluded": scan.excluded,
            "skipped": scan.skipped,
            "hashed_at": scan.hashed_at,
            "root": _stats([FsObject("", scan.root)]) if scan.root is not None else None,
            "started": scan.started,
        },
        "databases": {
            "format": db.source_format,
            "architecture": db.architecture,
            "packages": [_package(p) for p in packages],
            "distro": len(db.distro),
            "owners": owner_rows(db.owners),
            "pip_owners": owner_rows(db.pip_owners),
            "shared": db.shared,
            "dropped": db.dropped,
            "db_paths": db.db_paths,
            "records": db.records,
        },
        "trace": None if kept.trace_racy else kept.trace,
        "ownership": {
            "made": [_package(p) for p in own.packages.values() if id(p) not in pkg_index],
            "modified": own.modified,
            "modified_by_package": {
                k: [(obj.path, _record(rec)) for obj, rec in v] for k, v in own.modified_by_package.items()
            },
            "missing": own.missing,
            "origins": own.origins,
            "intervals": own.intervals,
            "warnings": own.warnings,
        },
        "layers": _shape(kept.layers),
    }
    return seal(_MAGIC, data)


def decode(data: bytes) -> KeptScan:
    d = unseal(_MAGIC, data, "kept scan", KEPT_FORMAT)
    s = d["scan"]
    objects: dict[str, FsObject] = {}
    homes: dict[str, list[FsObject]] = {}
    links, xattrs, digests = s["links"], s["xattrs"], s["digests"]
    paths, stats, obj_homes = s["paths"], s["stats"], s["homes"]
    if len(stats) != len(paths) * _STAT.size or len(obj_homes) != len(paths):
        raise ValueError("objects of another shape")
    stat_result = os.stat_result
    for path, st, home in zip(paths, _STAT.iter_unpack(stats), obj_homes):
        obj = objects[path] = FsObject(path, stat_result(st), home)
        homes.setdefault(home, []).append(obj)
    for path, target in links.items():
        objects[path].linkname = target
    for path, found in xattrs.items():
        objects[path].xattrs = found
    for path, found in digests.items():
        objects[path].content_hash = found.get(CONTENT_HASH)
    for path in s["fixed_mtime"]:
        objects[path].fixed_mtime = True
    root = stat_result(next(_STAT.iter_unpack(s["root"]))) if s["root"] else None
    scan = Scan(
        objects, digests, s["excluded"], [tuple(x) for x in s["skipped"]], s["hashed_at"],
        {k: Listing(*v) for k, v in s["listings"].items()}, root, s["started"],
    )
    db = d["databases"]
    packages = [_unpackage(t) for t in db["packages"]]
    databases = Databases(
        source_format=db["format"], architecture=db["architecture"], distro=packages[: db["distro"]],
        pip=packages[db["distro"] :], owners=_Owners(db["owners"], packages),
        pip_owners=_Owners(db["pip_owners"], packages), shared=db["shared"],
        dropped=[tuple(x) for x in db["dropped"]], db_paths=db["db_paths"], records=db["records"],
    )
    o = d["ownership"]
    made = [_unpackage(t) for t in o["made"]]
    ownership = Ownership(
        source_format=databases.source_format,
        architecture=databases.architecture,
        packages={**{p.key: p for p in packages}, **{p.key: p for p in made}},
        objects=objects,
        homes=homes,
        excluded=scan.excluded,
        skipped=scan.skipped,
        modified=o["modified"],
        modified_by_package={
            k: [(objects[path], FileRecord(*rec)) for path, rec in v] for k, v in o["modified_by_package"].items()
        },
        missing=o["missing"],
        shared=dict(sorted(databases.shared.items())),
        origins=o["origins"],
        intervals={k: tuple(v) for k, v in o["intervals"].items()},
        dropped=databases.dropped,
        warnings=o["warnings"],
    )
    layers = {n: KeptLayer(tuple(h), m, r, k, f) for n, (h, m, r, k, f) in d["layers"].items()}
    return KeptScan(d["fingerprint"], d["root"], scan, databases, d["trace"], ownership, layers, set(), fresh=False)
