"""Watching roots: watchdog (inotify) observers on each root's package database, bridged
into asyncio, plus the helpers that decide what to watch and when a transaction settled.

What is watched, per root, all non-recursive (a recursive watch of /usr alone costs
~15,000 inotify watches; the database changes on every package transaction anyway):
- the package database directory (what `PackageSource.database_paths()` names: dpkg
  `var/lib/dpkg`, rpm's rpmdb directory, resolved inside the root) and its immediate
  subdirectories (dpkg journals every status change in `updates/`, so a long unpack
  still produces events and does not look like a settled transaction);
- while a root has no database yet (debootstrap, `dnf --installroot` just starting), the
  deepest existing directory on the way to each place a database may appear;
- the root's parent directory (or its deepest existing ancestor), filtered on the root's
  own name: a root that appears, disappears or is replaced by a rename is noticed;
- the Python site directories pip's reader searches (sources/pip.py: the system and
  /usr/local ones, user sites, virtual environments), as they are at the last scan: a
  `pip install` or upgrade creates and removes `*.dist-info` directories there. Other
  files (user components, big files) are not watched: they are read at the next build.

Each directory is scheduled once, however many roots are interested in it, and the watch
is scheduled again when the directory was replaced (new inode): inotify watches inodes,
not names.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ..errors import PkglayerError
from ..rootfs import Rootfs
from ..sources import open_source
from ..sources.dpkg import ADMINDIR
from ..sources.pip import PipSource
from ..sources.rpmdb import LOCATIONS as RPM_LOCATIONS

log = logging.getLogger(__name__)

# Where a database may appear in a root that has none yet.
DB_CANDIDATES = (ADMINDIR, *RPM_LOCATIONS)
# Reading a file is no change (our own scans read the database).
_IGNORED_EVENTS = (FileOpenedEvent, FileClosedNoWriteEvent)
# Only changes are subscribed to: inotify then never reports the opens and reads of
# every database file that each scan (the daemon's own included) makes.
_WATCHED_EVENTS = [
    FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent, FileClosedEvent,
    DirCreatedEvent, DirModifiedEvent, DirDeletedEvent, DirMovedEvent,
]
# Lock files package managers hold (fcntl) for a whole transaction, relative to the root.
_DPKG_LOCKS = (f"{ADMINDIR}/lock-frontend", f"{ADMINDIR}/lock")
_RPM_LOCK = ".rpm.lock"
# Their names: a package manager closes them when it lets go (an fcntl unlock itself makes
# no event), so the transaction may be over at once rather than a debounce later.
LOCK_NAMES = frozenset({*(os.path.basename(p) for p in _DPKG_LOCKS), _RPM_LOCK})


@dataclass(frozen=True)
class Interest:
    """A root's interest in one directory: every event, or only events naming `only`."""

    root: str
    only: str | None = None  # a child name of the watched directory


def _deepest_existing(path: str) -> tuple[str, str]:
    """(deepest existing ancestor directory of path, next component towards path)."""
    child = os.path.basename(path)
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent) and not os.path.isdir(parent):
        child = os.path.basename(parent)
        parent = os.path.dirname(parent)
    return parent, child


def watch_targets(root_path: str, package_format: str | None) -> tuple[dict[str, str | None], list[str]]:
    """Directories to watch for one root: {host directory: child name filter or None},
    and the rootfs-relative database paths found (empty when there is none yet)."""
    targets: dict[str, str | None] = {}
    parent, child = _deepest_existing(root_path)
    targets[parent] = child
    if not os.path.isdir(root_path):
        return targets, []
    try:
        with Rootfs(root_path) as rootfs:
            try:
                source = open_source(rootfs, package_format)
                db_paths = source.database_paths() if source else []
            except PkglayerError:
                db_paths = []
            found = []
            for rel in db_paths:
                real = rootfs.resolve(rel)
                host = os.path.join(root_path, real)
                if os.path.isdir(host):
                    found.append(real)
                    targets[host] = None
                    with contextlib.suppress(OSError):
                        for entry in os.scandir(host):
                            if entry.is_dir(follow_symlinks=False):
                                targets[entry.path] = None
                elif os.path.isfile(host):
                    found.append(real)
                    targets[os.path.dirname(host)] = None
            for site in PipSource(rootfs).site_dirs():
                targets.setdefault(os.path.join(root_path, site.path), None)
            if not found:
                targets[root_path] = None
                for rel in DB_CANDIDATES:
                    real = rootfs.resolve(rel)
                    host = os.path.join(root_path, real)
                    if os.path.isdir(host):
                        targets[host] = None
                    else:
                        ancestor, _ = _deepest_existing(host)
                        if ancestor == root_path or ancestor.startswith(root_path + "/"):
                            targets.setdefault(ancestor, None)
            return targets, found
    except PkglayerError:
        return targets, []


def _lock_holder(path: str) -> int | None:
    """pid of a process holding an fcntl (POSIX) write lock on `path`, else None.

    Asks with F_GETLK, which takes no lock: dpkg and rpm would fail if we held one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        try:
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EBADF):
                return None
            raise
        l_type, _, _, _, pid = struct.unpack("hhqqi4x", answer)
        return None if l_type == fcntl.F_UNLCK else pid
    finally:
        os.close(fd)


def transaction_running(root_path: str, db_paths: list[str]) -> str | None:
    """Describe a package transaction in progress in the root (its lock is held), else None."""
    for rel in _DPKG_LOCKS:
        pid = _lock_holder(os.path.join(root_path, rel))
        if pid is not None:
            return f"{rel} is held by pid {pid}"
    for rel in db_paths:
        pid = _lock_holder(os.path.join(root_path, rel, _RPM_LOCK))
        if pid is not None:
            return f"{rel}/{_RPM_LOCK} is held by pid {pid}"
    return None


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher, directory: str):
        self.watcher = watcher
        self.directory = directory

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, _IGNORED_EVENTS):
            return
        if isinstance(event, DirModifiedEvent) and os.fsdecode(event.src_path) == self.directory:
            # watchdog's echo of an event about one of its entries, reported on its own:
            # after a lock file's close it would put the debounce back.
            return
        self.watcher._dispatch(self.directory, event)


class Watcher:
    """One watchdog observer for all roots. `callback(root, description, released)` runs
    on the event loop (via call_soon_threadsafe) for every relevant event; `released`
    when it is a package manager's lock file being closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[str, str, bool], None]):
        self.loop = loop
        self.callback = callback
        self.observer = Observer()
        self.observer.daemon = True
        self._lock = threading.Lock()
        self._interest: dict[str, set[Interest]] = {}
        self._watches: dict[str, tuple[object, tuple[int, int]]] = {}

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)

    def directories(self) -> dict[str, list[str]]:
        with self._lock:
            return {d: sorted(i.root for i in s) for d, s in sorted(self._interest.items())}

    def set_targets(self, root: str, targets: dict[str, str | None]) -> None:
        """Replace what `root` watches with `targets` (see watch_targets); {} drops it."""
        with self._lock:
            for directory in list(self._interest):
                self._interest[directory] = {i for i in self._interest[directory] if i.root != root}
            for directory, only in targets.items():
                self._interest.setdefault(directory, set()).add(Interest(root, only))
            wanted = {d for d, s in self._interest.items() if s}
            self._interest = {d: s for d, s in self._interest.items() if s}
        for directory in list(self._watches):
            if directory not in wanted:
                self._unschedule(directory)
        for directory in wanted:
            try:
                st = os.stat(directory)
            except OSError:
                self._unschedule(directory)
                continue
            ident = (st.st_dev, st.st_ino)
            current = self._watches.get(directory)
            if current is not None and current[1] == ident:
                continue
            self._unschedule(directory)
            try:
                watch = self.observer.schedule(
                    _Handler(self, directory), directory, recursive=False, event_filter=_WATCHED_EVENTS
                )
            except OSError as e:
                log.warning("cannot watch %s: %s", directory, e.strerror or e)
                continue
            self._watches[directory] = (watch, ident)

    def _unschedule(self, directory: str) -> None:
        current = self._watches.pop(directory, None)
        if current is not None:
            with contextlib.suppress(Exception):  # its emitter may have stopped (directory deleted)
                self.observer.unschedule(current[0])

    def _dispatch(self, directory: str, event: FileSystemEvent) -> None:
        """Runs in watchdog's thread."""
        paths = [os.fsdecode(event.src_path)]
        if getattr(event, "dest_path", ""):
            paths.append(os.fsdecode(event.dest_path))
        names = {os.path.basename(p) for p in paths if os.path.dirname(p) == directory}
        with self._lock:
            interests = list(self._interest.get(directory, ()))
        released = isinstance(event, FileClosedEvent) and os.path.basename(paths[-1]) in LOCK_NAMES
        for interest in interests:
            if interest.only is not None and interest.only not in names:
                continue
            description = f"{event.event_type} {paths[-1]}"
            try:
                self.loop.call_soon_threadsafe(self.callback, interest.root, description, released)
            except RuntimeError:
                return  # the loop is closed: shutting down
