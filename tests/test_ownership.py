"""Ownership rules that go beyond what the package database lists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pkglayer.config import BuildSettings
from pkglayer.ownership import scan_ownership
from pkglayer.rootfs import Rootfs
from pkglayer.sources import open_source
from tests.rootfs_factory import copy_tree


def _deb_with_python_module(tmp_path: Path) -> Path:
    """A real .deb (dpkg-deb) shipping a .py file, as Debian python packages do."""
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        "Package: python3-pkglayer-demo\nVersion: 1.0-1\nArchitecture: all\n"
        "Maintainer: tests <t@pkglayer.invalid>\nDescription: demo module\n"
    )
    mod = pkg / "usr/lib/python3/dist-packages/pkglayer_demo"
    mod.mkdir(parents=True)
    (mod / "__init__.py").write_text("VALUE = 1\n")
    (mod / "helper.py").write_text("def f():\n    return 2\n")
    deb = tmp_path / "python3-pkglayer-demo_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", pkg, deb], check=True, capture_output=True)
    return deb


def test_bytecode_goes_with_the_package_of_its_source(deb_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    deb = _deb_with_python_module(tmp_path)
    subprocess.run(["dpkg", f"--root={root}", "-i", deb], check=True, capture_output=True)
    mod = root / "usr/lib/python3/dist-packages/pkglayer_demo"
    # what py3compile does in a postinst: bytecode next to the sources, owned by nobody
    subprocess.run([sys.executable, "-m", "compileall", "-q", mod], check=True)
    subprocess.run([sys.executable, "-O", "-m", "compileall", "-q", mod], check=True)
    # bytecode of a file no package owns stays unowned
    (root / "srv/local.py").write_text("X = 1\n")
    subprocess.run([sys.executable, "-m", "compileall", "-q", root / "srv"], check=True)

    with Rootfs(str(root)) as rootfs:
        settings = BuildSettings()
        own = scan_ownership(rootfs, open_source(rootfs, None), settings.all_excludes, settings.drop_xattrs)
    key = next(k for k, p in own.packages.items() if p.name == "python3-pkglayer-demo")
    pycs = sorted(p for p in own.objects if p.endswith(".pyc"))
    demo_pycs = [p for p in pycs if "pkglayer_demo" in p]
    assert len(demo_pycs) == 4  # two modules, plain and -O
    assert all(own.objects[p].home == key for p in demo_pycs)
    assert own.objects["usr/lib/python3/dist-packages/pkglayer_demo/__pycache__"].home == key
    local = [p for p in pycs if p.startswith("srv/")]
    assert local and all(own.objects[p].home == "unowned" for p in local)
    assert own.objects["srv/__pycache__"].home == "unowned"
