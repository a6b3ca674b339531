"""The kept scan (keptscan.py, scan.walk with `kept`): a rebuild re-reads only what
changed, and never takes a changed file or database for an unchanged one."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from pkglayer.config import BuildSettings
from pkglayer.keptscan import DiskScans, fingerprint, scan_kept
from pkglayer.rootfs import Rootfs
from pkglayer.scan import RACY_SECONDS, walk
from tests.helpers import build_json, deb_package, dpkg_install, dpkg_root


def _walk(root: Path, kept=None, check=None):
    with Rootfs(str(root)) as rootfs:
        return walk(rootfs, lambda path: ("sha256",), (), (), kept=kept, check=check)


def _aged(scan, seconds: float = RACY_SECONDS + 1):
    """The scan as if it had been made `seconds` later: what it saw is then out of the
    racy window (instead of sleeping that long)."""
    return replace(scan, started=scan.started + seconds)


def test_same_size_and_mtime_edit_is_read_again(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    f = tmp_path / "d/f"
    f.write_bytes(b"aaaa")
    kept = _aged(_walk(tmp_path))
    st = f.stat()
    f.write_bytes(b"bbbb")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only ctime tells
    again = _walk(tmp_path, kept)
    assert again.changed == {"d/f"}
    assert again.digests["d/f"] != kept.digests["d/f"]


def test_unchanged_objects_are_trusted_only_outside_the_racy_window(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    (tmp_path / "g").write_bytes(b"more")
    fresh = _walk(tmp_path)  # f and g changed just before it started: racy
    assert _walk(tmp_path, fresh).changed == {"f", "g"}
    aged = _aged(fresh)
    again = _walk(tmp_path, aged)
    assert again.changed == set() and again.removed == set()
    assert again.objects["f"] is aged.objects["f"] and again.digests == aged.digests


def test_added_removed_and_renamed_entries(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a").write_bytes(b"a")
    (tmp_path / "d/b").write_bytes(b"b")
    kept = _aged(_walk(tmp_path))
    os.rename(tmp_path / "d/a", tmp_path / "d/c")
    (tmp_path / "d/b").unlink()
    (tmp_path / "e").write_bytes(b"e")
    again = _walk(tmp_path, kept)
    assert set(again.objects) == {"d", "d/c", "e"}
    assert again.removed == {"d/a", "d/b"}
    assert {"d/c", "e"} <= again.changed


def test_a_watch_that_names_the_changed_paths_is_enough(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in "ab":
        (tmp_path / "d" / name).write_bytes(name.encode())
    kept = _aged(_walk(tmp_path))
    st = (tmp_path / "d/a").stat()
    (tmp_path / "d/a").write_bytes(b"A")
    os.utime(tmp_path / "d/a", ns=(st.st_atime_ns, st.st_mtime_ns))
    # Told that only d/b may have changed, the walk believes it: d/a is not looked at.
    assert _walk(tmp_path, kept, check={"d/b"}).changed == set()
    assert _walk(tmp_path, kept, check={"d/a"}).changed == {"d/a"}


def _two_packages(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = dpkg_root(tmp_path / "root")
    one = deb_package(tmp_path, "one", "1.0", {"usr/share/one/file": b"one\n"})
    two = deb_package(tmp_path, "two", "1.0", {"usr/share/two/file": b"two\n"})
    return root, one, two


def _scan_kept(root: Path, settings: BuildSettings, kept):
    with Rootfs(str(root)) as rootfs:
        return scan_kept(rootfs, settings, kept, hash_content=True)


def _aged_kept(kept):
    return replace(kept, scan=_aged(kept.scan))


def test_an_unchanged_database_is_not_read_again_a_changed_one_is(tmp_path: Path) -> None:
    root, one, two = _two_packages(tmp_path)
    dpkg_install(root, one)
    settings = BuildSettings().validated()
    time.sleep(RACY_SECONDS + 0.1)  # a database written within the racy window is read again
    first = _scan_kept(root, settings, None)
    assert first.trace is not None
    same = _scan_kept(root, settings, _aged_kept(first))
    assert same.databases is first.databases
    assert set(same.ownership.packages) == set(first.ownership.packages)

    dpkg_install(root, two)  # a package transaction: the status file and info/ change
    after = _scan_kept(root, settings, _aged_kept(same))
    assert after.databases is not first.databases
    assert {k.split("-")[0] for k in after.ownership.packages} >= {"one", "two"}
    assert after.ownership.objects["usr/share/two/file"].home.startswith("two")


def test_a_database_written_within_the_racy_window_is_read_again(tmp_path: Path) -> None:
    root, one, _ = _two_packages(tmp_path)
    dpkg_install(root, one)
    settings = BuildSettings().validated()
    first = _scan_kept(root, settings, None)
    assert first.trace is None  # its files changed less than RACY_SECONDS ago
    assert _scan_kept(root, settings, first).databases is not first.databases


def test_package_file_edit_without_a_transaction_is_noticed(tmp_path: Path) -> None:
    root, one, _ = _two_packages(tmp_path)
    dpkg_install(root, one)
    settings = BuildSettings().validated()
    kept = _aged_kept(_scan_kept(root, settings, None))
    target = root / "usr/share/one/file"
    st = target.stat()
    target.write_bytes(b"ONE\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = _scan_kept(root, settings, kept)
    assert after.ownership.objects["usr/share/one/file"].home == "modified"


def test_a_damaged_kept_scan_is_ignored(deb_rootfs: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/a:t")
    settings = BuildSettings().validated()
    scans = DiskScans.for_settings(settings)
    assert isinstance(scans, DiskScans)
    kept, _ = scans.take(str(deb_rootfs.resolve()), fingerprint(settings))
    assert kept is not None and kept.ownership.objects.keys() == kept.scan.objects.keys()
    (path,) = Path(scans.directory).glob("*.scan")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    assert scans.take(str(deb_rootfs.resolve()), fingerprint(settings)) == (None, None)
    second = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/b:t")
    assert second["manifestDigest"] == first["manifestDigest"]
