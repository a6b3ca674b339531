"""The kept scan (keptscan.py, scan.walk with `kept`): a rebuild re-reads only what
changed, and never takes a changed file or database for an unchanged one."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import marshal
import os
import socket
import stat
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pkglayer import keptscan
from pkglayer.config import BuildSettings
from pkglayer.digests import CONTENT_HASH
from pkglayer.errors import PkglayerError
from pkglayer.keptscan import DiskScans, KeptLayer, KeptScan, LayerContents, decode, encode, fingerprint, scan_kept
from pkglayer.ownership import HOME_UNOWNED
from pkglayer.plan import PlannedLayer
from pkglayer.rootfs import Rootfs
from pkglayer.scan import RACY_SECONDS, Listing, same_stamp, walk
from pkglayer.timings import Timings
from pkglayer.usercomponents import ComponentSpec
from tests.helpers import build_json, deb_package, dpkg_install, dpkg_root, tmpfs
from tests.test_ownership_rules import SITE, dist_info

INFO_DIR = "var/lib/dpkg/info"


def _walk(root: Path, kept=None, check=None):
    with Rootfs(str(root)) as rootfs:
        return walk(rootfs, lambda path, st: ("sha256",), (), (), kept=kept, check=check)


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
    assert again.changed == set() and again.removed == set() and again.hashed == 0
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


# os.stat_result's fields by their place in what it is made from (the sequence, then
# the float and nanosecond times, blksize, blocks, rdev).
_STAT_PLACE = {"st_mode": 0, "st_ino": 1, "st_dev": 2, "st_nlink": 3, "st_uid": 4, "st_gid": 5, "st_size": 6,
               "st_atime_ns": 13, "st_mtime_ns": 14, "st_ctime_ns": 15}
# What a change to an object sets, any of which the walk must notice.
_STAMP = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_ctime_ns")


def _with(st: os.stat_result, name: str) -> os.stat_result:
    """`st` with one field one more."""
    values = [*st, st.st_atime, st.st_mtime, st.st_ctime, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
              st.st_blksize, st.st_blocks, st.st_rdev]
    values[_STAT_PLACE[name]] += 1
    changed = os.stat_result(values)
    assert getattr(changed, name) == getattr(st, name) + 1
    return changed


def test_same_stamp_compares_every_field_a_change_sets(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"f")
    st = os.lstat(tmp_path / "f")
    assert same_stamp(st, os.lstat(tmp_path / "f")) and same_stamp(st, _with(st, "st_atime_ns"))
    for name in _STAMP:
        assert not same_stamp(st, _with(st, name)) and not same_stamp(_with(st, name), st), name


def test_a_kept_object_holds_only_while_every_field_of_its_lstat_does(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_bytes(b"f")
    (tmp_path / "d/g").write_bytes(b"g")
    kept = _aged(_walk(tmp_path))
    assert _walk(tmp_path, kept).changed == set()
    for name in _STAMP:
        # In a directory kept as listed (the walk's inlined comparison), and in one
        # listed again (same_stamp).
        for relisted in (False, True):
            objects = dict(kept.objects)
            objects["d/f"] = replace(objects["d/f"], st=_with(objects["d/f"].st, name))
            if relisted:
                objects["d"] = replace(objects["d"], st=_with(objects["d"].st, "st_mtime_ns"))
            again = _walk(tmp_path, replace(kept, objects=objects))
            assert again.changed == ({"d", "d/f"} if relisted else {"d/f"}), (name, relisted)
            assert again.objects["d/g"] is kept.objects["d/g"] and again.hashed == 1
            assert again.digests == kept.digests


def test_an_object_changed_within_the_racy_window_is_read_again_in_an_unchanged_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_bytes(b"f")
    (tmp_path / "d/g").write_bytes(b"g")
    time.sleep(0.05)
    os.chmod(tmp_path / "d/f", 0o600)  # d/f's ctime now later than d's and d/g's
    scan = _walk(tmp_path)
    d, f = scan.objects["d"].st.st_ctime_ns, scan.objects["d/f"].st.st_ctime_ns
    assert scan.objects["d/g"].st.st_ctime_ns < f and d < f
    assert scan.root is not None and scan.root.st_ctime_ns < f
    # As if the scan had started just after the root, d and d/g changed and just before d/f did.
    again = _walk(tmp_path, replace(scan, started=(d + f) / 2 / 1e9 + RACY_SECONDS))
    assert again.changed == {"d/f"}


def test_every_name_of_a_changed_hard_linked_file_is_read_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "a").write_bytes(b"1")
    os.link(root / "a", root / "d/b")
    (root / "c").write_bytes(b"c")
    kept = _aged(_walk(root))
    st = (root / "a").stat()
    with open(root / "a", "r+b") as f:
        f.write(b"2")
    os.utime(root / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    # The watch names the name written through; the other name changed as much.
    again = _walk(root, kept, check={"a"})
    assert again.changed == {"a", "d/b"} and again.digests["d/b"] == again.digests["a"] != kept.digests["a"]


def test_a_file_linked_from_outside_the_tree_is_always_read_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"1")
    (root / "g").write_bytes(b"g")
    os.link(root / "f", tmp_path / "outside")
    kept = _aged(_walk(root))
    st = (root / "f").stat()
    with open(tmp_path / "outside", "r+b") as f:  # no event for anything in the tree
        f.write(b"2")
    os.utime(root / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    again = _walk(root, kept, check=set())
    assert again.changed == {"f"} and again.digests["f"] != kept.digests["f"]


def test_a_new_hard_link_is_seen_by_the_other_names_too(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "c").write_bytes(b"c")
    kept = _aged(_walk(tmp_path))
    os.link(tmp_path / "a", tmp_path / "d/b")
    # The watch reports the new name and its directory: a's link count changed all the same.
    again = _walk(tmp_path, kept, check={"d", "d/b"})
    assert again.changed == {"d", "d/b", "a"}
    assert again.objects["a"].st.st_nlink == again.objects["d/b"].st.st_nlink == 2
    assert again.objects["c"] is kept.objects["c"]


def test_trusted_needs_spare_asking_about_unchanged_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in ("a", "b", "d/e", "d/f"):
        (tmp_path / name).write_bytes(name.encode())
    kept = _aged(_walk(tmp_path))
    (tmp_path / "b").write_bytes(b"bigger")  # the root keeps its listing
    (tmp_path / "d/g").write_bytes(b"new")  # d is listed again
    asked: list[str] = []

    def algos(path: str, st: os.stat_result) -> tuple[str, ...]:
        asked.append(path)
        return ("sha256",)

    with Rootfs(str(tmp_path)) as rootfs:
        again = walk(rootfs, algos, (), (), kept=kept, trusted_needs=("sha256",))
        assert sorted(asked) == ["b", "d/g"] and again.hashed == 2
        assert {p: again.digests[p] for p in ("a", "d/e")} == {p: kept.digests[p] for p in ("a", "d/e")}
        more = walk(rootfs, algos, (), (), kept=kept, trusted_needs=("sha256", "md5"))
    for path in ("a", "d/e", "d/f"):
        assert set(more.digests[path]) == {"sha256", "md5"}
        assert more.digests[path]["sha256"] == kept.digests[path]["sha256"]
    assert more.hashed == 5
    with Rootfs(str(tmp_path)) as rootfs:
        other = walk(rootfs, algos, (), (), kept=kept, trusted_needs=("md5",))
    # The digests kept of an algorithm not asked for now stay beside those taken.
    assert set(other.digests["a"]) == {"sha256", "md5"} and other.digests["a"]["sha256"] == kept.digests["a"]["sha256"]


def test_an_unchanged_directory_keeps_its_excluded_entries_and_sockets(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in ("x", "d/x", "d/f"):
        (tmp_path / name).write_bytes(b"x")
    for name in ("sock", "d/sock"):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(tmp_path / name))
    with Rootfs(str(tmp_path)) as rootfs:
        kept = _aged(walk(rootfs, lambda path, st: (), ("x", "d/x"), ()))
        again = walk(rootfs, lambda path, st: (), ("x", "d/x"), (), kept=kept)
    assert kept.excluded == again.excluded == ["d/x", "x"]
    why = "socket (tar cannot store sockets)"
    assert kept.skipped == again.skipped == [("d/sock", why), ("sock", why)]
    assert again.listings == kept.listings and again.listings["d"] == Listing(("f",), ("x",), ("sock",))
    assert again.changed == set()


def test_an_entry_gone_since_its_directory_was_listed_is_left_out(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for name in ("d/a", "d/b"):
        (tmp_path / name).write_bytes(b"x")
    kept = _aged(_walk(tmp_path))
    (tmp_path / "d/a").unlink()
    # Told only d/a may have changed, the walk keeps d's listing and finds d/a gone.
    again = _walk(tmp_path, kept, check={"d/a"})
    assert set(again.objects) == {"d", "d/b"} and again.removed == {"d/a"} and again.changed == set()


def _two_packages(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = dpkg_root(tmp_path / "root")
    one = deb_package(tmp_path, "one", "1.0", {"usr/share/one/file": b"one\n"})
    two = deb_package(tmp_path, "two", "1.0", {"usr/share/two/file": b"two\n"})
    return root, one, two


def _scan_kept(root: Path, settings: BuildSettings, kept, hash_content: bool = True, **kwargs):
    with Rootfs(str(root)) as rootfs:
        return scan_kept(rootfs, settings, kept, hash_content=hash_content, **kwargs)


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
    time.sleep(RACY_SECONDS / 2)
    first = _scan_kept(root, settings, None)
    assert first.trace_racy  # its files changed less than RACY_SECONDS ago
    assert _scan_kept(root, settings, first).databases is not first.databases
    assert encode(first) and decode(encode(first)).trace is None  # kept on disk, it is no trace at all


def test_a_racy_trace_holds_while_a_watch_sees_none_of_its_paths_change(tmp_path: Path, monkeypatch) -> None:
    """The daemon's watch names every path changed since the kept scan: a trace read
    within the racy window holds while none of its paths is named, and a path named
    means the databases are read again even where its lstat looks the same (a change
    in the same clock tick as the read)."""
    root, one, _ = _two_packages(tmp_path)
    dpkg_install(root, one)
    settings = BuildSettings().validated()
    first = _scan_kept(root, settings, None)
    assert first.trace_racy
    judged: list[dict] = []
    real = keptscan.unchanged
    monkeypatch.setattr(keptscan, "unchanged", lambda root, trace: judged.append(trace) or real(root, trace))
    held = _scan_kept(root, settings, first, check=set())
    assert held.databases is first.databases and held.trace_racy
    assert judged == []  # nothing named: nothing of the trace is looked at
    status = "var/lib/dpkg/status"
    assert status in first.trace
    again = _scan_kept(root, settings, held, check={status})  # named, its lstat the same
    assert again.databases is not first.databases
    assert judged == [], "a racy note is never judged by an lstat"
    # Not racy any more: a named path is judged by its lstat, and only it.
    time.sleep(RACY_SECONDS + 0.1)
    settled = _scan_kept(root, settings, again, check=set())  # nothing named, but settled: read again
    assert settled.databases is not again.databases and not settled.trace_racy
    assert judged == []
    assert _scan_kept(root, settings, settled, check={status}).databases is settled.databases
    assert judged == [{status: settled.trace[status]}]


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


# ------------------------------------------------------------------ the kept scan on disk


@pytest.fixture(scope="module")
def kept_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildSettings]:
    """A dpkg root with two packages (a file of one edited, another deleted), a pip
    distribution, a declared component, a big file, a symlink, a file with an xattr, an
    excluded file and a socket, with settings that use each; read-only for the tests."""
    tmp = tmp_path_factory.mktemp("kept")
    root, _, two = _two_packages(tmp)
    one = deb_package(tmp, "one", "1.0", {"usr/share/one/file": b"one\n", "usr/share/one/gone": b"gone\n"})
    dpkg_install(root, one, two)
    dist_info(root, SITE, "extra", "2.0", {"extra/__init__.py": b"x = 1\n"})
    (root / "srv/notes").mkdir(parents=True)
    (root / "srv/notes/a").write_bytes(b"note\n")
    (root / "srv/big").write_bytes(b"b" * 8192)
    (root / "tmp").mkdir()
    (root / "tmp/scratch").write_bytes(b"excluded")
    (root / "link").symlink_to("usr/share/one/file")
    os.setxattr(root / "usr/share/two/file", "user.note", b"kept")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))
    (root / "usr/share/one/file").write_bytes(b"edited\n")
    (root / "usr/share/one/gone").unlink()
    time.sleep(RACY_SECONDS + 0.1)  # what the databases were read from out of the racy window: trace kept
    settings = BuildSettings(
        extra_excludes=("tmp/**",), big_file_size=4096,
        components=(ComponentSpec("notes", ("srv/notes/**",), "monthly"),),
    ).validated()
    return root, settings


def _kept_scan(root: Path, settings: BuildSettings, hash_content: bool = True) -> KeptScan:
    """The tree scanned, with its layers' keys remembered (one layer a home)."""
    kept = _scan_kept(root, settings, None, hash_content=hash_content)
    LayerContents(kept, _one_layer_a_home(kept), 1234, with_root=True).remember({})
    return kept


def _one_layer_a_home(kept: KeptScan) -> list[PlannedLayer]:
    return [PlannedLayer(f"layer-{i}", (home,), (), (), 0, 0.0) for i, home in enumerate(sorted(kept.ownership.homes))]


def _st(st: os.stat_result | None) -> tuple | None:
    if st is None:
        return None
    return (tuple(st), st.st_atime, st.st_mtime, st.st_ctime, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
            st.st_blksize, st.st_blocks, st.st_rdev)


def _pkg(p) -> dict:
    # Kept packages have no file lists: the owner maps hold the records.
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name != "files"}


def _owners(owners) -> dict:
    return {path: (_pkg(p), rec) for path, (p, rec) in owners.items()}


def _facts(kept: KeptScan) -> dict:
    """Everything a kept scan holds, as plain values."""
    s, db, o = kept.scan, kept.databases, kept.ownership
    return {
        "kept": (kept.fingerprint, kept.root, kept.trace),
        "objects": [(p, x.path, _st(x.st), x.home, x.linkname, x.xattrs, x.content_hash) for p, x in s.objects.items()],
        "scan": (s.digests, s.excluded, s.skipped, s.hashed_at, list(s.listings.items()), _st(s.root), s.started),
        "databases": (
            db.source_format, db.architecture, [_pkg(p) for p in db.distro], [_pkg(p) for p in db.pip],
            _owners(db.owners), _owners(db.pip_owners), db.shared, db.dropped, db.db_paths,
        ),
        "ownership": (
            o.source_format, o.architecture, {k: _pkg(p) for k, p in o.packages.items()}, list(o.objects),
            {h: [x.path for x in xs] for h, xs in o.homes.items()}, o.excluded, o.skipped, o.modified,
            {k: [(x.path, rec) for x, rec in v] for k, v in o.modified_by_package.items()}, o.missing,
            list(o.shared.items()), o.origins, o.intervals, o.dropped, o.warnings,
        ),
        "layers": {n: dataclasses.astuple(x) for n, x in kept.layers.items()},
    }


def test_a_kept_scan_comes_back_from_its_file_as_it_was(kept_tree, tmp_path: Path) -> None:
    root, settings = kept_tree
    kept = _kept_scan(root, settings)
    # The tree has every kind of fact the file must carry.
    s, o = kept.scan, kept.ownership
    assert kept.trace and kept.layers and s.excluded == ["tmp/scratch"] and s.skipped
    assert s.objects["link"].linkname and s.objects["usr/share/two/file"].xattrs
    assert kept.databases.pip and kept.databases.pip_owners and o.modified and o.missing and o.modified_by_package
    assert o.intervals and {"config", "big file", "pip"} <= set(o.origins.values())
    scans = DiskScans(str(tmp_path / "scans"))
    scans.keep(kept)
    (path,) = Path(scans.directory).glob("*.scan")
    assert stat.S_IMODE(os.stat(scans.directory).st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    back, check = scans.take(kept.root, kept.fingerprint)
    assert check is None and back is not None
    assert _facts(back) == _facts(kept)
    assert back.fresh is False and back.dirty_homes == set()
    assert back.ownership.objects is back.scan.objects
    assert all(o.content_hash == s.digests.get(p, {}).get(CONTENT_HASH) for p, o in back.scan.objects.items())
    # Another root's or other settings' scan is not taken for it.
    assert scans.take(kept.root + "/other", kept.fingerprint) == (None, None)
    assert scans.take(kept.root, fingerprint(BuildSettings().validated())) == (None, None)

    # Read back, it spares the next scan everything, and is not written again.
    again = _scan_kept(root, settings, _aged_kept(back))
    assert again.databases is back.databases and again.scan.changed == set() and again.fresh is False
    assert _facts(again)["ownership"] == _facts(kept)["ownership"]
    before = path.stat().st_mtime_ns
    scans.keep(again)
    assert path.stat().st_mtime_ns == before


def _homes(kept: KeptScan) -> dict[str, list[str]]:
    return {h: [o.path for o in xs] for h, xs in kept.ownership.homes.items()}


def test_an_unchanged_tree_is_taken_whole_from_the_kept_scan(kept_tree) -> None:
    root, settings = kept_tree
    kept = _aged_kept(_kept_scan(root, settings))
    timings = Timings()
    started = time.perf_counter()
    again = _scan_kept(root, settings, kept, timings=timings)
    elapsed = time.perf_counter() - started
    assert (again.fingerprint, again.root) == (fingerprint(settings), kept.root)
    assert again.databases is kept.databases and again.trace is kept.trace
    assert again.scan.changed == set() and again.scan.removed == set() and again.scan.hashed == 0
    assert again.ownership.objects is again.scan.objects and _homes(again) == _homes(kept)
    assert again.dirty_homes == set() and again.fresh is False
    assert again.layers == kept.layers and again.layers is not kept.layers
    assert {"database", "scan", "hash", "ownership"} <= set(timings.steps)
    assert timings.steps["scan"] >= 0 and timings.steps["scan"] + timings.steps["hash"] <= elapsed


def test_a_digest_taken_again_makes_the_kept_scan_fresh(kept_tree) -> None:
    root, settings = kept_tree
    kept = _aged_kept(_kept_scan(root, settings))
    value = kept.scan.digests["usr/share/two/file"].pop(CONTENT_HASH)
    again = _scan_kept(root, settings, kept)
    assert again.scan.hashed == 1 and again.scan.digests["usr/share/two/file"][CONTENT_HASH] == value
    assert again.scan.objects["usr/share/two/file"].content_hash == value
    assert again.fresh is True and again.dirty_homes == set() and again.databases is kept.databases


def test_without_the_content_hash_none_is_taken(kept_tree) -> None:
    root, settings = kept_tree
    kept = _aged_kept(_kept_scan(root, settings, hash_content=False))
    assert not any(CONTENT_HASH in d for d in kept.scan.digests.values())
    again = _scan_kept(root, settings, kept, hash_content=False)
    assert again.scan.hashed == 0 and again.fresh is False
    assert not any(CONTENT_HASH in d for d in again.scan.digests.values())


def test_the_first_scan_reports_its_hashing(kept_tree) -> None:
    root, settings = kept_tree
    seen: list[tuple[str, int, int]] = []
    timings = Timings()
    first = _scan_kept(root, settings, None, progress=lambda *a: seen.append(a), timings=timings)
    assert first.scan.changed is None and first.dirty_homes is None and first.fresh is True
    assert "hash" in timings.cpu  # the hashing threads' CPU time, charged to this build
    assert seen and {phase for phase, _, _ in seen} == {"hashing"} and seen[-1][1] == seen[-1][2] == first.scan.hashed
    assert first.scan.objects["usr/share/two/file"].content_hash


def test_a_scan_kept_under_other_settings_or_of_another_root_is_not_used(kept_tree) -> None:
    root, settings = kept_tree
    assert _scan_kept(root, settings._replace(package_format="none"), None).databases.distro == []
    kept = _aged_kept(_kept_scan(root, settings))
    other = settings._replace(drop_xattrs=(*settings.drop_xattrs, "user.other"))
    assert fingerprint(other) != fingerprint(settings)
    for again in (_scan_kept(root, other, kept), _scan_kept(root, settings, replace(kept, root="/elsewhere"))):
        assert again.scan.changed is None and again.databases is not kept.databases
        assert again.layers == {} and again.dirty_homes is None and again.fresh is True


def test_scan_kept_does_not_enter_a_mount_point(tmp_path: Path) -> None:
    root, one, _ = _two_packages(tmp_path)
    dpkg_install(root, one)
    with tmpfs(root / "mnt"):
        (root / "mnt/inside").write_bytes(b"x")
        kept = _scan_kept(root, BuildSettings().validated(), None)
    assert "mnt" in kept.scan.objects and "mnt/inside" not in kept.scan.objects
    assert [p for p, _ in kept.scan.skipped] == ["mnt"]


def test_scan_kept_reads_again_only_the_paths_it_is_told_may_have_changed(tmp_path: Path) -> None:
    root, one, _ = _two_packages(tmp_path)
    dpkg_install(root, one)
    settings = BuildSettings().validated()
    kept = _aged_kept(_scan_kept(root, settings, None))
    target = root / "usr/share/one/file"
    st = target.stat()
    target.write_bytes(b"ONE\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _scan_kept(root, settings, kept, check=set()).scan.changed == set()
    assert _scan_kept(root, settings, kept, check={"usr/share/one/file"}).scan.changed == {"usr/share/one/file"}


def test_a_file_a_changed_database_now_lists_gets_its_digest_and_home(tmp_path: Path) -> None:
    root, one, _ = _two_packages(tmp_path)
    dpkg_install(root, one)
    extra = root / "usr/share/one/extra"
    extra.write_bytes(b"extra\n")
    # Judged by content: the list rewritten below would otherwise vouch for the older file.
    settings = BuildSettings(hash_package_files=True).validated()
    kept = _aged_kept(_scan_kept(root, settings, None))
    path = "usr/share/one/extra"
    assert kept.ownership.objects[path].home == HOME_UNOWNED and "md5" not in kept.scan.digests[path]
    # The database now lists the file (which itself is untouched): its md5 must be taken.
    info = root / "var/lib/dpkg/info"
    with open(info / "one.list", "a") as f:
        f.write(f"/{path}\n")
    md5 = hashlib.md5(b"extra\n").hexdigest()
    with open(info / "one.md5sums", "a") as f:
        f.write(f"{md5}  {path}\n")
    after = _scan_kept(root, settings, kept)
    assert after.databases is not kept.databases and path not in after.scan.changed
    assert after.scan.digests[path]["md5"] == md5
    home = after.ownership.objects["usr/share/one/file"].home
    assert home.startswith("one") and after.ownership.objects[path].home == home
    assert after.dirty_homes is not None and {HOME_UNOWNED, home} <= after.dirty_homes
    # The same when a watch names only the database's files: usr/ is then taken whole
    # from the kept scan, and the file is asked about again as one its package lists.
    check = {f"{INFO_DIR}/one.list", f"{INFO_DIR}/one.md5sums"}
    watched = _scan_kept(root, settings, kept, check=check)
    assert watched.scan.taken_whole > 0 and not any(p.startswith("usr/") for p in watched.scan.changed)
    assert watched.scan.digests[path]["md5"] == md5 and watched.ownership.objects[path].home == home


def test_the_homes_of_what_changed_are_dirty_and_a_directory_change_dirties_all(tmp_path: Path) -> None:
    root, one, two = _two_packages(tmp_path)
    dpkg_install(root, one, two)
    (root / "srv").mkdir()
    (root / "srv/a").write_bytes(b"a")
    (root / "srv/big").write_bytes(b"b" * 8192)
    settings = BuildSettings(big_file_size=4096).validated()
    kept = _aged_kept(_scan_kept(root, settings, None))
    _sizes_hold(kept)
    big_home = kept.ownership.objects["srv/big"].home
    one_home = kept.ownership.objects["usr/share/one/file"].home
    two_home = kept.ownership.objects["usr/share/two/file"].home
    assert len({one_home, two_home, big_home, HOME_UNOWNED}) == 4

    (root / "srv/b").write_bytes(b"b")  # added, into an unowned directory
    after = _scan_kept(root, settings, kept)
    assert after.scan.changed == {"srv", "srv/b"} and after.dirty_homes == {HOME_UNOWNED}
    assert after.ownership.sizes == {h: n for h, n in kept.ownership.sizes.items() if h != HOME_UNOWNED}
    _sizes_hold(after)
    assert after.fresh is True and after.layers == kept.layers

    with open(root / "usr/share/two/file", "ab") as f:  # a package file edited: it moves home
        f.write(b"more\n")
    again = _scan_kept(root, settings, _aged_kept(after))
    moved_to = again.ownership.objects["usr/share/two/file"].home
    assert moved_to != two_home and again.dirty_homes == {two_home, moved_to}
    _sizes_hold(again)

    (root / "srv/big").unlink()  # removed: its home (and its directory's)
    gone = _scan_kept(root, settings, _aged_kept(again))
    assert gone.scan.removed == {"srv/big"} and gone.dirty_homes == {HOME_UNOWNED, big_home}
    _sizes_hold(gone)

    os.chmod(root / "srv", 0o700)  # a directory's attributes: every layer below it repeats them
    assert _scan_kept(root, settings, _aged_kept(gone)).dirty_homes is None
    (root / "srv/b").unlink()
    (root / "srv/b").mkdir()  # a file became a directory
    later = _aged_kept(_scan_kept(root, settings, _aged_kept(gone)))
    assert later.dirty_homes is None


def _sizes_hold(kept: KeptScan) -> None:
    """Each home's size (those kept from the scan before, for the homes that did not
    change, and those made now) is what its objects add up to; all of them asked for,
    for the next scan to keep."""
    own = kept.ownership
    for home, objects in own.homes.items():
        assert own.home_bytes(home) == sum(o.st.st_size for o in objects if stat.S_ISREG(o.st.st_mode)), home
    assert set(own.sizes) == set(own.homes)


# ------------------------------------------------------------------ layer keys


def test_layer_keys_are_kept_only_for_the_same_clean_homes(kept_tree) -> None:
    root, settings = kept_tree
    kept = _kept_scan(root, settings)
    planned = _one_layer_a_home(kept)
    names = [layer.name for layer in planned]
    keys = {n: kept.layers[n].key for n in names}
    assert all(keys.values()) and len(set(keys.values())) == len(names)

    same = LayerContents(kept, planned, 1234, with_root=True)
    assert set(same.known) == set(names) and same.keys == keys
    assert [same.files(n) for n in names] == [kept.layers[n].files for n in names]
    # Made again, they are the same.
    made = LayerContents(replace(kept, layers={}), planned, 1234, with_root=True)
    assert made.known == {} and made.keys == keys
    files = [kept.layers[n].files for n in names]
    assert [made.files(n) for n in names] == [len(made.members(n)) for n in names] == files

    dirs = [m for n in names for m in made.members(n) if m.type == tarfile.DIRTYPE]
    assert dirs and {m.mtime for m in dirs} == {1234}
    empty = LayerContents(kept, [PlannedLayer("empty", ("no-such-home",), (), (), 0, 0.0)], 1234)
    assert empty.members("empty") == [] and empty.files("empty") == 0 and empty.keys["empty"]
    for other in (LayerContents(kept, planned, 99, with_root=True), LayerContents(kept, planned, 1234)):
        assert other.known == {}
    assert LayerContents(kept, planned, 99, with_root=True).keys == LayerContents(
        replace(kept, layers={}), planned, 99, with_root=True).keys
    merged = [replace(planned[0], homes=planned[0].homes + planned[1].homes)]
    assert LayerContents(kept, merged, 1234, with_root=True).known == {}
    assert LayerContents(replace(kept, dirty_homes=None), planned, 1234, with_root=True).known == {}
    dirty = LayerContents(replace(kept, dirty_homes={planned[0].homes[0]}), planned, 1234, with_root=True)
    assert set(dirty.known) == set(names[1:]) and dirty.keys == keys


def test_remembered_layers_make_the_kept_scan_fresh_only_when_they_differ(kept_tree) -> None:
    root, settings = kept_tree
    kept = _kept_scan(root, settings)
    planned = _one_layer_a_home(kept)
    layers = dict(kept.layers)
    kept.fresh, kept.dirty_homes = False, {planned[0].homes[0]}
    LayerContents(kept, planned, 1234, with_root=True).remember({})
    assert kept.fresh is False and kept.layers == layers and kept.dirty_homes == set()
    LayerContents(kept, planned, 1234, with_root=True).remember({planned[0].name: "sha256:written"})
    assert kept.fresh is True and kept.layers[planned[0].name].key == "sha256:written"
    kept.fresh = False
    LayerContents(kept, planned[1:], 1234, with_root=True).remember({})
    assert kept.fresh is True and set(kept.layers) == {layer.name for layer in planned[1:]}


def test_a_layer_without_a_key_is_not_remembered(kept_tree) -> None:
    root, settings = kept_tree
    kept = _scan_kept(root, settings, None, hash_content=False)  # no content hashes: no keys of layers with files
    planned = _one_layer_a_home(kept)
    contents = LayerContents(kept, planned, 1234)
    keyless = [n for n, key in contents.keys.items() if key is None]
    keyed = [n for n, key in contents.keys.items() if key is not None]
    assert keyless and keyed
    contents.remember({keyless[0]: "sha256:written"})
    assert set(kept.layers) == {keyless[0], *keyed}
    homes = {layer.name: layer.homes for layer in planned}
    assert kept.layers[keyless[0]] == KeptLayer(
        homes[keyless[0]], 1234, False, "sha256:written", len(contents.members(keyless[0]))
    )


def test_hashes_taken_while_writing_layers_are_kept(kept_tree) -> None:
    root, settings = kept_tree
    kept = _kept_scan(root, settings, hash_content=False)
    kept.fresh = False
    kept.took({}, CONTENT_HASH)
    assert kept.fresh is False
    md5 = kept.scan.digests["usr/share/two/file"]["md5"]
    kept.took({"usr/share/two/file": "c0ffee", "srv/big": "beef"}, CONTENT_HASH)
    assert kept.fresh is True
    assert kept.scan.digests["usr/share/two/file"] == {"md5": md5, CONTENT_HASH: "c0ffee"}
    assert kept.scan.digests["srv/big"] == {CONTENT_HASH: "beef"}
    assert kept.scan.objects["usr/share/two/file"].content_hash == "c0ffee"


# ------------------------------------------------------------------ damaged and other files


def _payload(data: bytes) -> dict:
    return marshal.loads(data[len(keptscan._MAGIC) + 32 :])


def _sealed(d: dict) -> bytes:
    payload = marshal.dumps(d)
    return keptscan._MAGIC + hashlib.sha256(payload).digest() + payload


def test_a_kept_scan_file_of_another_kind_or_shape_is_refused(kept_tree) -> None:
    root, settings = kept_tree
    data = keptscan.encode(_kept_scan(root, settings))
    assert keptscan.decode(_sealed(_payload(data))).root == str(root.resolve())

    def altered(change) -> bytes:
        d = _payload(data)
        change(d)
        return _sealed(d)

    cases = [
        (b"x" + data[1:], "not a kept scan"),
        (data[:-1], "checksum mismatch (a damaged file)"),
        (data[: len(keptscan._MAGIC)] + bytes(32) + data[len(keptscan._MAGIC) + 32 :],
         "checksum mismatch (a damaged file)"),
        (altered(lambda d: d.update(format=keptscan.KEPT_FORMAT + 1)), "written by another version"),
        (altered(lambda d: d.update(version="0.0")), "written by another version"),
        (altered(lambda d: d["scan"].update(homes=d["scan"]["homes"][1:])), "objects of another shape"),
        (altered(lambda d: d["scan"].update(stats=d["scan"]["stats"][:-1])), "objects of another shape"),
        (altered(lambda d: d["databases"]["packages"].__setitem__(0, d["databases"]["packages"][0][1:])),
         "package record of another shape"),
    ]
    for bad, why in cases:
        with pytest.raises(ValueError) as refused:
            keptscan.decode(bad)
        assert str(refused.value) == why


def test_a_kept_scan_that_cannot_be_read_is_ignored_with_a_warning(kept_tree, tmp_path: Path, caplog) -> None:
    root, settings = kept_tree
    kept = _kept_scan(root, settings)
    scans = DiskScans(str(tmp_path / "scans"))
    assert scans.take(kept.root, kept.fingerprint) == (None, None)  # none yet: no warning
    assert caplog.records == []
    scans.keep(kept)
    (path,) = Path(scans.directory).glob("*.scan")
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    assert scans.take(kept.root, kept.fingerprint) == (None, None)
    assert caplog.messages == [f"ignoring the kept scan {path}: checksum mismatch (a damaged file)"]
    caplog.clear()
    path.write_bytes(b"")
    assert scans.take(kept.root, kept.fingerprint) == (None, None)
    assert caplog.messages == [f"ignoring the kept scan {path}: not a kept scan"]
    caplog.clear()
    path.unlink()
    path.mkdir()
    assert scans.take(kept.root, kept.fingerprint) == (None, None)
    assert caplog.messages == [f"ignoring kept scan: {path} is not a regular file"]
    caplog.clear()
    path.rmdir()
    os.mkfifo(path)  # read without blocking, and refused
    assert scans.take(kept.root, kept.fingerprint) == (None, None)
    assert caplog.messages == [f"ignoring kept scan: {path} is not a regular file"]


def test_a_kept_scan_bigger_than_the_limit_is_neither_written_nor_read(
    kept_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    root, settings = kept_tree
    kept = _kept_scan(root, settings)
    size = len(keptscan.encode(kept))
    scans = DiskScans(str(tmp_path / "scans"))
    scans.keep(kept)
    monkeypatch.setattr(keptscan, "MAX_KEPT_BYTES", size - 2)
    # Read no further than just past the limit: the file then fails its checksum.
    assert scans.take(kept.root, kept.fingerprint) == (None, None)
    (path,) = Path(scans.directory).glob("*.scan")
    path.unlink()
    caplog.set_level("INFO", logger="pkglayer.keptscan")
    scans.keep(kept)
    assert list(Path(scans.directory).iterdir()) == []
    assert caplog.messages[-1] == f"not keeping the scan of {kept.root}: {size} bytes is more than {size - 2}"
    monkeypatch.setattr(keptscan, "MAX_KEPT_BYTES", size)
    scans.keep(kept)
    assert scans.take(kept.root, kept.fingerprint)[0] is not None


def test_a_scan_that_cannot_be_kept_is_a_warning(kept_tree, tmp_path: Path, caplog) -> None:
    root, settings = kept_tree
    kept = _kept_scan(root, settings)
    (tmp_path / "file").write_bytes(b"")
    DiskScans(str(tmp_path / "file")).keep(kept)
    assert caplog.messages == [f"could not keep the scan of {kept.root} in {tmp_path / 'file'}: File exists"]
    caplog.clear()
    # A full disk: a warning, and no temporary file left.
    assert len(keptscan.encode(kept)) > 8 << 10
    with tmpfs(tmp_path / "small", size="8k") as small:
        DiskScans(str(small / "scans")).keep(kept)
        assert caplog.messages == [
            f"could not keep the scan of {kept.root} in {small / 'scans'}: No space left on device"
        ]
        assert list((small / "scans").iterdir()) == []


def test_the_scans_of_the_roots_used_last_are_kept(kept_tree, tmp_path: Path) -> None:
    root, settings = kept_tree
    kept = _kept_scan(root, settings)
    scans = DiskScans(str(tmp_path / "scans"))
    roots = [f"/root{i}" for i in range(keptscan.MAX_KEPT_ROOTS + 1)]
    for i, name in enumerate(roots):
        scans.keep(replace(kept, root=name))
        path = Path(scans._path(name, kept.fingerprint))
        os.utime(path, (1000 + i, 1000 + i))  # used in this order
    assert {p.name for p in Path(scans.directory).iterdir()} == {
        Path(scans._path(name, kept.fingerprint)).name for name in roots[1:]
    }
    # A temporary file a writer left an hour ago goes; a recent one and other files stay.
    stale, recent, other = (Path(scans.directory) / n for n in ("a.tmp", "b.tmp", "notes"))
    for p in (stale, recent, other):
        p.write_bytes(b"")
    os.utime(stale, (time.time() - 3700,) * 2)
    scans.keep(replace(kept, root=roots[0]))
    names = {p.name for p in Path(scans.directory).iterdir()}
    assert "a.tmp" not in names and {"b.tmp", "notes"} <= names
    assert {n for n in names if n.endswith(".scan")} == {
        Path(scans._path(name, kept.fingerprint)).name for name in [roots[0], *roots[2:]]
    }
    # The file name depends on both root and settings, and any root has one (a path that
    # is not UTF-8 comes as surrogates).
    assert scans._path("/a", "fp") != scans._path("/b", "fp") != scans._path("/b", "other")
    odd = os.fsdecode(b"/r\xff")
    assert scans._path(odd, "fp") != scans._path(os.fsdecode(b"/r\xfe"), "fp")


def test_scans_are_kept_beside_the_digest_cache_unless_it_is_off(tmp_path: Path) -> None:
    scans = DiskScans.for_settings(BuildSettings(hash_cache=str(tmp_path / "c/hashes.db")).validated())
    assert isinstance(scans, DiskScans) and scans.directory == str(tmp_path / "c/scans")
    off = keptscan.DiskScans.for_settings(BuildSettings(hash_cache="").validated())
    assert isinstance(off, keptscan.NoScans) and off.take("/", "fp") == (None, None)


def _facts_of_a_scan(kept: KeptScan) -> dict:
    """_facts, without when the scan ran."""
    facts = _facts(kept)
    digests, excluded, skipped, _hashed_at, listings, root, _started = facts["scan"]
    facts["scan"] = (digests, excluded, skipped, listings, root)
    return facts


def _reading_pids(monkeypatch, tmp_path: Path, fail_in_child: bool = False) -> Path:
    """Makes every read of the databases note the pid that did it in a file (the child's
    notes too); with `fail_in_child`, a read in another process than this one fails."""
    notes = tmp_path / "pids"
    parent = os.getpid()
    read = keptscan._read_databases

    def noted(root: str, package_format: str | None, *rest: bool, **known):
        with open(notes, "a") as f:
            f.write(f"{os.getpid()}\n")
        if fail_in_child and os.getpid() != parent:
            raise RuntimeError("the child fails")
        return read(root, package_format, *rest, **known)

    monkeypatch.setattr(keptscan, "_read_databases", noted)
    # This test process may run other tests' threads; the CLI, where it matters, does not.
    monkeypatch.setattr(keptscan, "single_threaded", lambda: True)
    return notes


def test_a_first_scan_reads_the_databases_in_a_child_beside_the_walk(kept_tree, monkeypatch, tmp_path: Path) -> None:
    root, settings = kept_tree
    one_job = settings._replace(jobs=1)
    _scan_kept(root, one_job, None)  # file reads set atimes once, before the two compared
    here = _scan_kept(root, one_job, None)
    notes = _reading_pids(monkeypatch, tmp_path)
    timings = Timings()
    beside = _scan_kept(root, settings._replace(jobs=2), None, timings=timings)
    (pid,) = notes.read_text().split()
    assert int(pid) != os.getpid()
    assert _facts_of_a_scan(beside) == _facts_of_a_scan(here)
    assert beside.scan.hashed == here.scan.hashed > 0  # the files the databases name were hashed after the walk
    assert list(timings.steps)[:3] == ["database", "scan", "hash"]
    # One job, or a kept scan to start from: no child.
    notes.unlink()
    _scan_kept(root, one_job, None)
    _scan_kept(root, settings._replace(jobs=2), _aged_kept(here))
    assert notes.read_text().split() == [str(os.getpid())]


def test_when_the_child_fails_the_databases_are_read_here(kept_tree, monkeypatch, tmp_path: Path) -> None:
    root, settings = kept_tree
    expected = _facts_of_a_scan(_scan_kept(root, settings._replace(jobs=1), None))
    notes = _reading_pids(monkeypatch, tmp_path, fail_in_child=True)
    again = _scan_kept(root, settings._replace(jobs=2), None)
    child, parent = notes.read_text().split()
    assert int(child) != os.getpid() and int(parent) == os.getpid()
    assert _facts_of_a_scan(again) == expected


def test_beside_the_walk_a_database_error_and_warnings_are_as_without(
    tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, one, _ = _two_packages(tmp_path)
    dpkg_install(root, one)
    (root / SITE / "broken-1.0.dist-info").mkdir(parents=True)
    (root / SITE / "broken-1.0.dist-info/INSTALLER").write_text("pip\n")
    (root / SITE / "broken-1.0.dist-info/METADATA").write_text("Metadata-Version: 2.1\n")
    notes = _reading_pids(monkeypatch, tmp_path)
    scanned = _scan_kept(root, BuildSettings(jobs=2).validated(), None)
    assert int(notes.read_text().split()[0]) != os.getpid()
    assert any(k.startswith("one") for k in scanned.ownership.packages)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("broken-1.0.dist-info/METADATA: no valid Name and Version" in m for m in warned), warned

    (root / "var/lib/dpkg/status").write_bytes(b"Package: one\nStatus: install ok installed\n\n\0garbage")
    errors = []
    for jobs in (1, 2):
        with pytest.raises(PkglayerError) as e:
            _scan_kept(root, BuildSettings(jobs=jobs).validated(), None)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1] and "status" in errors[0][1]


def test_without_keys_first_members_are_made_when_asked(kept_tree) -> None:
    root, settings = kept_tree
    kept = _scan_kept(root, settings, None)
    planned = _one_layer_a_home(kept)
    first = LayerContents(kept, planned, 1234, with_root=True)
    later = LayerContents(kept, planned, 1234, True, keys_first=False)
    assert set(later.keys) == set(first.keys) and set(later.keys.values()) == {None}
    assert later._members == {}  # nothing made before a writer asks
    for layer in planned:
        assert later.members(layer.name) == first.members(layer.name)
