"""What test modules share: running commands and the pkglayer CLI, digests, reading OCI
layouts, small real .debs, tmpfs mounts, and skipping for a missing tool or root (which
fails instead on CI, see `pytest_runtest_makereport`).

Test modules import helpers from here, tests/clients.py (third-party OCI clients),
tests/daemon_harness.py and tests/rootfs_factory.py, never from each other.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import zstandard

from tests.rootfs_factory import run

REPO = Path(__file__).resolve().parent.parent
# The layers every build puts on top of the package layers.
TOP_LAYERS = frozenset({"unowned", "modified", "pkgdb"})
REF_NAME = "org.opencontainers.image.ref.name"
CAPABILITY_XATTR = "security.capability"
# A real file capability, cap_net_raw=ep, as setcap writes it (VFS_CAP_REVISION_2).
CAP_VALUE = bytes.fromhex("0100000200200000000000000000000000000000")

# ------------------------------------------------------------------ skips (failures on CI)


def on_ci() -> bool:
    """CI sets CI=true (see .ci/run): everything must run there."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH (scripts/setup.sh installs it)")


def needs_root(why: str) -> pytest.MarkDecorator:
    """Mark for tests or modules that need root."""
    return pytest.mark.skipif(os.geteuid() != 0, reason=f"needs root: {why}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """On CI, a skipped test fails, with the skip's reason (it names the missing tool):
    a CI image that lacks a tool must not drop the tests that need it unnoticed.
    Registered by tests/conftest.py."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and on_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped on CI (CI=true), where every test must run: {reason}"


# ------------------------------------------------------------------ the pkglayer CLI


# The CLI as this interpreter (the venv's) runs it; for shell pipelines too.
PKGLAYER = (sys.executable, "-m", "pkglayer")


def pkglayer(*args: str | os.PathLike[str], check: bool = True, env: dict[str, str] | None = None,
             timeout: float = 1800, binary: bool = False) -> subprocess.CompletedProcess:
    """`python -m pkglayer ARGS`; env adds to os.environ; with `binary` the output is bytes
    (an archive on standard output). With check, a non-zero exit raises AssertionError
    with stderr."""
    argv = [*PKGLAYER, *map(os.fspath, args)]
    proc = subprocess.run(argv, capture_output=True, text=not binary, timeout=timeout,
                          env={**os.environ, **env} if env else None)
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace") if binary else proc.stderr
        raise AssertionError(f"pkglayer {' '.join(argv[3:])} exited {proc.returncode}:\n{stderr[-6000:]}")
    return proc


def pkglayer_json(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> dict:
    """`pkglayer ARGS --json`, parsed."""
    return json.loads(pkglayer(*args, "--json", env=env).stdout)


def build_json(rootfs: str | os.PathLike[str], *args: str, env: dict[str, str] | None = None) -> dict:
    """`pkglayer build ROOTFS -q ARGS --json`, parsed."""
    return pkglayer_json("build", rootfs, "-q", *args, env=env)


# ------------------------------------------------------------------ digests and layouts


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_blob(layout: str | os.PathLike[str], digest: str) -> bytes:
    algo, hexdigest = digest.split(":", 1)
    return (Path(layout) / "blobs" / algo / hexdigest).read_bytes()


def layout_manifest(layout: str | os.PathLike[str], tag: str) -> tuple[str, dict, dict]:
    """(digest, manifest, config) of the one manifest that index.json tags TAG."""
    index = json.loads((Path(layout) / "index.json").read_text())
    found = [m["digest"] for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag]
    assert len(found) == 1, f"{tag!r} in {layout}/index.json: {index}"
    manifest = json.loads(read_blob(layout, found[0]))
    return found[0], manifest, json.loads(read_blob(layout, manifest["config"]["digest"]))


def blob_files(layout: str | os.PathLike[str]) -> set[str]:
    """Hex names of the blobs in LAYOUT/blobs/sha256 (none when it does not exist)."""
    p = Path(layout) / "blobs" / "sha256"
    return {f.name for f in p.iterdir()} if p.exists() else set()


def promote_outputs(layers: Path) -> None:
    """What a build system does between builds: last output becomes next input."""
    src = layers / "output" / "blobs" / "sha256"
    dst = layers / "input" / "blobs" / "sha256"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        os.replace(f, dst / f.name)


def decompress(blob: bytes) -> bytes:
    """A gzip or zstd layer's tar bytes, told apart by their magic numbers (several gzip
    members or zstd frames are read through)."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    raise AssertionError(f"neither gzip nor zstd: {blob[:8]!r}")


def read_layer(layout: str | os.PathLike[str], digest: str) -> tarfile.TarFile:
    """A layer blob of a layout, opened with Python's tarfile."""
    return tarfile.open(fileobj=io.BytesIO(decompress(read_blob(layout, digest))), mode="r:",
                        encoding="utf-8", errors="surrogateescape")


# ------------------------------------------------------------------ real .debs


def deb_package(
    workdir: Path, name: str, version: str, files: dict[str, bytes], *, source: str | None = None,
    changelog: Sequence[str] = (), conffiles: Sequence[str] = (), built: int | None = None,
) -> Path:
    """A real .deb built with dpkg-deb: FILES (path -> data), those among them that
    CONFFILES names (paths of FILES) as conffiles, and, when CHANGELOG lists RFC 2822
    dates (newest first), usr/share/doc/NAME/changelog.Debian.gz with one entry per date.
    BUILT (Unix time): the files' mtimes in the package, as a package built then
    records them (dpkg-deb clamps to SOURCE_DATE_EPOCH); by default, now."""
    pkg = workdir / f"{name}-pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    control = f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
    if source:
        control += f"Source: {source}\n"
    control += "Maintainer: tests <t@pkglayer.invalid>\nDescription: test package\n"
    (pkg / "DEBIAN/control").write_text(control)
    if conffiles:
        (pkg / "DEBIAN/conffiles").write_text("".join(f"/{path}\n" for path in conffiles))
    for path, data in files.items():
        (pkg / path).parent.mkdir(parents=True, exist_ok=True)
        (pkg / path).write_bytes(data)
    if changelog:
        entries = "".join(
            f"{(source or name).split()[0]} ({version}) unstable; urgency=low\n\n  * entry {i}\n\n"
            f" -- tests <t@pkglayer.invalid>  {date}\n\n"
            for i, date in enumerate(changelog)
        )
        doc = pkg / "usr/share/doc" / name
        doc.mkdir(parents=True, exist_ok=True)
        (doc / "changelog.Debian.gz").write_bytes(gzip.compress(entries.encode(), mtime=0))
    deb = workdir / f"{name}_{version}_all.deb"
    env = None if built is None else {**os.environ, "SOURCE_DATE_EPOCH": str(built)}
    run(["dpkg-deb", "--root-owner-group", "--build", pkg, deb], env=env)
    shutil.rmtree(pkg)
    return deb


def dpkg_root(root: Path) -> Path:
    """An empty root with a dpkg database that `dpkg --root` installs into."""
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ("status", "available"):
        (root / "var/lib/dpkg" / f).touch()
    return root


def dpkg_install(root: Path, *debs: Path) -> None:
    run(["dpkg", f"--root={root}", "--force-unsafe-io", "-i", *map(str, debs)])


# ------------------------------------------------------------------ catching a writer mid-write


def _stopped(pid: int) -> bool:
    """Every thread of PID is stopped (state T), or the process is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rpartition(")")[2].split()[0])
    except FileNotFoundError:
        return True
    return all(state in ("T", "t", "Z", "X") for state in states)


def _locked_by_another(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops a lock we took
    return False


def stop_mid_write(proc: subprocess.Popen, tmp_dir: Path, ready: Callable[[], bool], timeout: float = 300) -> list[str]:
    """Stop PROC (SIGSTOP) at a moment when ready() holds and PROC is writing a blob: a
    blob-*.tmp in TMP_DIR (a BlobDir's temp directory) is locked, and its writer, being
    stopped, cannot finish it. Returns those temp files' names; the caller then kills PROC
    (SIGKILL ends a stopped process). Fails if PROC exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before it was caught writing a blob")
        if time.monotonic() > deadline:
            raise AssertionError(f"not caught writing a blob within {timeout} s")
        if ready() and tmp_dir.is_dir():
            os.kill(proc.pid, signal.SIGSTOP)
            while not _stopped(proc.pid):
                time.sleep(0.001)
            writing = sorted(p.name for p in tmp_dir.glob("blob-*.tmp") if _locked_by_another(p))
            if writing:
                return writing
            os.kill(proc.pid, signal.SIGCONT)  # between two blobs: try again
        time.sleep(0.005)


# ------------------------------------------------------------------ tmpfs mounts

# Mounts made here are named after the process, so that a later run can unmount those of
# a run that was killed before its cleanup (a leftover mount also blocks pytest from
# deleting its old temporary directories).
_TMPFS_SOURCE = "pkglayer-test-tmpfs-"


def _mounts() -> list[tuple[str, str]]:
    with open("/proc/self/mounts") as f:
        return [(fields[0], fields[1].replace("\\040", " ")) for fields in (line.split() for line in f)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unmount_stale_tmpfs() -> list[str]:
    """Unmount the tmpfs mounts of test processes that are gone; return their mount points."""
    stale = [point for source, point in _mounts()
             if source.startswith(_TMPFS_SOURCE) and source[len(_TMPFS_SOURCE):].isdigit()
             and not _alive(int(source[len(_TMPFS_SOURCE):]))]
    for point in reversed(stale):  # nested ones first
        run(["umount", "--lazy", point])
    return stale


@contextmanager
def tmpfs(path: Path, size: str | None = None) -> Iterator[Path]:
    """A real tmpfs mounted on PATH (created if absent) for the duration of the block."""
    require_root("mounting a tmpfs")
    unmount_stale_tmpfs()
    path.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", *(["-o", f"size={size}"] if size else []), f"{_TMPFS_SOURCE}{os.getpid()}", path])
    try:
        yield path
    finally:
        run(["umount", path])


def build_into_layers(rootfs: str | os.PathLike[str], settings, layers: str | os.PathLike[str]):
    """`pkglayer build ROOTFS --layers DIR` in-process (for tests that patch pipeline
    functions); the BuildResult."""
    from pkglayer.outputs import build_to

    return build_to(os.fspath(rootfs), settings, layers_dir=os.fspath(layers))[0]
