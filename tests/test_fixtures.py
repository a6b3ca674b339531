"""Smoke tests: each cached real rootfs has the facts the rest of the suite relies on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests import rootfs_factory as factory
from tests.helpers import CAPABILITY_XATTR


def test_deb_rootfs(deb_rootfs: Path) -> None:
    assert (deb_rootfs / "var/lib/dpkg/status").is_file()
    assert "iputils-ping" in factory.dpkg_versions(deb_rootfs)
    assert os.getxattr(deb_rootfs / "usr/bin/ping", CAPABILITY_XATTR, follow_symlinks=False)
    assert (deb_rootfs / "usr/bin").is_dir() and (deb_rootfs / "bin").is_symlink()


def test_deb_upgrade_pair(deb_upgrade_pair: factory.UpgradePair) -> None:
    pair = deb_upgrade_pair
    assert pair.upgraded, "no package differs"
    for name, (before, after) in pair.upgraded.items():
        assert before and after and before != after, (name, before, after)
    old, new = factory.dpkg_versions(pair.old), factory.dpkg_versions(pair.new)
    assert old.keys() == new.keys()
    assert {n for n in old if old[n] != new[n]} == set(pair.upgraded)


def test_rpm_rootfs(rpm_rootfs: Path) -> None:
    db = rpm_rootfs / "usr/lib/sysimage/rpm"
    assert (db / "rpmdb.sqlite").is_file()
    assert os.readlink(rpm_rootfs / "var/lib/rpm") == "../../usr/lib/sysimage/rpm"
    assert not (rpm_rootfs / "root/.rpmdb").exists()
    assert factory.rpm_query(rpm_rootfs, "pkglayer-demo").strip() == "pkglayer-demo-1.0-1.noarch"
    versions = factory.rpm_versions(rpm_rootfs)
    # every minbase .deb, converted, and the two synthetic packages: none dropped
    debs = {deb.name.split("_", 1)[0] for deb in factory.deb_debs().glob("*.deb")}
    assert len(debs) > 80 and versions.keys() == debs | {"pkglayer-demo", "pkglayer-extra"}

    share = rpm_rootfs / "usr/share/pkglayer-demo"
    assert (share / "hardlink-a").stat().st_ino == (share / "hardlink-b").stat().st_ino
    assert os.readlink(share / "data-link") == "data.txt"
    assert (share / "empty").stat().st_size == 0
    assert (rpm_rootfs / "var/lib/pkglayer-demo").is_dir()
    assert (rpm_rootfs / "etc/pkglayer-demo.conf").is_file()
    assert os.getxattr(rpm_rootfs / "usr/bin/pkglayer-ping", CAPABILITY_XATTR)
    # %ghost and --excludedocs: listed in the database, absent on disk.
    listed = factory.rpm_query(rpm_rootfs, "-l", "pkglayer-demo").split()
    for path in ("/var/log/pkglayer-demo.log", "/usr/share/doc/pkglayer-demo/README"):
        assert path in listed
        assert not (rpm_rootfs / path.lstrip("/")).exists()


def test_rpm_query_leaves_tree_alone(rpm_rootfs: Path) -> None:
    db = rpm_rootfs / "usr/lib/sysimage/rpm"
    before = {p.name: p.stat().st_mtime_ns for p in db.iterdir()}
    factory.rpm_versions(rpm_rootfs)
    assert {p.name: p.stat().st_mtime_ns for p in db.iterdir()} == before


def test_rpm_upgrade_pair(rpm_upgrade_pair: factory.UpgradePair) -> None:
    pair = rpm_upgrade_pair
    assert pair.upgraded == {"pkglayer-demo": ("1.0-1", "1.0-2")}
    data = "usr/share/pkglayer-demo/data.txt"
    assert (pair.old / data).read_text() != (pair.new / data).read_text()
    assert (pair.old / "etc/pkglayer-demo.conf").read_bytes() == (
        pair.new / "etc/pkglayer-demo.conf"
    ).read_bytes()
    assert os.getxattr(pair.new / "usr/bin/pkglayer-ping", CAPABILITY_XATTR)
    assert not (pair.new / "usr/share/doc/pkglayer-demo/README").exists()


def test_copy_tree_keeps_caps_and_links(deb_rootfs: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy"
    factory.copy_tree(deb_rootfs, dst)
    assert os.getxattr(dst / "usr/bin/ping", CAPABILITY_XATTR) == os.getxattr(
        deb_rootfs / "usr/bin/ping", CAPABILITY_XATTR
    )
    assert os.readlink(dst / "bin") == os.readlink(deb_rootfs / "bin")


def test_build_rpm_is_reproducible(rpm_specs_dir: Path, tmp_path: Path) -> None:
    spec = rpm_specs_dir / "pkglayer-extra.spec"
    a = factory.build_rpm(spec, "2.0", "7", tmp_path / "a")
    b = factory.build_rpm(spec, "2.0", "7", tmp_path / "b")
    assert a.name == "pkglayer-extra-2.0-7.noarch.rpm"
    assert a.read_bytes() == b.read_bytes()
    out = subprocess.run(["rpm", "-qp", a], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pkglayer-extra-2.0-7.noarch"


def test_pacman_rootfs(pacman_rootfs: Path) -> None:
    assert factory.pacman_versions(pacman_rootfs) == {
        "pkglayer-hello": "1.0-1", "pkglayer-split-lib": "2.0-3", "pkglayer-split-tools": "2.0-3",
    }
    # pacman's own check of every file against the package's mtree
    check = factory.pacman(pacman_rootfs, "-Qkk")
    assert check.count(" 0 altered files") == 3, check
    assert os.readlink(pacman_rootfs / "usr/share/pkglayer-hello/data-link") == "data.txt"
    assert (pacman_rootfs / "var/lib/pacman/sync/pkglayer.db").is_file()
    assert len(list((pacman_rootfs / "var/cache/pacman/pkg").glob("*.pkg.tar.gz"))) == 3


def test_pacman_upgrade_pair(pacman_upgrade_pair: factory.UpgradePair) -> None:
    pair = pacman_upgrade_pair
    assert pair.upgraded == {"pkglayer-hello": ("1.0-1", "1:1.1-1")}
    data = "usr/share/pkglayer-hello/data.txt"
    assert (pair.old / data).read_text() == "data of version 1.0\n"
    assert (pair.new / data).read_text() == "data of version 1.1\n"


def test_makepkg_is_reproducible(pacman_rootfs: Path, tmp_path: Path) -> None:
    """A rebuild with the recipe's SOURCE_DATE_EPOCH gives the cached package's bytes."""
    _, epoch, pkgver, pkgrel, built = factory.PACMAN_BUILDS[0]
    factory._makepkg(factory.PKGBUILDS_DIR / "pkglayer-hello", tmp_path, {
        "SOURCE_DATE_EPOCH": str(built), "PKGLAYER_EPOCH": epoch or "0",
        "PKGLAYER_PKGVER": pkgver or "", "PKGLAYER_PKGREL": pkgrel or "",
    })
    (rebuilt,) = tmp_path.glob("*.pkg.tar.gz")
    assert rebuilt.read_bytes() == (factory.pacman_packages() / rebuilt.name).read_bytes()


def test_pip_rootfs(pip_rootfs: Path) -> None:
    assert {"python3-pip", "python3-six", "python3-venv"} <= factory.dpkg_versions(pip_rootfs).keys()
    assert factory.pip_versions(pip_rootfs) == dict(r.split("==") for r in factory.PIP_SYSTEM)
    assert (pip_rootfs / "opt/app/venv/pyvenv.cfg").is_file()
    assert (pip_rootfs / "usr/local/lib/python3.11/dist-packages/six-1.17.0.dist-info/INSTALLER").read_text() == "pip\n"
    assert not (pip_rootfs / "tmp/pkglayer-wheels").exists()
    out = subprocess.run(
        ["chroot", pip_rootfs, "python3", "-B", "/usr/local/bin/pyflakes", "--version"],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert out.stdout.startswith("3.2.0")


def test_app_upgrade_pair(app_upgrade_pair: factory.UpgradePair) -> None:
    assert app_upgrade_pair.upgraded == {"urllib3": ("2.2.2", "2.2.3")}
    for root in (app_upgrade_pair.old, app_upgrade_pair.new):
        out = subprocess.run(
            ["chroot", root, f"{factory.APP_VENV}/bin/python", "-c",
             "import sys; sys.path.insert(0, '/opt/app'); import app, urllib3; print(urllib3.__version__)"],
            capture_output=True, text=True, check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        assert out.stdout.strip() == ("2.2.2" if root == app_upgrade_pair.old else "2.2.3")
    assert (app_upgrade_pair.old / factory.APP_MODEL).stat().st_size == 8 << 20
    assert not (app_upgrade_pair.new / "tmp/pkglayer-wheels").exists()
