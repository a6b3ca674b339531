"""The daemon as a process on real roots, changed with real package tools.

Every test starts `python -m pkglayer daemon` on private copies of the cached trees and
watches what it does through its control API; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkglayer.daemon.watch import watch_targets
from tests import rootfs_factory as factory
from tests.daemon_harness import cache_blobs, copy_root, root_entry, start, temp_files, wait_until, written_layers
from tests.helpers import TOP_LAYERS, dpkg_install, layout_manifest, pkglayer, sha256_file, stop_mid_write


@pytest.fixture(scope="module")
def deb_base(deb_rootfs: Path) -> Path:
    """debootstrap minbase without iputils-ping and libcap2-bin (deb_rootfs has them)."""
    return factory.deb_base()


@pytest.fixture(scope="module")
def extra_debs(deb_rootfs: Path) -> list[Path]:
    """Real .debs not installed in deb_base, in dependency order: libcap2-bin, iputils-ping."""
    archives = deb_rootfs / "var/cache/apt/archives"
    return [next(archives.glob("libcap2-bin_*.deb")), next(archives.glob("iputils-ping_*.deb"))]


# ------------------------------------------------------------------ watching


def test_install_prebuilds_the_new_layer_and_a_build_writes_only_top_layers(
    tmp_path: Path, deb_base: Path, extra_debs: list[Path], daemons
) -> None:
    root = copy_root(deb_base, tmp_path / "roots" / "deb")
    out = tmp_path / "out"
    d = start(daemons, tmp_path / "d", [root_entry("deb", root, output=f"oci:{out}:latest")])
    first = d.wait_settled("deb", rescans=0)
    assert first["packages"] == 88
    assert first["lastPrebuild"]["written"] == len(first["lastPrebuild"]["layers"])
    before = set(cache_blobs(d))

    dpkg_install(root, *extra_debs)
    # dpkg's last writes after it lets go of its lock may make a second rescan, which
    # finds nothing new: the state after the last one is what counts.
    after = d.wait_root("deb", lambda r: r["rescans"] >= 1 and r["state"] == "ready" and not r["pending"]
                        and r["packages"] == 90, 120, "root deb to settle with the two new packages")
    new_packages = ("iputils-ping-", "libcap2-bin-")
    assert len(cache_blobs(d)) > len(before)

    # A file no package owns changes without any package transaction (not watched).
    (root / "etc/motd").write_text("built by the daemon test\n")
    status, body = d.api("POST", "/v1/roots/deb/build", {"wait": True})
    assert status == 200, body
    build = body["build"]
    assert build["state"] == "succeeded", build
    result = build["result"]
    # Nobody asked before: the layers holding the new packages came from the cache, and
    # no prebuild rewrote anything else (the daemon keeps its plan stable).
    holding = [layer for layer in result["layers"] if any(k.startswith(new_packages) for k in layer["packages"])]
    added = {k for layer in holding for k in layer["packages"] if k.startswith(new_packages)}
    assert len(added) == 2 and all(layer["cached"] for layer in holding), holding
    written = written_layers(after["lastPrebuild"])
    assert all(name in TOP_LAYERS or set(keys) & added for name, keys in written.items()), written
    assert set(written_layers(result)) <= TOP_LAYERS
    assert "unowned" in written_layers(result)  # /etc/motd is unowned in minbase... or modified
    assert result["fromCache"] == len(result["layers"]) - result["written"]
    assert result["manifestDigest"] and (out / "index.json").exists()
    # The image is complete: every layer blob is in the layout.
    for layer in result["layers"]:
        assert (out / "blobs/sha256" / layer["digest"][7:]).is_file()
    assert d.root("deb")["lastBuild"]["manifestDigest"] == result["manifestDigest"]
    assert d.stop() == 0


def test_the_layer_plan_survives_a_restart(
    tmp_path: Path, deb_base: Path, extra_debs: list[Path], daemons
) -> None:
    """A root without outputs has no history of its own: the daemon's saved plan is what
    keeps the first prebuild after a restart from planning afresh."""
    root = copy_root(deb_base, tmp_path / "roots" / "deb")
    d = start(daemons, tmp_path / "d", [root_entry("deb", root)])
    d.wait_settled("deb", rescans=0)
    assert d.stop() == 0
    dpkg_install(root, *extra_debs)  # while the daemon is down
    d.start()
    after = d.wait_settled("deb", rescans=0)
    assert after["lastPrebuild"]["planDecision"].startswith("kept the prior plan: 1 added"), after["lastPrebuild"]
    written = written_layers(after["lastPrebuild"])
    new_keys = {k for keys in written.values() for k in keys if k.startswith(("iputils-ping-", "libcap2-bin-"))}
    assert len(new_keys) == 2
    assert all(name in TOP_LAYERS or set(keys) & new_keys for name, keys in written.items()), written
    assert d.stop() == 0


def test_two_roots_with_the_same_packages_build_each_layer_once(
    tmp_path: Path, deb_base: Path, extra_debs: list[Path], daemons
) -> None:
    a = copy_root(deb_base, tmp_path / "roots" / "a")
    b = copy_root(deb_base, tmp_path / "roots" / "b")
    dpkg_install(b, *extra_debs)  # b = a + two packages
    # A budget with room for every component: both plans are then one layer per
    # component, and the roots differ only in the layers holding b's extra packages.
    d = start(daemons, tmp_path / "d", [root_entry("a", a, **{"max-layers": 127}),
                                        root_entry("b", b, **{"max-layers": 127})])
    ra = d.wait_settled("a", rescans=0)
    rb = d.wait_settled("b", rescans=0)
    pa, pb = ra["lastPrebuild"], rb["lastPrebuild"]
    # Whichever root came first wrote the shared layers; the other took them from the cache.
    first, second = (pa, pb) if pa["finished"] < pb["finished"] else (pb, pa)
    assert first["written"] == len(first["layers"])
    shared = set(written_layers(first)) & set(written_layers(second))
    assert not (shared - TOP_LAYERS), f"layers written twice: {shared}"
    assert second["fromCache"] >= len(second["layers"]) - 4  # all but libcap2, iputils and the top layers
    # Count: every layer content was written exactly once overall.
    status, cache = d.api("GET", "/v1/cache")
    assert status == 200
    assert cache["added"] == pa["written"] + pb["written"] == cache["entries"]
    assert cache["entries"] == len(cache_blobs(d))

    # The same holds for a root installed the same way later, through apt in a chroot.
    c = copy_root(deb_base, tmp_path / "roots" / "c")
    for deb in extra_debs:
        shutil.copy(deb, c / "tmp" / deb.name)
    factory.run(
        ["chroot", str(c), "apt-get", "install", "-y", "--no-install-recommends",
         *[f"/tmp/{deb.name}" for deb in extra_debs]],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
    )
    d.roots.append(root_entry("c", c, **{"max-layers": 127}))
    d.write_config()
    d.signal(signal.SIGHUP)
    rc = d.wait_settled("c", rescans=0)
    package_layers = set(written_layers(rc["lastPrebuild"])) - TOP_LAYERS
    assert not package_layers, f"package layers written again for root c: {package_layers}"
    assert d.stop() == 0


def _close_the_burst(root: Path) -> tuple[set[str], set[str]]:
    """Create and delete a marker file in every directory the daemon watches for ROOT
    (the same watch_targets it uses). Returns the events the daemon logs for the
    deletions, and every event the markers cause (watchdog follows each with a
    "modified" event of the directory).

    Each directory's events reach the daemon in the order they happened, so once it has
    logged every deletion it has seen every earlier event too."""
    targets, _ = watch_targets(str(root), None)
    deletions, closing = set(), set()
    for directory, only in targets.items():
        if only is not None:  # the root's parent, filtered on the root's own name
            continue
        marker = os.path.join(directory, ".pkglayer-test-marker")
        with open(marker, "w"):
            pass
        os.unlink(marker)
        deletions.add(f"deleted {marker}")
        closing |= {f"deleted {marker}", f"modified {directory}"}
    assert len(deletions) >= 3, targets  # var/lib/dpkg, its info/ and updates/ at least
    return deletions, closing


@contextlib.contextmanager
def _frontend_lock(root: Path) -> Iterator[None]:
    """Hold dpkg's frontend lock, as apt does for a whole transaction."""
    fd = os.open(root / "var/lib/dpkg/lock-frontend", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _dpkg_under_frontend(root: Path, *debs: Path) -> None:
    factory.run(["dpkg", f"--root={root}", "--force-unsafe-io", "-i", *debs],
                env={**os.environ, "DPKG_FRONTEND_LOCKED": "1"})


def test_a_burst_of_database_writes_is_rescanned_once(
    tmp_path: Path, deb_base: Path, deb_rootfs: Path, extra_debs: list[Path], daemons
) -> None:
    root = copy_root(deb_base, tmp_path / "roots" / "deb")
    d = start(daemons, tmp_path / "d", [root_entry("deb", root, debounce=1.5)])
    d.wait_settled("deb", rescans=0)
    events_before = d.root("deb")["events"]
    archives = deb_rootfs / "var/cache/apt/archives"
    # One dpkg transaction: two new packages and ten reinstalled ones, run the way apt
    # runs dpkg, under the frontend lock, which is let go only once the daemon has seen
    # the markers (the daemon settles a root as soon as the lock is let go).
    again = sorted(archives.glob("lib[a-m]*.deb"))[:10]
    with _frontend_lock(root):
        _dpkg_under_frontend(root, *again, *extra_debs)
        deletions, closing = _close_the_burst(root)
        wait_until(lambda: all(f"root deb: {m}" in d.log() for m in deletions), 60, "the daemon to see the markers")
    closing.add(f"closed {root}/var/lib/dpkg/lock-frontend")
    # Every event of the burst has been seen; settled after that means the debounce timer
    # expired, the rescan and its prebuild finished and nothing is armed: no second
    # rescan can follow.
    final = d.wait_settled("deb", rescans=1)
    assert final["rescans"] == 1, final
    assert final["lastEvent"] in closing, final["lastEvent"]  # no event came after the markers
    assert final["events"] - events_before > 50, final["events"]
    assert final["prebuilds"] == 2  # the initial one and one for the burst
    assert final["packages"] == 90

    # A second burst later is a second rescan.
    with _frontend_lock(root):
        _dpkg_under_frontend(root, *again[:3])
        deletions, closing = _close_the_burst(root)
        wait_until(lambda: all(d.log().count(f"root deb: {m}") == 2 for m in deletions), 60, "the second markers")
    closing.add(f"closed {root}/var/lib/dpkg/lock-frontend")
    final = d.wait_settled("deb", rescans=2)
    assert final["rescans"] == 2 and final["lastEvent"] in closing, final
    assert d.stop() == 0


def test_rpm_root_upgrade_prebuilds_the_new_package_layer(
    tmp_path: Path, rpm_rootfs: Path, daemons
) -> None:
    root = copy_root(rpm_rootfs, tmp_path / "roots" / "rpm")
    d = start(daemons, tmp_path / "d", [root_entry("rpm", root)])
    first = d.wait_settled("rpm", rescans=0)
    assert first["format"] == "rpm"
    assert first["databasePaths"] == ["usr/lib/sysimage/rpm"]
    new = factory.synthetic_rpms() / "pkglayer-demo-1.0-2.noarch.rpm"
    factory.run(["rpm", "--root", str(root), "--dbpath", factory.RPM_DBPATH, "-U", "--nodeps", "--noscripts",
                 "--ignorearch", "--force-debian", str(new)])
    after = d.wait_settled("rpm", rescans=1)
    assert after["changes"]["changed"] == ["pkglayer-demo-1.0-2-noarch"]
    written = written_layers(after["lastPrebuild"])
    demo = [name for name, keys in written.items() if "pkglayer-demo-1.0-2-noarch" in keys]
    assert len(demo) == 1
    assert set(written) - set(demo) <= TOP_LAYERS
    assert d.stop() == 0


def _plan_label(layout: Path) -> dict:
    """The plan label (org.pkglayer.history) of the image tagged latest in a layout."""
    _, _, config = layout_manifest(layout, "latest")
    return json.loads(config["config"]["Labels"]["org.pkglayer.history"])


def test_daemon_builds_keep_the_planners_observations_like_the_cli(
    tmp_path: Path, rpm_rootfs: Path, daemons
) -> None:
    """Two daemon builds with an upgrade between them record the change in the plan's
    `components`, and the daemon's image carries the plan label a command-line build of
    the same sequence writes."""
    new = factory.synthetic_rpms() / "pkglayer-demo-1.0-2.noarch.rpm"

    def upgrade(root: Path) -> None:
        factory.run(["rpm", "--root", str(root), "--dbpath", factory.RPM_DBPATH, "-U", "--nodeps", "--noscripts",
                     "--ignorearch", "--force-debian", str(new)])

    root = copy_root(rpm_rootfs, tmp_path / "roots" / "rpm")
    out = tmp_path / "out"
    d = start(daemons, tmp_path / "d", [root_entry("rpm", root, output=f"oci:{out}:latest")])
    d.wait_settled("rpm", rescans=0)
    snapshots = []  # the trees the daemon built, for the command line to build the same
    for step in (1, 2):
        if step == 2:
            upgrade(root)
            d.wait_settled("rpm", rescans=1)
        status, body = d.api("POST", "/v1/roots/rpm/build", {"wait": True})
        assert status == 200 and body["build"]["state"] == "succeeded", body
        snapshots.append(copy_root(root, tmp_path / "snapshots" / str(step)))
    record = json.loads((d.state_dir / "roots" / "rpm.json").read_text())
    demo = record["plan"]["components"]["pkglayer-demo"]
    assert (demo["builds"], demo["changes"]) == (1, 1), demo
    unchanged = [c for name, c in record["plan"]["components"].items() if name != "pkglayer-demo"]
    assert unchanged and all((c["builds"], c["changes"]) == (1, 0) for c in unchanged)
    assert d.stop() == 0

    cli_out = tmp_path / "cli-out"
    for snapshot in snapshots:
        pkglayer("build", snapshot, "--compression", "zstd", "--output", f"oci:{cli_out}:latest", "--quiet")
    daemon_label = _plan_label(out)
    assert daemon_label["components"]["pkglayer-demo"] == demo
    assert daemon_label == _plan_label(cli_out)


# ------------------------------------------------------------ crash safety


def test_kill_9_during_a_layer_write_leaves_no_partial_blob_and_the_cache_is_reused(
    tmp_path: Path, deb_base: Path, daemons
) -> None:
    root = copy_root(deb_base, tmp_path / "roots" / "deb")
    # gzip -9 makes layer writes slow enough to be caught in the middle.
    entry = root_entry("deb", root, compression="gzip", level=9)
    d = start(daemons, tmp_path / "d", [entry], daemon={"jobs": 1})
    assert d.proc is not None
    writing = stop_mid_write(d.proc, d.cache_dir / ".pkglayer-tmp", lambda: len(cache_blobs(d)) >= 5, 120)
    d.kill()
    assert set(writing) <= set(temp_files(d)), "the interrupted write's temp file is left behind"
    blobs = cache_blobs(d)
    # No blob is visible under its final name unless complete.
    for digest, path in blobs.items():
        assert sha256_file(path) == digest
    committed = len(blobs)

    d.start()
    status, cache = d.api("GET", "/v1/cache")
    assert cache["startupCheck"]["temps"] >= 1
    assert not [n for n in temp_files(d) if n.startswith("blob-")]
    after = d.wait_settled("deb", rescans=0, timeout=240)
    prebuild = after["lastPrebuild"]
    # Layers committed before the kill were reused, not written again.
    assert prebuild["fromCache"] >= committed - 1  # one may be committed but not yet indexed (orphan)
    assert prebuild["written"] == len(prebuild["layers"]) - prebuild["fromCache"]
    for digest, path in cache_blobs(d).items():
        assert sha256_file(path) == digest
    assert d.stop() == 0


def test_sigterm_during_a_prebuild_exits_0_and_leaves_no_temp_files(
    tmp_path: Path, deb_base: Path, daemons
) -> None:
    root = copy_root(deb_base, tmp_path / "roots" / "deb")
    d = start(daemons, tmp_path / "d", [root_entry("deb", root, compression="gzip", level=9)])
    wait_until(lambda: any(n.startswith("blob-") for n in temp_files(d)), 120, "a layer write", interval=0.01)
    assert d.stop(timeout=120) == 0
    assert not [n for n in temp_files(d) if n.startswith("blob-")]
    assert not os.path.exists(d.socket)
    assert "abandoned: the daemon is stopping" in d.log()
    for digest, path in cache_blobs(d).items():
        assert sha256_file(path) == digest


# ------------------------------------------------------------- bad input


def test_bad_requests_unknown_roots_and_a_deleted_root_leave_the_daemon_serving(
    tmp_path: Path, deb_base: Path, daemons
) -> None:
    good = copy_root(deb_base, tmp_path / "roots" / "good")
    doomed = copy_root(deb_base, tmp_path / "roots" / "doomed")
    out = tmp_path / "out"
    d = start(daemons, tmp_path / "d", [
        root_entry("good", good, output=f"oci:{out}:latest"),
        root_entry("doomed", doomed, output=f"oci:{tmp_path / 'out2'}:latest"),
        root_entry("nowhere", tmp_path / "roots" / "not-there"),
    ])
    d.wait_settled("good", rescans=0)

    status, body = d.api("POST", "/v1/roots/good/build", raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = d.api("POST", "/v1/roots/good/build", {"wait": "soon"})
    assert status == 400 and "'wait'" in body["error"]["message"]
    status, body = d.api("POST", "/v1/roots/good/build", {"colour": 1})
    assert status == 400 and "colour" in body["error"]["message"]
    status, body = d.api("POST", "/v1/roots/nope/build", {})
    assert status == 404 and "unknown root 'nope'" in body["error"]["message"]
    status, body = d.api("GET", "/v1/roots/nope")
    assert status == 404
    status, body = d.api("GET", "/v1/nothing")
    assert status == 404 and body["error"]["message"].startswith("no such endpoint")
    status, body = d.api("DELETE", "/v1/roots/good")
    assert status == 405 and "error" in body
    status, body = d.api("GET", "/v1/builds/b999")
    assert status == 404
    # Not HTTP at all.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(d.socket)
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(100).split(b" ")[1] == b"400"

    # A root that does not exist is reported, and cannot be built.
    nowhere = d.root("nowhere")
    assert nowhere["state"] == "missing" and "does not exist" in nowhere["error"]
    status, body = d.api("POST", "/v1/roots/nowhere/build", {})
    assert status == 409

    # Deleted while watched.
    d.wait_settled("doomed", rescans=0)
    shutil.rmtree(doomed)
    gone = d.wait_root("doomed", lambda r: r["state"] == "missing", 60)
    assert "does not exist" in gone["error"]
    status, body = d.api("POST", "/v1/roots/doomed/build", {"wait": True})
    assert status == 409 and "does not exist" in body["error"]["message"]
    assert "root doomed: root directory" in d.log()

    # A corrupt package database on the good root: a clear error, the others are fine.
    status_file = good / "var/lib/dpkg/status"
    saved = status_file.read_bytes()
    status_file.write_bytes(b"Package: broken\nStatus: install ok installed\n\x00\x00garbage: [\n")
    d.wait_root("good", lambda r: r["rescans"] >= 1 and r["error"] is not None and not r["pending"], 60)
    status, health = d.api("GET", "/v1/health")
    assert health["status"] == "ok" and "good" in health["rootsWithErrors"]
    status_file.write_bytes(saved)
    d.wait_root("good", lambda r: r["rescans"] >= 2 and r["error"] is None and r["state"] == "ready", 120)

    # ... and still builds.
    status, body = d.api("POST", "/v1/roots/good/build", {"wait": True})
    assert status == 200 and body["build"]["state"] == "succeeded", body

    # A root that appears later is picked up (its parent directory is watched).
    copy_root(deb_base, tmp_path / "roots" / "not-there")
    appeared = d.wait_root("nowhere", lambda r: r["state"] == "ready" and r["packages"] == 88, 120)
    assert appeared["error"] is None
    assert d.stop() == 0


def test_a_root_replaced_by_rename_is_watched_again(
    tmp_path: Path, deb_base: Path, extra_debs: list[Path], daemons
) -> None:
    root = copy_root(deb_base, tmp_path / "roots" / "deb")
    d = start(daemons, tmp_path / "d", [root_entry("deb", root)])
    d.wait_settled("deb", rescans=0)
    staged = copy_root(deb_base, tmp_path / "roots" / ".deb-new")
    dpkg_install(staged, extra_debs[0])
    os.rename(root, tmp_path / "roots" / "deb-old")
    os.rename(staged, root)
    replaced = d.wait_settled("deb", rescans=1)
    assert replaced["packages"] == 89
    # The new tree's database is watched, not the old one's.
    dpkg_install(root, extra_debs[1])
    again = d.wait_settled("deb", rescans=2)
    assert again["packages"] == 90
    assert d.stop() == 0
