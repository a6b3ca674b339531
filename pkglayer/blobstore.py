"""Content-addressed blob directories (`<root>/blobs/sha256/<hex>`) with atomic writes.

Used for OCI image layouts and for the /layers protocol's `input/` and `output/`
directories. A blob only ever appears under its final name complete and fsynced: it is
written to `<root>/.pkglayer-tmp/` (same filesystem) and renamed into place.

Blobs in `input/` come from a previous build and are not trusted: every read opens the
file with O_NOFOLLOW, insists on a regular file, and imports are re-hashed (the size
compared first: a huge file under a wanted name costs nothing).

A published blob never shares its file with anything that someone else could write to:
an import hard-links a file only when it is `shareable` (owned by this process's user
and writable by nobody, so that no one but its owner can ever change it), and copies it
otherwise (docs/security.md).

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
import stat
import time
from types import TracebackType
from typing import NoReturn

from .digests import is_digest
from .errors import DigestError, PkglayerError
from .fsutil import fsync_dir, read_regular, unlink_quiet
from .hashcache import HashCache
from .timings import charge

TMP_DIR = ".pkglayer-tmp"
_TMP_RE = re.compile(r"blob-[0-9a-f]{32}\.tmp")
_LINK_TMP_RE = re.compile(r"link-[0-9a-f]{32}\.tmp")
# Hard links made by import_blob hold no lock (locking would lock the source's inode);
# they live for one call, so one left for this long was abandoned by a dead process.
_LINK_TMP_MAX_AGE = 3600
_CHUNK = 1 << 20
# Blobs are immutable; read-only files are also what makes a hard link safe (shareable).
_BLOB_MODE = 0o444
_LINK_FALLBACK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP)
# The "algorithm" under which a blob file's checked digest is remembered (see verify).
_SHA256 = "blob-sha256"


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


def shareable(st: os.stat_result) -> bool:
    """A blob file that may be hard-linked into another directory: a regular file owned by
    this process's user and writable by nobody. Only its owner could make it writable
    again; anyone else who can write to the directory holding it can only replace the
    name, which leaves the linked file alone."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o222


def _space_error(e: OSError, root: str) -> PkglayerError | None:
    if e.errno == errno.ENOSPC:
        return PkglayerError(f"no space left on device while writing blob to {root}")
    if e.errno == errno.EDQUOT:
        return PkglayerError(f"disk quota exceeded while writing blob to {root}")
    return None


def _open_source(src: BlobDir, digest: str, size: int | None) -> tuple[int, os.stat_result]:
    """The blob in `src` opened to be taken, checked to be a regular file of `size` bytes."""
    fd = _open_regular(src.path(digest))
    if fd is None:
        raise PkglayerError(f"blob {digest} is missing from {src.root} or is not a regular file")
    st = os.fstat(fd)
    if size is not None and st.st_size != size:
        os.close(fd)
        raise PkglayerError(f"blob {digest} in {src.root} is corrupt: it is {st.st_size} bytes, history says {size}")
    return fd, st


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

    def verify(self, digest: str, size: int | None = None, known: HashCache | None = None) -> bool:
        """The blob is a regular file whose sha256 equals its name (and of `size` bytes,
        checked first: a huge file under a wanted name costs nothing).

        `known` (this directory's record, hashcache.TreeRecords) remembers a blob found
        valid for as long as its file's inode, size, mtime and ctime stay the same, as
        the digest cache does for the files of a tree: any write to the file, or another
        file under its name, is hashed again."""
        return self._valid(digest, size, known) is not None

    def _valid(self, digest: str, size: int | None, known: HashCache | None = None) -> os.stat_result | None:
        fd = _open_regular(self.path(digest))
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            if size is not None and st.st_size != size:
                return None
            if known is not None and known.get(st, (_SHA256,)) == {_SHA256: digest}:
                return st
            started = time.time()
            if _sha256_fd(fd) != digest:
                return None
            if known is not None:
                known.put(st, {_SHA256: digest}, started)
            return st
        finally:
            os.close(fd)

    def vouched(self, digest: str, size: int, known: HashCache | None) -> bool:
        """`verify` without reading the blob: true when `known` remembers this very file
        as holding `digest` (false also where only reading it could tell)."""
        fd = _open_regular(self.path(digest))
        if fd is None:
            return False
        try:
            st = os.fstat(fd)
            return st.st_size == size and known is not None and known.get(st, (_SHA256,)) == {_SHA256: digest}
        finally:
            os.close(fd)

    def has_own(self, digest: str, size: int | None = None, known: HashCache | None = None) -> bool:
        """`verify`, and the file is this directory's own: not a hard link to a file that
        someone else could write (as an import by an older version might have left)."""
        st = self._valid(digest, size, known)
        return st is not None and (st.st_nlink == 1 or shareable(st))

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
        if self.has_own(digest, len(data)):
            return digest, len(data)
        with self.writer() as w:
            w.write(data)
            return w.commit(expected_digest=digest)

    def import_blob(self, src: BlobDir, digest: str, size: int | None = None, known: HashCache | None = None) -> None:
        """Make `digest` present here, taken from `src`, and verified (size first) before
        it gets its final name. A hard link when the source file is `shareable` and on the
        same filesystem, else a copy. No-op if a valid copy of our own is already here
        (`known`: this directory's record, see `verify`).
        Raises PkglayerError if `src` lacks the blob, or it is not `size` bytes, or its
        content does not match the digest."""
        if self.has_own(digest, size, known):
            return
        fd, st = _open_source(src, digest, size)
        try:
            if shareable(st) and self._link(src, digest, fd, st):
                return
            self._copy(src, digest, fd)
        finally:
            os.close(fd)

    def copy_blob(self, src: BlobDir, digest: str, size: int | None = None) -> None:
        """Make `digest` present here as a copy of the one in `src` (never a link: for
        blobs of a published image handed to someone who may write to them), verified
        before it gets its final name."""
        if self.has_own(digest, size):
            return
        fd, _ = _open_source(src, digest, size)
        try:
            self._copy(src, digest, fd)
        finally:
            os.close(fd)

    def _link(self, src: BlobDir, digest: str, fd: int, st: os.stat_result) -> bool:
        """Publish the file `fd` (checked shareable) by a hard link, hashed first; False
        where a link cannot be made (another filesystem) or the name now holds another file."""
        self._ensure_dirs()
        tmp = os.path.join(self.tmp, f"link-{os.urandom(16).hex()}.tmp")
        try:
            # follow_symlinks=False: a symlink swapped in is linked as a symlink, and then
            # is not the file checked below.
            os.link(src.path(digest), tmp, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno in _LINK_FALLBACK:
                return False
            raise PkglayerError(f"cannot link blob {digest} from {src.root}: {e.strerror}") from e
        try:
            linked = os.lstat(tmp)
            if (linked.st_dev, linked.st_ino) != (st.st_dev, st.st_ino):
                unlink_quiet(tmp)
                return False
            actual = _sha256_fd(fd)
            if actual != digest:
                raise PkglayerError(f"blob {digest} in {src.root} is corrupt: its content has digest {actual}")
            os.replace(tmp, self.path(digest))
        except BaseException:
            unlink_quiet(tmp)
            raise
        fsync_dir(self.blobs)
        return True

    def _copy(self, src: BlobDir, digest: str, fd: int) -> None:
        """Copy from `fd`, hashing exactly the bytes written (the source may change meanwhile)."""
        os.lseek(fd, 0, os.SEEK_SET)
        with self.writer() as w:
            while chunk := os.read(fd, _CHUNK):
                w.write(chunk)
            try:
                w.commit(expected_digest=digest)
            except PkglayerError as e:
                raise PkglayerError(f"blob {digest} in {src.root} is corrupt: {e}") from None

    def remove_except(self, keep: set[str]) -> None:
        """Remove every blob whose digest is not in `keep` (a layout that holds one image,
        which nothing else writes)."""
        try:
            names = os.listdir(self.blobs)
        except FileNotFoundError:
            return
        for name in names:
            if f"sha256:{name}" not in keep:
                unlink_quiet(os.path.join(self.blobs, name))

    def commit_held(self, tmp_path: str, digest: str, size: int) -> None:
        """Publish a blob another process wrote and holds (BlobWriter.hold): fsync it
        and rename it to its final name. The directory is not synced: the caller syncs
        it once (fsync_dir(self.blobs)) before anything refers to the blobs."""
        try:
            fd = os.open(tmp_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                    raise PkglayerError(f"temp file {tmp_path} is not the blob {digest} its writer held")
                os.fchmod(fd, _BLOB_MODE)
                os.fsync(fd)
                os.replace(tmp_path, self.path(digest))
            finally:
                os.close(fd)
        except OSError as e:
            unlink_quiet(tmp_path)
            err = _space_error(e, self.root)
            raise err or PkglayerError(f"cannot write blob to {self.root}: {e.strerror or e}") from e
        except BaseException:
            unlink_quiet(tmp_path)
            raise

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


# Writers whose temp files another process commits (BlobWriter.hold): kept, so their
# files stay open and locked until this process ends.
_HELD: list[BlobWriter] = []


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
            path = os.path.join(self._dir.tmp, f"blob-{os.urandom(16).hex()}.tmp")
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
            with charge("write"):
                n = self._file.write(data)
        except OSError as e:
            self._fail(e)
        with charge("hash"):
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
        with charge("write"):
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

    def hold(self) -> tuple[str, int]:
        """Flush, and keep the temp file open and locked for another process to commit
        (BlobDir.commit_held), while this one goes on with other work; return (digest,
        size). The lock lasts as long as this process keeps the writer (`_HELD`): a
        cleaner leaves the file alone until then."""
        if self._done:
            raise ValueError("BlobWriter already committed or aborted")
        with charge("write"):
            try:
                self._file.flush()
            except OSError as e:
                self._fail(e)
        self._done = True
        _HELD.append(self)
        return "sha256:" + self._hash.hexdigest(), self.size

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
