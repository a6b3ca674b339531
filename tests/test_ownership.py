"""Ownership rules that go beyond what the package database lists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pkglayer.config import BuildSettings
from pkglayer.ownership import scan_ownership
from pkglayer.rootfs import Rootfs
from pkglayer.sources import open_source
from tests.helpers import deb_package, dpkg_install
from tests.rootfs_factory import copy_tree


def test_bytecode_goes_with_the_package_of_its_source(deb_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    # a real .deb shipping .py files, as Debian python packages do
    deb = deb_package(tmp_path, "python3-pkglayer-demo", "1.0-1", {
        "usr/lib/python3/dist-packages/pkglayer_demo/__init__.py": b"VALUE = 1\n",
        "usr/lib/python3/dist-packages/pkglayer_demo/helper.py": b"def f():\n    return 2\n",
    })
    dpkg_install(root, deb)
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
