"""The daemon's walk after a package transaction (scan.walk with `check` from the
file-change watch): it goes through the directories above what changed and takes every
other subtree whole from the kept scan, and what it finds is what a walk of the whole
tree finds."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pkglayer.config import BuildSettings
from pkglayer.daemon.changes import TreeWatch
from pkglayer.keptscan import KeptScan, scan_kept
from pkglayer.rootfs import Rootfs
from pkglayer.scan import RACY_SECONDS
from tests.helpers import deb_package, dpkg_install, dpkg_root, tmpfs


def _scan(root: Path, kept: KeptScan | None, check=None) -> KeptScan:
    with Rootfs(str(root)) as rootfs:
        return scan_kept(rootfs, BuildSettings().validated(), kept, check, hash_content=True)


def _aged(kept: KeptScan) -> KeptScan:
    # As if made RACY_SECONDS later: what it saw is trusted (instead of sleeping).
    return replace(kept, scan=replace(kept.scan, started=kept.scan.started + RACY_SECONDS + 1))


def _facts(kept: KeptScan) -> dict:
    """Everything a build takes from a scan, in the order it has it (not the access
    times, which reading a file for the scans sets)."""
    scan = kept.scan
    return {
        "objects": [
            (p, tuple(o.st)[:7], o.st.st_mtime_ns, o.st.st_ctime_ns, o.linkname, o.xattrs, o.content_hash, o.home,
             o.fixed_mtime)
            for p, o in scan.objects.items()
        ],
        "listings": scan.listings, "spans": scan.spans, "excluded": scan.excluded, "skipped": scan.skipped,
        "homes": {h: [o.path for o in objs] for h, objs in kept.ownership.homes.items()},
        "modified": kept.ownership.modified,
        "linked": sorted(scan.linked_paths()),
    }


@pytest.fixture
def watched_root(deb_rootfs: Path, tmp_path: Path):
    """A copy of the minbase root with a watch on it, scanned once."""
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(deb_rootfs), str(root)], check=True)
    watch = TreeWatch(str(root))
    assert watch.take() is None
    kept = _aged(_scan(root, None))
    watch.kept()
    yield root, watch, kept
    watch.close()


def test_after_a_transaction_only_the_directories_above_the_changes_are_gone_through(
    watched_root, tmp_path: Path
) -> None:
    root, watch, kept = watched_root
    assert kept.scan.spans is not None and kept.scan.spans[""] == (0, len(kept.scan.objects))
    deb = deb_package(tmp_path, "tool", "1.0", {
        "usr/bin/tool": b"#!/bin/sh\n", "usr/share/tool/data/a": b"a\n", "usr/share/doc/tool/README": b"r\n",
    })
    for step in (["-i", str(deb)], ["--purge", "tool"]):
        subprocess.run(["dpkg", f"--root={root}", "--force-unsafe-io", *step], check=True, capture_output=True)
        check = watch.take()
        assert check  # the watch saw the transaction
        after = _scan(root, kept, check)
        watch.kept()
        # Gone through: the entries of the directories at or above a changed path, no more.
        above = {""} | {p.rsplit("/", i)[0] for p in check for i in range(1, p.count("/") + 1)} | set(check)
        bound = sum(len(listing.objects) for d, listing in after.scan.listings.items() if d in above)
        gone_through = len(after.scan.objects) - after.scan.taken_whole
        assert gone_through <= bound < len(after.scan.objects) / 3
        assert _facts(after) == _facts(_scan(root, None))
        assert after.scan.changed and (after.scan.removed if step[0] == "--purge" else True)
        kept = _aged(after)


def test_edits_of_every_kind_match_a_walk_of_the_whole_tree(tmp_path: Path) -> None:
    root = dpkg_root(tmp_path / "root")
    one = deb_package(tmp_path, "one", "1.0", {"usr/share/one/a": b"a\n", "usr/share/one/sub/b": b"b\n"})
    dpkg_install(root, one)
    for d in ("srv/x/y", "srv/z", "opt/keep/deep", "opt/links", "mnt/m", "run/quiet"):
        (root / d).mkdir(parents=True)
    (root / "srv/x/y/f").write_bytes(b"f")
    (root / "srv/z/g").write_bytes(b"g")
    (root / "opt/keep/deep/h").write_bytes(b"h")
    (root / "opt/links/one").write_bytes(b"linked")
    os.link(root / "opt/links/one", root / "srv/x/other-name")
    (root / "opt/links/two").write_bytes(b"linked later")
    (root / "opt/links/three").write_bytes(b"linked, then not")
    os.link(root / "opt/links/three", root / "opt/links/three-too")
    (root / "tmp").mkdir()
    (root / "tmp/excluded").write_bytes(b"e")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "run/quiet/daemon.sock"))  # in a directory nothing below changes
    with tmpfs(root / "mnt/m"):
        (root / "mnt/m/inside").write_bytes(b"not in the tree")
        watch = TreeWatch(str(root))
        try:
            assert watch.take() is None
            kept = _aged(_scan(root, None))
            watch.kept()
            (root / "srv/x/y/f").write_bytes(b"F")  # edited
            shutil.rmtree(root / "srv/z")  # a subtree gone
            (root / "srv/new/deeper").mkdir(parents=True)  # a subtree made
            (root / "srv/new/deeper/n").write_bytes(b"n")
            (root / "usr/share/one/sub/b").write_bytes(b"edited")  # a package file edited
            (root / "usr/share/one/link").symlink_to("a")
            (root / "tmp/another").write_bytes(b"excluded too")
            with open(root / "srv/x/other-name", "ab") as f:  # through one name of two
                f.write(b" and more")
            os.chmod(root / "opt/keep", 0o700)  # a directory's attributes
            os.link(root / "opt/links/two", root / "srv/new/two")  # a new name: both have links now
            os.unlink(root / "opt/links/three-too")  # a name gone: the other has none now
            os.setxattr(root / "opt/keep/deep/h", "user.component", b"tagged")
            after = _scan(root, kept, watch.take())
            assert _facts(after) == _facts(_scan(root, None))
        finally:
            watch.close()
            sock.close()
    assert "opt/links/one" in after.scan.changed  # the other name of the file written
    assert ("mnt/m", "mount point: contents on another filesystem not included") in after.scan.skipped
    assert any(p == "run/quiet/daemon.sock" for p, _ in after.scan.skipped)
    assert after.scan.taken_whole > 0 and "run/quiet" not in after.scan.changed
    assert {"srv/z", "srv/z/g"} <= after.scan.removed and "srv/z/g" not in after.scan.digests
    assert "usr/share/one/sub/b" in after.ownership.modified
    assert after.ownership.objects["opt/keep/deep/h"].home.startswith("tagged-")


def test_after_a_transaction_the_rules_judge_again_only_what_changed(watched_root, tmp_path: Path, monkeypatch) -> None:
    from pkglayer import ownership

    root, watch, kept = watched_root
    judged: list[str] = []
    is_modified = ownership._is_modified

    def counting(obj, *args, **kwargs):
        judged.append(obj.path)
        return is_modified(obj, *args, **kwargs)

    # The packages of a database read within the racy window of its files are read again
    # next time (the copy was just made): read it once more after that.
    time.sleep(RACY_SECONDS + 0.1)
    kept = _aged(_scan(root, kept, watch.take()))
    watch.kept()
    monkeypatch.setattr(ownership, "_is_modified", counting)
    deb = deb_package(tmp_path, "tool", "1.0", {"usr/bin/tool": b"#!/bin/sh\n", "usr/share/tool/a": b"a\n"})
    subprocess.run(["dpkg", f"--root={root}", "--force-unsafe-io", "-i", str(deb)], check=True, capture_output=True)
    after = _scan(root, kept, watch.take())
    listed = [p for p, o in after.ownership.objects.items() if o.home not in ("unowned", "pkgdb")]
    assert len(listed) > 1000 and set(judged) <= after.scan.changed, set(judged) - after.scan.changed
    assert {"usr/bin/tool", "usr/share/tool/a"} <= set(judged)
    assert _facts(after) == _facts(_scan(root, None))  # which judges every object again
