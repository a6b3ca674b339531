"""Package files dpkg's own timestamps vouch for are taken as installed, unread
(ownership.vouched_for): a regular file, not a conffile, whose ctime and mtime are no
later than its package's var/lib/dpkg/info/PKG.list.

The roots are real: packages built with dpkg-deb and installed by dpkg (fresh from dpkg,
as a package manager leaves a tree), debootstrap's tree read in place, and copies of
them. A copy gives every file, the lists too, a new ctime: there a file's mtime alone
must be earlier than its list's (Package.files_copied).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pkglayer.cli import _settings_from_args, make_parser
from pkglayer.config import BuildSettings, load_settings
from pkglayer.hashcache import HashCache
from pkglayer.keptscan import KeptScan, fingerprint, scan_kept
from pkglayer.rootfs import Rootfs
from pkglayer.scan import RACY_SECONDS
from pkglayer.sources.base import COPIED_AFTER_NS
from tests.helpers import build_json, deb_package, dpkg_install, dpkg_root, pkglayer, read_layer
from tests.rootfs_factory import copy_tree

TOOL = {
    "usr/bin/tool": b"#!/bin/sh\necho tool\n",
    "usr/share/tool/data": b"data " * 200,
    "usr/share/tool/more": b"more\n",
    "etc/tool.conf": b"setting = 1\n",
}
OTHER = {"usr/share/other/file": b"other\n"}
PACKAGE_FILES = set(TOOL) | set(OTHER)
CONFFILE = "etc/tool.conf"
TOOL_KEY = "tool-1.0-all"
# Longer than a tick of the kernel's coarse clock (10 ms at HZ=100), which file times
# come from: a change made after it has a later ctime than anything dpkg wrote before.
CLOCK_TICK = 0.05


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A root as dpkg leaves it: packages tool (with a conffile) and other."""
    debs = tmp_path / "debs"
    debs.mkdir()
    root = dpkg_root(tmp_path / "root")
    dpkg_install(
        root,
        deb_package(debs, "tool", "1.0", TOOL, conffiles=[CONFFILE]),
        deb_package(debs, "other", "1.0", OTHER),
    )
    time.sleep(CLOCK_TICK)
    return root


def scanned(root: Path, **settings) -> KeptScan:
    """Databases, scan and homes as a build takes them (no digest cache, no kept scan)."""
    with Rootfs(str(root)) as rootfs:
        return scan_kept(rootfs, BuildSettings(hash_cache="", **settings).validated(), None)


def md5_read(kept: KeptScan) -> set[str]:
    return {path for path, found in kept.scan.digests.items() if "md5" in found}


def list_mtime_ns(root: Path, package: str) -> int:
    return os.lstat(root / f"var/lib/dpkg/info/{package}.list").st_mtime_ns


def edit_in_place(path: Path, data: bytes) -> None:
    """Overwrite the start of the file: same inode, same size when `data` is as long."""
    with open(path, "r+b") as f:
        f.write(data)


def changed_since_dpkg(root: Path, path: str, package: str) -> None:
    """What the test relies on: the change gave the file a later ctime than the list."""
    assert os.lstat(root / path).st_ctime_ns > list_mtime_ns(root, package)


def test_a_tree_fresh_from_dpkg_reads_only_its_conffiles(fresh: Path) -> None:
    kept = scanned(fresh)
    assert md5_read(kept) == {CONFFILE}
    assert kept.scan.hashed == 1
    own = kept.ownership
    assert own.modified == []
    assert {own.objects[p].home for p in TOOL} == {TOOL_KEY}
    assert own.objects["usr/share/other/file"].home == "other-1.0-all"


def test_debootstraps_tree_is_judged_the_same_reading_a_fraction(deb_base: Path) -> None:
    trusting = scanned(deb_base)
    hashing = scanned(deb_base, hash_package_files=True)
    owners = trusting.databases.owners
    conffiles = {path for path, (_, rec) in owners.items() if rec.config}
    with_md5 = md5_read(hashing)
    assert len(with_md5) > 4000  # every regular package file
    # Read: the conffiles (installed when configured, after the list) and the file
    # debootstrap swaps for a stand-in while it installs.
    assert md5_read(trusting) - conffiles == {"usr/sbin/start-stop-daemon"}
    assert trusting.ownership.modified == hashing.ownership.modified
    assert {p: o.home for p, o in trusting.ownership.objects.items()} == {
        p: o.home for p, o in hashing.ownership.objects.items()
    }


def test_a_package_file_edited_in_place_is_modified(fresh: Path) -> None:
    edit_in_place(fresh / "usr/share/tool/data", b"DATA")
    changed_since_dpkg(fresh, "usr/share/tool/data", "tool")
    kept = scanned(fresh)
    assert kept.ownership.modified == ["usr/share/tool/data"]
    assert kept.ownership.objects["usr/share/tool/data"].home == "modified"
    # Only the changed file and the conffile were read.
    assert md5_read(kept) == {"usr/share/tool/data", CONFFILE}


def test_an_edit_whose_mtime_is_set_back_is_still_modified(fresh: Path) -> None:
    path = fresh / "usr/bin/tool"
    before = os.lstat(path)
    edit_in_place(path, b"#!/bin/sh\necho TOOL\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -d: ctime stays new
    after = os.lstat(path)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)
    changed_since_dpkg(fresh, "usr/bin/tool", "tool")
    kept = scanned(fresh)
    assert kept.ownership.modified == ["usr/bin/tool"]
    assert md5_read(kept) == {"usr/bin/tool", CONFFILE}


def test_a_conffile_is_never_taken_on_trust(fresh: Path) -> None:
    edit_in_place(fresh / CONFFILE, b"setting = 2\n")
    # dpkg then rewrites the list (another package's Replaces: would): the edit is
    # older than the list now. A plain file would be taken on trust (the one case
    # where trust is misplaced; see vouched_for), a conffile never is.
    edit_in_place(fresh / "usr/share/tool/more", b"MORE\n")
    time.sleep(CLOCK_TICK)
    (fresh / "var/lib/dpkg/info/tool.list").touch()
    kept = scanned(fresh)
    assert kept.ownership.modified == [CONFFILE]
    assert md5_read(kept) == {CONFFILE}
    assert kept.ownership.objects["usr/share/tool/more"].home == TOOL_KEY


DAY = 24 * 3600


@pytest.fixture
def extracted(tmp_path: Path) -> Path:
    """The tree of an image built an hour ago from packages built a day before, extracted
    now: every ctime is the extraction's, mtimes are the image's."""
    debs = tmp_path / "debs"
    debs.mkdir()
    built = int(time.time()) - DAY
    installed = dpkg_root(tmp_path / "installed")
    dpkg_install(
        installed,
        deb_package(debs, "tool", "1.0", TOOL, conffiles=[CONFFILE], built=built),
        deb_package(debs, "other", "1.0", OTHER, built=built),
    )
    root = tmp_path / "extracted"
    copy_tree(installed, root)
    for d, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(d, name)
            st = os.lstat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 3600 * 10**9), follow_symlinks=False)
    time.sleep(CLOCK_TICK)
    return root


def test_a_copied_tree_is_judged_by_mtimes(extracted: Path) -> None:
    kept = scanned(extracted)
    assert all(p.files_copied for p in kept.databases.distro)
    assert md5_read(kept) == {CONFFILE}
    assert kept.ownership.modified == []
    edit_in_place(extracted / "usr/share/other/file", b"OTHER\n")
    kept = scanned(extracted)
    assert md5_read(kept) == {"usr/share/other/file", CONFFILE}
    assert kept.ownership.modified == ["usr/share/other/file"]
    hashing = scanned(extracted, hash_package_files=True)
    assert md5_read(hashing) == PACKAGE_FILES
    assert {p: o.home for p, o in kept.ownership.objects.items()} == {
        p: o.home for p, o in hashing.ownership.objects.items()
    }


def test_a_copy_keeps_ctimes_as_evidence_only_while_close_to_the_list(fresh: Path) -> None:
    """dpkg renames a list into place right after writing it; a list whose ctime is
    later than its mtime by more than COPIED_AFTER_NS was copied."""
    lst = fresh / "var/lib/dpkg/info/tool.list"
    assert not scanned(fresh).databases.distro[-1].files_copied
    for back, copied in ((COPIED_AFTER_NS // 2, False), (COPIED_AFTER_NS * 2, True)):
        # utime sets the ctime to now, the mtime to `back` before it
        os.utime(lst, ns=(time.time_ns() - back, time.time_ns() - back))
        tool = next(p for p in scanned(fresh).databases.distro if p.name == "tool")
        assert tool.files_copied is copied, back


def test_in_a_copied_tree_an_edit_whose_mtime_is_set_back_is_taken_on_trust(
    extracted: Path, tmp_path: Path,
) -> None:
    """The price of judging copies by mtime (ownership.vouched_for): an edit made with
    the file's old mtime, before the copy, goes unseen. It costs update economy only:
    the image has the edited bytes, in the package's layer."""
    path = extracted / "usr/share/tool/data"
    before = os.lstat(path)
    edit_in_place(path, b"DATA")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    kept = scanned(extracted)
    assert md5_read(kept) == {CONFFILE}
    assert kept.ownership.modified == [] and kept.ownership.objects["usr/share/tool/data"].home == TOOL_KEY
    built = build_json(extracted, "--output", f"oci:{tmp_path}/img:t", "--no-hash-cache")
    [layer] = [x for x in built["layers"] if x["name"].startswith(TOOL_KEY)]
    with read_layer(tmp_path / "img", layer["digest"]) as tar:
        assert tar.extractfile("usr/share/tool/data").read() == path.read_bytes()
    assert path.read_bytes().startswith(b"DATA")
    # Read whole, as debsums would, it is modified.
    assert scanned(extracted, hash_package_files=True).ownership.modified == ["usr/share/tool/data"]


def test_mtimes_set_to_one_value_are_no_evidence(extracted: Path) -> None:
    """buildah --timestamp, a SOURCE_DATE_EPOCH clamp or an ostree commit give the lists
    and the files edited after them one mtime: only a file strictly older than its list
    is taken on trust."""
    edit_in_place(extracted / "usr/bin/tool", b"#!/bin/sh\necho TOOL\n")
    one = time.time_ns() - DAY * 10**9
    for d, dirs, files in os.walk(extracted):
        for name in [*dirs, *files]:
            os.utime(os.path.join(d, name), ns=(one, one), follow_symlinks=False)
    kept = scanned(extracted)
    assert md5_read(kept) == PACKAGE_FILES
    assert kept.ownership.modified == ["usr/bin/tool"]


def test_a_bootc_style_tree_with_every_mtime_zero_is_read_whole(fresh: Path) -> None:
    # An ostree checkout: every mtime 0, the lists' too; ctime is when it was checked out.
    for d, dirs, files in os.walk(fresh):
        for name in [*dirs, *files]:
            os.utime(os.path.join(d, name), ns=(0, 0), follow_symlinks=False)
    assert list_mtime_ns(fresh, "tool") == 0
    kept = scanned(fresh, compare_mtimes=False)
    assert md5_read(kept) == PACKAGE_FILES
    assert kept.ownership.modified == []


def test_a_kept_scan_rereads_a_vouched_file_once_it_is_edited(fresh: Path) -> None:
    settings = BuildSettings(hash_cache="").validated()
    time.sleep(RACY_SECONDS + 0.1)  # a database written within the racy window is read again
    first = scanned(fresh)
    assert md5_read(first) == {CONFFILE}

    def again(kept: KeptScan) -> KeptScan:
        aged = replace(kept, scan=replace(kept.scan, started=kept.scan.started + RACY_SECONDS + 1))
        with Rootfs(str(fresh)) as rootfs:
            return scan_kept(rootfs, settings, aged)

    same = again(first)
    assert same.databases is first.databases and same.scan.hashed == 0 and same.ownership.modified == []
    edit_in_place(fresh / "usr/share/tool/data", b"DATA")
    edited = again(same)
    assert edited.databases is first.databases
    assert edited.ownership.modified == ["usr/share/tool/data"]
    assert md5_read(edited) == {"usr/share/tool/data", CONFFILE}


def test_hash_package_files_reads_every_package_file(fresh: Path, tmp_path: Path) -> None:
    kept = scanned(fresh, hash_package_files=True)
    assert md5_read(kept) == PACKAGE_FILES
    assert kept.ownership.modified == []
    # The setting, from the [build] table and from the command line; a kept scan made
    # under the other value is not used.
    conf = tmp_path / "pkglayer.toml"
    conf.write_text("[build]\nhash-package-files = true\n")
    assert load_settings(str(conf)).hash_package_files and not BuildSettings().hash_package_files
    for command in ("build", "plan", "scan"):
        args = make_parser().parse_args([command, str(fresh), "--hash-package-files"])
        assert _settings_from_args(args).hash_package_files, command
        args = make_parser().parse_args([command, str(fresh)])
        assert not _settings_from_args(args).hash_package_files, command
    assert fingerprint(BuildSettings(hash_package_files=True)) != fingerprint(BuildSettings())


def test_the_digest_cache_holds_only_digests_taken(deb_base: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "digests.sqlite")
    settings = BuildSettings(hash_cache=path).validated()
    cache = HashCache(path)
    with Rootfs(str(deb_base)) as rootfs:
        cache.load(rootfs.path)
        kept = scan_kept(rootfs, settings, None, cache=cache)
    cache.save()
    with sqlite3.connect(path) as db:
        cached = db.execute("SELECT count(*) FROM digests WHERE algo = 'md5'").fetchone()[0]
    assert cached == len(md5_read(kept)) < 200


def test_a_fresh_tree_builds_the_same_image_as_with_every_file_hashed(deb_base: Path, tmp_path: Path) -> None:
    common = ("--no-hash-cache", "--compression", "zstd")
    trusting = build_json(deb_base, "--output", f"oci:{tmp_path}/a:t", *common)
    hashing = build_json(deb_base, "--output", f"oci:{tmp_path}/b:t", "--hash-package-files", *common)
    assert [(x["name"], x["contentKey"]) for x in trusting["layers"]] == [
        (x["name"], x["contentKey"]) for x in hashing["layers"]
    ]
    assert trusting["manifestDigest"] == hashing["manifestDigest"]
    # The files taken as installed were not read to judge them.
    logged = pkglayer("plan", deb_base, "--no-hash-cache", "-v").stderr
    assert "package files taken as installed, unread" in logged
    logged = pkglayer("plan", deb_base, "--no-hash-cache", "-v", "--hash-package-files").stderr
    assert "taken as installed" not in logged


# ------------------------------------------------------------------ pip's RECORD
# pip, uv and installer write a distribution's RECORD last: its mtime vouches for the
# distribution's files the same way (sources/pip.py).


def pip_files_read(kept: KeptScan) -> set[str]:
    pip_paths = set(kept.databases.pip_owners)
    return {path for path, found in kept.scan.digests.items() if "sha256" in found and path in pip_paths}


def test_a_tree_fresh_from_pip_reads_none_of_its_files(pip_rootfs: Path) -> None:
    trusting = scanned(pip_rootfs)
    hashing = scanned(pip_rootfs, hash_package_files=True)
    assert len(trusting.databases.pip_owners) > 100
    # six 1.17.0 is installed twice, in /usr/local and in the venv: one package whose
    # files the earlier RECORD vouches for, so the venv's copy, installed later, is read.
    read = pip_files_read(trusting)
    assert read and all(p.startswith("opt/app/venv/") and "six" in p for p in read)
    every = pip_files_read(hashing)
    assert read < every and any("idna" in p for p in every) and any("pyflakes" in p for p in every)
    assert trusting.ownership.modified == hashing.ownership.modified
    assert {p: o.home for p, o in trusting.ownership.objects.items()} == {
        p: o.home for p, o in hashing.ownership.objects.items()
    }


def test_a_pip_file_edited_after_install_is_read_and_modified(pip_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(pip_rootfs, root)
    # As pip leaves a tree: every RECORD written after the files it lists (a copy gave
    # every file a new ctime).
    records = list(root.glob("**/*.dist-info/RECORD"))
    assert records
    time.sleep(CLOCK_TICK)
    for record in records:
        os.utime(record)
    time.sleep(CLOCK_TICK)
    kept = scanned(root)
    assert pip_files_read(kept) == set() and kept.ownership.modified == []
    edited = next(p for p in kept.databases.pip_owners if p.endswith(".py")
                  and os.lstat(root / p).st_size > 4 and "dist-info" not in p)
    edit_in_place(root / edited, b"#!!!")
    kept = scanned(root)
    assert pip_files_read(kept) == {edited}
    assert kept.ownership.modified == [edited]
