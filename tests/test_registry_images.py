"""Images in, images out, against real clients: images made with umoci as a user would
make them are rechunked (`--from oci:` and `--from docker://`), and two simulated build
hosts publish consecutive versions to Debian's docker-registry, the second one planning
from the first one's image in the registry.

What the registry stored is counted on the registry's side (its storage directory).
Needs root (umoci unpack without --rootless, podman) and takes a few minutes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import rootfs_factory as factory
from tests.clients import Coverage, Registry, compare_trees, podman, umoci_unpack
from tests.helpers import layout_manifest, needs_root, pkglayer, pkglayer_json, run, sha256_digest

pytestmark = needs_root("umoci without --rootless and podman")

HISTORY_LABEL = "org.pkglayer.history"


# ------------------------------------------------------------------ helpers


def skopeo_inspect(ref: str, *flags: str) -> bytes:
    return run(["skopeo", "inspect", "--tls-verify=false", *flags, ref]).encode("utf-8", "surrogateescape")


def compare_unpacked(source_layout: Path, source_tag: str, out_layout: Path, out_tag: str, tmp: Path
                     ) -> tuple[list[str], Coverage]:
    """Unpack both images with umoci and compare the trees (minus what pkglayer excludes)."""
    src = umoci_unpack(source_layout, source_tag, tmp / "src-bundle")
    out = umoci_unpack(out_layout, out_tag, tmp / "out-bundle")
    summary = pkglayer_json("scan", src)
    exclude = [*summary["excluded"], *(item["path"] for item in summary["skipped"])]
    coverage = Coverage()
    return compare_trees(src, out, exclude, coverage), coverage


# ------------------------------------------------------------------ source images, made with umoci

SOURCE_CONFIG = {
    "--config.env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "APP_MODE=rechunked"],
    "--config.entrypoint": ["/bin/sh", "-c"],
    "--config.cmd": ["echo hello from the source image"],
    "--config.workingdir": ["/root"],
    "--config.user": ["0:0"],
    "--config.exposedports": ["8080/tcp"],
    "--config.volume": ["/data"],
    "--config.label": ["containers.bootc=1", "org.example.origin=umoci"],
    "--config.stopsignal": ["SIGRTMIN+3"],
}
DELETED_FILE = "etc/debian_version"
DELETED_DIR = "usr/share/doc/bash"
OPAQUE_DIR = "usr/share/doc/dash"


@dataclass(frozen=True)
class Sources:
    layout: Path  # tags "single" (one layer) and "multi" (three layers, whiteouts, opaque dir)


def _opaque_layer(path: Path) -> None:
    """A layer as an overlay-based builder makes it when a directory is replaced:
    the directory, its opaque marker, and the new content."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in ((OPAQUE_DIR, tarfile.DIRTYPE, b""),
                                 (f"{OPAQUE_DIR}/.wh..wh..opq", tarfile.REGTYPE, b""),
                                 (f"{OPAQUE_DIR}/README.local", tarfile.REGTYPE, b"replaced by a later layer\n")):
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.size = kind, 1_700_000_000, len(data)
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            tar.addfile(info, io.BytesIO(data) if data else None)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, deb_rootfs: Path) -> Sources:
    work = tmp_path_factory.mktemp("sources")
    layout = work / "layout"
    run(["umoci", "init", "--layout", layout])
    run(["umoci", "new", "--image", f"{layout}:single"])
    run(["umoci", "unpack", "--image", f"{layout}:single", work / "b1"])
    rootfs = work / "b1" / "rootfs"
    rootfs.rmdir()
    factory.copy_tree(deb_rootfs, rootfs)
    # As a Containerfile would: drop downloaded packages before committing.
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    run(["umoci", "repack", "--image", f"{layout}:single", work / "b1"])
    config_args = [a for flag, values in SOURCE_CONFIG.items() for v in values for a in (flag, v)]
    run(["umoci", "config", "--image", f"{layout}:single", *config_args])
    # Second layer: a deleted file and a deleted directory (umoci writes .wh. whiteouts).
    run(["umoci", "unpack", "--image", f"{layout}:single", work / "b2"])
    (work / "b2/rootfs" / DELETED_FILE).unlink()
    shutil.rmtree(work / "b2/rootfs" / DELETED_DIR)
    run(["umoci", "repack", "--image", f"{layout}:multi", work / "b2"])
    # Third layer: an opaque directory.
    _opaque_layer(work / "opaque.tar")
    run(["umoci", "raw", "add-layer", "--image", f"{layout}:multi", work / "opaque.tar"])
    shutil.rmtree(work / "b1")
    shutil.rmtree(work / "b2")
    _, manifest, _ = layout_manifest(layout, "multi")
    assert len(manifest["layers"]) == 3
    return Sources(layout)


@pytest.fixture(scope="module")
def rechunked(tmp_path_factory: pytest.TempPathFactory, sources: Sources) -> dict[str, tuple[Path, dict]]:
    """Both source images rechunked from their OCI layout."""
    out = {}
    for tag in ("single", "multi"):
        layout = tmp_path_factory.mktemp(f"rechunked-{tag}") / "layout"
        result = pkglayer_json("build", "--from", f"oci:{sources.layout}:{tag}", "--output", f"oci:{layout}:r", "-q")
        out[tag] = (layout, result)
    return out


def _check_config(config: dict) -> None:
    c = config["config"]
    assert c["Env"] == SOURCE_CONFIG["--config.env"]
    assert c["Entrypoint"] == ["/bin/sh", "-c"] and c["Cmd"] == ["echo hello from the source image"]
    assert (c["WorkingDir"], c["User"], c["StopSignal"]) == ("/root", "0:0", "SIGRTMIN+3")
    assert c["ExposedPorts"] == {"8080/tcp": {}} and c["Volumes"] == {"/data": {}}
    assert c["Labels"]["containers.bootc"] == "1" and c["Labels"]["org.example.origin"] == "umoci"
    assert HISTORY_LABEL in c["Labels"]
    assert (config["architecture"], config["os"]) == ("amd64", "linux")


@pytest.mark.parametrize("tag", ["single", "multi"])
def test_rechunk_keeps_tree_and_config(tag: str, sources: Sources, rechunked, tmp_path: Path) -> None:
    layout, result = rechunked[tag]
    assert result["source"]["layers"] == (1 if tag == "single" else 3)
    assert len(result["layers"]) > 50, "re-layered by package"
    diffs, cov = compare_unpacked(sources.layout, tag, layout, "r", tmp_path)
    assert diffs == [], "\n".join(diffs[:50])
    assert cov.files > 1000 and cov.symlinks > 0 and cov.hardlink_sets and cov.setuid
    assert "usr/bin/ping" in cov.capabilities
    _, _, config = layout_manifest(layout, "r")
    _check_config(config)
    unpacked = tmp_path / "out-bundle/rootfs"
    if tag == "multi":
        assert result["source"]["whiteouts"] >= 2 and result["source"]["opaqueDirs"] == 1
        assert not (unpacked / DELETED_FILE).exists() and not (unpacked / DELETED_DIR).exists()
        assert sorted(os.listdir(unpacked / OPAQUE_DIR)) == ["README.local"]
    else:
        assert (unpacked / DELETED_FILE).exists() and (unpacked / DELETED_DIR).is_dir()


def test_rechunk_from_registry_and_overrides(sources: Sources, rechunked, registry: Registry, tmp_path: Path) -> None:
    src = registry.ref("source/minbase:multi")
    run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{sources.layout}:multi", src])
    result = pkglayer_json("build", "--from", src, "--tls-verify=false", "--output", f"oci:{tmp_path}/out:r", "-q",
                      "--tmpdir", str(tmp_path))
    # Same image, same layers and config: the same manifest as rechunking the local layout.
    assert result["manifestDigest"] == rechunked["multi"][1]["manifestDigest"]
    assert sorted(os.listdir(tmp_path)) == ["out"], "pulled layout and working tree are removed"
    over = pkglayer_json("build", "--from", src, "--tls-verify=false", "--output", f"oci:{tmp_path}/over:r", "-q",
                    "--label", "containers.bootc=0", "--env", "APP_MODE=override", "--cmd", "echo overridden")
    _, _, config = layout_manifest(tmp_path / "over", "r")
    c = config["config"]
    assert c["Labels"]["containers.bootc"] == "0" and c["Labels"]["org.example.origin"] == "umoci"
    assert c["Env"] == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "APP_MODE=override"]
    assert c["Cmd"] == ["echo", "overridden"] and c["Entrypoint"] == ["/bin/sh", "-c"]
    # Only the config differs.
    assert [layer["digest"] for layer in over["layers"]] == [layer["digest"] for layer in result["layers"]]


# ------------------------------------------------------------------ two build hosts, one registry


@dataclass
class Host:
    """A build host: its own cache and working directories, nothing shared but the registry."""

    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {"XDG_CACHE_HOME": str(self.root / "cache"), "TMPDIR": str(self.root / "tmp")}

    def build(self, rootfs: Path, *args: str) -> dict:
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        result = pkglayer_json("build", rootfs, "-q", "--tls-verify=false", *args, env=self.env)
        assert os.listdir(self.root / "tmp") == [], "staging layout removed"
        return result


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory, registry: Registry, deb_upgrade_pair):
    pair = deb_upgrade_pair
    a, b = Host(tmp_path_factory.mktemp("host-a")), Host(tmp_path_factory.mktemp("host-b"))
    v1 = a.build(pair.old, "--output", registry.ref("fleet/app:1"))
    before = registry.blobs()
    v2 = b.build(pair.new, "--prior", registry.ref("fleet/app:1"), "--output", registry.ref("fleet/app:2"))
    after = registry.blobs()
    return pair, v1, v2, before, after


def test_second_host_uploads_only_changed_layers(registry: Registry, two_hosts) -> None:
    pair, v1, v2, before, after = two_hosts
    total = len(v2["layers"])
    written = [layer for layer in v2["layers"] if not layer["reused"]]
    # One package was upgraded: its layer, the package database and a few unowned files change.
    assert 1 <= len(written) <= 5, [layer["name"] for layer in written]
    assert v2["reused"] == total - len(written) and v2["written"] == len(written)
    upgraded = next(iter(pair.upgraded))
    assert any(upgraded in name for layer in written for name in layer["packages"]), (upgraded, written)
    # Reused layers are the first host's blobs, by digest; the second host never had them.
    v1_digests = {layer["digest"] for layer in v1["layers"]}
    assert all(layer["digest"] in v1_digests for layer in v2["layers"] if layer["reused"])

    # Registry side: new blobs are exactly the written layers, the config and the manifest.
    new = {d: s for d, s in after.items() if d not in before}
    manifest_raw = skopeo_inspect(registry.ref("fleet/app:2"), "--raw")
    config_digest = json.loads(manifest_raw)["config"]["digest"]
    assert set(new) == {layer["digest"] for layer in written} | {config_digest, v2["manifestDigest"]}
    push = v2["push"]
    assert push["uploadedBlobs"] == len(written) + 1 and push["skippedBlobs"] == total - len(written)
    assert push["uploadedBytes"] + len(manifest_raw) == sum(new.values())
    assert push["skippedBytes"] == sum(layer["size"] for layer in v2["layers"] if layer["reused"])
    full = sum(layer["size"] for layer in v2["layers"]) + new[config_digest] + len(manifest_raw)
    print(f"\none-package update ({upgraded}): uploaded {sum(new.values())} of {full} bytes "
          f"({100 * sum(new.values()) / full:.1f}%), {len(new)} blobs of {total + 2}; layers written: "
          + ", ".join(f"{layer['name']} ({layer['size']} B)" for layer in written))


def test_round_trip_keeps_manifest_digest_and_podman_runs(registry: Registry, two_hosts, podman_store) -> None:
    _, _, v2, _, _ = two_hosts
    ref = registry.ref("fleet/app:2")
    inspected = json.loads(skopeo_inspect(ref))
    assert inspected["Digest"] == v2["manifestDigest"] == v2["push"]["manifestDigest"]
    raw = skopeo_inspect(ref, "--raw")
    assert sha256_digest(raw) == v2["manifestDigest"]
    # The plan is in the config the registry serves.
    config = json.loads(skopeo_inspect(ref, "--config", "--raw"))
    plan = json.loads(config["config"]["Labels"][HISTORY_LABEL])
    assert [layer["digest"] for layer in plan["layers"]] == [layer["digest"] for layer in v2["layers"]]
    assert [h["comment"] for h in config["history"]] == [layer["name"] for layer in v2["layers"]]
    image_id = podman(podman_store, "pull", "--quiet", "--tls-verify=false", ref.replace("docker://", "")
                      ).strip().splitlines()[-1]
    out = podman(podman_store, "run", "--rm", image_id, "/bin/sh", "-c", "echo hello from the registry; id -u")
    assert out == "hello from the registry\n0\n"


def test_prior_from_registry_without_registry_output_plans_only(
    registry: Registry, two_hosts, tmp_path: Path
) -> None:
    """A third host writes a local layout with the plan from the registry: a complete
    layout (every layer written), and the same image as the second host's; pushing it
    uploads nothing."""
    pair, _, v2, _, _ = two_hosts
    host = Host(tmp_path / "host-c")
    layout = tmp_path / "layout"
    v2_local = host.build(pair.new, "--prior", registry.ref("fleet/app:1"), "--output", f"oci:{layout}:v2")
    assert v2_local["written"] == len(v2_local["layers"]) and v2_local["push"] is None
    assert v2_local["manifestDigest"] == v2["manifestDigest"]
    run(["skopeo", "copy", f"oci:{layout}:v2", f"dir:{tmp_path / 'dir'}"])  # every blob present and valid
    before = registry.blobs()
    pushed = pkglayer_json("push", f"oci:{layout}:v2", registry.ref("fleet/app:2-again"), "--tls-verify=false")
    assert pushed["manifestDigest"] == v2["manifestDigest"]
    assert pushed["uploadedBlobs"] == 0 and pushed["uploadedBytes"] == 0
    assert pushed["skippedBlobs"] == len(v2["layers"]) + 1
    assert registry.blobs() == before


def test_push_of_a_fresh_repository_reports_every_blob(registry: Registry, rechunked) -> None:
    layout, result = rechunked["single"]
    before = registry.blobs()
    pushed = pkglayer_json("push", f"oci:{layout}:r", registry.ref("pushed/single:r"), "--tls-verify=false")
    new = {d: s for d, s in registry.blobs().items() if d not in before}
    config_digest = json.loads(skopeo_inspect(registry.ref("pushed/single:r"), "--raw"))["config"]["digest"]
    assert pushed["manifestDigest"] == result["manifestDigest"]
    # Nothing was in this repository. (The registry stores a blob once: layers that another
    # repository already has are mounted, not stored again.)
    assert pushed["uploadedBlobs"] == len(result["layers"]) + 1 and pushed["skippedBlobs"] == 0
    assert set(new) <= {layer["digest"] for layer in result["layers"]} | {config_digest, result["manifestDigest"]}
    assert config_digest in new and result["manifestDigest"] in new
    # Pushed again under another tag: everything is there.
    again = pkglayer_json("push", f"oci:{layout}:r", registry.ref("pushed/single:again"), "--tls-verify=false")
    assert again["uploadedBlobs"] == 0 and again["skippedBlobs"] == len(result["layers"]) + 1


def test_prior_with_a_tampered_registry_label_is_refused(registry: Registry, two_hosts, tmp_path: Path) -> None:
    """The prior image's plan is untrusted input: a label that names other layers than
    the manifest is refused before anything is built."""
    pair, _, _, _, _ = two_hosts
    layout = tmp_path / "tampered"
    run(["skopeo", "copy", "--src-tls-verify=false", registry.ref("fleet/app:1"), f"oci:{layout}:t"])
    digest, manifest, config = layout_manifest(layout, "t")
    plan = json.loads(config["config"]["Labels"][HISTORY_LABEL])
    plan["layers"][0]["digest"], plan["layers"][1]["digest"] = plan["layers"][1]["digest"], plan["layers"][0]["digest"]
    config["config"]["Labels"][HISTORY_LABEL] = json.dumps(plan)
    run(["umoci", "config", "--image", f"{layout}:t", "--config.label",
         f"{HISTORY_LABEL}={json.dumps(plan, separators=(',', ':'))}"])
    run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:t", registry.ref("fleet/tampered:1")])
    proc = pkglayer("build", pair.new, "--prior", registry.ref("fleet/tampered:1"), "--tls-verify=false",
                    "--output", registry.ref("fleet/tampered:2"), check=False, env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 1
    assert "label org.pkglayer.history layer 0" in proc.stderr and "does not match the manifest" in proc.stderr
    assert proc.stderr.startswith("pkglayer: error: ")

