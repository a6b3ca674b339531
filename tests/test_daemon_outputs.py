"""A daemon root whose `output` is not an OCI layout: the real daemon stages the image in
its state directory and publishes each build with skopeo, here into a private vfs
containers-storage that skopeo itself is asked about afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from pkglayer.blobstore import BlobDir
from pkglayer.layout import open_layout
from tests.daemon_harness import start
from tests.helpers import PKGLAYER, needs_root, require_tools, run

pytestmark = needs_root("the daemon reads roots as root; containers-storage")


def tiny_root(path: Path) -> Path:
    """Two layers with --big-file-size 10k: usr/bin/tool (a component of its own), the rest unowned."""
    (path / "etc").mkdir(parents=True)
    (path / "etc/motd").write_text("hello\n")
    (path / "usr/bin").mkdir(parents=True)
    (path / "usr/bin/tool").write_bytes(bytes(range(256)) * 80)
    return path


def stored(ref: str) -> tuple[list[str], dict]:
    """The layer digests of the image in the store, and its config (skopeo reads the store)."""
    layers = json.loads(run(["skopeo", "inspect", ref]))["Layers"]
    return layers, json.loads(run(["skopeo", "inspect", "--config", ref]))


def build(d, name: str) -> dict:
    status, body = d.api("POST", f"/v1/roots/{name}/build", {"wait": True, "timeout": 120})
    assert status == 200, body
    return body["build"]


def test_builds_are_published_to_containers_storage_from_a_kept_staged_layout(tmp_path: Path, daemons) -> None:
    require_tools("skopeo")
    root = tiny_root(tmp_path / "roots" / "tiny")
    store, runroot = tmp_path / "store", tmp_path / "run"
    ref = f"containers-storage:[vfs@{store}+{runroot}]localhost/tiny:v1"
    d = start(daemons, tmp_path / "d", [{
        "name": "tiny", "path": str(root), "format": "none", "big-file-size": "10k", "debounce": 0.5, "output": ref,
    }])
    d.wait_root("tiny", lambda r: r["state"] == "ready", 60)
    staged = d.state_dir / "outputs" / "tiny"
    # A prebuild fills the cache only: nothing staged, nothing published.
    assert not staged.exists() and not store.exists()

    # A store that cannot be written: the build fails in one line; the staged layout is
    # whole all the same, and it is the next build's prior.
    store.write_text("not a directory\n")
    failed = build(d, "tiny")
    assert failed["state"] == "failed" and "\n" not in failed["error"], failed
    assert failed["error"].startswith(f"writing {ref}: skopeo failed: "), failed["error"]
    image = open_layout(str(staged), "latest")
    assert all(BlobDir(staged).verify(desc.digest, desc.size) for desc in image.layers)
    store.unlink()

    first = build(d, "tiny")
    assert first["state"] == "succeeded", first
    one = first["result"]
    assert one["published"] == [ref] and one["image"] == f"oci:{staged}:latest"
    assert one["written"] == 0  # the prebuild cached both layers
    layers, config = stored(ref)
    assert layers == [layer["digest"] for layer in one["layers"]] and len(layers) == 2
    assert config["rootfs"]["diff_ids"] == [layer["diffID"] for layer in one["layers"]]
    assert run(["skopeo", "inspect", "--format", "{{.Digest}}", ref]).strip() == one["manifestDigest"]

    (root / "etc/motd").write_text("hello again\n")
    # Built again through `pkglayer ctl`, which says where the image went.
    out = subprocess.run([*PKGLAYER, "ctl", "--socket", d.socket, "build", "tiny", "--wait"],
                         capture_output=True, text=True, check=True).stdout
    second = d.root("tiny")["lastBuild"]
    assert f"wrote {ref}\n" in out and f"image oci:{staged}:latest manifest {second['manifestDigest']}" in out
    assert second["published"] == [ref] and second["manifestDigest"] != one["manifestDigest"]
    before = {layer["name"]: layer["digest"] for layer in one["layers"]}
    after = {layer["name"]: layer["digest"] for layer in second["layers"]}
    assert before.keys() == after.keys()
    assert {name for name in after if after[name] != before[name]} == {"unowned"}
    assert [layer["name"] for layer in second["layers"] if not layer["reused"]] == ["unowned"]
    layers, config = stored(ref)
    assert layers == [layer["digest"] for layer in second["layers"]]
    plan = json.loads(config["config"]["Labels"]["org.pkglayer.history"])
    assert [rec["digest"] for rec in plan["layers"]] == layers
    # The staged layout holds the last image only.
    image = open_layout(str(staged), "latest")
    own = {image.manifest_digest, image.config_digest, *(desc.digest for desc in image.layers)}
    assert {f"sha256:{p.name}" for p in (staged / "blobs/sha256").iterdir()} == own
    assert d.stop() == 0

    # Without its saved plan, its cache and the store, the daemon finds the plan and the
    # blobs in the staged layout: nothing is written, and the image is published again.
    for gone in (d.cache_dir, store, runroot):
        shutil.rmtree(gone)
    (d.state_dir / "roots/tiny.json").unlink()
    logged = len(d.log())
    d.start()
    d.wait_root("tiny", lambda r: r["state"] == "ready", 60)
    third = build(d, "tiny")["result"]
    assert f"prior plan from the earlier image oci:{staged}:latest" in d.log()[logged:]
    assert third["written"] == 0 and third["manifestDigest"] == second["manifestDigest"]
    assert stored(ref)[0] == [layer["digest"] for layer in second["layers"]]
    assert d.stop() == 0
