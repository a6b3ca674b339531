"""Rootfs access never leaves the rootfs: chroot-style resolution, no-follow opens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pkglayer.errors import RootfsError
from pkglayer.rootfs import FileOpener, Rootfs


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/lib/libx.so").write_text("lib")
    (root / "etc/shadow").write_text("rootfs shadow")
    (root / "lib").symlink_to("usr/lib")
    (root / "abs").symlink_to("/etc/shadow")  # absolute: means the rootfs's own /etc
    (root / "up").symlink_to("../../../../../../etc/shadow")  # ".." stops at the root
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    return root


def test_resolution_has_chroot_semantics(tree: Path) -> None:
    with Rootfs(tree) as r:
        assert r.resolve("lib/libx.so") == "usr/lib/libx.so"
        assert r.resolve("abs") == "etc/shadow"
        assert r.resolve("up") == "etc/shadow"
        assert r.resolve("abs", follow_final=False) == "abs"
        assert r.read_bytes("abs") == b"rootfs shadow"
        assert r.read_bytes("up") == b"rootfs shadow"
        assert r.read_bytes("lib/libx.so") == b"lib"
        with pytest.raises(RootfsError, match="too many levels"):
            r.resolve("loop1")


def test_no_follow_open_refuses_links(tree: Path) -> None:
    with Rootfs(tree) as r:
        with pytest.raises(RootfsError, match="symlink"):
            r.open_fd("abs", resolve=False)
        with pytest.raises(RootfsError, match="symlink"):
            r.open_fd("lib/libx.so", resolve=False)
        with FileOpener(r) as opener:
            fd, st = opener.open_fd("usr/lib/libx.so")
            os.close(fd)
            assert st.st_size == 3
            # a directory swapped for a link after the walk is refused, not followed
            os.rename(tree / "usr/lib", tree / "usr/lib.real")
            (tree / "usr/lib").symlink_to("/etc")
            with FileOpener(r) as fresh, pytest.raises(RootfsError, match="symlink"):
                fresh.open_fd("usr/lib/libx.so")


def test_walk_does_not_enter_links(tree: Path) -> None:
    with Rootfs(tree) as r:
        paths = {e.path for e in r.walk()}
    assert "lib" in paths and "lib/libx.so" not in paths
    assert "usr/lib/libx.so" in paths


def test_missing_or_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(RootfsError, match="does not exist"):
        Rootfs(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RootfsError, match="not a directory"):
        Rootfs(tmp_path / "file")
