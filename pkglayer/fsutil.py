"""File-safety primitives every module uses: a bounded read that never follows a symlink
or blocks on a FIFO, an atomic small-file write, a directory walk one component at a
time without following links, and the removal of a tree of any depth.

Nothing here recurses over path depth: a tree from an image may be as deep as its path
limit allows (2,000 levels), far beyond Python's recursion limit.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import marshal
import os
import stat
import time
from collections.abc import Callable, Sequence

from . import __version__
from .errors import PkglayerError

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def read_regular(
    path: str | os.PathLike[str],
    limit: int,
    what: str,
    error: type[PkglayerError] = PkglayerError,
    missing_ok: bool = False,
) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes, opened without following a
    symlink in its last component and without blocking on a FIFO.

    A missing file is None with `missing_ok`, else an error; anything else that is wrong
    (a symlink, not a regular file, too big) raises `error` with a one-line message
    naming `what` and the path."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{what}: {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{what}: {path} is a symlink; refusing to follow it") from None
        raise error(f"{what}: cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what}: {path} is not a regular file")
        if st.st_size > limit:
            raise error(f"{what}: {path} is {st.st_size} bytes, more than the limit of {limit}")
        # Read at most one byte past the limit, in case the file grows after fstat.
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{what}: cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise error(f"{what}: {path} is more than the limit of {limit} bytes")
    return data


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix,
    also after a crash: temp file in the same directory, fsync, rename, fsync the directory.
    A file that already holds `data` with `mode` is left as it is (an unchanged rebuild's
    history.json: two fsyncs spared)."""
    path = os.fspath(path)
    if _holds(path, data, mode):
        return
    directory = os.path.dirname(os.path.abspath(path))
    # A new random name, as tempfile.mkstemp makes (tempfile's imports cost every start).
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.urandom(8).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise
    fsync_dir(directory)


def _holds(path: str, data: bytes, mode: int) -> bool:
    """`path` is a regular file (not a symlink) of exactly `data`, with permissions `mode`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode or st.st_size != len(data):
            return False
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False
    finally:
        os.close(fd)


def write_private(path: str, data: bytes) -> None:
    """Write a cache file whole, readable by its owner only, into a directory made 0700
    if missing: a temp file renamed over `path`. No fsync: a cache's reader checks what
    it reads (a file torn by a crash is ignored)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise


def seal(magic: bytes, value: dict) -> bytes:
    """A cache file's bytes: `magic`, the sha256 of the rest, then `value` in marshal
    format (plain data only: loading it never runs code)."""
    payload = marshal.dumps(value)
    return magic + hashlib.sha256(payload).digest() + payload


def unseal(magic: bytes, data: bytes, what: str, file_format: int) -> dict:
    """What `seal` sealed, if it is whole and of this `file_format` and pkglayer version
    (its "format" and "version" keys); ValueError otherwise."""
    if not data.startswith(magic):
        raise ValueError(f"not a {what}")
    head = len(magic)
    digest, payload = data[head : head + 32], data[head + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch (a damaged file)")
    value = marshal.loads(payload)
    if value["format"] != file_format or value["version"] != __version__:
        raise ValueError("written by another version")
    return value


def evict_least_recent(directory: str, suffix: str, count: int, keep: str) -> None:
    """Leave the `count` files ending in `suffix` written last in `directory` (`keep`
    among them), and remove temp files a writer that died left over an hour ago."""
    found = []
    now = time.time()
    for entry in os.scandir(directory):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if entry.name.endswith(".tmp") and now - st.st_mtime > 3600:
            unlink_quiet(entry.path)
        elif entry.name.endswith(suffix) and entry.path != keep:
            found.append((st.st_mtime, entry.path))
    for _, path in sorted(found, reverse=True)[count - 1 :]:
        unlink_quiet(path)


def unlink_quiet(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def open_dir_nofollow(
    base_fd: int,
    parts: Sequence[str],
    create_mode: int | None = None,
    on_create: Callable[[], None] | None = None,
) -> int:
    """Open base/parts[0]/.../parts[-1] as a directory, one component at a time, never
    following a symlink (a link swapped in fails instead of escaping). Missing components
    are created with `create_mode` when it is given, calling `on_create` for each.

    On failure the OSError's `filename` is the path, relative to the base, of the
    component that failed, so the caller can say what is in the way."""
    fd = os.dup(base_fd)
    try:
        for i, part in enumerate(parts):
            try:
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if create_mode is None:
                        raise
                    if on_create is not None:
                        on_create()
                    os.mkdir(part, create_mode, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, create_mode)  # not narrowed by the umask
            except OSError as e:
                e.filename = "/".join(parts[: i + 1])
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


class Workspace:
    """A private temporary directory (an unpacked source image, a staged layout), made on
    first use under `base` (default $TMPDIR, else /var/tmp: disk-backed on Debian, and an
    unpacked OS image can be large) and removed at the end, whether the work succeeded
    or not."""

    DEFAULT_BASE = "/var/tmp"

    def __init__(self, base: str | None = None):
        self.base = base or os.environ.get("TMPDIR") or self.DEFAULT_BASE
        self._path: str | None = None
        self._names = 0

    def path(self, name: str) -> str:
        """A path for `name` inside the workspace (not created)."""
        if self._path is None:
            import tempfile

            try:
                self._path = tempfile.mkdtemp(prefix="pkglayer-", dir=self.base)
            except OSError as e:
                raise PkglayerError(f"cannot create a working directory in {self.base}: {e.strerror}") from None
        return os.path.join(self._path, name)

    def new(self, prefix: str) -> str:
        """A name inside the workspace that no earlier call returned."""
        self._names += 1
        return f"{prefix}-{self._names}"

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._path is not None:
            try:
                remove_tree(self._path)
            except OSError as e:
                # Never hides the error that ended the work; says what is left behind.
                log.warning("could not remove the working directory %s: %s", self._path, e.strerror or e)
            self._path = None


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _clear(fd: int) -> list[str]:
    """Unlink every entry of the directory `fd` but its subdirectories; return those."""
    subdirs = []
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                try:
                    os.unlink(entry.name, dir_fd=fd)
                except FileNotFoundError:
                    pass
    return subdirs


def remove_tree(name: str | os.PathLike[str], dir_fd: int | None = None) -> None:
    """Remove `name` (relative to `dir_fd` when given) and, for a directory, everything
    below it. Symlinks are removed, never followed. A missing `name` is no error.

    Iterative and holding one directory open at a time, so any depth works (shutil.rmtree
    recurses per level and keeps a descriptor per level). Going back up uses "..",
    checked to be the very directory we came down from: a directory moved away meanwhile
    stops the removal (OSError) instead of leading it elsewhere."""
    name = os.fspath(name)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    # From the top down to the directory `fd` is: (its name in its parent, its (dev, ino),
    # subdirectories still to remove; None until it has been cleared).
    path: list[tuple[str, tuple[int, int], list[str] | None]] = [(name, _ident(fd), None)]
    try:
        while True:
            here, ident, pending = path[-1]
            if pending is None:
                pending = _clear(fd)
                path[-1] = (here, ident, pending)
            if pending:
                child = pending.pop()
                try:
                    cfd = os.open(child, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    os.unlink(child, dir_fd=fd)  # no longer a directory
                    continue
                os.close(fd)
                fd = cfd
                path.append((child, _ident(fd), None))
                continue
            path.pop()
            if not path:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            if _ident(parent) != path[-1][1]:
                os.close(parent)
                raise OSError(errno.ESTALE, f"{here} was moved while being removed", name)
            os.close(fd)
            fd = parent
            os.rmdir(here, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)
