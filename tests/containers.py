"""Real buildah, podman and skopeo on a private containers-storage store, and the images
the Containerfile tests build on: a Debian base image, the pkglayer tool image from the
top-level Containerfile, and a bootc-style image whose tree holds an ostree repository.

Nothing can be pulled from a registry here: every base image is made from a cached
debootstrap tree (tests/rootfs_factory.py). Stores use the vfs driver (overlay with
PKGLAYER_TEST_STORAGE_DRIVER=overlay: the Containerfile tests then take about half the
time) and builds use chroot isolation, which work on this machine as root (see
docs/containers.md). vfs copies the whole tree for every layer, so images here are kept
to few layers where the test allows.

Test modules import the fixtures they use: ``from tests.containers import tool_image``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import rootfs_factory as factory
from tests.clients import _mounts_below, _runroot
from tests.helpers import build_json, run

REPO = Path(__file__).resolve().parent.parent
# podman on this machine (tests/clients.py, field-facts.md): runc, no systemd; --network
# none always (else podman edits the host's firewall), and ulimits runc may set.
PODMAN_GLOBAL_FLAGS = ("--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc")
PODMAN_CONTAINER_FLAGS = ("--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
# vfs needs no mounts; overlay imports ~3x faster into ~1/25 of the disk space.
STORAGE_DRIVER = os.environ.get("PKGLAYER_TEST_STORAGE_DRIVER", "vfs")
TOOL_IMAGE = "localhost/pkglayer:test"
BASE_TAG = "bookworm"


@dataclass(frozen=True)
class Store:
    """A private containers-storage store under `dir`, shared by buildah, podman and
    skopeo: graph root DIR/root, run root a short path under /tmp (podman refuses one
    longer than 50 characters), big temporary files in DIR/tmp."""

    dir: Path
    driver: str = "vfs"

    @property
    def graphroot(self) -> Path:
        return self.dir / "root"

    @property
    def runroot(self) -> Path:
        return _runroot(self.dir)

    def ref(self, name: str) -> str:
        """The skopeo reference of image `name` in this store."""
        return f"containers-storage:[{self.driver}@{self.graphroot}+{self.runroot}]{name}"

    def _env(self) -> dict[str, str]:
        # Image pulls and commits stage big files in $TMPDIR (default /var/tmp).
        tmp = self.dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "TMPDIR": str(tmp)}

    def _storage(self) -> list[str]:
        return ["--root", str(self.graphroot), "--runroot", str(self.runroot), "--storage-driver", self.driver]

    def buildah(self, *args: str, cwd: Path | None = None, timeout: float = 1800) -> str:
        return run(["buildah", *self._storage(), *args], timeout=timeout, cwd=cwd, env=self._env())

    def podman(self, *args: str, cwd: Path | None = None, timeout: float = 1800) -> str:
        """podman as it runs here (runc, cgroupfs, file events: field-facts.md); `run`
        and `create` get --network none and the ulimits runc needs."""
        if args and args[0] in ("run", "create"):
            args = (args[0], *PODMAN_CONTAINER_FLAGS, *args[1:])
        argv = ["podman", *self._storage(), "--tmpdir", str(self.dir / "tmp"), *PODMAN_GLOBAL_FLAGS, *args]
        return run(argv, timeout=timeout, cwd=cwd, env=self._env())

    def build(self, tool: str, context: Path, *args: str) -> str:
        """`buildah build` or `podman build` of `context`, run from it (a relative
        `FROM oci:PATH` is resolved from there), with chroot isolation."""
        build_args = ("build", "--isolation", "chroot", *args, str(context))
        if tool == "buildah":
            return self.buildah(*build_args, cwd=context)
        if tool == "podman":
            return self.podman(*build_args, cwd=context)
        raise ValueError(f"unknown build tool {tool!r}")

    def manifest(self, name: str) -> dict:
        """A manifest the store keeps for `name` (skopeo inspect --raw). Which one, when an
        image has several (buildah adds its own when it commits a FROM-only stage), is
        not fixed: name the digest (`NAME@sha256:...`) to get a particular one."""
        return json.loads(run(["skopeo", "inspect", "--raw", self.ref(name)]))

    def config(self, name: str) -> dict:
        return json.loads(run(["skopeo", "inspect", "--config", "--raw", self.ref(name)]))

    def inspect(self, name: str) -> dict:
        (info,) = json.loads(self.podman("image", "inspect", name))
        return info

    def remove(self) -> None:
        """Delete the store; nothing is deleted while something is still mounted below
        it. (`podman system reset` would delete layer by layer: minutes for vfs.)"""
        if self.graphroot.exists():
            for argv in (("buildah", "umount", "--all"), ("podman", "unmount", "--all", "--force")):
                try:
                    (self.buildah if argv[0] == "buildah" else self.podman)(*argv[1:], timeout=300)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"{' '.join(argv)} failed: {e}", file=sys.stderr)
        leftover = _mounts_below(self.dir) + _mounts_below(self.runroot)
        if leftover:
            raise RuntimeError(f"refusing to delete {self.dir}: still mounted below it: {leftover}")
        shutil.rmtree(self.runroot, ignore_errors=True)
        shutil.rmtree(self.dir)


def new_store(path: Path, driver: str = "vfs") -> Iterator[Store]:
    """A Store at `path`, removed when the generator is closed."""
    path.mkdir(parents=True, exist_ok=True)
    store = Store(path, driver)
    try:
        yield store
    finally:
        store.remove()


@pytest.fixture(scope="session")
def session_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One private store for the session: the tool image is built into it once, and the
    layers tests share stay imported (vfs imports are the slow part)."""
    yield from new_store(tmp_path_factory.mktemp("containers") / "store", STORAGE_DRIVER)


# ------------------------------------------------------------------ base images


def one_layer_image(rootfs: Path, layout: Path, tag: str = BASE_TAG) -> str:
    """`oci:LAYOUT:TAG` of `rootfs` as one layer, as debian:bookworm is published
    (pkglayer with --format none and no big-file components: everything unowned), with a
    label of its own as a base image has. The package database stays; apt's .debs and
    lists do not (default excludes). Returns the reference."""
    build_json(rootfs, "--output", f"oci:{layout}:{tag}", "--format", "none", "--big-file-size", "1T",
               "--label", f"org.example.base={tag}", "--cmd", '["/bin/bash"]')
    return f"oci:{layout}:{tag}"


def make_wheelhouse(work: Path) -> Path:
    """Wheels of pkglayer, its dependencies and setuptools in WORK/wheels, made on the
    host with its pip configuration, so the tool image builds without pip reaching an
    index (here PyPI is behind a proxy only the host trusts: docs/containers.md)."""
    src = work / "src"
    # A copy, so the build leaves no build/ or *.egg-info in the repository.
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "pkglayer", src / "pkglayer", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = work / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--wheel-dir", str(wheels), str(src), "setuptools>=68"], timeout=900)
    return wheels


def build_tool_image(store: Store, base: str, wheels: Path, name: str = TOOL_IMAGE) -> str:
    """Build the top-level Containerfile with buildah on `base`; pip installs from
    `wheels`, mounted on /mnt (which exists in the base, so no mount point stays in the
    image). apt still fetches from Debian's mirror. Returns `name`."""
    store.build("buildah", REPO, "--build-arg", f"BASE={base}",
                "--build-arg", "PIP_ARGS=--no-index --find-links /mnt",
                "-v", f"{wheels}:/mnt:ro", "-t", name)
    return name


@pytest.fixture(scope="session")
def debian_base(deb_upgrade_pair, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`oci:LAYOUT:bookworm`: debootstrap minbase at point-release versions, one layer."""
    return one_layer_image(deb_upgrade_pair.old, tmp_path_factory.mktemp("debian-base") / "layout")


@pytest.fixture(scope="session")
def tool_image(session_store: Store, debian_base: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The pkglayer tool image (top-level Containerfile) in the session store."""
    wheels = make_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))
    return build_tool_image(session_store, debian_base, wheels)


# ------------------------------------------------------------------ bootc


def bootc_layout(rootfs: Path, layout: Path, tag: str = "latest") -> dict[str, str]:
    """Write `layout` with one image of a factory.bootc_rootfs tree, made as a tool other
    than pkglayer makes one: a single gzip layer of GNU tar's (hard links into
    sysroot/ostree/repo/objects kept, security.capability and user.* xattrs), and the
    labels a bootc image carries (containers.bootc, ostree.bootable, ostree.commit of the
    tree's repository, ostree.final-diffid of the layer) plus a version label that must
    survive. Returns the labels."""
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    tar = subprocess.run(
        ["tar", "--create", "--file=-", f"--directory={rootfs}", "--sort=name", "--numeric-owner",
         "--format=pax", "--pax-option=delete=atime,delete=ctime", "--xattrs",
         "--xattrs-include=security.capability", "--xattrs-include=user.*", "."],
        check=True, capture_output=True,
    ).stdout
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
             **put(gzip.compress(tar, compresslevel=6, mtime=0))}
    labels = {
        "containers.bootc": "1",
        "ostree.bootable": "true",
        "ostree.commit": factory.ostree_commit(rootfs),
        "ostree.final-diffid": diff_id,
        "org.opencontainers.image.version": "43.20261201.0",
    }
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/sbin/init"], "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "ostree container encapsulate"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **put(json.dumps(config).encode())},
        "layers": [layer],
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       **put(json.dumps(manifest).encode()),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return labels


@pytest.fixture(scope="session", params=factory.BOOTC_RPMDB_LOCATIONS)
def bootc_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(`oci:LAYOUT:latest`, its labels, the tree) for a bootc-style image, once with the
    rpm database in usr/lib/sysimage/rpm and once in usr/share/rpm."""
    if shutil.which("ostree") is None:
        pytest.fail("ostree is not installed (apt-get install ostree; scripts/setup.sh does)")
    rootfs = factory.bootc_rootfs(request.param)
    layout = tmp_path_factory.mktemp("bootc") / "layout"
    labels = bootc_layout(rootfs, layout)
    return f"oci:{layout}:latest", labels, rootfs
