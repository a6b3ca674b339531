"""Which paths of a root changed since its last build: a recursive inotify watch of the
whole root, so that a build re-reads only those (keptscan.py) instead of the tree.

The kernel queues an event in the same system call that makes the change, so draining
the queue when a build starts (`take`) is a barrier: every change made before it is
known. A change made while the build runs is kept for the next one. Nothing is missed;
when something could be, the next build checks every path (lstat, the way the CLI does)
instead of only the named ones:
- the kernel's queue overflowed (IN_Q_OVERFLOW), or more paths changed than is worth
  listing (a big transaction: a full check is then cheaper);
- a directory could not be watched (out of inotify watches, no permission): every build
  checks every path for as long as that lasts, and the watch is set up again each time;
- a directory was moved out of sight (watches follow inodes, so the names of the
  watches below it would be wrong), or the root itself replaced: the watches are set up
  again. A directory renamed within the root (dpkg makes each new one as NAME.dpkg-new,
  then renames it) is not: the event of its new name has every watch below it named
  again, and its own move is then found to be where that says;
- the daemon started (nothing is kept across restarts), or the build that took the
  changes failed (they are given to the next one again).

One thread per root reads the events as they come (so a long transaction does not fill
the kernel's queue); `take` reads what is left.

What inotify cannot see, this cannot either: a file changed through a shared writable
mapping (mmap) gets no event, nor does a file on a network filesystem changed by another
machine. The CLI, which checks every path, sees those.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import threading
from collections.abc import Collection

from inotify_simple import INotify
from inotify_simple import flags as F

from ..keptscan import KeptScan

log = logging.getLogger(__name__)

# Every change to a name, its data or its metadata (not opens and reads: the builds read
# the tree). IN_EXCL_UNLINK: no events for files already unlinked but still open.
_MASK = (
    F.MODIFY | F.ATTRIB | F.CLOSE_WRITE | F.MOVED_FROM | F.MOVED_TO | F.CREATE | F.DELETE | F.DELETE_SELF
    | F.MOVE_SELF | F.DONT_FOLLOW | F.ONLYDIR | F.EXCL_UNLINK
)
# Events that change a directory's entries: the directory is listed again too.
_ENTRY_EVENTS = F.CREATE | F.DELETE | F.MOVED_FROM | F.MOVED_TO
# More changed paths than this: check them all instead (about a second of lstat).
MAX_LISTED = 200_000


class TreeWatch:
    """A recursive watch of one root directory (`take`: the paths changed since)."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._lock = threading.Lock()
        self._inotify = INotify(nonblocking=True)
        self._wds: dict[int, str] = {}  # watch descriptor -> rootfs-relative directory ("" the root)
        self._inodes: dict[int, int] = {}  # watch descriptor -> the inode it watches
        self._changed: set[str] = set()
        self._taken: set[str] | None = None  # given to a build that has not kept its scan yet
        self._all = True  # every path may have changed (nothing known yet)
        self._taken_all = False
        self._unwatched: str | None = None  # why some directory has no watch
        self._stale = False  # a directory was renamed: the names of the watches are wrong
        self._root_id: tuple[int, int] | None = None
        self._closed = False
        with self._lock:
            self._setup()
        self._thread = threading.Thread(target=self._run, name=f"watch {self.root}", daemon=True)
        self._thread.start()

    @property
    def watches(self) -> int:
        return len(self._wds)

    def close(self) -> None:
        # Not joined: the thread sees `_closed` within a second and ends.
        with self._lock:
            self._closed = True
            self._inotify.close()

    def take(self) -> Collection[str] | None:
        """The rootfs-relative paths that may have changed since the last `kept` (None:
        any may have). Directories among them are to be listed again."""
        with self._lock:
            if self._closed:
                return None
            self._drain()
            if self._taken is not None:  # the build that took them did not finish
                self._changed |= self._taken
                self._all = self._all or self._taken_all
            if self._unwatched is not None or self._stale or self._root_moved():
                self._setup()  # every path may have changed meanwhile
            self._taken, self._taken_all = self._changed, self._all
            self._changed, self._all = set(), False
            return None if self._taken_all else set(self._taken)

    def kept(self) -> None:
        """The build that took the changes kept its scan: they are accounted for."""
        with self._lock:
            self._taken, self._taken_all = None, False

    # -- in the lock ----------------------------------------------------------------

    def _root_moved(self) -> bool:
        try:
            st = os.lstat(self.root)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._root_id

    def _setup(self) -> None:
        """Watch every directory of the root afresh; what happened before is unknown."""
        for wd in list(self._wds):
            try:
                self._inotify.rm_watch(wd)
            except OSError:
                pass  # already gone with its directory
        self._wds.clear()
        self._inodes.clear()
        self._all = True
        self._unwatched = None
        self._stale = False
        try:
            st = os.lstat(self.root)
        except OSError as e:
            self._unwatched = f"{self.root}: {e.strerror}"
            return
        self._root_id = (st.st_dev, st.st_ino)
        self._watch_tree("")

    def _watch_tree(self, top: str, found: set[str] | None = None) -> None:
        """Watch `top` and every directory below it; with `found`, add every path there
        (made before its directory was watched, so without events of their own)."""
        stack: list[tuple[str, int | None]] = [(top, None)]
        while stack:
            rel, inode = stack.pop()
            host = os.path.join(self.root, rel) if rel else self.root
            try:
                if inode is None:
                    inode = os.lstat(host).st_ino  # before the watch: a directory replaced meanwhile mismatches
                wd = self._inotify.add_watch(host, _MASK)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    continue  # gone already: its parent's event says so
                if self._unwatched is None:
                    self._unwatched = "out of inotify watches (fs.inotify.max_user_watches)" if (
                        e.errno == errno.ENOSPC) else (e.strerror or str(e))
                    log.warning("cannot watch /%s in %s (%s): every build checks the whole tree",
                                rel, self.root, self._unwatched)
                continue
            self._wds[wd] = rel
            self._inodes[wd] = inode
            try:
                with os.scandir(host) as it:
                    for entry in it:
                        path = f"{rel}/{entry.name}" if rel else entry.name
                        if found is not None:
                            found.add(path)
                        if entry.is_dir(follow_symlinks=False):
                            stack.append((path, entry.inode()))
            except OSError:
                continue  # gone or unreadable: the build's own listing says what is there

    def _found_at(self, wd: int, rel: str) -> bool:
        """Whether the directory watched by `wd` is at `rel` (its watch named again after
        a rename within the root)."""
        try:
            st = os.lstat(os.path.join(self.root, rel))
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_ino == self._inodes.get(wd)

    def _drain(self) -> None:
        if self._closed:
            return
        try:
            events = self._inotify.read(timeout=0)
        except OSError as e:
            log.warning("reading the watch of %s: %s", self.root, e.strerror or e)
            self._all = True
            return
        for event in events:
            self._event(event.wd, event.mask, event.name)
        if len(self._changed) > MAX_LISTED:
            self._changed.clear()
            self._all = True

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & F.Q_OVERFLOW:
            log.info("the watch of %s overflowed: the next build checks the whole tree", self.root)
            self._all = True
            return
        d = self._wds.get(wd)
        if mask & F.IGNORED:
            self._wds.pop(wd, None)
            self._inodes.pop(wd, None)
            return
        if d is None:
            return
        if mask & (F.DELETE_SELF | F.MOVE_SELF):
            if d == "" or (mask & F.MOVE_SELF and not self._found_at(wd, d)):
                # The root replaced, or a directory moved where its new name was not
                # seen: the names below it are stale.
                self._stale = True
                self._all = True
            return
        path = f"{d}/{name}" if d and name else d or name  # no name: the directory itself
        self._changed.add(path)
        if mask & _ENTRY_EVENTS:
            self._changed.add(d)
        if mask & F.ISDIR and mask & (F.CREATE | F.MOVED_TO):
            # Its entries may have been made before this watch could see them.
            self._watch_tree(path, self._changed)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        while True:
            # Wait without the lock (a second at most, to notice `close`), read with it.
            ready = poller.poll(1000)
            with self._lock:
                if self._closed:
                    return
                if ready:
                    self._drain()


class WatchedScans:
    """The daemon's KeptScans (keptscan.py) of one root: the last scan, in memory, with
    the root's TreeWatch naming what changed since."""

    def __init__(self, root: str):
        self.root = root
        self.watch = TreeWatch(root)
        self._kept: KeptScan | None = None

    def take(self, root: str, fingerprint: str) -> tuple[KeptScan | None, Collection[str] | None]:
        changed = self.watch.take()
        kept = self._kept
        if kept is None or kept.root != root or kept.fingerprint != fingerprint:
            return None, None
        return kept, changed

    def keep(self, kept: KeptScan) -> None:
        self._kept = kept
        self.watch.kept()

    def close(self) -> None:
        self.watch.close()
        self._kept = None
