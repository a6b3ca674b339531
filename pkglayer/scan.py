"""The single walk over a rootfs: every object once, never following a symlink, with the
digests later stages need.

Which digests a file needs is the caller's decision (`algos_for`, from its path and
lstat): the package database's own algorithm for package files, so edits can be told
apart from pristine files (unless the database's timestamps vouch for the file), and
the content hash of layer keys when earlier layers may be reused. Hashing
runs on worker threads after the walk; a digest cache (hashcache.py) spares files
unchanged since they were last hashed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .digests import CONTENT_HASH, new_hasher
from .errors import TreeChangedError
from .globs import PathGlobs
from .hashcache import HashCache
from .rootfs import FileOpener, Rootfs
from .timings import Timings, charge, working_for

if TYPE_CHECKING:
    from .sources import FileRecord

_READ_CHUNK = 1024 * 1024
_MOUNT_POINT = "mount point: contents on another filesystem not included"
_SOCKET = "socket (tar cannot store sockets)"
# What the walk's stack holds: a directory to go through, the end of one (its span is
# known), a subtree to take whole from the kept scan.
_DIR, _END, _COPY = 0, 1, 2
# Objects changed this close before a scan started may change again without their lstat
# showing it (timestamps have a coarse clock): a later scan reads them again.
RACY_SECONDS = 2

#: progress(phase, done, total): called as long work advances (scan, hashing, layers)
Progress = Callable[[str, int, int], None]
#: the digests a regular file needs, from its path and lstat (see `walk`)
AlgosFor = Callable[[str, os.stat_result], tuple[str, ...]]


@dataclass(slots=True)
class FsObject:
    """One object of the rootfs, with what a layer needs to reproduce it."""

    path: str
    st: os.stat_result
    home: str = "unowned"  # set by ownership.assign_homes
    linkname: str | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    content_hash: str | None = None  # CONTENT_HASH of a regular file's data, when the scan took it
    # Set by ownership (like `home`): the mtime is when the package was installed, the
    # content is the package's (a database record, bytecode compiled at install): layers
    # give it the directories' fixed mtime, so a reinstall of the same package makes the
    # same layer.
    fixed_mtime: bool = False
    # The record of its package it was last found to be as installed (ownership): while
    # the object and the record are the ones judged (a kept scan's, a package read again
    # unchanged), the verdict holds, and the daemon's rules need not judge it again.
    unmodified_as: FileRecord | None = None


@dataclass(frozen=True)
class Listing:
    """A directory's entries as a scan found them, by what became of each (sorted)."""

    objects: tuple[str, ...]
    excluded: tuple[str, ...] = ()
    sockets: tuple[str, ...] = ()


@dataclass
class Scan:
    objects: dict[str, FsObject]  # by rootfs-relative path, in walk order (parents first)
    digests: dict[str, dict[str, str]]  # path -> {algorithm: hex digest}, for the files hashed
    excluded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    hashed_at: float = 0.0  # when hashing started: files changed after it are not cached
    # For the next scan of the same tree (see `walk`):
    listings: dict[str, Listing] = field(default_factory=dict)  # by directory ("" the root)
    root: os.stat_result | None = None  # the root directory's lstat
    started: float = 0.0  # when the walk started (time.time())
    # Against the scan it was given: the paths read afresh (new or changed) and those
    # gone; None when there was none to compare with.
    changed: set[str] | None = None
    removed: set[str] = field(default_factory=set)
    hashed: int = 0  # files whose digests were not kept (taken, or found in the digest cache)
    # Each listed directory's contents (everything below it) as a range of positions in
    # `objects`, which the walk emits subtree by subtree: a later walk told which paths
    # changed takes an untouched subtree whole (None: not known, as for a scan read
    # from disk).
    spans: dict[str, tuple[int, int]] | None = None
    taken_whole: int = 0  # objects in subtrees taken whole from the kept scan
    # The paths of the objects other than directories with more than one link, in no
    # particular order (None: not known yet; see `linked_paths`).
    linked: list[str] | None = None

    def linked_paths(self) -> list[str]:
        """`linked`, made from the objects if not known (a walk given the paths that
        changed makes it from the kept scan's: hard links are looked for in every
        scan, and few objects have them)."""
        if self.linked is None:
            self.linked = [
                p for p, o in self.objects.items() if o.st.st_nlink > 1 and not stat.S_ISDIR(o.st.st_mode)
            ]
        return self.linked


def same_stamp(a: os.stat_result, b: os.stat_result) -> bool:
    """Nothing changed the object between the two lstats: every change of content,
    mode, owner or links sets ctime, which cannot be set from user space (the rest is
    compared too, cheapest to fail first)."""
    # a[:7]: mode, ino, dev, nlink, uid, gid, size (one slice compares them cheaper than
    # seven attributes: this runs once per object of the tree)
    return a.st_ctime_ns == b.st_ctime_ns and a.st_mtime_ns == b.st_mtime_ns and a[:7] == b[:7]


def walk(
    rootfs: Rootfs,
    algos_for: AlgosFor | None,
    excludes: Iterable[str],
    drop_xattrs: Iterable[str],
    one_file_system: bool = True,
    jobs: int = 1,
    cache: HashCache | None = None,
    progress: Progress | None = None,
    kept: Scan | None = None,
    check: Collection[str] | None = None,
    timings: Timings | None = None,
    trusted_needs: tuple[str, ...] | None = None,
    recheck: Collection[str] | None = None,
    algos_later: Callable[[], AlgosFor] | None = None,
) -> Scan:
    """Every object of the rootfs but the excluded ones; regular files hashed with the
    algorithms `algos_for(path, lstat)` names (distinct, sorted).

    With `kept`, an earlier scan of the same tree with the same settings, only what
    changed is read again, the way git's index works: an object whose lstat (inode,
    size, mtime, ctime, mode, owner, links) is what the kept scan saw keeps its link
    target, xattrs and digests, and a directory whose lstat is unchanged keeps its
    listing (creating, removing or renaming an entry changes its mtime). ctime cannot be
    set from user space; objects changed less than `RACY_SECONDS` before the kept scan
    started are read again all the same (a change in the same clock tick would leave
    their lstat as it was). Every object is lstat'ed, unless `check` names the only
    paths that may have changed since (the daemon's file-change watch): those paths,
    and the directories among them listed again; a directory with none of them below
    it is taken whole from the kept scan, without going through its objects, so the
    walk costs what changed, not the size of the tree. That takes `recheck`: the only
    paths for which `algos_for` may name a digest the kept scan did not take (None: any
    may, and every object is gone through). `trusted_needs`, when `algos_for` is what
    it was for the kept scan but for these algorithms, spares asking it about unchanged
    files: the kept scan took what it named for them.

    With `algos_later` (no `kept`), `algos_for` is not asked during the walk: the walk
    calls `algos_later()` at its end for it (the databases it comes from are being read
    beside the walk).
    """
    assert algos_later is None or kept is None
    started = time.time()
    undecided: list[FsObject] | None = [] if algos_later is not None else None
    excluded_matcher = PathGlobs(excludes, globstar=True)
    drop_matcher = PathGlobs(drop_xattrs, globstar=False)
    excluded: list[str] = []
    skipped: list[tuple[str, str]] = []
    objects: dict[str, FsObject] = {}
    listings: dict[str, Listing] = {}
    digests: dict[str, dict[str, str]] = {}
    changed: set[str] = set()
    relisted = False
    old_objects = kept.objects if kept else {}
    old_digests = kept.digests if kept else {}
    old_listings = kept.listings if kept else {}
    racy_ns = (kept.started - RACY_SECONDS) * 1e9 if kept else 0.0
    spans: dict[str, tuple[int, int]] = {}
    starts: dict[str, int] = {}
    # With the paths that may have changed known: the directories above them, which must
    # be gone through; every other directory's subtree is the kept one (see `copy`).
    dirty: set[str] | None = None
    old_spans = kept.spans if kept is not None else None
    if kept is not None and check is not None:
        check = set(check) | _links_to_check(kept, check)
        if recheck is not None and old_spans is not None and old_spans.get("", (0, -1))[1] == len(old_objects):
            dirty = {""}
            for p in check:
                while p:
                    p = p.rpartition("/")[0]
                    if p in dirty:
                        break
                    dirty.add(p)
            old_paths = list(old_objects)
            old_values = list(old_objects.values())
            # The kept directories by where their contents start, to find those within a
            # subtree taken whole without going through its paths.
            by_start = sorted((s, d) for d, (s, _) in old_spans.items())
            starts_at = [s for s, _ in by_start]
            digests.update(old_digests)  # those of objects gone are dropped at the end
            old_mounts = [s for s in kept.skipped if s[1] == _MOUNT_POINT]
    copied: set[str] = set()  # the directories taken whole
    taken_whole = 0

    def trusted(old: os.stat_result | None, st: os.stat_result) -> bool:
        return old is not None and old.st_ctime_ns < racy_ns and same_stamp(old, st)

    top = rootfs.path + "/"
    os_lstat = os.lstat
    trusted_set = frozenset(trusted_needs) if trusted_needs is not None else None

    hasher = _Hasher(rootfs, cache or HashCache(None), jobs, timings)
    links = FileOpener(rootfs)  # symlinks are read from their directory's descriptor, kept open

    def visit(path: str, st: os.stat_result, old: FsObject | None) -> FsObject:
        """The object at `path` as `st` finds it: the kept one while that still holds."""
        mode = st.st_mode
        if old is not None and (st is old.st or (old.st.st_ctime_ns < racy_ns and same_stamp(old.st, st))):
            obj = old
            have = old_digests.get(path)
        else:
            obj = FsObject(path, st)
            have = None
            changed.add(path)
            digests.pop(path, None)
            if stat.S_ISLNK(mode):
                obj.linkname = links.readlink(path)
            xattrs = rootfs.getxattrs(path)
            if xattrs:
                obj.xattrs = tuple(sorted((k, v) for k, v in xattrs.items() if not drop_matcher.matches(k)))
        if stat.S_ISREG(mode):
            if have:
                digests[path] = have
            if obj is old and trusted_needs is None and dirty is not None and path not in recheck:
                return obj  # the kept digests are still all it needs
            if undecided is not None:
                undecided.append(obj)
                return obj
            algos = trusted_needs if obj is old and trusted_needs is not None else algos_for(path, st)
            if algos and not (have and all(a in have for a in algos)):
                hasher.add(obj, algos)
        return obj

    def enter(path: str, st: os.stat_result, old: FsObject | None, subdirs: list) -> None:
        if one_file_system and st.st_dev != rootfs.dev:
            skipped.append((path, _MOUNT_POINT))
        elif (
            dirty is not None and old is not None and path not in dirty and path not in check
            and (st is old.st or trusted(old.st, st)) and path in old_spans
        ):
            subdirs.append((_COPY, path, st, None))
        else:
            subdirs.append((_DIR, path, st, old.st if old is not None else None))

    def copy(d: str) -> None:
        """The kept subtree of `d`, which the watch says nothing below changed."""
        nonlocal taken_whole
        a, b = old_spans[d]
        shift = len(objects) - a
        objects.update(zip(old_paths[a:b], old_values[a:b]))
        taken_whole += b - a
        below = f"{d}/"
        for i in range(bisect_left(starts_at, a), bisect_right(starts_at, b)):
            sub = by_start[i][1]
            if sub != d and not sub.startswith(below):
                continue  # an empty sibling's contents start where d's do
            s_a, s_b = old_spans[sub]
            spans[sub] = (s_a + shift, s_b + shift)
            listing = listings[sub] = old_listings[sub]
            if listing.excluded or listing.sockets:
                prefix = f"{sub}/" if sub else ""
                excluded.extend(prefix + n for n in listing.excluded)
                skipped.extend((prefix + n, _SOCKET) for n in listing.sockets)
            copied.add(sub)

    root_st = rootfs.stat()
    is_dir, is_reg = stat.S_ISDIR, stat.S_ISREG
    try:
        stack: list[tuple[int, str, os.stat_result | None, os.stat_result | None]] = [
            (_DIR, "", root_st, kept.root if kept else None)
        ]
        while stack:
            kind, d, st_d, old_st_d = stack.pop()
            if kind == _END:
                spans[d] = (starts.pop(d), len(objects))
                continue
            if kind == _COPY:
                copy(d)
                continue
            starts[d] = len(objects)
            stack.append((_END, d, None, None))
            listing = old_listings.get(d)
            if listing is not None and not (
                (check is None or d not in check) and (st_d is old_st_d or trusted(old_st_d, st_d))
            ):
                listing = None
            subdirs: list[tuple[int, str, os.stat_result | None, os.stat_result | None]] = []
            if listing is None:
                # Listed afresh: each entry's new lstat decides whether its kept facts hold.
                relisted = True
                names: list[str] = []
                excluded_names: list[str] = []
                sockets: list[str] = []
                prefix = f"{d}/" if d else ""

                def known(name: str, inode: int, prefix: str = prefix) -> os.stat_result | None:
                    # An entry the watch names no change for, the same inode as before, is as it was.
                    old = old_objects.get(prefix + name)
                    return old.st if old is not None and old.st.st_ino == inode and prefix + name not in check \
                        else None

                for name, st in rootfs.entries(d, known if dirty is not None else None):
                    path = prefix + name
                    old = old_objects.get(path)
                    if old is not None and st is old.st:  # as it was: not excluded, not a socket
                        names.append(name)
                        objects[path] = visit(path, st, old)
                        if is_dir(st.st_mode):
                            enter(path, st, old, subdirs)
                    elif excluded_matcher.matches(path):
                        excluded.append(path)
                        excluded_names.append(name)
                    elif stat.S_ISSOCK(st.st_mode):
                        skipped.append((path, _SOCKET))
                        sockets.append(name)
                    else:
                        names.append(name)
                        objects[path] = visit(path, st, old)
                        if is_dir(st.st_mode):
                            enter(path, st, old, subdirs)
                listings[d] = Listing(tuple(names), tuple(excluded_names), tuple(sockets))
                stack.extend(reversed(subdirs))
                continue
            # An unchanged directory has the same entries, each the same inode (a replaced
            # entry would have changed the directory), so the same excludes. Most entries
            # are unchanged too: they take the short way (visit's first branch, inlined).
            listings[d] = listing
            prefix = f"{d}/" if d else ""
            excluded.extend(prefix + n for n in listing.excluded)
            skipped.extend((prefix + n, _SOCKET) for n in listing.sockets)
            for name in listing.objects:
                path = prefix + name
                old = old_objects.get(path)
                if old is not None and check is not None and path not in check:
                    st = old.st  # the watch says nothing happened to it
                else:
                    try:
                        st = os_lstat(top + path)
                    except FileNotFoundError:
                        continue  # gone since the directory was read: not part of the tree
                ost = old.st if old is not None else None
                # same_stamp(), inlined: this runs once per object of the tree.
                if ost is None or not (st is ost or (
                    ost.st_ctime_ns < racy_ns and ost.st_ctime_ns == st.st_ctime_ns
                    and ost.st_mtime_ns == st.st_mtime_ns and ost[:7] == st[:7]
                )):
                    obj = objects[path] = visit(path, st, old)
                elif is_reg(st.st_mode):
                    obj = objects[path] = old
                    have = old_digests.get(path)
                    if have:
                        digests[path] = have
                        if trusted_set is not None and have.keys() >= trusted_set:
                            continue
                    if trusted_needs is None and dirty is not None and path not in recheck:
                        continue  # the kept digests are still all it needs
                    needs = trusted_needs if trusted_needs is not None else algos_for(path, st)
                    if needs and not (have and have.keys() >= set(needs)):
                        hasher.add(obj, needs)
                    continue
                else:
                    objects[path] = old
                if is_dir(st.st_mode):
                    enter(path, st, old, subdirs)
            stack.extend(reversed(subdirs))
        if dirty is not None:
            # Files taken whole whose needed digests the databases may have changed.
            for path in recheck:
                obj = objects.get(path)
                if obj is not None and stat.S_ISREG(obj.st.st_mode) and path.rpartition("/")[0] in copied:
                    needs = algos_for(path, obj.st)
                    have = digests.get(path)
                    if needs and not (have and have.keys() >= set(needs)):
                        hasher.add(obj, needs)
        if undecided is not None:
            decide = algos_later()
            for obj in undecided:
                algos = decide(obj.path, obj.st)
                if algos:
                    hasher.add(obj, algos)
        if check is not None:
            # A new name for a file (a hard link) changes the other names' link count
            # without an event for them.
            linked = {(o.st.st_dev, o.st.st_ino) for p in changed if (o := objects[p]).st.st_nlink > 1
                      and not stat.S_ISDIR(o.st.st_mode)}
            for path, obj in list(objects.items()) if linked else ():
                if path not in changed and (obj.st.st_dev, obj.st.st_ino) in linked:
                    with contextlib.suppress(FileNotFoundError):
                        objects[path] = visit(path, os_lstat(top + path), obj)
    except BaseException:
        hasher.abandon()
        raise
    finally:
        links.close()
    with timings.step("hash") if timings else contextlib.nullcontext():
        hashed = hasher.results(progress)
    for path, found in hashed.items():
        digests[path] = {**digests.get(path, {}), **found}
    removed = set(old_objects) - set(objects) if relisted or len(objects) != len(old_objects) else set()
    if dirty is not None:
        # Kept objects kept their content hash; only the digests of those gone go.
        for path in removed:
            digests.pop(path, None)
        skipped.extend(m for m in old_mounts if m[0].rpartition("/")[0] in copied)
        for path in hashed:
            objects[path].content_hash = digests[path].get(CONTENT_HASH)
    else:
        for path, found in digests.items():
            objects[path].content_hash = found.get(CONTENT_HASH)
    linked = None
    if dirty is not None:
        kept_objects = kept.objects
        linked = [p for p in kept.linked_paths() if objects.get(p) is kept_objects[p]] + [
            p for p in changed if (o := objects[p]).st.st_nlink > 1 and not stat.S_ISDIR(o.st.st_mode)
        ]
    return Scan(
        objects, digests, sorted(excluded), sorted(skipped), hasher.started, listings, root_st, started,
        changed if kept is not None else None, removed, len(hashed), spans, taken_whole, linked,
    )


def _links_to_check(kept: Scan, check: Collection[str]) -> set[str]:
    """Paths a change watch cannot vouch for: every name of a file with several links
    when one of them changed (a write through one name is reported for that name only),
    and files linked from outside the tree (no event at all)."""
    names: dict[tuple[int, int], list[str]] = defaultdict(list)
    objects = kept.objects
    for path in kept.linked_paths():
        st = objects[path].st
        names[(st.st_dev, st.st_ino)].append(path)
    out: set[str] = set()
    for paths in names.values():
        if len(paths) < kept.objects[paths[0]].st.st_nlink or any(p in check for p in paths):
            out.update(paths)
    return out


def _hash_chunk(rootfs: Rootfs, chunk: list[tuple[FsObject, tuple[str, ...]]]) -> list[dict[str, str]]:
    out = []
    buf = memoryview(bytearray(_READ_CHUNK))  # reused: no allocation per read
    with FileOpener(rootfs) as opener:
        for obj, algos in chunk:
            hashers = [new_hasher(a) for a in algos]
            try:
                fd, st = opener.open_fd(obj.path)
            except FileNotFoundError:
                raise TreeChangedError(f"/{obj.path} disappeared while being read") from None
            try:
                if (st.st_ino, st.st_size) != (obj.st.st_ino, obj.st.st_size):
                    raise TreeChangedError(f"/{obj.path} changed while being read")
                remaining = st.st_size
                while remaining:
                    n = os.readv(fd, [buf[: min(remaining, _READ_CHUNK)]])
                    if not n:
                        raise TreeChangedError(f"/{obj.path} shrank while being read")
                    remaining -= n
                    for h in hashers:
                        h.update(buf[:n])
            finally:
                os.close(fd)
            out.append({a: h.hexdigest() for a, h in zip(algos, hashers)})
    return out


class _Hasher:
    """Hashes the files the walk found, on worker threads, once the walk is done.

    Not while it goes on: the walk is Python work that holds the GIL, and hashing
    threads taking it back for every small file slowed both (a cold walk of the 537 MB
    benchmark tree with every file hashed: 1.03-1.11 s concurrently, 0.67-0.76 s one
    after the other; docs/benchmark.md, phase I). Files go to the workers in runs of
    `_CHUNK` in walk order: neighbours share directories (see FileOpener), and many
    small runs keep every worker busy to the end.
    """

    _CHUNK = 128

    def __init__(self, rootfs: Rootfs, cache: HashCache, jobs: int, timings: Timings | None = None):
        self.rootfs = rootfs
        self.timings = timings
        self.cache = cache
        self.jobs = max(1, jobs)
        self.pending: list[tuple[FsObject, tuple[str, ...]]] = []
        self.digests_of: dict[str, dict[str, str]] = {}
        self.started = time.time()

    def add(self, obj: FsObject, algos: tuple[str, ...]) -> None:
        cached = self.cache.get(obj.st, algos)
        if cached is not None:
            self.digests_of[obj.path] = cached
            return
        self.pending.append((obj, algos))

    def _hash(self, chunk: list[tuple[FsObject, tuple[str, ...]]]) -> list[dict[str, str]]:
        with working_for(self.timings), charge("hash"):
            return _hash_chunk(self.rootfs, chunk)

    def abandon(self) -> None:
        self.pending = []

    def results(self, progress: Progress | None = None) -> dict[str, dict[str, str]]:
        pending, self.pending = self.pending, []
        if not pending:
            return self.digests_of
        chunks = [pending[i : i + self._CHUNK] for i in range(0, len(pending), self._CHUNK)]
        done = 0
        with ThreadPoolExecutor(max_workers=min(self.jobs, len(chunks))) as pool:
            try:
                for chunk, found in zip(chunks, pool.map(self._hash, chunks)):
                    for (obj, _), digests in zip(chunk, found):
                        self.digests_of[obj.path] = digests
                        self.cache.put(obj.st, digests, self.started)
                    done += len(chunk)
                    if progress:
                        progress("hashing", done, len(pending))
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return self.digests_of
