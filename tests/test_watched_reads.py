"""The daemon's reads of a package database after a transaction (keptscan.scan_kept
with `check` from the file-change watch): a path the watch saw no change on finds what
the last read noted for it, without a lookup, and the resolutions of that read hold
while nothing it looked up changed into or out of a symlink; whatever changed, the
databases are what a read from scratch makes of the tree.

The roots are real: packages built with dpkg-deb and installed by dpkg, /lib a symlink
to usr/lib as on merged-/usr systems, a real inotify watch."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import pkglayer.rootfs as rootfs_module
from pkglayer import keptscan
from pkglayer.config import BuildSettings
from pkglayer.daemon.changes import TreeWatch
from pkglayer.keptscan import KeptScan, scan_kept
from pkglayer.ownership import Databases
from pkglayer.rootfs import Rootfs
from pkglayer.scan import RACY_SECONDS
from tests.helpers import deb_package, dpkg_install, dpkg_root
from tests.test_owner_map import EXTRA, TOOL, from_scratch, owners

DATES = ("Mon, 01 Jan 2024 00:00:00 +0000",)


def _scan(root: Path, kept: KeptScan | None, check=None) -> KeptScan:
    with Rootfs(str(root)) as rootfs:
        return scan_kept(rootfs, BuildSettings(jobs=1).validated(), kept, check, hash_content=True)


def _same_as_from_scratch(root: Path, db: Databases) -> None:
    scratch = from_scratch(root)
    assert owners(db) == owners(scratch)
    assert db.shared == scratch.shared and db.records == scratch.records
    assert [(p.key, p.changelog, p.files_settled_ns) for p in db.distro] == [
        (p.key, p.changelog, p.files_settled_ns) for p in scratch.distro
    ]


class _Watched:
    """A root with a watch, scanned as the daemon does: each scan with the paths the
    watch names, and kept."""

    def __init__(self, root: Path):
        self.root = root
        self.watch = TreeWatch(str(root))
        assert self.watch.take() is None
        self.kept = _scan(root, None)
        self.watch.kept()

    def rescan(self) -> tuple[KeptScan, set[str]]:
        check = self.watch.take()
        assert check is not None
        self.kept = _scan(self.root, self.kept, check)
        self.watch.kept()
        return self.kept, set(check)


@pytest.fixture
def watched(tmp_path: Path):
    debs = tmp_path / "debs"
    debs.mkdir()
    root = dpkg_root(tmp_path / "root")
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    dpkg_install(root, deb_package(debs, "tool", "1.0", TOOL, changelog=DATES))
    w = _Watched(root)
    yield w, debs
    w.watch.close()


def _lookups(monkeypatch) -> list[str]:
    """The paths Rootfs lstats from now on while it reads the databases."""
    seen: list[str] = []
    reading = []
    real, read = os.lstat, keptscan._read_databases

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def lstat(path, *args, **kwargs):
            if reading:
                seen.append(str(path))
            return real(path, *args, **kwargs)

    def reads(*args, **kwargs):
        reading.append(True)
        try:
            return read(*args, **kwargs)
        finally:
            reading.pop()

    monkeypatch.setattr(rootfs_module, "os", _Os())
    monkeypatch.setattr(keptscan, "_read_databases", reads)
    return seen


def _resolved(monkeypatch) -> list[tuple[str, ...]]:
    """The paths a Rootfs reading the databases (a traced one) resolves component by
    component from now on (not from its memo)."""
    made: list[tuple[str, ...]] = []
    real = Rootfs._resolve_uncached

    def counted(self, comps):
        if self.trace is not None:
            made.append(comps)
        return real(self, comps)

    monkeypatch.setattr(Rootfs, "_resolve_uncached", counted)
    return made


def test_after_transactions_only_what_the_watch_names_is_looked_up(watched, monkeypatch) -> None:
    w, debs = watched
    dpkg_install(w.root, deb_package(debs, "extra", "1.0", EXTRA))
    first, _ = w.rescan()
    _same_as_from_scratch(w.root, first.databases)
    assert first.trace_racy  # dpkg wrote just now: kept all the same, for the watch

    dpkg_install(w.root, deb_package(debs, "other", "1.0", {"usr/share/other/file": b"other\n"}))
    lookups = _lookups(monkeypatch)
    resolved = _resolved(monkeypatch)
    after, check = w.rescan()
    assert after.databases is not first.databases  # read again
    assert lookups, "the paths the watch named are looked at again"
    top = f"{w.root}/"
    looked = {p.removeprefix(top) for p in lookups}
    # Nothing the read before noted is looked up again unless the watch names it.
    assert not {p for p in looked if p in first.trace and p not in check}
    assert looked & check and looked - set(first.trace)  # (both kinds were looked up)
    assert len(lookups) < len(after.trace) / 3
    # The directories the packages it knew list were not resolved again: the read
    # before's resolutions hold (nothing it looked up became or stopped being a link).
    assert not {("lib", "tool"), ("lib", "extra"), ("usr", "bin")} & set(resolved)
    assert ("usr", "share", "other") in resolved  # the new package's
    assert after.trace["lib"] == first.trace["lib"] and "usr/lib" in after.trace  # what they were made from, noted
    monkeypatch.undo()
    _same_as_from_scratch(w.root, after.databases)
    assert after.ownership.objects["usr/share/other/file"].home == "other-1.0-all"


def test_a_directory_symlink_changed_is_resolved_again(watched) -> None:
    w, debs = watched
    dpkg_install(w.root, deb_package(debs, "extra", "1.0", EXTRA))
    w.rescan()
    # /lib becomes a directory of its own: the packages listing /lib/... own lib/... now.
    (w.root / "lib").unlink()
    shutil.copytree(w.root / "usr/lib", w.root / "lib", symlinks=True)
    shutil.rmtree(w.root / "usr/lib/tool")
    shutil.rmtree(w.root / "usr/lib/extra")
    after, check = w.rescan()
    assert "lib" in check
    assert owners(after.databases)["lib/tool/data"] == ("tool-1.0-all", "/lib/tool/data")
    assert "usr/lib/tool/data" not in after.databases.owners
    _same_as_from_scratch(w.root, after.databases)
    assert after.ownership.objects["lib/extra/file"].home == "extra-1.0-all"


def test_a_directory_moved_away_leaves_no_stale_note_below_it(watched) -> None:
    """What a read found below a directory moved away was not named by the watch (its
    entries moved with it, unseen): the read before's notes are not used."""
    w, _ = watched
    doc = w.root / "usr/share/doc/tool"
    assert (doc / "changelog.Debian.gz").is_file()
    time.sleep(RACY_SECONDS + 0.1)
    status = w.root / "var/lib/dpkg/status"
    status.write_bytes(status.read_bytes())  # read again, out of the racy window: dpkg's reader keeps the package
    _, check = w.rescan()
    assert "var/lib/dpkg/status" in check
    before = next(p for p in w.kept.databases.distro if p.name == "tool")
    assert before.changelog  # read from the changelog
    doc.rename(w.root / "usr/share/tool-doc")
    after, check = w.rescan()
    assert "usr/share/doc/tool/changelog.Debian.gz" not in check
    tool = next(p for p in after.databases.distro if p.name == "tool")
    assert tool.changelog == ()
    _same_as_from_scratch(w.root, after.databases)


def test_a_symlink_below_a_directory_that_appeared_is_followed(watched) -> None:
    """A link's target whose first directory was not there was taken as written,
    without looking below it: that directory made since, with a symlink in it, the
    listed paths resolve through the link."""
    w, debs = watched
    dpkg_install(w.root, deb_package(debs, "opt", "1.0", {"opt/app/file": b"app\n"}))
    shutil.rmtree(w.root / "opt")
    (w.root / "opt").symlink_to("data/opt")  # dangling: no /data
    w.watch.close()
    w = _Watched(w.root)
    assert w.kept.trace["data"] is None and "data/opt" not in w.kept.trace
    assert owners(w.kept.databases)["data/opt/app/file"][0] == "opt-1.0-all"
    (w.root / "srv/opt/app").mkdir(parents=True)
    (w.root / "srv/opt/app/file").write_bytes(b"app\n")
    (w.root / "data").mkdir()
    (w.root / "data/opt").symlink_to("../srv/opt")
    try:
        after, check = w.rescan()
    finally:
        w.watch.close()
    assert "data/opt" in check
    assert owners(after.databases)["srv/opt/app/file"] == ("opt-1.0-all", "/opt/app/file")
    _same_as_from_scratch(w.root, after.databases)
    assert after.ownership.objects["srv/opt/app/file"].home == "opt-1.0-all"
