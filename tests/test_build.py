"""End-to-end properties of `pkglayer build` on real rootfs trees."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pkglayer import build as build_mod
from pkglayer.blobstore import BlobDir
from pkglayer.config import BuildSettings
from pkglayer.errors import PkglayerError, RootfsError, TreeChangedError
from pkglayer.ownership import scan_ownership
from pkglayer.rootfs import Rootfs
from pkglayer.sources import open_source
from pkglayer.tarwriter import layer_members, write_layer
from tests.helpers import (
    TOP_LAYERS,
    blob_files,
    build_into_layers,
    build_json,
    layout_manifest,
    pkglayer,
    pkglayer_json,
    promote_outputs,
    read_layer,
    sha256_file,
    stop_mid_write,
    tmpfs,
)
from tests.rootfs_factory import copy_tree


def layer_digests(result: dict) -> dict[str, str]:
    return {layer["name"]: layer["digest"] for layer in result["layers"]}


def layer_holding(result: dict, package: str) -> str:
    """Name of the layer that holds the package named `package` (any version)."""
    return next(
        layer["name"] for layer in result["layers"] if any(k.startswith(package + "-") for k in layer["packages"])
    )


# -- determinism -----------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_two_builds_give_the_same_manifest(deb_rootfs: Path, tmp_path: Path, compression: str) -> None:
    a = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/a:t", "--compression", compression)
    b = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/b:t", "--compression", compression, "-j", "1")
    assert a["manifestDigest"] == b["manifestDigest"]
    assert blob_files(tmp_path / "a") == blob_files(tmp_path / "b")
    assert 60 <= len(a["layers"]) <= 64  # minbase has ~90 packages, ~70 sources: the budget binds


def test_same_package_in_two_trees_gives_the_same_layer(
    deb_rootfs: Path, deb_upgrade_pair, tmp_path: Path
) -> None:
    # deb_rootfs and the pair's old tree come from two separate debootstrap runs.
    per_component = ("--max-layers", "120")
    a = layer_digests(build_json(deb_rootfs, "--output", f"oci:{tmp_path}/a:t", *per_component))
    b = layer_digests(build_json(deb_upgrade_pair.old, "--output", f"oci:{tmp_path}/b:t", *per_component))
    common = (set(a) & set(b)) - TOP_LAYERS
    assert len(common) > 60
    differing = sorted(n for n in common if a[n] != b[n])
    assert differing == []


def test_layers_are_deterministic_tars(deb_rootfs: Path, tmp_path: Path) -> None:
    result = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/img:t")
    dirs: dict[str, tuple] = {}
    for layer in result["layers"]:
        with read_layer(tmp_path / "img", layer["digest"]) as tf:
            names = [m.name for m in tf.getmembers()]
            assert names == sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape"))
            for m in tf.getmembers():
                assert m.uname == "" and m.gname == ""
                assert "security.selinux" not in " ".join(m.pax_headers)
                parent = m.name.rpartition("/")[0]
                assert not parent or parent in names, f"{m.name} without parent in {layer['name']}"
                if m.isdir():
                    attrs = (m.mode, m.uid, m.gid, m.mtime, tuple(sorted(m.pax_headers.items())))
                    # a directory repeated in several layers must look the same in each
                    assert dirs.setdefault(m.name, attrs) == attrs, m.name
                    assert m.mtime == 0


def test_capability_xattr_kept(deb_rootfs: Path, tmp_path: Path) -> None:
    result = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/img:t")
    ping = next(layer for layer in result["layers"] if layer["name"].startswith("iputils-ping-"))
    with read_layer(tmp_path / "img", ping["digest"]) as tf:
        m = tf.getmember("usr/bin/ping")
    want = os.getxattr(deb_rootfs / "usr/bin/ping", "security.capability")
    assert m.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape") == want


# -- reuse across builds (/layers protocol) ---------------------------------------------


def _rebuild_counting_tars(monkeypatch, rootfs: Path, layers: Path) -> tuple[build_mod.BuildResult, list[str]]:
    # Noted in a file: layers may be written by forked processes.
    notes = layers.parent / "tarred"
    notes.write_text("")
    real = build_mod.write_layer

    def counting(rootfs_, members, *a, **kw):
        with open(notes, "a") as f:
            f.write((members[-1].name if members else "") + "\n")
        return real(rootfs_, members, *a, **kw)

    monkeypatch.setattr(build_mod, "write_layer", counting)
    result = build_into_layers(rootfs, BuildSettings(), layers)
    return result, notes.read_text().splitlines()


@pytest.mark.parametrize("pair_name", ["deb_upgrade_pair", "rpm_upgrade_pair"])
def test_upgrade_rewrites_only_the_upgraded_package(
    request, monkeypatch, tmp_path: Path, pair_name: str
) -> None:
    pair = request.getfixturevalue(pair_name)
    layers = tmp_path / "layers"
    first = build_json(pair.old, "--layers", str(layers))
    assert first["reused"] == 0
    promote_outputs(layers)

    result, tarred = _rebuild_counting_tars(monkeypatch, pair.new, layers)
    written = {o.record.name for o in result.layers if not o.reused}
    reused = {o.record.name for o in result.layers if o.reused}
    upgraded_names = set(pair.upgraded)
    new_keys = {
        o.record.name
        for o in result.layers
        if any(k.startswith(n + "-") for n in upgraded_names for k in o.record.packages)
    }
    assert upgraded_names and new_keys
    # only the upgraded packages and top layers were tarred again, and exactly once each
    assert written - TOP_LAYERS == new_keys, (written, upgraded_names)
    assert len(tarred) == len(written)
    assert "pkgdb" in written  # the database did change
    assert len(reused) == len(result.layers) - len(written) > 50
    # new blobs only for what was written; the history lists the whole image in order
    assert blob_files(layers / "output") == {o.record.digest[7:] for o in result.layers if not o.reused}
    history = json.loads((layers / "history.json").read_text())
    assert [entry["name"] for entry in history["layers"]] == [o.record.name for o in result.layers]
    assert history["schemaVersion"] == 1


def test_rebuild_of_unchanged_tree_writes_nothing(deb_rootfs: Path, tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    first = build_json(deb_rootfs, "--layers", str(layers), "--output", f"oci:{tmp_path}/a:t")
    promote_outputs(layers)
    second = build_json(deb_rootfs, "--layers", str(layers), "--output", f"oci:{tmp_path}/b:t")
    assert second["written"] == 0 and second["reused"] == len(first["layers"])
    assert blob_files(layers / "output") == set()
    assert second["manifestDigest"] == first["manifestDigest"]


def test_rebuild_into_the_same_oci_layout_reuses_its_blobs(deb_rootfs: Path, tmp_path: Path) -> None:
    first = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/img:t")
    blob = tmp_path / "img/blobs/sha256" / first["layers"][0]["digest"][7:]
    inode = blob.stat().st_ino
    second = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/img:t")
    assert second["written"] == 0 and second["manifestDigest"] == first["manifestDigest"]
    assert blob.stat().st_ino == inode  # not rewritten


def test_json_and_progress_say_where_the_time_went(deb_rootfs: Path, tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    first = build_json(deb_rootfs, "--layers", str(layers), "--no-hash-cache")
    steps, cpu = first["timings"]["steps"], first["timings"]["cpu"]
    assert list(steps) == ["database", "scan", "hash", "ownership", "plan", "keys", "reuse", "write"]
    assert list(cpu) == ["hash", "compress", "read", "write"]
    assert all(v > 0 for v in (steps["database"], steps["scan"], steps["write"], *cpu.values())), first["timings"]
    assert sum(steps.values()) <= first["seconds"] + 0.01
    promote_outputs(layers)
    again = pkglayer("build", deb_rootfs, "--layers", layers)  # not quiet: the summary says it too
    line = next(x for x in again.stdout.splitlines() if x.startswith("time (s): "))
    assert "scan " in line and "compress" not in line  # nothing was compressed
    rebuilt = build_json(deb_rootfs, "--layers", str(layers))
    assert rebuilt["written"] == 0 and rebuilt["timings"]["cpu"]["compress"] == 0


def test_in_place_edit_with_same_size_and_mtime_changes_the_key(deb_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    layers = tmp_path / "layers"
    build_json(root, "--layers", str(layers))
    promote_outputs(layers)
    target = root / "usr/share/base-passwd/group.master"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[0] ^= 0x20  # same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    second = build_json(root, "--layers", str(layers))
    # In this copied tree dpkg's list vouches for the file by its mtime (test_dpkg_trust),
    # so it stays in its package's layer: that layer is written anew, with the edit.
    [layer] = [x for x in second["layers"] if x["name"].startswith("base-passwd-")]
    assert not layer["reused"]
    with read_layer(layers / "output", layer["digest"]) as tf:
        assert tf.extractfile(str(target.relative_to(root))).read() == bytes(data)


# -- modified files ---------------------------------------------------------------------


def test_edited_conffile_goes_to_the_modified_layer(deb_rootfs: Path, tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    pristine = layer_digests(build_json(deb_rootfs, "--layers", str(layers)))
    promote_outputs(layers)
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    with open(root / "etc/login.defs", "a") as f:
        f.write("# local edit\n")
    assert pkglayer_json("scan", str(root))["modified"] == ["etc/login.defs"]

    result = build_json(root, "--layers", str(layers), "--output", f"oci:{tmp_path}/img:t")
    edited = layer_digests(result)
    login = layer_holding(result, "login")
    # the package layer is the pristine one (its blob from the earlier build, checked
    # member by member against the database), the edit sits in the layer above it
    assert edited[login] == pristine[login]
    assert {layer["name"] for layer in result["layers"] if not layer["reused"]} <= TOP_LAYERS
    with read_layer(tmp_path / "img", edited[login]) as tf:
        assert not tf.extractfile("etc/login.defs").read().endswith(b"# local edit\n")
    with read_layer(tmp_path / "img", edited["modified"]) as tf:
        assert tf.getnames()[-1] == "etc/login.defs"
        assert tf.extractfile("etc/login.defs").read().endswith(b"# local edit\n")

    # with no earlier build to take the pristine bytes from, the package layer leaves
    # the edited file out rather than ship the edit twice
    alone = build_json(root, "--output", f"oci:{tmp_path}/alone:t")
    with read_layer(tmp_path / "alone", layer_digests(alone)[login]) as tf:
        assert "etc/login.defs" not in tf.getnames()


def test_a_tampered_prior_layer_is_not_taken_as_pristine(deb_rootfs: Path, tmp_path: Path) -> None:
    """A prior blob that does not hold the package's pristine content is not reused."""
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    with open(root / "etc/login.defs", "a") as f:
        f.write("# first edit\n")
    layers = tmp_path / "layers"
    build_json(root, "--layers", str(layers))  # login layer written without login.defs
    promote_outputs(layers)
    with open(root / "etc/login.defs", "a") as f:
        f.write("# second edit\n")
    second = build_json(root, "--layers", str(layers))
    login = next(layer for layer in second["layers"] if layer["name"].startswith("login-"))
    assert login["reused"]  # same content key: the file is still left out
    # now forge a history that claims a different blob is login's pristine layer
    history = json.loads((layers / "history.json").read_text())
    bash = next(layer for layer in history["layers"] if layer["name"].startswith("bash-"))
    for layer in history["layers"]:
        if layer["name"].startswith("login-"):
            for k in ("digest", "diffID", "size"):
                layer[k] = bash[k]
            layer["contentKey"] = "sha256:" + "0" * 64
    (layers / "history.json").write_text(json.dumps(history))
    promote_outputs(layers)
    third = build_json(root, "--layers", str(layers))
    login3 = next(layer for layer in third["layers"] if layer["name"].startswith("login-"))
    assert not login3["reused"] and login3["digest"] == login["digest"]


def test_edited_rpm_config_file_goes_to_the_modified_layer(rpm_rootfs: Path, tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    first = build_json(rpm_rootfs, "--layers", str(layers))
    pristine = layer_digests(first)
    promote_outputs(layers)
    root = tmp_path / "root"
    copy_tree(rpm_rootfs, root)
    scan_before = pkglayer_json("scan", str(root))
    assert scan_before["modified"] == []
    demo = next(p for p in scan_before["packages"] if p["name"] == "pkglayer-demo")
    conf = next(
        f for f in subprocess.run(
            ["rpm", "--root", str(root), "--dbpath", "/usr/lib/sysimage/rpm", "-qc", "pkglayer-demo"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
    )
    with open(root / conf.lstrip("/"), "a") as f:
        f.write("edited=1\n")
    second = build_json(root, "--layers", str(layers))
    edited = layer_digests(second)
    layer = layer_holding(first, "pkglayer-demo")
    assert layer == layer_holding(second, "pkglayer-demo")
    assert demo["key"] in next(x["packages"] for x in first["layers"] if x["name"] == layer)
    assert edited[layer] == pristine[layer]
    assert edited["modified"]
    assert pkglayer_json("scan", str(root))["modified"] == [conf.lstrip("/")]


# -- layer budget, hard links, no database ----------------------------------------------


def test_layer_budget_groups_whole_components(deb_rootfs: Path, tmp_path: Path) -> None:
    full = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/a:t")
    small = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/b:t", "--max-layers", "12")
    assert len(small["layers"]) <= 12
    everything = [p for layer in full["layers"] for p in layer["packages"]]
    grouped = [p for layer in small["layers"] for p in layer["packages"]]
    assert sorted(grouped) == sorted(everything)  # every package exactly once
    # packages built from one source share a layer: util-linux ships several in minbase
    scan_out = pkglayer_json("scan", str(deb_rootfs))
    by_source: dict[str, set[str]] = {}
    for p in scan_out["packages"]:
        by_source.setdefault(p["source"], set()).add(p["key"])
    assert len(by_source["util-linux"]) > 2
    home = {k: layer["name"] for layer in small["layers"] for k in layer["packages"]}
    for source, keys in by_source.items():
        assert len({home[k] for k in keys if k in home}) <= 1, source


def test_hard_link_sets_never_cross_layers(deb_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    os.link(root / "usr/bin/dpkg", root / "usr/local/bin/dpkg-hardlink")
    result = build_json(root, "--output", f"oci:{tmp_path}/img:t")
    holders = []
    for layer in result["layers"]:
        with read_layer(tmp_path / "img", layer["digest"]) as tf:
            names = set(tf.getnames())
            if {"usr/bin/dpkg", "usr/local/bin/dpkg-hardlink"} & names:
                holders.append((layer["name"], names))
    assert len(holders) == 1
    assert {"usr/bin/dpkg", "usr/local/bin/dpkg-hardlink"} <= holders[0][1]


def test_rootfs_without_database_is_all_unowned(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "etc").mkdir()
    (root / "etc/config").write_text("x=1\n")
    (root / "tmp").mkdir()
    (root / "tmp/scratch").write_text("gone")
    scan_out = pkglayer_json("scan", str(root))
    assert scan_out["format"] is None and scan_out["packages"] == []
    assert sorted(scan_out["unowned"]) == ["bin", "bin/tool", "etc", "etc/config", "tmp"]
    assert scan_out["excluded"] == ["tmp/scratch"]
    result = build_json(root, "--output", f"oci:{tmp_path}/img:t")
    assert [layer["name"] for layer in result["layers"]] == ["unowned"]


# -- hostile and broken input -----------------------------------------------------------


def _no_blobs_written(d: Path) -> bool:
    return not blob_files(d)


def test_missing_rootfs_is_a_clear_error(tmp_path: Path) -> None:
    proc = pkglayer("build", str(tmp_path / "nope"), "--output", f"oci:{tmp_path}/img", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"pkglayer: error: rootfs {tmp_path}/nope does not exist"


def test_unknown_compression_is_rejected(deb_rootfs: Path, tmp_path: Path) -> None:
    proc = pkglayer("build", str(deb_rootfs), "--output", f"oci:{tmp_path}/i", "--compression", "lz4", check=False)
    assert proc.returncode == 2 and "invalid choice: 'lz4'" in proc.stderr
    conf = tmp_path / "c.toml"
    conf.write_text('[build]\ncompression = "lz4"\n')
    proc = pkglayer("build", str(deb_rootfs), "--output", f"oci:{tmp_path}/i", "--config", str(conf), check=False)
    assert proc.returncode == 1 and "unknown compression 'lz4'" in proc.stderr
    assert _no_blobs_written(tmp_path / "i")


def test_garbage_dpkg_status_is_a_clear_error(deb_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    (root / "var/lib/dpkg/status").write_bytes(os.urandom(4096))
    proc = pkglayer("build", str(root), "--output", f"oci:{tmp_path}/img", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("pkglayer: error: ") and "status" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _no_blobs_written(tmp_path / "img")


def test_truncated_rpmdb_is_a_clear_error(rpm_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(rpm_rootfs, root)
    db = root / "usr/lib/sysimage/rpm/rpmdb.sqlite"
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 3)
    before = sorted(os.listdir(db.parent))
    proc = pkglayer("build", str(root), "--output", f"oci:{tmp_path}/img", check=False)
    assert proc.returncode == 1
    assert "corrupt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(db.parent)) == before  # no -shm/-wal created in the rootfs
    assert not (root / "root/.rpmdb").exists()
    assert _no_blobs_written(tmp_path / "img")


@pytest.mark.parametrize(
    "history, message",
    [
        ("../../etc/passwd", "name"),
        ("not json", "JSON"),
        ("version 99", "99"),
    ],
)
def test_hostile_history_is_a_clear_error(deb_rootfs: Path, tmp_path: Path, history: str, message: str) -> None:
    layers = tmp_path / "layers"
    valid = build_json(deb_rootfs, "--layers", str(layers))
    promote_outputs(layers)
    text = (layers / "history.json").read_text()
    if history == "not json":
        text = text[: len(text) // 2]
    elif history == "version 99":
        text = text.replace('"schemaVersion": 1', '"schemaVersion": 99')
    else:
        text = text.replace(valid["layers"][0]["name"], history)
    (layers / "history.json").write_text(text)
    proc = pkglayer("build", str(deb_rootfs), "--layers", str(layers), check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _no_blobs_written(layers / "output")


def test_input_blob_not_matching_its_digest_is_rebuilt(deb_rootfs: Path, tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    first = build_json(deb_rootfs, "--layers", str(layers))
    promote_outputs(layers)
    victim = next(layer for layer in first["layers"] if layer["name"].startswith("bash-"))
    blob = layers / "input/blobs/sha256" / victim["digest"][7:]
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    # and another history entry points at a blob that is a symlink to a host file
    other = next(layer for layer in first["layers"] if layer["name"].startswith("dash-"))
    link = layers / "input/blobs/sha256" / other["digest"][7:]
    link.unlink()
    link.symlink_to("/etc/shadow")
    second = build_json(deb_rootfs, "--layers", str(layers))
    written = {layer["name"] for layer in second["layers"] if not layer["reused"]}
    assert written == {victim["name"], other["name"]}
    assert len(second["warnings"]) == 2
    # the rebuilt blobs are the true ones
    assert layer_digests(second)[victim["name"]] == victim["digest"]


def test_symlinks_out_of_the_rootfs_are_stored_not_followed(deb_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    (root / "etc/evil-abs").symlink_to("/etc/shadow")
    (root / "etc/evil-rel").symlink_to("../../../../../../etc/shadow")
    # the package database itself replaced by a link to the host: read in-root instead
    os.rename(root / "var/lib/dpkg/status", root / "var/lib/dpkg/status.real")
    (root / "var/lib/dpkg/status").symlink_to("/var/lib/dpkg/status.real")
    host_secret = Path("/etc/shadow").read_bytes()
    result = build_json(root, "--output", f"oci:{tmp_path}/img:t")
    found = {}
    for layer in result["layers"]:
        with read_layer(tmp_path / "img", layer["digest"]) as tf:
            for m in tf.getmembers():
                if m.name in ("etc/evil-abs", "etc/evil-rel"):
                    found[m.name] = (m.issym(), m.linkname)
                if m.isfile() and m.size == len(host_secret) and m.name == "etc/shadow":
                    assert tf.extractfile(m).read() == (root / "etc/shadow").read_bytes()
    assert found == {
        "etc/evil-abs": (True, "/etc/shadow"),
        "etc/evil-rel": (True, "../../../../../../etc/shadow"),
    }
    assert len(result["layers"]) > 60  # the database was read through the in-root link


def test_file_changed_after_scan_stops_the_layer(deb_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    settings = BuildSettings()
    with Rootfs(root) as rootfs:
        own = scan_ownership(rootfs, open_source(rootfs), settings.all_excludes, settings.drop_xattrs)
        key = next(k for k in own.homes if k.startswith("bash-"))
        members = layer_members(own.homes[key], own.objects, 0)
        with open(root / "usr/bin/bash", "r+b") as f:
            f.write(b"\x7fELF")  # same bytes, but a write: ctime changes
        out = BlobDir(tmp_path / "blobs", create=True)
        with pytest.raises(RootfsError, match="changed during the build"):
            with out.writer() as w:
                write_layer(rootfs, members, "gzip", 6, w)
                w.commit()
        os.unlink(root / "usr/bin/bash")
        with pytest.raises(RootfsError, match="disappeared"):
            with out.writer() as w:
                write_layer(rootfs, members, "gzip", 6, w)
                w.commit()
    assert blob_files(tmp_path / "blobs") == set()


def test_killed_build_leaves_no_partial_blob_and_rerun_completes(deb_rootfs: Path, tmp_path: Path) -> None:
    layout = tmp_path / "img"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pkglayer", "build", str(deb_rootfs), "--output", f"oci:{layout}:t", "-q", "-j", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Killed while provably writing a layer, after three were committed.
        writing = stop_mid_write(proc, layout / ".pkglayer-tmp", lambda: len(blob_files(layout)) >= 3)
    finally:
        proc.kill()
        proc.wait()
    assert set(writing) <= {p.name for p in (layout / ".pkglayer-tmp").iterdir()}
    committed = blob_files(layout)
    assert len(committed) >= 3
    for name in committed:
        assert sha256_file(layout / "blobs/sha256" / name) == f"sha256:{name}"
    assert not (layout / "index.json").exists()
    rerun = build_json(deb_rootfs, "--output", f"oci:{layout}:t")
    clean = build_json(deb_rootfs, "--output", f"oci:{tmp_path}/clean:t")
    assert rerun["manifestDigest"] == clean["manifestDigest"]
    assert not list((layout / ".pkglayer-tmp").iterdir()), "the rerun removes the dead writer's temp file"


def test_full_disk_is_a_clear_error_without_partial_blobs(deb_rootfs: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", size="4M") as mnt:
        proc = pkglayer("build", str(deb_rootfs), "--output", f"oci:{mnt}/img:t", check=False)
        assert proc.returncode == 1
        assert "no space left" in proc.stderr.lower()
        for name in blob_files(mnt / "img"):
            assert sha256_file(mnt / "img/blobs/sha256" / name) == f"sha256:{name}"
        leftovers = [p for p in (mnt / "img").rglob("*") if p.is_file() and "blobs" not in p.parts]
        assert leftovers == []


def test_image_config_options(deb_rootfs: Path, tmp_path: Path) -> None:
    result = build_json(
        deb_rootfs, "--output", f"oci:{tmp_path}/img:v1",
        "--label", "org.opencontainers.image.title=demo", "--label", "empty=",
        "--env", "LANG=C.UTF-8", "--env", "PATH=/usr/bin:/bin",
        "--cmd", '["/bin/sh", "-c", "echo hi"]', "--entrypoint", "/usr/bin/env -i",
        "--workdir", "/root", "--user", "0:0", "--source-date-epoch", "1700000000",
    )
    digest, _, config = layout_manifest(tmp_path / "img", "v1")
    assert digest == result["manifestDigest"]
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["created"] == "2023-11-14T22:13:20Z"
    c = config["config"]
    # The build's plan travels in the config as a label (see tests/test_image_inputs.py).
    plan = json.loads(c["Labels"].pop("org.pkglayer.history"))
    assert [layer["digest"] for layer in plan["layers"]] == [layer["digest"] for layer in result["layers"]]
    assert c["Labels"] == {"org.opencontainers.image.title": "demo", "empty": ""}
    assert c["Env"] == ["LANG=C.UTF-8", "PATH=/usr/bin:/bin"]
    assert c["Cmd"] == ["/bin/sh", "-c", "echo hi"]
    assert c["Entrypoint"] == ["/usr/bin/env", "-i"]
    assert (c["WorkingDir"], c["User"]) == ("/root", "0:0")
    assert len(config["history"]) == len(config["rootfs"]["diff_ids"]) == len(result["layers"])
    bash = next(h for h in config["history"] if h["comment"].startswith("bash-"))
    assert bash["created_by"] == f"pkglayer: {bash['comment']}"


@pytest.mark.parametrize("bad", [["--label", "novalue"], ["--env", "=x"], ["--cmd", "[1, 2]"]])
def test_bad_image_options_are_clear_errors(deb_rootfs: Path, tmp_path: Path, bad: list[str]) -> None:
    proc = pkglayer("build", str(deb_rootfs), "--output", f"oci:{tmp_path}/img", *bad, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("pkglayer: error: ")
    assert _no_blobs_written(tmp_path / "img")


def test_format_none_treats_everything_as_unowned(deb_rootfs: Path) -> None:
    out = json.loads(pkglayer("scan", str(deb_rootfs), "--json", "--format", "none", "--big-file-size", "1T").stdout)
    assert out["packages"] == [] and out["homes"]["pkgdb"]["files"] == 0
    assert "usr/bin/bash" in out["unowned"]
    # but for the big files, which get components of their own (bash is 1.2 MB)
    out = json.loads(pkglayer("scan", str(deb_rootfs), "--json", "--format", "none").stdout)
    assert {p["origin"] for p in out["packages"]} == {"big file"}
    assert "usr/bin/bash" not in out["unowned"] and "usr/bin/ls" in out["unowned"]
    proc = pkglayer("scan", str(deb_rootfs), "--format", "rpm", check=False)
    assert proc.returncode == 1 and "no rpm database" in proc.stderr


def test_sockets_mounts_and_odd_names(tmp_path: Path) -> None:
    import socket

    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "mnt/data").mkdir(parents=True)
    (root / "srv").mkdir()
    odd = [b"srv/caf\xe9-latin1", b"srv/new\nline", ("srv/" + "d" * 150).encode()]
    for name in odd:
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(b"odd")
    (root / "srv/long-link").symlink_to("x" * 200)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "run/app.sock"))
    try:
        with tmpfs(root / "mnt/data"):
            (root / "mnt/data/on-tmpfs").write_text("not part of the rootfs's filesystem")
            scan_out = pkglayer_json("scan", str(root))
            result = build_json(root, "--output", f"oci:{tmp_path}/img:t")
    finally:
        sock.close()
    reasons = {item["path"]: item["reason"] for item in scan_out["skipped"]}
    assert "socket" in reasons["run/app.sock"] and "mount point" in reasons["mnt/data"]
    with read_layer(tmp_path / "img", result["layers"][0]["digest"]) as tf:
        names = {os.fsencode(n) for n in tf.getnames()}
        assert b"mnt/data" in names and b"mnt/data/on-tmpfs" not in names
        assert b"run/app.sock" not in names
        assert set(odd) <= names
        assert tf.getmember("srv/long-link").linkname == "x" * 200


def test_pristine_layer_from_the_earlier_image_in_the_same_layout(deb_rootfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_tree(deb_rootfs, root)
    first = layer_digests(build_json(root, "--output", f"oci:{tmp_path}/img:t"))
    with open(root / "etc/login.defs", "a") as f:
        f.write("# local edit\n")
    second = build_json(root, "--output", f"oci:{tmp_path}/img:t")
    login = layer_holding(second, "login")
    assert layer_digests(second)[login] == first[login]
    assert {layer["name"] for layer in second["layers"] if not layer["reused"]} <= TOP_LAYERS


def test_rpm_wal_with_committed_data_is_kept(rpm_rootfs: Path, tmp_path: Path) -> None:
    """Committed transactions may sit in rpmdb.sqlite-wal: the layer must keep them."""
    import sqlite3

    root = tmp_path / "root"
    copy_tree(rpm_rootfs, root)
    dbdir = root / "usr/lib/sysimage/rpm"
    script = (
        "import os, sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1])\n"
        "con.execute('PRAGMA journal_mode=WAL')\n"
        "con.execute('PRAGMA wal_autocheckpoint=0')\n"
        "con.execute(\"DELETE FROM Packages WHERE hnum IN (SELECT hnum FROM Name WHERE key='pkglayer-extra')\")\n"
        "con.commit()\n"
        "os._exit(0)  # no close, so no checkpoint\n"
    )
    subprocess.run([sys.executable, "-c", script, str(dbdir / "rpmdb.sqlite")], check=True)
    assert (dbdir / "rpmdb.sqlite-wal").stat().st_size > 0
    result = build_json(root, "--output", f"oci:{tmp_path}/img:t")
    assert not any(p.startswith("pkglayer-extra-") for layer in result["layers"] for p in layer["packages"])
    pkgdb = next(layer for layer in result["layers"] if layer["name"] == "pkgdb")
    out = tmp_path / "db"
    out.mkdir()
    with read_layer(tmp_path / "img", pkgdb["digest"]) as tf:
        names = tf.getnames()
        assert "usr/lib/sysimage/rpm/rpmdb.sqlite-shm" not in names
        for name in ("rpmdb.sqlite", "rpmdb.sqlite-wal"):
            (out / name).write_bytes(tf.extractfile(f"usr/lib/sysimage/rpm/{name}").read())
    def count(db: str) -> int:
        con = sqlite3.connect(db, uri=True)
        try:
            return con.execute("SELECT count(*) FROM Packages").fetchone()[0]
        finally:
            con.close()

    before = count(f"file:{rpm_rootfs / 'usr/lib/sysimage/rpm/rpmdb.sqlite'}?immutable=1")
    assert count(str(out / "rpmdb.sqlite")) == before - 1  # the WAL's deletion is in the image


def test_progress_is_logged_for_journals(deb_rootfs: Path, tmp_path: Path) -> None:
    proc = pkglayer("build", str(deb_rootfs), "--output", f"oci:{tmp_path}/img:t", "-v", "--no-hash-cache")
    lines = proc.stderr.splitlines()
    assert any(line.startswith("pkglayer: hashing: ") for line in lines)
    layer_lines = [line for line in lines if line.startswith("pkglayer: layers: ")]
    assert len(layer_lines) >= 5 and layer_lines[-1].split()[-1].split("/")[0] == layer_lines[-1].split("/")[-1]
    assert not any("\x1b" in line or "\r" in line for line in lines)  # plain lines, no terminal codes


def test_version_names_where_the_package_runs_from() -> None:
    # Several installs (a venv, a checkout on sys.path, `python -m` in a checkout) can
    # answer to `pkglayer`: --version says which one did, as pip's does.
    import pkglayer as package

    said = pkglayer("--version").stdout.strip()
    here = os.path.dirname(os.path.abspath(package.__file__))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert said == f"pkglayer {package.__version__} from {here} (python {python})"


# -- layers written by forked processes ---------------------------------------------------


def _noting_writers(monkeypatch, tmp_path: Path, in_child=None) -> Path:
    """Every write_layer call notes its pid in a file; `in_child(pid)` runs first in a
    process other than this one. The CLI is single-threaded; this test process may not
    be, so it is taken to be."""
    notes = tmp_path / "writer-pids"
    parent = os.getpid()
    real = build_mod.write_layer

    def noting(*a, **kw):
        with open(notes, "a") as f:
            f.write(f"{os.getpid()}\n")
        if in_child is not None and os.getpid() != parent:
            in_child()
        return real(*a, **kw)

    monkeypatch.setattr(build_mod, "write_layer", noting)
    monkeypatch.setattr(build_mod, "single_threaded", lambda: True)
    return notes


def test_layers_written_by_processes_are_those_threads_write(deb_rootfs: Path, tmp_path: Path, monkeypatch) -> None:
    on_threads = build_into_layers(deb_rootfs, BuildSettings(jobs=1), tmp_path / "threads")
    notes = _noting_writers(monkeypatch, tmp_path)
    in_processes = build_into_layers(deb_rootfs, BuildSettings(jobs=2), tmp_path / "processes")
    pids = {int(p) for p in notes.read_text().split()}
    assert len(notes.read_text().split()) == in_processes.written > 1 and os.getpid() not in pids
    assert [(o.record, o.files, o.reused) for o in in_processes.layers] == [
        (o.record, o.files, o.reused) for o in on_threads.layers
    ]
    # The processes' CPU time is charged to the build.
    assert all(in_processes.timings.cpu.get(work, 0) > 0 for work in ("hash", "compress", "read", "write"))
    # The kept scan counts the layers' files without making their members again.
    again = build_into_layers(deb_rootfs, BuildSettings(jobs=2), tmp_path / "processes")
    assert again.written == 0 and [o.files for o in again.layers] == [o.files for o in in_processes.layers]


def test_a_writing_process_that_fails_fails_the_build_as_a_thread_would(
    deb_rootfs: Path, tmp_path: Path, monkeypatch
) -> None:
    def changed() -> None:
        raise TreeChangedError("/usr/bin/x changed during the build; nothing was written, rerun")

    _noting_writers(monkeypatch, tmp_path, changed)
    with pytest.raises(TreeChangedError, match=r"^/usr/bin/x changed during the build"):
        build_into_layers(deb_rootfs, BuildSettings(jobs=2), tmp_path / "changed")

    _noting_writers(monkeypatch, tmp_path, lambda: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(PkglayerError, match="a process writing layers died"):
        build_into_layers(deb_rootfs, BuildSettings(jobs=2), tmp_path / "killed")
    # Whatever was committed is whole: every blob is its digest.
    for blob in (tmp_path / "killed/output/blobs/sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


_KILLED_BUILD = """
import os, sys, time
from pkglayer import build as build_mod
from pkglayer.config import BuildSettings
from pkglayer.outputs import build_to

def stuck(*args, **kwargs):
    open(os.path.join(sys.argv[3], str(os.getpid())), "w").close()
    time.sleep(120)

build_mod.write_layer = stuck
build_to(sys.argv[1], BuildSettings(jobs=2), layers_dir=sys.argv[2])
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_writing_processes_end_with_a_killed_build(deb_rootfs: Path, tmp_path: Path) -> None:
    marks = tmp_path / "writers"
    marks.mkdir()
    args = [str(deb_rootfs), str(tmp_path / "layers"), str(marks)]
    build = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, *args])
    deadline = time.monotonic() + 120
    while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline and build.poll() is None:
        time.sleep(0.05)
    writers = [int(m.name) for m in marks.iterdir()]
    assert len(writers) == 2 and build.pid not in writers
    build.kill()  # as SIGTERM would, with no handler: no chance to stop them
    build.wait()
    deadline = time.monotonic() + 10
    while not all(map(_gone, writers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(map(_gone, writers)), "a writing process outlived its build"
