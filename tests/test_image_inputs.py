"""Images as build input and prior (pkglayer.inputs, imageconfig, prior and `pkglayer build
--from`): a source image's config carried over, the plan label (org.pkglayer.history)
read back and cross-checked, and hand-made layouts through the CLI.

Needs root (unpacking keeps owners).
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from pkglayer.errors import PkglayerError
from pkglayer.imageconfig import merge_config
from pkglayer.inputs import image_platform
from pkglayer.layout import ImageError, ImageOptions, Platform, open_layout
from pkglayer.prior import plan_from_image
from tests.crafted import Layer, listing, make_layout, manifest_file, rewrite_layout, unpack_layout
from tests.helpers import (
    CAP_VALUE,
    CAPABILITY_XATTR,
    build_json,
    needs_root,
    pkglayer,
    pkglayer_json,
    read_blob,
    sha256_digest,
)

pytestmark = needs_root("unpacking keeps owners")


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """tmp_path/outside: a directory a hostile layer aims at; must stay empty."""
    (tmp_path / "outside").mkdir()
    return tmp_path


def test_cli_refuses_hostile_image_and_cleans_up(sandbox: Path) -> None:
    outside = sandbox / "outside"
    layout = make_layout(sandbox / "img", [Layer().add("x", tarfile.SYMTYPE, linkname=str(outside))
                                           .add("x/passwd", data=b"pwned").bytes()])
    work = sandbox / "work"
    work.mkdir()
    proc = pkglayer("build", "--from", f"oci:{layout}:t", "--output", f"oci:{sandbox}/out", "--tmpdir", work,
                    check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("pkglayer: error: layer 0 (sha256:"), proc.stderr
    assert "/x/passwd: /x is a symlink" in proc.stderr and "refusing to write through it" in proc.stderr
    assert os.listdir(outside) == [] and os.listdir(work) == [], "the working tree is removed"
    assert not (sandbox / "out").exists(), "nothing is written when the source is refused"


def test_cli_needs_exactly_one_input(tmp_path: Path) -> None:
    for args in ([], [str(tmp_path), "--from", "oci:x:y"]):
        proc = pkglayer("build", *args, "--output", f"oci:{tmp_path}/o", check=False)
        assert proc.returncode == 1 and "give " in proc.stderr and "--from IMAGE" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ config and plan


def test_source_config_is_carried_over_and_overridable(tmp_path: Path) -> None:
    runtime = {
        "Env": ["PATH=/usr/bin", "LANG=C"], "Entrypoint": ["/init"], "Cmd": ["--serve"],
        "WorkingDir": "/srv", "User": "1000:1000", "ExposedPorts": {"8080/tcp": {}},
        "Volumes": {"/data": {}}, "Labels": {"containers.bootc": "1", "a": "b"}, "StopSignal": "SIGRTMIN+3",
    }
    layout = make_layout(tmp_path / "img", [Layer().add("f").bytes()], runtime=runtime,
                         extra_config={"architecture": "arm64", "variant": "v8"})
    src = open_layout(str(layout), "t")
    kept = merge_config(src.runtime, ImageOptions())
    assert (kept.env, kept.entrypoint, kept.cmd, kept.workdir, kept.user) == (
        ["PATH=/usr/bin", "LANG=C"], ["/init"], ["--serve"], "/srv", "1000:1000")
    assert (kept.exposed_ports, kept.volumes, kept.stop_signal) == ({"8080/tcp": {}}, {"/data": {}}, "SIGRTMIN+3")
    assert kept.labels == {"containers.bootc": "1", "a": "b"}
    assert image_platform(src, "src") == Platform("arm64", "linux", "v8")
    cli = ImageOptions(env=["LANG=C.UTF-8", "X=1"], labels={"a": "c"}, cmd=["other"], user="0")
    over = merge_config(src.runtime, cli)
    assert over.env == ["PATH=/usr/bin", "LANG=C.UTF-8", "X=1"]
    assert over.labels == {"containers.bootc": "1", "a": "c"}
    assert (over.cmd, over.entrypoint, over.user) == (["other"], ["/init"], "0")


def test_bad_source_config_is_refused(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "img", [Layer().add("f").bytes()], runtime={"Env": "PATH=/bin"})
    with pytest.raises(ImageError, match="Env must be an array of strings"):
        merge_config(open_layout(str(layout), "t").runtime, ImageOptions())


def _tiny_rootfs(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("tiny\n")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/true\n")
    return root


def _build(rootfs: Path, out: str, *args: str) -> dict:
    return build_json(rootfs, "--format", "none", "--output", out, "--no-hash-cache", *args)


def test_plan_label_round_trip_and_cross_checks(tmp_path: Path) -> None:
    rootfs = _tiny_rootfs(tmp_path / "rootfs")
    layout = tmp_path / "img"
    result = _build(rootfs, f"oci:{layout}:v1")
    image = open_layout(str(layout), "v1")
    plan = plan_from_image(image, "oci:img:v1")
    assert [r.digest for r in plan.layers] == [r["digest"] for r in result["layers"]]
    assert [r.content_key for r in plan.layers] == [r["contentKey"] for r in result["layers"]]
    label = image.runtime["Labels"]["org.pkglayer.history"]
    assert "\n" not in label and ": " not in label, "compact JSON"

    manifest = json.loads(manifest_file(layout).read_bytes())
    config = json.loads(read_blob(layout, manifest["config"]["digest"]))
    # A label whose layer does not match the manifest (consistent digests otherwise) is refused.
    tampered = json.loads(label)
    tampered["layers"][0]["digest"] = sha256_digest(b"elsewhere")
    config["config"]["Labels"]["org.pkglayer.history"] = json.dumps(tampered)
    rewrite_layout(layout, manifest, config)
    with pytest.raises(ImageError, match="does not match the manifest's layer"):
        plan_from_image(open_layout(str(layout), "v1"), "x")
    # A label that is not a valid plan at all.
    config["config"]["Labels"]["org.pkglayer.history"] = '{"schemaVersion": 1, "layers": "../../etc"}'
    rewrite_layout(layout, manifest, config)
    with pytest.raises(PkglayerError, match="label org.pkglayer.history"):
        plan_from_image(open_layout(str(layout), "v1"), "x")
    del config["config"]["Labels"]["org.pkglayer.history"]
    rewrite_layout(layout, manifest, config)
    with pytest.raises(ImageError, match="no org.pkglayer.history label"):
        plan_from_image(open_layout(str(layout), "v1"), "x")


def test_prior_from_oci_layout_reuses_its_blobs(tmp_path: Path) -> None:
    rootfs = _tiny_rootfs(tmp_path / "rootfs")
    first = _build(rootfs, f"oci:{tmp_path}/a:v1")
    # A different layout: only --prior oci: makes the first image's layers reusable.
    second = _build(rootfs, f"oci:{tmp_path}/b:v2", "--prior", f"oci:{tmp_path}/a:v1")
    assert second["reused"] == len(second["layers"]) and second["written"] == 0
    assert second["manifestDigest"] == first["manifestDigest"]
    third = _build(rootfs, f"oci:{tmp_path}/c:v3")
    assert third["written"] == len(third["layers"])


def test_rechunk_keeps_the_tree_and_config(tmp_path: Path) -> None:
    """Small end-to-end: a crafted two-layer image through `pkglayer build --from oci:`."""
    lower = (Layer().dir(".").dir("etc").add("etc/hostname", data=b"h\n").add("etc/gone", data=b"g")
             .dir("usr").dir("usr/bin")
             .add("usr/bin/ping", data=b"ELF", mode=0o755, xattrs={CAPABILITY_XATTR: CAP_VALUE})
             .add("usr/bin/ping6", tarfile.LNKTYPE, linkname="usr/bin/ping").bytes())
    upper = Layer().add("etc/.wh.gone").add("etc/new", data=b"n", uid=1000, mode=0o600).bytes()
    layout = make_layout(tmp_path / "img", [lower, upper],
                         runtime={"Cmd": ["/bin/sh"], "Labels": {"containers.bootc": "1"}, "StopSignal": "SIGTERM"})
    out = tmp_path / "out"
    result = pkglayer_json("build", "--from", f"oci:{layout}:t", "--output", f"oci:{out}:r", "-q", "--tmpdir", tmp_path)
    assert result["source"]["layers"] == 2 and result["source"]["whiteouts"] == 1
    assert sorted(os.listdir(tmp_path)) == ["img", "out"], "the working tree is removed"
    back = tmp_path / "back"
    stats = unpack_layout(out, back, tag="r")
    assert stats.layers == 1  # no package database: one unowned layer
    assert listing(back) == ["etc", "etc/hostname", "etc/new", "usr", "usr/bin", "usr/bin/ping", "usr/bin/ping6"]
    assert os.getxattr(back / "usr/bin/ping", CAPABILITY_XATTR) == CAP_VALUE
    assert os.lstat(back / "usr/bin/ping").st_ino == os.lstat(back / "usr/bin/ping6").st_ino
    new = os.lstat(back / "etc/new")
    assert (new.st_uid, stat.S_IMODE(new.st_mode)) == (1000, 0o600)
    image = open_layout(str(out), "r")
    assert image.runtime["Cmd"] == ["/bin/sh"] and image.runtime["StopSignal"] == "SIGTERM"
    assert image.runtime["Labels"]["containers.bootc"] == "1"
