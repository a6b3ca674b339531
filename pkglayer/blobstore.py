"""Content-addressed blob directories (`<root>/blobs/sha256/<hex>`) with atomic writes.

Used for OCI image layouts and for the /layers protocol's `input/` and `output/`
directories. A blob only ever appears under its final name complete and fsynced: it is
written to `<root>/.pkglayer-tmp/` (same filesystem) and renamed into place.

Blobs in `input/` come from a previous build and are not trusted: every read opens the
file with O_NOFOLLOW, insists on a regular file, and imports are re-hashed.

Stale temp files: every BlobWriter holds an exclusive flock() on its temp file for as
long as it lives. The kernel drops the lock when the owning process dies, however it
dies, so a temp file whose lock can be taken belongs to a dead writer and is removed.
Unlike pid or age checks this cannot remove a live writer's file, also when the same
directory is shared between a build container and the host (different pid namespaces)
and regardless of clocks or pid reuse.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import re
import secrets
import stat
import time
from types import TracebackType
from typing import NoReturn

from .digests import is_digest
from .errors import DigestError, PkglayerError
from .fsutil import fsync_dir, read_regular, unlink_quiet

TMP_DIR = ".pkglayer-tmp"
_TMP_RE = re.compile(r"blob-[0-9a-f]{32}\.tmp")
_LINK_TMP_RE = re.compile(r"link-[0-9a-f]{32}\.tmp")
# Hard links made by import_blob hold no lock (locking would lock the source's inode);
# they live for one call, so one left for this long was abandoned by a dead process.
_LINK_TMP_MAX_AGE = 3600
_CHUNK = 1 << 20
# Blobs are immutable, and an imported blob may share its inode with input/ via a hard link.
_BLOB_MODE = 0o444


def _open_regular(path: str) -> int | None:
    """Open `path` for reading if it is a regular file (never through a symlink), else None.

    O_NONBLOCK keeps a hostile FIFO from blocking the open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def _space_error(e: OSError, root: str) -> PkglayerError | None:
    if e.errno == errno.ENOSPC:
        return PkglayerError(f"no space left on device while writing blob to {root}")
    if e.errno == errno.EDQUOT:
        return PkglayerError(f"disk quota exceeded while writing blob to {root}")
    return None


class BlobDir:
    """A directory laid out as <root>/blobs/sha256/<hex> (an OCI layout, or /layers/input, /layers/output).

    With create=False the root must exist, but blobs/sha256 may be missing (an empty
    input/ then simply has no blobs). create=True creates the directories and removes
    temp files left by writers that died."""

    def __init__(self, root: str | os.PathLike[str], create: bool = False):
        self.root = os.fspath(root)
        self.blobs = os.path.join(self.root, "blobs", "sha256")
        self.tmp = os.path.join(self.root, TMP_DIR)
        if create:
            self._ensure_dirs()
            self.remove_stale_temps()
        elif not os.path.isdir(self.root):
            raise PkglayerError(f"blob directory {self.root} does not exist or is not a directory")

    def __repr__(self) -> str:
        return f"BlobDir({self.root!r})"

    def _ensure_dirs(self) -> None:
        try:
            os.makedirs(self.blobs, exist_ok=True)
            os.makedirs(self.tmp, exist_ok=True)
        except OSError as e:
            raise PkglayerError(f"cannot create blob directory in {self.root}: {e.strerror}") from e

    def path(self, digest: str) -> str:
        """Where the blob with this digest lives. Raises DigestError for a malformed digest,
        which also rules out any path trickery ("/", "..") in the name."""
        if not is_digest(digest):
            raise DigestError(f"invalid blob digest {digest!r}: expected sha256:<64 lower-case hex>")
        return os.path.join(self.blobs, digest[len("sha256:"):])

    def has(self, digest: str) -> bool:
        """A regular file (not a symlink) exists under that name. Its content is not checked."""
        try:
            return stat.S_ISREG(os.lstat(self.path(digest)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def size(self, digest: str) -> int:
        """Size in bytes of a present blob (lstat: a symlink is not a blob)."""
        st = os.lstat(self.path(digest))
        if not stat.S_ISREG(st.st_mode):
            raise PkglayerError(f"blob {digest} in {self.root} is not a regular file")
        return st.st_size

    def verify(self, digest: str, size: int | None = None) -> bool:
        """The blob is a regular file whose sha256 equals its name (and of `size` bytes,
        checked first: a huge file under a wanted name costs nothing)."""
        fd = _open_regular(self.path(digest))
        if fd is None:
            return False
        try:
            if size is not None and os.fstat(fd).st_size != size:
                return False
            return _sha256_fd(fd) == digest
        finally:
            os.close(fd)

    def read(
        self, digest: str, size: int, limit: int, what: str, error: type[PkglayerError] = PkglayerError
    ) -> bytes:
        """A small blob (manifest, config, index) of `size` bytes, checked against its
        digest; sizes above `limit` are refused before anything is read."""
        if size > limit:
            raise error(f"{what} {digest} is {size} bytes, more than the limit of {limit}")
        data = read_regular(self.path(digest), limit, f"{what} {digest}", error)
        assert data is not None
        if len(data) != size:
            raise error(f"{what} {digest} is {len(data)} bytes, its descriptor says {size}")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise error(f"{what} {digest} does not match its digest: the content has {actual}")
        return data

    def writer(self) -> BlobWriter:
        self._ensure_dirs()
        return BlobWriter(self)

    def add_bytes(self, data: bytes) -> tuple[str, int]:
        """Store `data` and return (digest, size). No-op when a valid copy is already present."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.verify(digest):
            return digest, len(data)
        with self.writer() as w:
            w.write(data)
            return w.commit(expected_digest=digest)

    def import_blob(self, src: BlobDir, digest: str) -> None:
        """Make `digest` present here, taken from `src`: a hard link when both are on one
        filesystem, else a copy. The result is verified before it gets its final name.
        No-op if a valid copy is already here. Raises PkglayerError if `src` lacks the
        blob or its content does not match the digest."""
        final = self.path(digest)
        if self.verify(digest):
            return
        src_path = src.path(digest)
        self._ensure_dirs()
        tmp = os.path.join(self.tmp, f"link-{secrets.token_hex(16)}.tmp")
        try:
            # follow_symlinks=False: a symlink in src is linked as a symlink, and then
            # fails the regular-file check below instead of importing its target.
            os.link(src_path, tmp, follow_symlinks=False)
        except FileNotFoundError:
            raise PkglayerError(f"blob {digest} is missing from {src.root}") from None
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                raise PkglayerError(f"cannot link blob {digest} from {src.root}: {e.strerror}") from e
            self.copy_blob(src, digest)
            return
        try:
            fd = _open_regular(tmp)
            if fd is None:
                raise PkglayerError(f"blob {digest} in {src.root} is not a regular file")
            try:
                actual = _sha256_fd(fd)
            finally:
                os.close(fd)
            if actual != digest:
                raise PkglayerError(f"blob {digest} in {src.root} is corrupt: its content has digest {actual}")
            os.replace(tmp, final)
        except BaseException:
            unlink_quiet(tmp)
            raise
        fsync_dir(self.blobs)

    def copy_blob(self, src: BlobDir, digest: str) -> None:
        """Make `digest` present here as a copy of the one in `src`, verified before it
        gets its final name (never a link: the two stay independent)."""
        fd = _open_regular(src.path(digest))
        if fd is None:
            raise PkglayerError(f"blob {digest} is missing from {src.root} or is not a regular file")
        try:
            with self.writer() as w:
                while chunk := os.read(fd, _CHUNK):
                    w.write(chunk)
                try:
                    w.commit(expected_digest=digest)
                except PkglayerError as e:
                    raise PkglayerError(f"blob {digest} in {src.root} is corrupt: {e}") from None
        finally:
            os.close(fd)

    def remove_stale_temps(self) -> list[str]:
        """Remove temp files of writers that are gone (see the module docstring); return their names."""
        removed: list[str] = []
        try:
            names = os.listdir(self.tmp)
        except FileNotFoundError:
            return removed
        for name in sorted(names):
            path = os.path.join(self.tmp, name)
            if _LINK_TMP_RE.fullmatch(name):
                if _older_than(path, _LINK_TMP_MAX_AGE):
                    unlink_quiet(path)
                    removed.append(name)
                continue
            if not _TMP_RE.fullmatch(name):
                continue  # not ours: leave it alone
            fd = _open_regular(path)
            if fd is None:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer holds it
                unlink_quiet(path)
                removed.append(name)
            finally:
                os.close(fd)
        return removed


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.lstat(path).st_mtime > seconds
    except FileNotFoundError:
        return False


class BlobWriter:
    """Streams one blob into a temp file, hashing as data flows; `commit()` publishes it.

    Use as a context manager: leaving the block without commit() (an exception,
    KeyboardInterrupt) removes the temp file."""

    def __init__(self, blobdir: BlobDir):
        self._dir = blobdir
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False
        self.tmp_path, fd = self._create_locked()
        self._file: io.BufferedWriter = open(fd, "wb", buffering=_CHUNK, closefd=True)

    def _create_locked(self) -> tuple[str, int]:
        while True:
            path = os.path.join(self._dir.tmp, f"blob-{secrets.token_hex(16)}.tmp")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as e:
                err = _space_error(e, self._dir.root)
                raise err or PkglayerError(f"cannot create a temp file in {self._dir.tmp}: {e.strerror}") from e
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A cleaner may have taken the lock between our create and flock, and removed
            # the file: then start over with a new name.
            if os.fstat(fd).st_nlink > 0:
                return path, fd
            os.close(fd)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._done:
            raise ValueError("write to a committed or aborted BlobWriter")
        try:
            n = self._file.write(data)
        except OSError as e:
            self._fail(e)
        self._hash.update(data)
        self.size += n
        return n

    def commit(self, expected_digest: str | None = None) -> tuple[str, int]:
        """Flush, fsync, and rename the blob to its final name; return (digest, size).

        If a blob with that name exists it is replaced atomically: the content is the
        same if it was valid, and a corrupt one gets repaired. With `expected_digest`, a
        different digest raises PkglayerError and nothing is published."""
        if self._done:
            raise ValueError("BlobWriter already committed or aborted")
        digest = "sha256:" + self._hash.hexdigest()
        if expected_digest is not None and digest != expected_digest:
            self.abort()
            raise PkglayerError(f"blob content has digest {digest}, expected {expected_digest}")
        final = self._dir.path(digest)
        try:
            self._file.flush()
            os.fchmod(self._file.fileno(), _BLOB_MODE)
            os.fsync(self._file.fileno())
            # Rename while still holding the lock, so a cleaner never sees a finished temp unlocked.
            os.replace(self.tmp_path, final)
        except OSError as e:
            self._fail(e)
        self._done = True
        self._close()
        fsync_dir(self._dir.blobs)
        return digest, self.size

    def abort(self) -> None:
        """Drop the temp file. Safe to call more than once."""
        self._done = True
        self._close()
        unlink_quiet(self.tmp_path)

    def _close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # only reachable on abort paths: a failed final flush (e.g. ENOSPC) is moot

    def _fail(self, e: OSError) -> NoReturn:
        self.abort()
        err = _space_error(e, self._dir.root)
        if err is not None:
            raise err from e
        raise PkglayerError(f"cannot write blob to {self._dir.root}: {e.strerror or e}") from e
