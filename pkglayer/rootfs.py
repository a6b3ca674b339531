"""Read-only access to a root filesystem that never leaves it.

Paths are rootfs-relative strings without a leading slash ("usr/bin/bash"; "" is the
root itself). Symlinks are resolved the way a chroot would see them: an absolute target
restarts at the rootfs, ".." stops at the rootfs. Every open walks the path one component
at a time with O_NOFOLLOW, so a link swapped in while we read fails instead of escaping.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from operator import attrgetter

from .errors import RootfsError, TreeChangedError
from .fsutil import open_dir_nofollow

_MAX_SYMLINKS = 40  # same limit as the kernel's path walk


_UNSEEN = object()
# Resolutions a Rootfs remembers (a package database names some ten thousand paths).
_MAX_RESOLVED = 65536
_NAME = attrgetter("name")


def split(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


class Rootfs:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.path.abspath(os.fspath(path))
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise RootfsError(f"rootfs {self.path} does not exist") from None
        except OSError as e:
            raise RootfsError(f"rootfs {self.path}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise RootfsError(f"rootfs {self.path} is not a directory")
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise RootfsError(f"rootfs {self.path}: {e.strerror}") from None
        self.dev = st.st_dev
        # Resolutions cached per instance (a method's lru_cache would keep every
        # Rootfs alive, with its entries, for as long as the process lives).
        self._resolved: dict[tuple[str, ...], str] = {}
        # With a dict here, every path looked up is noted with what was found (see
        # `noted`): what was read from the tree, to tell later whether it is unchanged.
        self.trace: dict[str, Noted] | None = None
        # Notes known to hold still (an earlier trace, less what a watch saw change
        # since: the daemon's): a lookup found there needs no system call.
        self.known: Mapping[str, Noted] | None = None
        # The trace of an earlier read every resolution of which resolves the same now
        # (the daemon's, after checking what changed): what was made of them may be kept.
        self.holding: dict[str, Noted] | None = None

    def stat(self) -> os.stat_result:
        """The root directory's own lstat."""
        return os.fstat(self._fd)

    def _note(self, path: str, st: os.stat_result | None, listed: bool = False) -> None:
        if self.trace is not None and (listed or path not in self.trace):
            self.trace[path] = noted(st, listed)

    def _known(self, path: str) -> Noted | object:
        """The note `known` holds for `path` (noted again in the trace), else _UNSEEN."""
        was = self.known.get(path, _UNSEEN) if self.known is not None else _UNSEEN
        if was is not _UNSEEN and self.trace is not None and (path not in self.trace or (
                was is not None and was[0] == "f")):
            self.trace[path] = was
        return was

    def _mode(self, path: str) -> int | None:
        """The mode of what is at `path` (no link followed), noted; None if nothing."""
        was = self._known(path)
        if was is not _UNSEEN:
            return None if was is None else stat.S_IFDIR if was[0] == "d" else was[3]
        try:
            st = os.lstat(os.path.join(self.path, path))
        except (FileNotFoundError, NotADirectoryError):
            self._note(path, None)
            return None
        self._note(path, st)
        return st.st_mode

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Rootfs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- path resolution ---------------------------------------------------------------

    def resolve(self, relpath: str, follow_final: bool = True) -> str:
        """Resolve symlinks inside the rootfs; the result names no symlink except
        possibly the final component when follow_final is False."""
        comps = split(relpath)
        if not comps:
            return ""
        if follow_final:
            return self._resolve(tuple(comps))
        parent = self._resolve(tuple(comps[:-1]))
        last = comps[-1]
        if last == "..":
            return self._resolve(tuple(split(parent) + [".."]))
        return f"{parent}/{last}" if parent else last

    def _resolve(self, comps: tuple[str, ...]) -> str:
        found = self._resolved.get(comps)
        if found is None:
            found = self._resolve_uncached(comps)
            if len(self._resolved) < _MAX_RESOLVED:
                self._resolved[comps] = found
        return found

    def _resolve_uncached(self, comps: tuple[str, ...]) -> str:
        if len(comps) > 1 and ".." not in comps:
            # The parent's resolution (cached: a package database names thousands of
            # paths in a few hundred directories), then the last component. Not with
            # "..": after a missing component the rest is taken as written, so "none/.."
            # must not be resolved on its own.
            done = split(self._resolve(comps[:-1]))
            todo = [comps[-1]]
        else:
            done, todo = [], list(comps)
        links = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            candidate = "/".join([*done, name])
            mode = self._mode(candidate)
            if mode is None:
                # Nothing there (or not a directory above): the rest of the path cannot
                # contain links either.
                done.append(name)
                done.extend(todo)
                return "/".join(_normalise(done))
            if stat.S_ISLNK(mode):
                links += 1
                if links > _MAX_SYMLINKS:
                    raise RootfsError(f"too many levels of symbolic links in /{'/'.join(comps)}")
                target = os.readlink(os.path.join(self.path, candidate))
                if target.startswith("/"):
                    done = []
                todo = split(target) + todo
                continue
            done.append(name)
        return "/".join(done)

    # -- opening -----------------------------------------------------------------------

    def _open_dirs(self, comps: list[str]) -> int:
        """Open a directory below the root, component by component, never following a link."""
        return open_dir_nofollow(self._fd, comps)

    def open_fd(self, relpath: str, resolve: bool = True) -> int:
        """Open a regular file for reading. With resolve, in-root symlinks are followed
        (chroot semantics); without, the path must contain no symlink at all."""
        rel = self.resolve(relpath) if resolve else relpath
        comps = split(rel)
        if not comps:
            raise RootfsError("cannot open the rootfs itself as a file")
        try:
            dfd = self._open_dirs(comps[:-1])
        except OSError as e:
            _raise_if_swapped(e, relpath)
            raise
        try:
            return _open_regular(comps[-1], dfd, relpath)[0]
        finally:
            os.close(dfd)

    def open(self, relpath: str, resolve: bool = True):
        return os.fdopen(self.open_fd(relpath, resolve), "rb", buffering=1024 * 1024)

    def read_bytes(self, relpath: str, max_size: int | None = None) -> bytes:
        with self.open(relpath) as f:
            if max_size is not None:
                data = f.read(max_size + 1)
                if len(data) > max_size:
                    raise RootfsError(f"/{relpath} is larger than {max_size} bytes")
                return data
            return f.read()

    def _found(self, relpath: str) -> Noted:
        """What is at `relpath`, symlinks resolved, as `noted` puts it ("f" for a
        directory too). Traced, the lookup that resolved it is that answer already: a
        path noted is one with no symlink above it (what a lookup is made of)."""
        if self.trace is not None:
            was = self.trace.get(relpath, _UNSEEN)
            if was is None or (was is not _UNSEEN and was[0] == "f" and not stat.S_ISLNK(was[3])):
                return was
        real = self.resolve(relpath)
        if self.trace is not None:
            was = self.trace.get(real, _UNSEEN)
            if was is None or (was is not _UNSEEN and was[0] == "f"):
                return was
        was = self._known(real)
        if was is None or (was is not _UNSEEN and was[0] == "f"):
            return was
        try:
            return noted(os.lstat(os.path.join(self.path, real)), listed=True)
        except OSError:
            return None

    def exists(self, relpath: str) -> bool:
        return self._found(relpath) is not None

    def stamp(self, relpath: str) -> tuple[int, ...] | None:
        """What identifies the content of the file at `relpath` (symlinks resolved) while
        it is unchanged: device, inode, mode, size, mtime and ctime; None if there is nothing."""
        found = self._found(relpath)
        return None if found is None else found[1:]

    def is_file(self, relpath: str) -> bool:
        found = self._found(relpath)
        return found is not None and stat.S_ISREG(found[3])

    def listdir(self, relpath: str) -> list[str]:
        rel = self.resolve(relpath)
        try:
            fd = self._open_dirs(split(rel))
        except OSError:
            return []
        try:
            if self.trace is not None:
                self._note(rel, os.fstat(fd), listed=True)
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def readlink(self, relpath: str) -> str:
        comps = split(relpath)
        fd = self._open_dirs(comps[:-1])
        try:
            return os.readlink(comps[-1], dir_fd=fd)
        finally:
            os.close(fd)

    def getxattrs(self, relpath: str) -> dict[str, bytes]:
        """Extended attributes of the object itself (not of a link target)."""
        full = f"{self.path}/{relpath}"  # not os.path.join: once per object of every walk
        try:
            names = os.listxattr(full, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.ENODATA):
                return {}
            raise
        out = {}
        for n in names:
            try:
                out[n] = os.getxattr(full, n, follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
        return out

    # -- walking -----------------------------------------------------------------------

    def entries(
        self, relpath: str, known: Callable[[str, int], os.stat_result | None] | None = None
    ) -> Iterator[tuple[str, os.stat_result]]:
        """The entries of a directory the walk found, sorted by name, each with its lstat
        taken as it is reached (or what `known(name, inode)` gives for it instead: an
        lstat known to hold); an entry that vanishes before then is not part of the tree."""
        try:
            with os.scandir(f"{self.path}/{relpath}" if relpath else self.path) as it:
                found = sorted(it, key=_NAME)
        except FileNotFoundError:
            raise TreeChangedError(f"/{relpath} disappeared while being read") from None
        except PermissionError as e:
            raise RootfsError(f"/{relpath}: {e.strerror}") from None
        for de in found:
            st = known(de.name, de.inode()) if known is not None else None
            if st is None:
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
            yield de.name, st


# What a traced lookup found at a path: None (nothing there), ("d", dev, ino) for a
# directory passed through, ("f", dev, ino, mode, size, mtime_ns, ctime_ns) for anything
# else and for a directory listed (its mtime changes with its entries).
Noted = tuple | None


def noted(st: os.stat_result | None, listed: bool = False) -> Noted:
    if st is None:
        return None
    if stat.S_ISDIR(st.st_mode) and not listed:
        return ("d", st.st_dev, st.st_ino)
    return ("f", st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def unchanged(root: str, trace: dict[str, Noted]) -> bool:
    """Every path of a trace still finds what it found then (one lstat each). Parents
    come before their children in a trace, so a directory that became a symlink fails
    before any path below it is looked up through the link."""
    for path, was in trace.items():
        try:
            st = os.lstat(os.path.join(root, path))
        except (FileNotFoundError, NotADirectoryError):
            if was is not None:
                return False
            continue
        if was is None or noted(st, listed=was[0] == "f") != was:
            return False
    return True


class FileOpener:
    """Opens many files below the root without re-walking shared parents.

    Paths come sorted, so neighbours share directories: keeping the last few directory
    descriptors open saves most of the component-by-component opens. Each directory is
    still opened with O_NOFOLLOW from its (already safe) parent. Not thread-safe: one
    opener per worker.
    """

    def __init__(self, rootfs: Rootfs, max_dirs: int = 32):
        self.rootfs = rootfs
        self.max_dirs = max(2, max_dirs)
        self._dirs: OrderedDict[str, int] = OrderedDict()

    def __enter__(self) -> FileOpener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _dir(self, rel: str) -> int:
        fd = self._dirs.get(rel)
        if fd is not None:
            self._dirs.move_to_end(rel)
            return fd
        # From the nearest open ancestor down, one component at a time (a loop, not a
        # recursion: trees may be thousands of levels deep).
        parts = rel.split("/") if rel else []
        i = len(parts) - 1
        while i > 0 and "/".join(parts[:i]) not in self._dirs:
            i -= 1
        if i <= 0 and "" not in self._dirs:
            self._add("", os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.rootfs._fd))
        fd = self._dirs["/".join(parts[:max(i, 0)])]
        for j in range(max(i, 0), len(parts)):
            # The parent was added last, so _add never evicts it before this open.
            child = os.open(parts[j], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            fd = self._add("/".join(parts[: j + 1]), child)
        return fd

    def _add(self, rel: str, fd: int) -> int:
        self._dirs[rel] = fd
        self._dirs.move_to_end(rel)
        if len(self._dirs) > self.max_dirs:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def _parent(self, relpath: str) -> tuple[int, str]:
        parent, _, name = relpath.rpartition("/")
        try:
            return self._dir(parent), name
        except OSError as e:
            _raise_if_swapped(e, relpath)
            raise

    def open_fd(self, relpath: str) -> tuple[int, os.stat_result]:
        """Open a regular file whose path contains no symlink (a path from the walk);
        returns the descriptor and its fstat."""
        dir_fd, name = self._parent(relpath)
        return _open_regular(name, dir_fd, relpath)

    def readlink(self, relpath: str) -> str:
        """The target of a symlink whose parents are no symlinks (a path from the walk)."""
        dir_fd, name = self._parent(relpath)
        return os.readlink(name, dir_fd=dir_fd)


def _raise_if_swapped(e: OSError, relpath: str) -> None:
    # O_NOFOLLOW/O_DIRECTORY refused a component: something became a symlink after the walk.
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        raise RootfsError(f"/{relpath} changed into a symlink while being read") from None


def _open_regular(name: str, dir_fd: int, relpath: str) -> tuple[int, os.stat_result]:
    """Open `name` in `dir_fd` without following a link; it must be a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        _raise_if_swapped(e, relpath)
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RootfsError(f"/{relpath} is not a regular file")
    return fd, st


def _normalise(comps: list[str]) -> list[str]:
    out: list[str] = []
    for c in comps:
        if c == "..":
            if out:
                out.pop()
        elif c and c != ".":
            out.append(c)
    return out
