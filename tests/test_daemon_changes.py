"""The daemon's incremental scans: a recursive watch names what changed (daemon/changes.py),
and a build re-reads only that, without ever missing a change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pkglayer.daemon.changes import TreeWatch
from tests import rootfs_factory as factory
from tests.daemon_harness import copy_root, root_entry, start, written_layers
from tests.helpers import dpkg_install, layout_manifest, read_layer


@pytest.fixture
def watch(tmp_path: Path):
    (tmp_path / "root/a/b").mkdir(parents=True)
    (tmp_path / "root/a/b/f").write_bytes(b"f")
    w = TreeWatch(str(tmp_path / "root"))
    assert w.take() is None  # nothing is known before the first build
    w.kept()
    yield w
    w.close()


def test_the_watch_names_changed_paths_and_the_directories_listed_again(tmp_path: Path, watch: TreeWatch) -> None:
    root = tmp_path / "root"
    assert watch.take() == set()
    watch.kept()
    (root / "a/b/f").write_bytes(b"g")
    os.chmod(root / "a", 0o700)
    (root / "a/new").mkdir()
    (root / "a/new/deep").mkdir()
    (root / "a/new/deep/x").write_bytes(b"x")  # perhaps before its directory was watched
    (root / "a/b/f").rename(root / "a/moved")
    assert watch.take() == {"a", "a/b", "a/b/f", "a/moved", "a/new", "a/new/deep", "a/new/deep/x"}
    watch.kept()
    (root / "a/new/deep/x").write_bytes(b"y")  # the new directories are watched too
    assert watch.take() == {"a/new/deep/x"}


def test_changes_taken_by_a_build_that_failed_are_given_again(tmp_path: Path, watch: TreeWatch) -> None:
    (tmp_path / "root/a/b/f").write_bytes(b"1")
    assert watch.take() == {"a/b/f"}  # no kept(): that build failed
    (tmp_path / "root/a/g").write_bytes(b"2")
    assert watch.take() == {"a/b/f", "a/g", "a"}
    watch.kept()
    assert watch.take() == set()


def test_a_directory_renamed_within_the_root_is_followed_under_its_new_name(tmp_path: Path, watch: TreeWatch) -> None:
    root = tmp_path / "root"
    (root / "a/b/sub").mkdir()
    assert watch.take() == {"a/b", "a/b/sub"}
    watch.kept()
    # What dpkg does with every directory it makes: NAME.dpkg-new, then renamed.
    (root / "a/b").rename(root / "a/c")
    assert watch.take() == {"a", "a/b", "a/c", "a/c/f", "a/c/sub"}  # not everything
    watch.kept()
    (root / "a/c/f").write_bytes(b"z")
    (root / "a/c/sub/g").write_bytes(b"g")
    assert watch.take() == {"a/c/f", "a/c/sub", "a/c/sub/g"}  # the watches below carry the new names


def test_a_directory_moved_out_of_sight_or_an_overflow_means_checking_everything(
    tmp_path: Path, watch: TreeWatch
) -> None:
    (tmp_path / "root/a/b").rename(tmp_path / "elsewhere")  # its watch would keep the old name
    assert watch.take() is None
    watch.kept()
    (tmp_path / "root/a/new").mkdir()
    (tmp_path / "root/a/new/f").write_bytes(b"z")
    assert watch.take() == {"a", "a/new", "a/new/f"}  # watched again
    watch.kept()
    watch._event(-1, 0x4000, "")  # IN_Q_OVERFLOW, as the kernel reports it
    assert watch.take() is None


def test_edits_without_a_package_transaction_are_in_the_next_build(tmp_path: Path, daemons) -> None:
    """An unowned file and a package's file, both edited in place with the same size and
    mtime, and a build asked for at once: the daemon's incremental scan sees both."""
    root = copy_root(factory.deb_base(), tmp_path / "roots" / "deb")
    (root / "srv/notes").write_bytes(b"first\n")
    out = tmp_path / "out"
    d = start(daemons, tmp_path / "d", [root_entry("deb", root, output=f"oci:{out}:latest")])
    d.wait_settled("deb", rescans=0)
    status, body = d.api("POST", "/v1/roots/deb/build", {"wait": True})
    assert status == 200 and body["build"]["state"] == "succeeded", body

    edits = {"srv/notes": b"FIRST\n", "usr/share/base-passwd/group.master": None}
    for rel, data in edits.items():
        path = root / rel
        st = path.stat()
        if data is None:
            data = bytearray(path.read_bytes())
            data[0] ^= 0x20
            edits[rel] = data = bytes(data)
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    status, body = d.api("POST", "/v1/roots/deb/build", {"wait": True})
    assert status == 200 and body["build"]["state"] == "succeeded", body
    result = body["build"]["result"]
    # The package file stays in its package's layer, written anew: in this copied root
    # its mtime alone vouches for it (test_dpkg_trust); the bytes are the edit's.
    written = set(written_layers(result))
    assert "unowned" in written and any(name.startswith("base-passwd-") for name in written), written
    _, manifest, _ = layout_manifest(out, "latest")
    found = {}
    for layer in manifest["layers"]:
        with read_layer(out, layer["digest"]) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("./")
                if name in edits and member.isfile():
                    found[name] = tar.extractfile(member).read()
    assert found == edits
    assert d.stop() == 0


def test_a_package_manager_letting_go_of_its_lock_settles_the_root_at_once(tmp_path: Path, daemons) -> None:
    """dpkg closes its lock files as it exits: the root is rescanned and prebuilt then,
    not a debounce (here a minute) after the transaction's last write."""
    root = copy_root(factory.deb_base(), tmp_path / "roots" / "deb")
    deb = next((factory.deb_rootfs() / "var/cache/apt/archives").glob("libcap2-bin_*.deb"))
    d = start(daemons, tmp_path / "d", [root_entry("deb", root, debounce=60.0)])
    before = d.wait_settled("deb", rescans=0)
    dpkg_install(root, deb)
    after = d.wait_settled("deb", rescans=1, timeout=30)
    assert after["packages"] == before["packages"] + 1
    assert any(k.startswith("libcap2-bin-") for k in after["changes"]["added"])
    assert d.stop() == 0
