"""zstd:chunked layers pulled by the real client: podman (4.3.1 here) with overlay storage
and partial pulls enabled in a private storage.conf, from Debian's docker-registry.

Two build hosts publish v1 and v2 of a Debian tree (one real bookworm-security upgrade
apart) with `--compression zstd:chunked`; the second plans from the first one's image in
the registry, so its unchanged layers are reused by digest, annotations included. podman
pulls v1, then v2: its debug log must show the partial-pull path for the changed layers,
the registry's access log gives the bytes it served for v2, which must be what the TOCs
say a client is missing, and the container's filesystem must be the source tree. The
same image pulled into vfs storage, which cannot take partial pulls, reads the layers as
plain zstd, runs, and is the tree.
"""

# Fixtures are imported by name and then used as parameters of the same name.
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from pkglayer.config import DEFAULT_EXCLUDES
from tests.clients import (
    Registry,
    _mounts_below,
    _runroot,
    compare_trees,
    serve_registry,
    snapshot,
)
from tests.helpers import PKGLAYER, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="podman with overlay storage needs root")

CHECKSUM = "io.containers.zstd-chunked.manifest-checksum"
POSITION = "io.containers.zstd-chunked.manifest-position"


@dataclass
class Published:
    registry: Registry
    old: Path
    new: Path
    v1: dict  # `pkglayer build --json` of each host
    v2: dict


def _build(host: Path, rootfs: Path, *args: str) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(host / "cache"), "TMPDIR": str(host / "tmp")}
    (host / "tmp").mkdir(parents=True, exist_ok=True)
    out = run([*PKGLAYER, "build", rootfs, "-q", "--json", "--tls-verify=false",
               "--compression", "zstd:chunked", *args], env=env)
    return json.loads(out)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, deb_upgrade_pair) -> Iterator[Published]:
    pair = deb_upgrade_pair
    work = tmp_path_factory.mktemp("registry")
    with serve_registry(work, log_level="info") as reg:
        v1 = _build(tmp_path_factory.mktemp("host-a"), pair.old, "--output", reg.ref("chunked:1"))
        v2 = _build(tmp_path_factory.mktemp("host-b"), pair.new, "--prior", reg.ref("chunked:1"),
                    "--output", reg.ref("chunked:2"))
        yield Published(reg, pair.old, pair.new, v1, v2)


class PartialPodman:
    """podman with a private store (overlay unless told otherwise) whose storage.conf turns
    partial pulls on or off; the setting is read from CONTAINERS_STORAGE_CONF, not from the
    command line."""

    def __init__(self, root: Path, partial: bool = True, driver: str = "overlay") -> None:
        self.root = root
        self.driver = driver
        self.conf = root / "storage.conf"
        self.conf.write_text(
            "[storage]\n"
            f'driver = "{driver}"\n'
            f'graphroot = "{root / "root"}"\n'
            f'runroot = "{_runroot(root)}"\n'
            "[storage.options.pull_options]\n"
            f'enable_partial_images = "{str(partial).lower()}"\n'
        )

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["podman", "--root", str(self.root / "root"), "--runroot", str(_runroot(self.root)),
                "--tmpdir", str(self.root / "tmp"), "--storage-driver", self.driver, "--cgroup-manager", "cgroupfs",
                "--events-backend", "file", "--runtime", "runc", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "CONTAINERS_STORAGE_CONF": str(self.conf)})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-6000:]}")
        return proc

    def cleanup(self) -> None:
        for args in (("unmount", "--all", "--force"), ("system", "reset", "--force")):
            try:
                self(*args)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"podman {' '.join(args)} failed: {e}")
        leftover = _mounts_below(self.root) + _mounts_below(_runroot(self.root))
        if leftover:
            raise RuntimeError(f"refusing to delete {self.root}: still mounted below it: {leftover}")
        shutil.rmtree(_runroot(self.root), ignore_errors=True)
        shutil.rmtree(self.root)


@pytest.fixture
def partial_podman(tmp_path: Path) -> Iterator[PartialPodman]:
    root = tmp_path / "podman"
    root.mkdir()
    p = PartialPodman(root)
    try:
        yield p
    finally:
        p.cleanup()


def _toc(blob: bytes, notes: dict[str, str]) -> tuple[list[dict], int]:
    offset, length, size, _ = map(int, notes[POSITION].split(":"))
    return json.loads(zstandard.ZstdDecompressor().decompress(blob[offset:offset + length], max_output_size=size))[
        "entries"], length


def test_podman_pulls_only_what_changed(published: Published, partial_podman: PartialPodman) -> None:
    reg = published.registry
    m1, m2 = reg.manifest("chunked:1"), reg.manifest("chunked:2")
    v1_layers = {d["digest"] for d in m1["layers"]}
    changed = [d for d in m2["layers"] if d["digest"] not in v1_layers]
    assert 1 <= len(changed) <= 5 and len(m2["layers"]) > 30
    # Reused layers kept their annotations through the registry, on another host.
    assert all(CHECKSUM in d["annotations"] for d in m2["layers"])

    first = partial_podman("--log-level", "debug", "pull", "--tls-verify=false", reg.ref("chunked:1")[9:]).stderr
    assert set(re.findall(r"Retrieved partial blob (sha256:[0-9a-f]{64})", first)) == v1_layers

    mark = reg.log_size()
    second = partial_podman("--log-level", "debug", "pull", "--tls-verify=false", reg.ref("chunked:2")[9:]).stderr
    partial = set(re.findall(r"Retrieved partial blob (sha256:[0-9a-f]{64})", second))
    assert partial == {d["digest"] for d in changed}, second[-3000:]
    assert "Failed to retrieve partial blob" not in second
    skipped = set(re.findall(r"Skipping blob (sha256:[0-9a-f]{64}) \(already present\)", second))
    assert skipped == {d["digest"] for d in m2["layers"]} - partial

    # What a client is missing, from the TOCs: each changed layer's TOC, and the frames of
    # the files whose content is in no v1 layer.
    have = {e["digest"] for d in m1["layers"] for e in _toc(reg.blob(d["digest"]), d["annotations"])[0]
            if e.get("digest")}
    served = reg.served(mark)
    for d in changed:
        entries, toc_len = _toc(reg.blob(d["digest"]), d["annotations"])
        missing = [e for e in entries if e.get("digest") and e["digest"] not in have]
        need = toc_len + sum(e["endOffset"] - e["offset"] for e in missing)
        got = served[d["digest"]]
        # Range responses add multipart boundaries; merged neighbouring ranges add gaps.
        assert need <= got <= need * 1.05 + 4096, (d["annotations"]["org.pkglayer.layer.name"], need, got)
        assert got < d["size"]
    blobs = {k: v for k, v in served.items() if k.startswith("sha256:")}
    assert set(blobs) == {d["digest"] for d in changed} | {m2["config"]["digest"]}

    # The container's filesystem is the source tree, but for what podman 4.3.1 never makes
    # from a TOC: device nodes and fifos, and symlink timestamps.
    cid = partial_podman("create", "--network", "none", reg.ref("chunked:2")[9:], "/bin/true").stdout.strip()
    mnt = partial_podman("mount", cid).stdout.strip()
    try:
        diffs = compare_trees(published.new, mnt, DEFAULT_EXCLUDES)
    finally:
        partial_podman("unmount", cid)
    src = snapshot(published.new, DEFAULT_EXCLUDES)
    known = []
    for line in diffs:
        path, what = line[1:].split(": ", 1)
        kind = src[path].kind if path in src else None
        if (kind in ("chr", "blk", "fifo") and what == "missing from the image") or (
                kind == "symlink" and what.startswith("mtime ")):
            known.append(line)
    assert diffs == known, [d for d in diffs if d not in known][:20]
    assert any(n.kind == "symlink" for n in src.values())
    # The layers' ./ entry gives the container a root that other users can enter.
    out = partial_podman("run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit",
                         "nproc=1024:1024", "--user", "65534", reg.ref("chunked:2")[9:], "/bin/sh", "-c",
                         "stat -c %a / && ls /usr/bin/dpkg").stdout
    assert out.split() == ["755", "/usr/bin/dpkg"]


def test_pull_into_vfs_runs(published: Published, tmp_path: Path) -> None:
    """vfs, which cannot take partial pulls at all, reads the layers as plain zstd."""
    root = tmp_path / "podman"
    root.mkdir()
    vfs = PartialPodman(root, partial=False, driver="vfs")
    try:
        ref = published.registry.ref("chunked:2")[9:]
        log = vfs("--log-level", "debug", "pull", "--tls-verify=false", ref).stderr
        assert "Retrieved partial blob" not in log
        out = vfs("run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit",
                  "nproc=1024:1024", ref, "/usr/bin/dpkg-query", "-W", "-f", "${Package}\n").stdout
        assert len(out.split()) > 80
        cid = vfs("create", "--network", "none", ref, "/bin/true").stdout.strip()
        mnt = vfs("mount", cid).stdout.strip()
        try:
            diffs = compare_trees(published.new, mnt, DEFAULT_EXCLUDES)
        finally:
            vfs("unmount", cid)
        assert diffs == []
    finally:
        vfs.cleanup()
