"""Trees far deeper than Python's recursion limit (issue 11, defect 3): 1,500 levels, as a
rootfs to build and as an image to unpack, rebuild and clean up. 1,500 one-letter levels
are 3,000 bytes of path: within PATH_MAX and within the unpacker's 4,096-byte path limit,
so a real tool can make such a tree; the trees here are made one level at a time from a
directory fd, as such a tool would.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from pkglayer.fsutil import remove_tree
from pkglayer.layout import open_layout
from pkglayer.unpack import unpack
from tests import tarcraft
from tests.helpers import PKGLAYER

DEPTH = 1500
DEEP = "/".join(["d"] * DEPTH)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking images keeps owners: needs root")


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path):
    """pytest's own clean-up of old temporary directories recurses (shutil.rmtree)."""
    yield
    for name in os.listdir(tmp_path):
        remove_tree(tmp_path / name)


def make_chain(top: Path, depth: int = DEPTH) -> int:
    """`depth` nested directories `d` under `top`; returns an fd of the deepest one."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def write_at(dir_fd: int, name: str, data: bytes) -> None:
    with open(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd), "wb") as f:
        f.write(data)


def chain_layer(prefix: str = "", extra: list[bytes] | None = None) -> bytes:
    """A layer of a DEPTH-level chain under `prefix` with a file at the bottom."""
    out = []
    for i in range(1, DEPTH + 1):
        out.append(tarcraft.member(prefix + "/".join(["d"] * i), b"5", mode=0o755))
    out.append(tarcraft.member(f"{prefix}{DEEP}/bottom", data=b"deep file"))
    return tarcraft.stream(out + (extra or []))


def layer_names(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    names = []
    for desc in manifest["layers"]:
        raw = gzip.decompress((blobs / desc["digest"][7:]).read_bytes())
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            names += tar.getnames()
    return names


def test_remove_tree_removes_any_depth_and_never_follows_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    top = tmp_path / "top"
    top.mkdir()
    fd = make_chain(top)
    try:
        write_at(fd, "file", b"x")
        os.symlink(str(outside), "to-dir", dir_fd=fd)
        os.symlink(str(outside / "keep"), "to-file", dir_fd=fd)
        os.mkfifo("fifo", dir_fd=fd)
        for i in range(300):  # a wide directory at the bottom, too
            os.mkdir(f"w{i}", dir_fd=fd)
        os.mkdir("locked", 0o000, dir_fd=fd)
    finally:
        os.close(fd)
    os.symlink(str(outside), top / "link-at-top")

    remove_tree(top)

    assert not top.exists()
    assert sorted(os.listdir(outside)) == ["keep"] and (outside / "keep").read_text() == "precious"
    remove_tree(top)  # a missing tree is no error


def test_a_deep_rootfs_builds(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fd = make_chain(root)
    try:
        write_at(fd, "bottom", b"deep file")
    finally:
        os.close(fd)
    proc = subprocess.run(
        [*PKGLAYER, "build", str(root), "--format", "none", "--no-hash-cache", "-q",
         "--output", f"oci:{tmp_path}/out:t"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{DEEP}/bottom" in layer_names(tmp_path / "out")


@needs_root
def test_a_deep_image_is_unpacked_rebuilt_and_its_working_tree_removed(tmp_path: Path) -> None:
    layout = tarcraft.layout(tmp_path / "img", [chain_layer()])
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [*PKGLAYER, "build", "--from", f"oci:{layout}:t", "--output", f"oci:{tmp_path}/out:t", "-q",
         "--tmpdir", str(work)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{DEEP}/bottom" in layer_names(tmp_path / "out")
    assert os.listdir(work) == [], "the unpacked tree is removed"


@needs_root
def test_a_deep_image_refused_late_still_leaves_no_working_tree(tmp_path: Path) -> None:
    bad = tarcraft.member("../escape", data=b"x")
    layout = tarcraft.layout(tmp_path / "img", [chain_layer(extra=[bad])])
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [*PKGLAYER, "build", "--from", f"oci:{layout}:t", "--output", f"oci:{tmp_path}/out:t",
         "--tmpdir", str(work)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pkglayer: error: layer 0 (sha256:"), proc.stderr[-2000:]
    assert "contains '..'" in lines[0]
    assert os.listdir(work) == [], "the unpacked tree is removed on errors too"
    assert not (tmp_path / "escape").exists()


@needs_root
def test_whiteouts_and_opaque_directories_over_deep_trees(tmp_path: Path) -> None:
    lower = chain_layer("a/", [tarcraft.member("b/" + "/".join(["d"] * i), b"5", mode=0o755)
                               for i in range(1, DEPTH + 1)])
    # Only the opaque directory's own new entry survives; a whiteout takes a whole deep tree.
    upper = tarcraft.stream([tarcraft.member("a/", b"5", mode=0o700), tarcraft.member("a/new", data=b"n"),
                             tarcraft.member("a/.wh..wh..opq"), tarcraft.member(".wh.b")])
    layout = tarcraft.layout(tmp_path / "img", [lower, upper])
    tree = tmp_path / "tree"
    tree.mkdir()
    unpack(open_layout(str(layout), "t"), str(tree))
    assert sorted(os.listdir(tree)) == ["a"]
    assert os.listdir(tree / "a") == ["new"]
    assert stat.S_IMODE(os.lstat(tree / "a").st_mode) == 0o700
