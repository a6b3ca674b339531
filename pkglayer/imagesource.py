"""Read an OCI image layout that someone else wrote, and unpack its layers into a tree.

Everything here treats the image as hostile:

- every blob (index, manifest, config, layer) is read from a regular file opened without
  following a symlink, its size must be the descriptor's and within `Limits`, and its
  sha256 must be the descriptor's digest; layers are checked twice, once before
  extraction (so a corrupt blob is reported as such, not as a broken tar) and again
  while extracting (so a blob swapped in between is caught too), and their uncompressed
  stream must hash to the config's `rootfs.diff_ids` entry;
- member names are relative paths without `..`; a name or hard-link target whose parent
  is a symlink is refused rather than followed, so nothing is ever written outside the
  working tree, whatever the symlinks in it point to (they are stored, never followed);
- the total uncompressed size and the number of entries are bounded.

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
import json
import os
import platform
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Any

from .blobstore import is_digest
from .errors import PkglayerError
from .oci import REF_NAME, REF_RE


class ImageError(PkglayerError):
    """A source image is malformed, hostile, too large, or unsupported."""


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
# layer media type -> compression
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20
# Never set from an image: host-specific labels and overlay bookkeeping.
DEFAULT_SKIP_XATTRS = ("security.selinux", "security.ima", "security.evm", "trusted.*")

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Limits:
    """Bounds for reading an untrusted image. The defaults fit any real OS image."""

    index_bytes: int = 4 << 20
    manifest_bytes: int = 4 << 20
    config_bytes: int = 16 << 20
    layers: int = 512
    # total of the uncompressed layer streams, and so also of each compressed blob
    image_bytes: int = 64 << 30
    entries: int = 5_000_000
    path_bytes: int = 4096


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int


@dataclass
class SourceImage:
    """A validated manifest and config of an image in a layout (blobs not yet read)."""

    layout: str
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    config_raw: bytes
    layers: list[Descriptor]
    diff_ids: list[str]

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    @property
    def os(self) -> str:
        return self.config["os"]

    @property
    def variant(self) -> str | None:
        return self.config.get("variant")

    @property
    def runtime(self) -> dict[str, Any]:
        """The config's `config` object (Env, Cmd, Labels...); {} when absent."""
        return self.config.get("config") or {}


@dataclass
class UnpackStats:
    entries: int = 0
    bytes: int = 0  # uncompressed tar bytes read
    whiteouts: int = 0
    opaque: int = 0
    layers: int = 0
    skipped_xattrs: set[str] = field(default_factory=set)


# ---------------------------------------------------------------- reading the layout


def _read_file(path: str, limit: int, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{what}: {path} does not exist") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot open {path} (a symlink?): {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{what}: {path} is not a regular file")
        if st.st_size > limit:
            raise ImageError(f"{what}: {path} is {st.st_size} bytes, more than the limit of {limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ImageError(f"{what}: {path} is more than the limit of {limit} bytes")
    return data


def _blob_path(layout: str, digest: str) -> str:
    if not is_digest(digest):
        raise ImageError(f"unsupported or malformed digest {str(digest)[:100]!r} (expected sha256:<64 hex>)")
    return os.path.join(layout, "blobs", "sha256", digest[len("sha256:"):])


def read_blob(layout: str, desc: Descriptor, limit: int, what: str) -> bytes:
    """A small blob (manifest, config, index), checked against its descriptor."""
    if desc.size > limit:
        raise ImageError(f"{what} {desc.digest} is {desc.size} bytes, more than the limit of {limit}")
    data = _read_file(_blob_path(layout, desc.digest), limit, f"{what} {desc.digest}")
    return check_bytes(data, desc, what)


def check_bytes(data: bytes, desc: Descriptor, what: str) -> bytes:
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != desc.digest:
        raise ImageError(f"{what} {desc.digest} does not match its digest: the content has {actual}")
    if len(data) != desc.size:
        raise ImageError(f"{what} {desc.digest} is {len(data)} bytes, its descriptor says {desc.size}")
    return data


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ImageError(f"{what}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: not a JSON object")
    return obj


def descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: descriptor is not a JSON object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str):
        raise ImageError(f"{what}: descriptor has no mediaType")
    if not is_digest(digest):
        raise ImageError(f"{what}: unsupported or malformed digest {str(digest)[:100]!r} (expected sha256:<64 hex>)")
    if type(size) is not int or size < 0:
        raise ImageError(f"{what}: descriptor size must be a non-negative integer")
    return Descriptor(media_type, digest, size)


def host_platform() -> tuple[str, str]:
    machine = platform.machine()
    return "linux", _GOARCH.get(machine, machine)


def pick_from_index(index: dict[str, Any], what: str, tag: str | None = None) -> Descriptor:
    """The manifest an index names `tag`, or for a platform index the host's platform."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ImageError(f"{what}: no manifests array")
    if tag is not None:
        named = [m for m in manifests if isinstance(m, dict) and (m.get("annotations") or {}).get(REF_NAME) == tag]
        if len(named) > 1:
            raise ImageError(f"{what}: {len(named)} manifests are tagged {tag!r}")
        if named:
            return descriptor(named[0], f"{what}: tag {tag!r}")
    want_os, want_arch = host_platform()
    by_platform = [
        m for m in manifests
        if isinstance(m, dict) and isinstance(m.get("platform"), dict)
        and m["platform"].get("os") == want_os and m["platform"].get("architecture") == want_arch
    ]
    if tag is None and len(manifests) == 1:
        return descriptor(manifests[0], what)
    if tag is None and by_platform:
        return descriptor(by_platform[0], f"{what}: {want_os}/{want_arch}")
    if tag is None:
        raise ImageError(f"{what}: {len(manifests)} manifests and none for {want_os}/{want_arch}")
    raise ImageError(f"{what}: no image tagged {tag!r}")


def parse_layout_ref(ref: str) -> tuple[str, str | None]:
    """"oci:DIR[:TAG]" -> (DIR, TAG or None). As with skopeo, DIR ends at the first ":"."""
    if not ref.startswith("oci:"):
        raise ImageError(f"image reference {ref!r} is not of the form oci:DIR[:TAG]")
    directory, sep, tag = ref[len("oci:"):].partition(":")
    if not directory:
        raise ImageError(f"image reference {ref!r} has an empty directory")
    if not sep:
        return directory, None
    if not REF_RE.fullmatch(tag):
        raise ImageError(f"image reference {ref!r}: {tag!r} is not a valid OCI ref name")
    return directory, tag


def open_layout(layout: str, tag: str | None, limits: Limits = DEFAULT_LIMITS) -> SourceImage:
    """Find the image `tag` (None: the only image, or the host platform's) in an OCI
    layout and validate its manifest and config. Layer blobs are not read here."""
    where = f"oci:{layout}" + (f":{tag}" if tag else "")
    index = parse_json(_read_file(os.path.join(layout, "index.json"), limits.index_bytes, f"{where}: index.json"),
                       f"{where}: index.json")
    desc = pick_from_index(index, f"{where}: index.json", tag)
    for _ in range(2):  # one nested index (a multi-platform image) at most
        if desc.media_type not in (OCI_INDEX, DOCKER_LIST):
            break
        nested = parse_json(read_blob(layout, desc, limits.index_bytes, "image index"), f"{where}: image index")
        desc = pick_from_index(nested, f"{where}: image index {desc.digest}")
    raw = read_blob(layout, desc, limits.manifest_bytes, "manifest")
    return image_from_manifest(layout, desc.digest, raw, lambda d: read_blob(layout, d, limits.config_bytes, "config"),
                               limits, where)


def image_from_manifest(layout: str, manifest_digest: str, raw: bytes, read_config, limits: Limits,
                        where: str) -> SourceImage:
    """Validate a manifest (already checked against its digest) and the config it names."""
    manifest = parse_json(raw, f"{where}: manifest")
    media_type = manifest.get("mediaType", OCI_MANIFEST)
    if media_type in (OCI_INDEX, DOCKER_LIST):
        raise ImageError(f"{where}: is a multi-platform index, not an image manifest")
    if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST) or manifest.get("schemaVersion") != 2:
        raise ImageError(f"{where}: unsupported manifest type {str(media_type)[:100]!r}")
    config_desc = descriptor(manifest.get("config"), f"{where}: manifest config")
    if config_desc.media_type not in CONFIG_TYPES:
        raise ImageError(f"{where}: unsupported config type {config_desc.media_type[:100]!r}")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{where}: manifest has no layers array")
    if len(raw_layers) > limits.layers:
        raise ImageError(f"{where}: {len(raw_layers)} layers, more than the limit of {limits.layers}")
    layers = [descriptor(d, f"{where}: layer {i}") for i, d in enumerate(raw_layers)]
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise ImageError(f"{where}: layer {i} has unsupported media type {layer.media_type[:100]!r}")
        if layer.size > limits.image_bytes:
            raise ImageError(f"{where}: layer {i} is {layer.size} bytes, more than the limit of {limits.image_bytes}")
    config_raw = read_config(config_desc)
    config = parse_json(config_raw, f"{where}: config")
    for key in ("architecture", "os"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise ImageError(f"{where}: config has no {key}")
    if "variant" in config and not isinstance(config["variant"], str):
        raise ImageError(f"{where}: config variant is not a string")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(is_digest(d) for d in diff_ids):
        raise ImageError(f"{where}: config rootfs.diff_ids is missing or malformed")
    if len(diff_ids) != len(layers):
        raise ImageError(f"{where}: config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    runtime = config.get("config")
    if runtime is not None and not isinstance(runtime, dict):
        raise ImageError(f"{where}: config.config is not a JSON object")
    return SourceImage(
        layout=layout, manifest_digest=manifest_digest, manifest=manifest, config_digest=config_desc.digest,
        config=config, config_raw=config_raw, layers=layers, diff_ids=list(diff_ids),
    )


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
    return parts


def _xattr_skipped(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


class _Tree:
    """The private working tree, written only through directory fds opened with
    O_NOFOLLOW from its root: a symlink in the tree is never followed."""

    def __init__(self, root: str, limits: Limits, skip_xattrs: tuple[str, ...]):
        self.root = root
        self.limits = limits
        self.skip_xattrs = skip_xattrs
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.dir_times: dict[tuple[str, ...], int] = {}
        self.is_root = os.geteuid() == 0
        self.skipped_xattrs: set[str] = set()

    def close(self) -> None:
        os.close(self.root_fd)

    def _open_dir(self, parts: tuple[str, ...], create: bool, what: str) -> int:
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    # A parent the layer did not list: 0755 root:root, as umoci and containers-storage do.
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    here = "/" + "/".join(parts[: i + 1])
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        target = os.readlink(part, dir_fd=fd)
                        raise ImageError(
                            f"{what}: {here} is a symlink (-> {target[:200]}); refusing to write through it"
                        ) from None
                    raise ImageError(f"{what}: {here} is not a directory") from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lstat(self, dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, dir_fd: int, name: str) -> None:
        st = self._lstat(dir_fd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    # -- whiteouts

    def whiteout(self, parent: tuple[str, ...], name: str, added: set[tuple[str, ...]], what: str) -> None:
        if name in ("", ".", "..") or (*parent, name) in added:
            return
        try:
            fd = self._open_dir(parent, create=False, what=what)
        except FileNotFoundError:
            return
        try:
            self._remove(fd, name)
        finally:
            os.close(fd)

    def opaque(self, parent: tuple[str, ...], added: set[tuple[str, ...]], what: str) -> None:
        try:
            fd = self._open_dir(parent, create=False, what=what)
        except FileNotFoundError:
            return
        try:
            self._hide_lower(fd, parent, added)
        finally:
            os.close(fd)

    def _hide_lower(self, fd: int, path: tuple[str, ...], added: set[tuple[str, ...]]) -> None:
        for name in os.listdir(fd):
            child = (*path, name)
            if child not in added:
                self._remove(fd, name)
                continue
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    self._hide_lower(cfd, child, added)
                finally:
                    os.close(cfd)

    # -- entries

    def _xattrs(self, member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out = []
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr."):]
            if _xattr_skipped(name, self.skip_xattrs):
                self.skipped_xattrs.add(name)
                continue
            out.append((name, value.encode("utf-8", "surrogateescape")))
        return out

    def _attrs_fd(self, fd: int, member: tarfile.TarInfo, xattrs: list[tuple[str, bytes]]) -> None:
        # chown first: it clears setuid bits and security.capability.
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        for name, value in xattrs:
            os.setxattr(fd, name, value)

    def add(self, parts: tuple[str, ...], member: tarfile.TarInfo, tar: tarfile.TarFile, what: str) -> None:
        if not parts:  # the root itself: attributes only
            if not member.isdir():
                raise ImageError(f"{what}: the root entry is not a directory")
            self._attrs_fd(self.root_fd, member, self._xattrs(member))
            self.dir_times[()] = _mtime_ns(member)
            return
        parent, name = parts[:-1], parts[-1]
        dfd = self._open_dir(parent, create=True, what=what)
        try:
            self._add_in(dfd, parts, name, member, tar, what)
        finally:
            os.close(dfd)

    def _add_in(self, dfd: int, parts, name: str, member: tarfile.TarInfo, tar, what: str) -> None:
        xattrs = self._xattrs(member)
        mtime = _mtime_ns(member)
        existing = self._lstat(dfd, name)
        if member.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    self._remove(dfd, name)
                os.mkdir(name, 0o700, dir_fd=dfd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                self._attrs_fd(fd, member, xattrs)
            finally:
                os.close(fd)
            self.dir_times[parts] = mtime
            return
        if existing is not None:
            self._remove(dfd, name)
        if member.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                src = tar.extractfile(member)
                assert src is not None
                while chunk := src.read(_CHUNK):
                    _write_all(fd, chunk)
                self._attrs_fd(fd, member, xattrs)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=dfd)
            os.chown(name, member.uid, member.gid, dir_fd=dfd, follow_symlinks=False)
            for xname, value in xattrs:
                # /proc/self/fd/N is our own directory; the final symlink is not followed.
                os.setxattr(f"/proc/self/fd/{dfd}/{name}", xname, value, follow_symlinks=False)
            os.utime(name, ns=(mtime, mtime), dir_fd=dfd, follow_symlinks=False)
        elif member.islnk():
            target = _components(member.linkname.lstrip("/"), f"{what}: hard link target", self.limits)
            if not target:
                raise ImageError(f"{what}: hard link to the root directory")
            sfd = self._open_dir(target[:-1], create=False, what=f"{what}: hard link target")
            try:
                st = self._lstat(sfd, target[-1])
                if st is None:
                    raise ImageError(f"{what}: hard link to /{'/'.join(target)}, which does not exist")
                if stat.S_ISDIR(st.st_mode):
                    raise ImageError(f"{what}: hard link to a directory /{'/'.join(target)}")
                os.link(target[-1], name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
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
                os.chown(proc, member.uid, member.gid)
                os.chmod(proc, member.mode & 0o7777)
                for xname, value in xattrs:
                    os.setxattr(proc, xname, value)
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except (InvalidOperation, ValueError):
            pass
    return int(member.mtime) * 1_000_000_000


# ---------------------------------------------------------------- unpacking


def unpack(
    image: SourceImage,
    dest: str,
    limits: Limits = DEFAULT_LIMITS,
    skip_xattrs: tuple[str, ...] = DEFAULT_SKIP_XATTRS,
    progress=None,
) -> UnpackStats:
    """Apply the image's layers in order onto the directory `dest` (normally empty)."""
    stats = UnpackStats()
    tree = _Tree(dest, limits, tuple(skip_xattrs))
    try:
        for index, desc in enumerate(image.layers):
            what = f"layer {index} ({desc.digest[:19]})"
            _unpack_layer(image.layout, desc, image.diff_ids[index], tree, limits, stats, what)
            stats.layers += 1
            if progress:
                progress("unpack", index + 1, len(image.layers))
        tree.apply_dir_times()
    finally:
        tree.close()
    stats.skipped_xattrs = tree.skipped_xattrs
    return stats


def _unpack_layer(layout: str, desc: Descriptor, diff_id: str, tree: _Tree, limits: Limits,
                  stats: UnpackStats, what: str) -> None:
    path = _blob_path(layout, desc.digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{what}: blob {desc.digest} is missing from {layout}") from None
    except OSError as e:
        raise ImageError(f"{what}: cannot open blob {desc.digest} (a symlink?): {e.strerror}") from None
    try:
        _verify_blob_fd(fd, desc, what)
        compressed = _Hashing(_FdReader(fd), desc.size, f"{what}: blob")
        plain = _Hashing(_decompressor(compressed, LAYER_TYPES[desc.media_type]),
                         limits.image_bytes - stats.bytes, f"{what}: the image's uncompressed size")
        added: set[tuple[str, ...]] = set()
        try:
            with tarfile.open(fileobj=plain, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
                for member in tar:
                    stats.entries += 1
                    if stats.entries > limits.entries:
                        raise ImageError(f"{what}: more than the limit of {limits.entries} entries")
                    parts = _components(member.name, what, limits)
                    where = f"{what}: /{'/'.join(parts)}"
                    if parts and parts[-1].startswith(WHITEOUT):
                        if parts[-1] == OPAQUE:
                            tree.opaque(parts[:-1], added, where)
                            stats.opaque += 1
                        else:
                            tree.whiteout(parts[:-1], parts[-1][len(WHITEOUT):], added, where)
                            stats.whiteouts += 1
                        continue
                    tree.add(parts, member, tar, where)
                    added.add(parts)
            plain.drain()
            compressed.drain()
        except tarfile.TarError as e:
            raise ImageError(f"{what}: not a valid tar stream: {e}") from None
        except (zlib.error, EOFError, gzip.BadGzipFile) as e:
            raise ImageError(f"{what}: corrupt compressed stream: {e}") from None
        except ImageError:
            raise
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
