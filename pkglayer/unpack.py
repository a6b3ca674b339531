"""Apply the layers of an untrusted image, in order, to a private working tree.

The image was validated by layout.py (manifest, config, digests, sizes); here each
layer blob is checked twice, once before extraction (so a corrupt blob is reported as
such, not as a broken tar) and again while extracting (so a blob swapped in between is
caught too), and its uncompressed stream must hash to the config's `rootfs.diff_ids`
entry. Member names are relative paths without `..`; a name or hard-link target whose
parent is a symlink is refused rather than followed, so nothing is ever written outside
the working tree, whatever the symlinks in it point to (they are stored, never
followed). The total uncompressed size, what unpacking writes (file sizes counted before
a byte is written; sparse members are refused) and the number of entries (hard links,
devices and the parent directories a layer leaves implicit included) are bounded, and
every header field is range-checked (tarread.py). Errors name the layer and the path.

Whiteouts follow the image-spec: `.wh.NAME` removes NAME from the layers below, and
`.wh..wh..opq` hides everything the layers below had in its directory. Entries keep
their numeric owner, mode (setuid/setgid/sticky too), mtime, `SCHILY.xattr.*` extended
attributes (`security.capability` included), hard links, symlinks, device nodes and FIFOs.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from .blobstore import BlobDir
from .fsutil import open_dir_nofollow, remove_tree
from .layout import DEFAULT_LIMITS, Descriptor, Image, ImageError, Limits
from .mediatypes import LAYER_COMPRESSION
from .tarread import NAME_MAX, Checked, TarReadError, check_member, open_stream

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20
_OPEN_DIRS = 64  # directory fds the tree keeps open
# Never set from an image: host-specific labels and overlay bookkeeping.
DEFAULT_SKIP_XATTRS = ("security.selinux", "security.ima", "security.evm", "trusted.*")


@dataclass
class UnpackStats:
    entries: int = 0  # tar members and the parent directories created for them
    bytes: int = 0  # uncompressed tar bytes read
    written: int = 0  # file data, link targets and xattrs written
    whiteouts: int = 0
    opaque: int = 0
    layers: int = 0
    skipped_xattrs: set[str] = field(default_factory=set)


# ---------------------------------------------------------------- streams


class _Hashing(io.RawIOBase):
    """Reads from `raw`, hashing and counting; refuses to deliver more than `limit` bytes."""

    def __init__(self, raw, limit: int, what: str):
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self.limit = limit
        self.what = what

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        self.count += n
        if self.count > self.limit:
            raise ImageError(f"{self.what}: more than the limit of {self.limit} bytes")
        self.hash.update(data)
        b[:n] = data
        return n

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _FdReader:
    def __init__(self, fd: int):
        self.fd = fd

    def read(self, n: int = _CHUNK) -> bytes:
        return os.read(self.fd, n if n and n > 0 else _CHUNK)


def _decompressor(raw, compression: str):
    if compression == "none":
        return raw
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))


def _sniff_compression(fd: int, declared: str) -> str:
    """The compression the blob's first bytes show, as containers-storage decides it; the
    media type is only the default. skopeo copies local storage's uncompressed layers
    out under a +gzip media type (--dest-oci-accept-uncompressed-layers, skopeo 1.9)."""
    head = os.pread(fd, 4, 0)
    found = next((name for magic, name in _MAGIC if head.startswith(magic)), "none")
    return found if found != "none" or len(head) >= 4 else declared


def _verify_blob_fd(fd: int, desc: Descriptor, what: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{what}: blob {desc.digest} is not a regular file")
    if st.st_size != desc.size:
        raise ImageError(f"{what}: blob {desc.digest} is {st.st_size} bytes, the manifest says {desc.size}")
    h = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
    actual = "sha256:" + h.hexdigest()
    if actual != desc.digest:
        raise ImageError(f"{what}: blob does not match its digest {desc.digest}: the content has {actual}")
    os.lseek(fd, 0, os.SEEK_SET)


# ---------------------------------------------------------------- the working tree


def _components(name: str, what: str, limits: Limits) -> tuple[str, ...]:
    if "\0" in name:
        raise ImageError(f"{what}: NUL in a path")
    if len(name.encode("utf-8", "surrogateescape")) > limits.path_bytes:
        raise ImageError(f"{what}: path longer than {limits.path_bytes} bytes")
    if name.startswith("/"):
        raise ImageError(f"{what}: absolute path {name[:200]!r} in a layer; refusing it")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ImageError(f"{what}: path {name[:200]!r} contains '..'; refusing to write outside the tree")
    for part in parts:
        # A character is at most 4 bytes: only long components need encoding.
        if len(part) > NAME_MAX // 4 and len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise ImageError(f"{what}: path {name[:200]!r} has a component longer than {NAME_MAX} bytes")
    return parts


class _Fault(Exception):
    """What is wrong with the entry being applied; the caller names the layer and path."""


def _xattr_skipped(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


class _Tree:
    """The private working tree, written only through directory fds opened with
    O_NOFOLLOW from its root: a symlink in the tree is never followed."""

    def __init__(self, root: str, limits: Limits, skip_xattrs: tuple[str, ...], stats: UnpackStats):
        self.root = root
        self.limits = limits
        self.skip_xattrs = skip_xattrs
        self.stats = stats
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.dir_times: dict[tuple[str, ...], int] = {}
        self.is_root = os.geteuid() == 0
        self.skipped_xattrs: set[str] = set()
        # Directories of the current layer holding nothing from the layers below (an
        # opaque whiteout went through them): each is gone through once per layer.
        self.clean: set[tuple[str, ...]] = set()
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        os.close(self.root_fd)

    def _count_entry(self) -> None:
        self.stats.entries += 1
        if self.stats.entries > self.limits.entries:
            raise _Fault(f"more than the limit of {self.limits.entries} entries")

    def _open_dir(self, parts: tuple[str, ...], create: bool, what: str) -> int:
        """A new fd of the directory `parts` (the caller closes it)."""
        try:
            return os.dup(self._dir(parts, create))
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            here = str(e.filename)
            st = os.stat(here, dir_fd=self.root_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(here, dir_fd=self.root_fd)
                raise ImageError(
                    f"{what}: /{here} is a symlink (-> {target[:200]}); refusing to write through it"
                ) from None
            raise ImageError(f"{what}: /{here} is not a directory") from None

    def _dir(self, parts: tuple[str, ...], create: bool) -> int:
        """The cached fd of the directory `parts`: from its cached parent (a layer lists a
        directory's entries together, so that is the common case), else walked from the
        root, caching the last levels on the way. An entry about to be removed is
        forgotten first (_forget), so no cached fd ever names a removed directory."""
        fd = self._dirs.get(parts)
        if fd is not None:
            self._dirs.move_to_end(parts)
            return fd
        n = len(parts)
        parent = self._dirs.get(parts[:-1]) if n > 1 else None
        start, cur, owned = (n - 1, parent, False) if parent is not None else (0, self.root_fd, False)
        for j in range(start, n):
            # A parent the layer did not list: 0755 root:root, as umoci and containers-storage do.
            try:
                child = open_dir_nofollow(cur, parts[j:j + 1], 0o755 if create else None, self._count_entry)
            except OSError as e:
                e.filename = "/".join(parts[:j + 1])
                raise
            finally:
                if owned:
                    os.close(cur)
            # Only the levels the cache can hold are cached (it may evict the parent: used by then).
            if j >= n - _OPEN_DIRS:
                cur, owned = self._cache(parts[:j + 1], child), False
            else:
                cur, owned = child, True
        return cur

    def _cache(self, parts: tuple[str, ...], fd: int) -> int:
        old = self._dirs.pop(parts, None)
        if old is not None:
            os.close(old)
        self._dirs[parts] = fd
        if len(self._dirs) > _OPEN_DIRS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def _forget(self, parts: tuple[str, ...]) -> None:
        """`parts` is about to be removed: drop the cached fds of it and below it."""
        n = len(parts)
        for cached in [c for c in self._dirs if c[:n] == parts]:
            os.close(self._dirs.pop(cached))

    def _remove(self, dir_fd: int, parts: tuple[str, ...]) -> None:
        self._forget(parts)
        remove_tree(parts[-1], dir_fd)

    def _lstat(self, dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # -- whiteouts

    def whiteout(self, parent: tuple[str, ...], name: str, added: set[tuple[str, ...]], what: str) -> None:
        if name in ("", ".", "..") or (*parent, name) in added:
            return
        try:
            fd = self._open_dir(parent, create=False, what=what)
        except FileNotFoundError:
            return
        try:
            self._remove(fd, (*parent, name))
        finally:
            os.close(fd)

    def opaque(self, parent: tuple[str, ...], added: set[tuple[str, ...]], what: str) -> None:
        """Remove what the layers below have under `parent`, keeping what this layer added.

        Iterative (directories may nest as deep as paths allow), and each directory is
        gone through at most once per layer: after that it holds only this layer's entries."""
        todo = [parent]
        while todo:
            path = todo.pop()
            if path in self.clean:
                continue
            self.clean.add(path)
            try:
                fd = self._open_dir(path, create=False, what=what)
            except FileNotFoundError:
                continue
            try:
                with os.scandir(fd) as it:
                    names = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                for name, is_dir in names:
                    child = (*path, name)
                    if child not in added:
                        self._remove(fd, child)
                    elif is_dir:
                        todo.append(child)
            finally:
                os.close(fd)

    # -- entries

    def _xattrs(self, checked: Checked) -> list[tuple[str, bytes]]:
        out = []
        for name, value in checked.xattrs:
            if _xattr_skipped(name, self.skip_xattrs):
                self.skipped_xattrs.add(name)
                continue
            out.append((name, value))
        return out

    def _attrs(self, target: int | str, member: tarfile.TarInfo, xattrs: list[tuple[str, bytes]]) -> None:
        """Owner, mode and xattrs of an fd, or of a /proc/self/fd path (nodes opened O_PATH)."""
        # chown first: it clears setuid bits and security.capability.
        os.chown(target, member.uid, member.gid)
        os.chmod(target, member.mode & 0o7777)
        _set_xattrs(target, xattrs)

    def add(self, parts: tuple[str, ...], member: tarfile.TarInfo, checked: Checked, tar: tarfile.TarFile,
            what: str) -> None:
        if not parts:  # the root itself: attributes only
            if not member.isdir():
                raise ImageError(f"{what}: the root entry is not a directory")
            self._attrs(self.root_fd, member, self._xattrs(checked))
            self.dir_times[()] = checked.mtime_ns
            return
        parent, name = parts[:-1], parts[-1]
        dfd = self._open_dir(parent, create=True, what=what)
        try:
            self._add_in(dfd, parts, name, member, checked, tar, what)
        finally:
            os.close(dfd)

    def _add_in(self, dfd: int, parts, name: str, member: tarfile.TarInfo, checked: Checked, tar,
                what: str) -> None:
        xattrs = self._xattrs(checked)
        mtime = checked.mtime_ns
        existing = self._lstat(dfd, name)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    self._remove(dfd, parts)
                os.mkdir(name, 0o700, dir_fd=dfd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                self._attrs(fd, member, xattrs)
            finally:
                os.close(fd)
            self.dir_times[parts] = mtime
            return
        if existing is not None:
            self._remove(dfd, parts)
        if member.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                src = tar.extractfile(member)
                assert src is not None
                while chunk := src.read(_CHUNK):
                    _write_all(fd, chunk)
                self._attrs(fd, member, xattrs)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=dfd)
            os.chown(name, member.uid, member.gid, dir_fd=dfd, follow_symlinks=False)
            # /proc/self/fd/N is our own directory; the final symlink is not followed.
            _set_xattrs(f"/proc/self/fd/{dfd}/{name}", xattrs, follow_symlinks=False)
            os.utime(name, ns=(mtime, mtime), dir_fd=dfd, follow_symlinks=False)
        elif member.islnk():
            target = _components(member.linkname.lstrip("/"), f"{what}: hard link target", self.limits)
            if not target:
                raise ImageError(f"{what}: hard link to the root directory")
            try:
                sfd = self._open_dir(target[:-1], create=False, what=f"{what}: hard link target")
            except FileNotFoundError:
                sfd = None
            st = self._lstat(sfd, target[-1]) if sfd is not None else None
            try:
                if st is None:
                    raise ImageError(f"{what}: hard link to /{'/'.join(target)}, which does not exist")
                if stat.S_ISDIR(st.st_mode):
                    raise ImageError(f"{what}: hard link to a directory /{'/'.join(target)}")
                os.link(target[-1], name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                if sfd is not None:
                    os.close(sfd)
        elif member.ischr() or member.isblk() or member.isfifo():
            if member.isfifo():
                os.mkfifo(name, 0o600, dir_fd=dfd)
            else:
                if not self.is_root:
                    raise ImageError(f"{what}: device node; unpacking device nodes needs root")
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=dfd)
            # O_PATH: an fd to the node itself, without opening the device or blocking on the FIFO.
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                proc = f"/proc/self/fd/{fd}"
                self._attrs(proc, member, xattrs)
                os.utime(proc, ns=(mtime, mtime))
            finally:
                os.close(fd)
        else:
            raise ImageError(f"{what}: unsupported tar entry type {member.type!r}")

    def apply_dir_times(self) -> None:
        # Deepest first, so setting a child's time does not disturb its parent's.
        for parts in sorted(self.dir_times, key=len, reverse=True):
            try:
                fd = self._open_dir(parts, create=False, what="directory times")
            except (FileNotFoundError, ImageError):
                continue  # removed by a later layer
            try:
                t = self.dir_times[parts]
                os.utime(fd, ns=(t, t))
            finally:
                os.close(fd)


def _set_xattrs(target: int | str, xattrs: list[tuple[str, bytes]], follow_symlinks: bool = True) -> None:
    for name, value in xattrs:
        try:
            os.setxattr(target, name, value, follow_symlinks=follow_symlinks)
        except OSError as e:
            raise _Fault(f"cannot set extended attribute {name[:80]!r}: {e.strerror}") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ---------------------------------------------------------------- unpacking


def unpack(
    image: Image,
    dest: str,
    limits: Limits = DEFAULT_LIMITS,
    skip_xattrs: tuple[str, ...] = DEFAULT_SKIP_XATTRS,
    progress=None,
) -> UnpackStats:
    """Apply the image's layers in order onto the directory `dest` (normally empty)."""
    stats = UnpackStats()
    tree = _Tree(dest, limits, tuple(skip_xattrs), stats)
    try:
        for index, desc in enumerate(image.layers):
            what = f"layer {index} ({desc.digest[:19]})"
            _unpack_layer(image.layout, desc, image.diff_ids[index], tree, limits, stats, what)
            stats.layers += 1
            if progress:
                progress("unpack", index + 1, len(image.layers))
        try:
            tree.apply_dir_times()
        except OSError as e:
            raise ImageError(f"setting directory times in {dest}: {e.strerror}") from None
    finally:
        tree.close()
    stats.skipped_xattrs = tree.skipped_xattrs
    return stats


def _os_message(e: OSError, tree: _Tree) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
        return f"{e.strerror} (writing to {tree.root})"
    return e.strerror or str(e)


def _unpack_layer(layout: str, desc: Descriptor, diff_id: str, tree: _Tree, limits: Limits,
                  stats: UnpackStats, what: str) -> None:
    path = BlobDir(layout).path(desc.digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{what}: blob {desc.digest} is missing from {layout}") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot open blob {desc.digest} (a symlink?): {e.strerror}") from None
    tree.clean = set()
    where = f"{what}: /"
    after = f"{what}: at the first entry"  # a header error comes before its member's path is known
    try:
        _verify_blob_fd(fd, desc, what)
        compression = _sniff_compression(fd, LAYER_COMPRESSION[desc.media_type])
        compressed = _Hashing(_FdReader(fd), desc.size, f"{what}: blob")
        plain = _Hashing(_decompressor(compressed, compression),
                         limits.image_bytes - stats.bytes, f"{what}: the image's uncompressed size")
        added: set[tuple[str, ...]] = set()
        try:
            with open_stream(plain) as tar:
                for member in tar:
                    parts = _components(member.name, what, limits)
                    where = f"{what}: /{'/'.join(parts)}"
                    try:
                        checked = check_member(member, limits.image_bytes - stats.written)
                        tree._count_entry()
                        if parts and parts[-1].startswith(WHITEOUT):
                            if parts[-1] == OPAQUE:
                                tree.opaque(parts[:-1], added, where)
                                stats.opaque += 1
                            else:
                                tree.whiteout(parts[:-1], parts[-1][len(WHITEOUT):], added, where)
                                stats.whiteouts += 1
                            continue
                        # Counted before anything is written: the limit is on what lands on disk.
                        stats.written += (member.size if member.isreg() else 0) + len(member.linkname) + sum(
                            len(v) for _, v in checked.xattrs)
                        if stats.written > limits.image_bytes:
                            raise _Fault(f"unpacking would write more than the limit of {limits.image_bytes} bytes")
                        tree.add(parts, member, checked, tar, where)
                    except (_Fault, TarReadError) as e:
                        raise ImageError(f"{where}: {e}") from None
                    except OSError as e:
                        raise ImageError(f"{where}: {_os_message(e, tree)}") from None
                    added.add(parts)
                    after = f"{what}: after /{'/'.join(parts)}"
            plain.drain()
            compressed.drain()
        except TarReadError as e:  # a header, before its member's path is known
            raise ImageError(f"{after}: {e}") from None
        except tarfile.TarError as e:
            raise ImageError(f"{after}: not a valid tar stream: {e}") from None
        except (zlib.error, EOFError, gzip.BadGzipFile) as e:
            raise ImageError(f"{what}: corrupt compressed stream: {e}") from None
        except ImageError:
            raise
        except OSError as e:
            raise ImageError(f"{what}: cannot read blob {desc.digest}: {e.strerror}") from None
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise ImageError(f"{what}: corrupt zstd stream: {e}") from None
            raise
    finally:
        os.close(fd)
    stats.bytes += plain.count
    if compressed.digest != desc.digest or compressed.count != desc.size:
        raise ImageError(f"{what}: blob changed while being read: it no longer matches {desc.digest}")
    if plain.digest != diff_id:
        raise ImageError(f"{what}: uncompressed content has digest {plain.digest}, the config's diff_id is {diff_id}")
