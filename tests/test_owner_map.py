"""The owner map of a database read again after a transaction: the packages the dpkg
reader hands back unchanged keep the real paths made for them, but only while every
directory they list resolves as it did; the result is always what a read from scratch
gives.

The roots are real: packages built with dpkg-deb and installed by dpkg, /lib a symlink
to usr/lib as on merged-/usr systems."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from pkglayer import ownership
from pkglayer.ownership import Databases, read_databases
from pkglayer.rootfs import Rootfs
from pkglayer.scan import RACY_SECONDS
from pkglayer.sources import dpkg, open_source
from tests.helpers import deb_package, dpkg_install, dpkg_root
from tests.rootfs_factory import run

TOOL = {"usr/bin/tool": b"tool 1\n", "lib/tool/data": b"data 1\n"}
TOOL_2 = {"usr/bin/tool": b"tool 2\n", "lib/tool/data2": b"data 2\n"}
OTHER = {"lib/other/file": b"other\n", "usr/share/other/file": b"other\n"}
EXTRA = {"lib/extra/file": b"extra\n"}


def read(root: Path, trace: dict | None = None) -> Databases:
    with Rootfs(root) as rootfs:
        rootfs.trace = trace
        return read_databases(rootfs, open_source(rootfs, None))


def from_scratch(root: Path) -> Databases:
    """A read with no process cache (the real paths kept here, the packages dpkg's reader keeps)."""
    path = os.path.abspath(root)
    saved = ownership._REAL_PATHS.pop(path, None), dpkg._PACKAGES.pop(path, None)
    try:
        return read(root)
    finally:
        ownership._REAL_PATHS.pop(path, None)
        dpkg._PACKAGES.pop(path, None)
        for cache, entry in zip((ownership._REAL_PATHS, dpkg._PACKAGES), saved):
            if entry is not None:
                cache[path] = entry  # type: ignore[index]


def owners(db: Databases) -> dict[str, tuple[str, str]]:
    return {real: (pkg.key, rec.path) for real, (pkg, rec) in db.owners.items()}


def assert_as_from_scratch(root: Path) -> Databases:
    """Reads the databases after the caches' racy window, and checks them against a read from scratch."""
    time.sleep(RACY_SECONDS + 0.1)
    read(root)  # remembers what the next read may reuse
    again = read(root)
    scratch = from_scratch(root)
    assert owners(again) == owners(scratch)
    assert again.shared == scratch.shared
    return again


def kept_reals(root: Path, db: Databases) -> dict[str, tuple]:
    """The real paths the cache holds for each package of `db`, by package key."""
    known = ownership._REAL_PATHS[os.path.abspath(root)].packages
    return {p.key: known[id(p)][2] for p in db.distro if id(p) in known}


def merged_root(tmp_path: Path, debs: list[Path]) -> Path:
    root = dpkg_root(tmp_path / "root")
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    dpkg_install(root, *debs)
    return root


def test_after_install_upgrade_and_removal_the_map_is_as_from_scratch(tmp_path: Path) -> None:
    debs = tmp_path / "debs"
    debs.mkdir()
    tool, other = deb_package(debs, "tool", "1.0", TOOL), deb_package(debs, "other", "1.0", OTHER)
    root = merged_root(tmp_path, [tool, other])
    first = assert_as_from_scratch(root)
    assert owners(first)["usr/lib/tool/data"] == ("tool-1.0-all", "/lib/tool/data")
    assert first.shared["usr"] == ["other-1.0-all", "tool-1.0-all"]  # dpkg lists directories too
    before = kept_reals(root, first)
    assert set(before) == {"tool-1.0-all", "other-1.0-all"}

    dpkg_install(root, deb_package(debs, "extra", "1.0", EXTRA))
    installed = assert_as_from_scratch(root)
    kept = kept_reals(root, installed)
    assert kept["other-1.0-all"] is before["other-1.0-all"]  # not made again
    assert owners(installed)["usr/lib/extra/file"] == ("extra-1.0-all", "/lib/extra/file")

    dpkg_install(root, deb_package(tmp_path, "tool", "2.0", TOOL_2))
    upgraded = assert_as_from_scratch(root)
    assert "usr/lib/tool/data" not in upgraded.owners
    assert owners(upgraded)["usr/lib/tool/data2"] == ("tool-2.0-all", "/lib/tool/data2")

    run(["dpkg", f"--root={root}", "--force-unsafe-io", "--purge", "other"])
    removed = assert_as_from_scratch(root)
    assert "usr/lib/other/file" not in removed.owners
    assert kept_reals(root, removed)["extra-1.0-all"] is kept["extra-1.0-all"]


def test_a_directory_symlink_changed_between_reads_is_seen(tmp_path: Path) -> None:
    debs = tmp_path / "debs"
    debs.mkdir()
    root = merged_root(tmp_path, [deb_package(debs, "tool", "1.0", TOOL)])
    time.sleep(RACY_SECONDS + 0.1)
    read(root)
    db = read(root)
    assert owners(db)["usr/lib/tool/data"] == ("tool-1.0-all", "/lib/tool/data")
    reused = db.distro[0]
    # /lib becomes a directory of its own: the package (the same Package: its records
    # did not change) lists /lib/tool/data, which is now lib/tool/data.
    (root / "lib").unlink()
    shutil.copytree(root / "usr/lib", root / "lib")
    shutil.rmtree(root / "usr/lib/tool")
    trace: dict = {}
    again = read(root, trace)
    assert again.distro[0] is reused
    assert owners(again)["lib/tool/data"] == ("tool-1.0-all", "/lib/tool/data")
    assert "usr/lib/tool/data" not in again.owners
    assert owners(again) == owners(from_scratch(root))
    # What the map was made from is noted, so that a kept scan sees /lib change again.
    assert trace["lib"] == ("d", (root / "lib").lstat().st_dev, (root / "lib").lstat().st_ino)
