"""Real third-party OCI clients (umoci, skopeo, oci-image-tool, podman, a registry)
driven against images written by pkglayer.

The fixtures here (podman_store, shared_podman_store, registry) are made available to
every test module by tests/conftest.py. Everything here needs root: umoci keeps
ownership only when not rootless, and podman runs with the flags measured in
/work/shared/notes/field-facts.md.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import CAPABILITY_XATTR, require_tools, run, sha256_file

# ------------------------------------------------------------------ umoci


def umoci_unpack(layout: str | os.PathLike[str], tag: str, dest: str | os.PathLike[str]) -> Path:
    """Unpack LAYOUT:TAG into DEST as root (not --rootless, so uids/gids, device nodes and
    xattrs are kept); return DEST/rootfs."""
    run(["umoci", "unpack", "--image", f"{os.fspath(layout)}:{tag}", dest])
    return Path(dest) / "rootfs"


# ------------------------------------------------------------------ tree comparison


@dataclass(frozen=True)
class Node:
    """Everything compare_trees checks about one filesystem object."""

    kind: str  # "dir", "file", "symlink", "chr", "blk", "fifo", "socket"
    mode: int  # permission bits including setuid/setgid/sticky
    uid: int
    gid: int
    mtime: int | None  # whole seconds (tar precision); None for directories
    size: int | None  # regular files only
    sha256: str | None  # regular files only
    target: str | None  # symlinks only
    rdev: tuple[int, int] | None  # device nodes only
    capability: bytes | None  # the security.capability xattr
    inode: tuple[int, int]  # (st_dev, st_ino): hard-link grouping, not compared itself


@dataclass
class Coverage:
    """What a comparison looked at, so a test can prove it checked something."""

    paths: int = 0
    files: int = 0
    symlinks: int = 0
    devices: int = 0
    fifos: int = 0
    capabilities: list[str] = field(default_factory=list)
    hardlink_sets: list[frozenset[str]] = field(default_factory=list)
    setuid: list[str] = field(default_factory=list)


_KINDS = {
    stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


def _excluded(path: str, globs: Sequence[str]) -> bool:
    """True if path or one of its parents is named (literally or by a glob) in globs:
    an excluded directory takes its subtree with it."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for g in globs:
            if prefix == g or fnmatch.fnmatchcase(prefix, g):
                return True
    return False


def _capability(path: str) -> bytes | None:
    try:
        return os.getxattr(path, CAPABILITY_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def snapshot(root: str | os.PathLike[str], exclude_globs: Iterable[str] = ()) -> dict[str, Node]:
    """Every object below root (root itself as ""), keyed by rootfs-relative path,
    without following symlinks or crossing into excluded subtrees."""
    root = os.fspath(root)
    globs = tuple(g.strip("/") for g in exclude_globs)
    nodes: dict[str, Node] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        fmt = stat.S_IFMT(st.st_mode)
        kind = _KINDS[fmt]
        is_reg = fmt == stat.S_IFREG
        nodes[rel] = Node(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime=None if kind == "dir" else st.st_mtime_ns // 1_000_000_000,
            size=st.st_size if is_reg else None,
            sha256=sha256_file(full) if is_reg else None,
            target=os.readlink(full) if kind == "symlink" else None,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None,
            capability=_capability(full),
            inode=(st.st_dev, st.st_ino),
        )
        if kind == "dir":
            for name in os.listdir(full):
                child = f"{rel}/{name}" if rel else name
                if not _excluded(child, globs):
                    stack.append(child)
    return nodes


def hardlink_sets(nodes: dict[str, Node]) -> dict[str, frozenset[str]]:
    """path -> every path (itself included) sharing its inode, for non-directories
    that share one with another snapshotted path."""
    by_inode: dict[tuple[int, int], set[str]] = {}
    for path, node in nodes.items():
        if node.kind != "dir":
            by_inode.setdefault(node.inode, set()).add(path)
    return {p: frozenset(s) for s in by_inode.values() if len(s) > 1 for p in s}


_COMPARED = ("kind", "mode", "uid", "gid", "mtime", "size", "sha256", "target", "rdev", "capability")
# dpkg's records of a package (info/PKG.list...) and the bytecode compiled at install go to
# the package's layer with the fixed directory mtime (ownership.claim_package_records,
# claim_bytecode): the tree's install time or that.
FIXED_MTIME_GLOBS = ("var/lib/dpkg/info/*", "*/__pycache__/*.pyc")


def fixed_by_design(path: str) -> bool:
    """Whether a layer may give the object at `path` the fixed mtime (FIXED_MTIME_GLOBS)."""
    return _excluded(path, FIXED_MTIME_GLOBS)


def compare_trees(
    src: str | os.PathLike[str],
    unpacked: str | os.PathLike[str],
    exclude_globs: Iterable[str],
    coverage: Coverage | None = None,
    fixed_mtime: int = 0,
) -> list[str]:
    """Differences between a source rootfs (minus exclude_globs and their subtrees) and
    an unpacked image: paths present on one side only, type, mode, owner, size and
    sha256 of regular files, symlink targets, device numbers, security.capability,
    mtimes of non-directories (directory mtimes are normalised by design, and those of
    FIXED_MTIME_GLOBS may be `fixed_mtime`, the build's SOURCE_DATE_EPOCH), and
    hard-link grouping. Fills `coverage` with what was compared. Empty list: equal."""
    globs = tuple(exclude_globs)
    a = snapshot(src, globs)
    # The image must not contain excluded paths either, so it is walked unfiltered.
    b = snapshot(unpacked)
    diffs: list[str] = []
    for path in sorted(a.keys() - b.keys()):
        diffs.append(f"/{path}: missing from the image")
    for path in sorted(b.keys() - a.keys()):
        diffs.append(f"/{path}: only in the image")
    for path in sorted(a.keys() & b.keys()):
        na, nb = a[path], b[path]
        for attr in _COMPARED:
            va, vb = getattr(na, attr), getattr(nb, attr)
            if attr == "mtime" and vb == fixed_mtime and fixed_by_design(path):
                continue
            if va != vb:
                if attr == "mode":
                    va, vb = oct(va), oct(vb)
                diffs.append(f"/{path}: {attr} {va!r} in the rootfs, {vb!r} in the image")
    links_a, links_b = hardlink_sets(a), hardlink_sets(b)
    for path in sorted((links_a.keys() | links_b.keys()) & a.keys() & b.keys()):
        sa, sb = links_a.get(path, frozenset({path})), links_b.get(path, frozenset({path}))
        if sa != sb:
            diffs.append(f"/{path}: hard-linked with {sorted(sa)} in the rootfs, {sorted(sb)} in the image")
    if coverage is not None:
        common = a.keys() & b.keys()
        coverage.paths = len(common)
        kinds = [a[p].kind for p in common]
        coverage.files = kinds.count("file")
        coverage.symlinks = kinds.count("symlink")
        coverage.devices = kinds.count("chr") + kinds.count("blk")
        coverage.fifos = kinds.count("fifo")
        coverage.capabilities = sorted(p for p in common if a[p].capability is not None)
        coverage.setuid = sorted(p for p in common if a[p].mode & (stat.S_ISUID | stat.S_ISGID)
                                 and a[p].kind == "file")
        coverage.hardlink_sets = sorted(set(links_a.values()), key=sorted)
    return diffs


# ------------------------------------------------------------------ podman

# Global flags podman needs on this machine (field-facts: runc, vfs, cgroupfs, file events).
_PODMAN_GLOBAL = ("--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                  "--events-backend", "file", "--runtime", "runc")
# Flags for `run`/`create`: --network none always (else podman edits the host firewall).
_PODMAN_CONTAINER = ("--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


def _runroot(storage_root: Path) -> Path:
    """podman refuses a runroot longer than 50 characters, so it lives in a short
    directory named after storage_root instead of inside it."""
    key = hashlib.sha256(str(storage_root.resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"pkglayer-podman-{key}"


def podman_argv(storage_root: str | os.PathLike[str]) -> list[str]:
    """podman with its images, containers and tmp files under storage_root (runtime state
    in _runroot(storage_root))."""
    root = Path(storage_root)
    return ["podman", "--root", str(root / "root"), "--runroot", str(_runroot(root)),
            "--tmpdir", str(root / "tmp"), *_PODMAN_GLOBAL]


def podman(storage_root: str | os.PathLike[str], *args: str, timeout: float = 900) -> str:
    """Run podman_argv(storage_root); `run` and `create` get --network none and the
    ulimits. Returns stdout."""
    argv = podman_argv(storage_root)
    if args and args[0] in ("run", "create"):
        args = (args[0], *_PODMAN_CONTAINER, *args[1:])
    return run([*argv, *args], timeout=timeout)


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def podman_cleanup(storage_root: str | os.PathLike[str]) -> None:
    """Remove podman's containers, images and storage under storage_root. Files there
    belong to root; nothing is deleted while a mount is still below it."""
    root = Path(storage_root)
    if not root.exists():
        return
    if (root / "root").exists():
        for args in (("unmount", "--all", "--force"), ("system", "reset", "--force")):
            try:
                podman(root, *args, timeout=300)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"podman {' '.join(args)} failed: {e}", file=sys.stderr)
    runroot = _runroot(root)
    leftover = _mounts_below(root) + _mounts_below(runroot)
    if leftover:
        raise RuntimeError(f"refusing to delete {root}: still mounted below it: {leftover}")
    shutil.rmtree(runroot, ignore_errors=True)
    shutil.rmtree(root)


@pytest.fixture
def podman_store(tmp_path: Path) -> Iterator[Path]:
    """A private podman storage directory, emptied afterwards (vfs copies every layer:
    an image of ~90 layers takes gigabytes)."""
    root = tmp_path / "podman"
    root.mkdir()
    try:
        yield root
    finally:
        podman_cleanup(root)


@pytest.fixture(scope="module")
def shared_podman_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Like podman_store, shared by the tests of a module so an image is pulled into vfs
    once, and emptied after them (two images took 8.6 GB here)."""
    root = tmp_path_factory.mktemp("podman-shared")
    try:
        yield root
    finally:
        podman_cleanup(root)


# ------------------------------------------------------------------ registry


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _registry_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@dataclass(frozen=True)
class Registry:
    """A running registry: its address and the directory it stores blobs in, so tests
    can count what it holds on its own side."""

    address: str  # 127.0.0.1:PORT
    data: Path
    log: Path

    def blobs(self) -> dict[str, int]:
        """digest -> size of every blob the registry stores (layers, configs, manifests)."""
        root = self.data / "docker/registry/v2/blobs/sha256"
        if not root.exists():
            return {}
        return {f"sha256:{p.parent.name}": p.stat().st_size for p in root.glob("*/*/data")}

    def ref(self, name: str) -> str:
        """docker://ADDRESS/NAME"""
        return f"docker://{self.address}/{name}"

    def blob(self, digest: str) -> bytes:
        hexa = digest.split(":")[1]
        return (self.data / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data").read_bytes()

    def manifest(self, name: str) -> dict:
        return json.loads(run(["skopeo", "inspect", "--tls-verify=false", "--raw", self.ref(name)]))

    def log_size(self) -> int:
        return self.log.stat().st_size

    def served(self, since: int) -> dict[str, int]:
        """Bytes sent per request path since log offset `since` (blobs by digest); the
        registry logs them at log level "info"."""
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        out: dict[str, int] = {}
        for line in text.splitlines():
            if 'msg="response completed"' not in line:
                continue
            uri = re.search(r'http\.request\.uri="?([^" ]+)', line)
            written = re.search(r"http\.response\.written=(\d+)", line)
            assert uri and written, line
            key = uri.group(1).rsplit("/", 1)[-1]
            out[key] = out.get(key, 0) + int(written.group(1))
        return out


@contextlib.contextmanager
def serve_registry(work: Path, log_level: str = "warn") -> Iterator[Registry]:
    """Debian's docker-registry on 127.0.0.1 (loopback only, no auth, no TLS), storing
    blobs and its log (work/registry.log) under `work`. At log level "info" it logs every
    request with the bytes it sent (http.response.written)."""
    require_tools("docker-registry")
    exe = shutil.which("docker-registry")
    assert exe is not None
    port = _free_loopback_port()
    address = f"127.0.0.1:{port}"
    # JSON is YAML: no dependency needed to write the config.
    config = {
        "version": 0.1,
        "log": {"level": log_level},
        "storage": {"filesystem": {"rootdirectory": str(work / "data")}, "delete": {"enabled": True}},
        "http": {"addr": address},
    }
    (work / "config.yml").write_text(json.dumps(config))
    with open(work / "registry.log", "wb") as log:
        proc = subprocess.Popen(
            [exe, "serve", str(work / "config.yml")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while not _registry_answers(f"http://{address}/v2/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"docker-registry did not come up on {address}:\n"
                    + (work / "registry.log").read_text(errors="replace")[-4000:]
                )
            time.sleep(0.1)
        yield Registry(address, work / "data", work / "registry.log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One registry for the session (see serve_registry); tests use repositories of their own."""
    with serve_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg
