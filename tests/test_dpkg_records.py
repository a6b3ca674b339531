"""Files written at install time whose content is the package's go to the package's
layer with the directories' fixed mtime, so that a reinstall of the same package makes the
same layer: dpkg's records of a package (var/lib/dpkg/info/PKG.list, .md5sums,
.conffiles, the maintainer scripts: ownership.claim_package_records; a transaction then
changes the layers of the packages it touched and a small `pkgdb`, the status file, not a
layer holding every package's records) and the bytecode compiled after installation
(ownership.claim_bytecode).

The roots are real: packages built with dpkg-deb and installed by dpkg.
"""

from __future__ import annotations

import py_compile
import tarfile
import time
from pathlib import Path

import pytest

from pkglayer.scan import RACY_SECONDS
from tests.helpers import build_json, deb_package, dpkg_install, dpkg_root, read_layer

TOOL = {
    "usr/bin/tool": b"#!/bin/sh\necho tool\n",
    "usr/share/tool/data": b"data " * 200,
    "etc/tool.conf": b"setting = 1\n",
}
OTHER = {"usr/share/other/file": b"other\n"}
INFO = "var/lib/dpkg/info"


@pytest.fixture
def debs(tmp_path: Path) -> list[Path]:
    out = tmp_path / "debs"
    out.mkdir()
    return [deb_package(out, "tool", "1.0", TOOL, conffiles=["etc/tool.conf"]), deb_package(out, "other", "1.0", OTHER)]


@pytest.fixture
def root(tmp_path: Path, debs: list[Path]) -> Path:
    root = dpkg_root(tmp_path / "root")
    dpkg_install(root, *debs)
    return root


def layers(result: dict, layout: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """Each layer's members by path, by layer name."""
    return {
        layer["name"]: {m.name: m for m in read_layer(layout, layer["digest"]).getmembers()}
        for layer in result["layers"]
    }


def test_a_packages_records_are_in_its_layer_with_the_fixed_mtime(root: Path, tmp_path: Path) -> None:
    result = build_json(root, "--output", f"oci:{tmp_path}/img:t", "--no-hash-cache", "--source-date-epoch", "7")
    by_layer = layers(result, tmp_path / "img")
    tool = by_layer["tool-1.0-all"]
    records = sorted(p for p in tool if p.startswith(f"{INFO}/"))
    assert records == [f"{INFO}/tool.{x}" for x in ("conffiles", "list", "md5sums")]
    for path in records:
        # the tree's mtime is when dpkg installed it; the layer's is SOURCE_DATE_EPOCH
        assert (root / path).stat().st_mtime > 7 and tool[path].mtime == 7
        assert tool[path].size == (root / path).stat().st_size
    assert sorted(p for p in by_layer["other-1.0-all"] if p.startswith(f"{INFO}/")) == [
        f"{INFO}/other.list", f"{INFO}/other.md5sums"
    ]
    pkgdb = by_layer["pkgdb"]
    assert "var/lib/dpkg/status" in pkgdb and f"{INFO}/format" in pkgdb
    assert not [p for p in pkgdb if p.startswith((f"{INFO}/tool.", f"{INFO}/other."))]
    # every record is in exactly one layer
    everywhere = [p for members in by_layer.values() for p in members if p.startswith(f"{INFO}/") and p != INFO]
    assert sorted(everywhere) == sorted(f"{INFO}/{p.name}" for p in (root / INFO).iterdir())


def test_a_reinstall_of_the_same_packages_makes_the_same_package_layers(
    root: Path, debs: list[Path], tmp_path: Path
) -> None:
    first = build_json(root, "--output", f"oci:{tmp_path}/a:t", "--no-hash-cache")
    time.sleep(1.1)  # a later second: whatever dpkg writes now has another mtime
    before = (root / INFO / "tool.list").stat().st_mtime_ns
    dpkg_install(root, *debs)
    assert (root / INFO / "tool.list").stat().st_mtime_ns > before  # dpkg wrote its records again
    second = build_json(root, "--output", f"oci:{tmp_path}/b:t", "--no-hash-cache")
    keys = [{x["name"]: x["contentKey"] for x in r["layers"]} for r in (first, second)]
    for name in ("tool-1.0-all", "other-1.0-all"):
        assert keys[0][name] == keys[1][name], name


def test_an_upgrade_changes_the_upgraded_package_and_pkgdb_only(root: Path, tmp_path: Path) -> None:
    first = build_json(root, "--output", f"oci:{tmp_path}/a:t", "--no-hash-cache")
    newer = deb_package(tmp_path / "debs", "other", "1.1", {"usr/share/other/file": b"other, newer\n"})
    dpkg_install(root, newer)
    second = build_json(root, "--output", f"oci:{tmp_path}/b:t", "--no-hash-cache")
    keys = [{x["name"]: x["contentKey"] for x in r["layers"]} for r in (first, second)]
    assert keys[0]["tool-1.0-all"] == keys[1]["tool-1.0-all"]
    assert "other-1.1-all" in keys[1] and keys[1]["other-1.1-all"] != keys[0]["other-1.0-all"]
    by_layer = layers(second, tmp_path / "b")
    assert f"{INFO}/other.list" in by_layer["other-1.1-all"]
    assert by_layer["pkgdb"]["var/lib/dpkg/status"].size == (root / "var/lib/dpkg/status").stat().st_size



def test_a_build_from_the_kept_scan_writes_the_records_fixed_mtime_too(root: Path, tmp_path: Path) -> None:
    # The second build reads the tree's facts from the scan the first one kept (a digest
    # cache of its own), and has no earlier image to reuse: it writes every layer again,
    # from the kept objects, which must still say their mtime is fixed.
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    time.sleep(RACY_SECONDS + 0.1)  # else the kept scan trusts nothing dpkg just wrote
    first = build_json(root, "--output", f"oci:{tmp_path}/a:t", env=cache)
    second = build_json(root, "--output", f"oci:{tmp_path}/b:t", env=cache)
    assert list((tmp_path / "cache/pkglayer/scans").glob("*.scan"))  # a scan was kept
    assert second["written"] == len(second["layers"])
    assert [x["diffID"] for x in first["layers"]] == [x["diffID"] for x in second["layers"]]


def test_bytecode_compiled_again_at_a_reinstall_keeps_the_package_layer(tmp_path: Path) -> None:
    # As Debian's py3compile does in postinst: timestamp-based bytecode next to the
    # package's .py, which no package lists; compiled again, it has the same bytes and a
    # new mtime.
    debs = tmp_path / "debs"
    debs.mkdir()
    deb = deb_package(debs, "pymod", "1.0", {"usr/lib/python3/dist-packages/pymod.py": b"VALUE = 42\n"})
    root = dpkg_root(tmp_path / "root")
    source = root / "usr/lib/python3/dist-packages/pymod.py"
    compiled = root / "usr/lib/python3/dist-packages/__pycache__/pymod.cpython-311.pyc"

    def install() -> bytes:
        dpkg_install(root, deb)
        py_compile.compile(str(source), cfile=str(compiled), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        return compiled.read_bytes()

    data = install()
    first = build_json(root, "--output", f"oci:{tmp_path}/a:t", "--no-hash-cache")
    members = layers(first, tmp_path / "a")["pymod-1.0-all"]
    pyc = "usr/lib/python3/dist-packages/__pycache__/pymod.cpython-311.pyc"
    assert pyc in members and members[pyc].mtime == 0 and compiled.stat().st_mtime > 0
    before = compiled.stat().st_mtime_ns
    time.sleep(1.1)
    assert install() == data and compiled.stat().st_mtime_ns > before
    second = build_json(root, "--output", f"oci:{tmp_path}/b:t", "--no-hash-cache")
    keys = [{x["name"]: x["contentKey"] for x in r["layers"]} for r in (first, second)]
    assert keys[0]["pymod-1.0-all"] == keys[1]["pymod-1.0-all"]


def test_a_record_that_is_a_symlink_takes_nothing_from_where_it_points(root: Path, tmp_path: Path) -> None:
    # A hostile or broken tree: tool's maintainer script is a link into another package's files.
    (root / INFO / "tool.postinst").symlink_to("../../../../usr/share/other/file")
    result = build_json(root, "--output", f"oci:{tmp_path}/img:t", "--no-hash-cache")
    by_layer = layers(result, tmp_path / "img")
    link = by_layer["pkgdb"][f"{INFO}/tool.postinst"]  # records are regular files: the link stays with dpkg's
    assert link.issym() and link.linkname == "../../../../usr/share/other/file"
    assert "usr/share/other/file" in by_layer["other-1.0-all"]
    assert "usr/share/other/file" not in by_layer["tool-1.0-all"]
