"""The Containerfile flows with this machine's real buildah and podman: the pkglayer tool
image (top-level Containerfile) and examples/package-layers, a build that layers its own
image by package and, rebuilt after a one-package change, writes and stores only the
layers that changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests import containers
from tests import rootfs_factory as factory
from tests.containers import REPO, Store
from tests.helpers import build_json, pkglayer_json, run

# The fixtures this module uses; pytest finds them by name here.
session_store = containers.session_store
debian_base = containers.debian_base
tool_image = containers.tool_image

EXAMPLE = REPO / "examples/package-layers/Containerfile"


def _layout_config(layout: Path, tag: str) -> tuple[str, dict]:
    """(manifest digest, config) of LAYOUT:TAG."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    manifest = json.loads((layout / "blobs/sha256" / desc["digest"].split(":")[1]).read_text())
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    return desc["digest"], config


def test_tool_image_layers_a_tree_like_the_host(
    session_store: Store, tool_image: str, rpm_rootfs: Path, tmp_path: Path
) -> None:
    """The documented `podman run ... pkglayer build` works in the tool image, reads an
    rpm database with the image's bindings, and gives the host's layers."""
    assert session_store.podman("run", "--rm", tool_image, "--version").startswith("pkglayer ")
    out = tmp_path / "out"
    out.mkdir()
    printed = session_store.podman(
        "run", "--rm", "-v", f"{rpm_rootfs}:/rootfs:ro", "-v", f"{out}:/out", tool_image,
        "build", "/rootfs", "--output", "oci:/out/image:1", "--json", "-q",
    )
    in_container = json.loads(printed)
    on_host = build_json(rpm_rootfs, "--output", f"oci:{tmp_path / 'host'}:1")
    assert len(in_container["layers"]) > 10
    assert [layer["diffID"] for layer in in_container["layers"]] == [
        layer["diffID"] for layer in on_host["layers"]
    ]
    packages = {p for layer in in_container["layers"] for p in layer["packages"]}
    assert "pkglayer-demo-1.0-1-noarch" in packages, sorted(packages)


# ------------------------------------------------------------------ the example


def _new_debs(tree: Path, base: Path) -> list[Path]:
    """The .debs apt downloaded into `tree` that `base` (which tree was derived from)
    does not have: what turned base into tree."""
    have = {p.name for p in (base / "var/cache/apt/archives").glob("*.deb")}
    return sorted(p for p in (tree / "var/cache/apt/archives").glob("*.deb") if p.name not in have)


@pytest.fixture(scope="module")
def flow_inputs(debian_base: str, deb_rootfs: Path, deb_upgrade_pair: factory.UpgradePair):
    """The .debs the first build installs (iputils-ping and libcap2-bin, whose postinst
    gives ping a file capability) and the .debs of one bookworm-security upgrade, which
    the second build adds, over the minbase image."""
    pair = deb_upgrade_pair
    install = _new_debs(deb_rootfs, pair.old)
    upgrade = _new_debs(pair.new, pair.old)
    assert {p.name.split("_")[0] for p in install} == {"iputils-ping", "libcap2-bin"}, install
    assert {p.name.split("_")[0] for p in upgrade} == set(pair.upgraded), upgrade
    return debian_base, install, upgrade, pair.upgraded


def _blobs(layers: Path, sub: str) -> set[str]:
    d = layers / sub / "blobs/sha256"
    return {f"sha256:{p.name}" for p in d.iterdir()} if d.is_dir() else set()


@pytest.mark.parametrize("tool", ["buildah", "podman"])
def test_containerfile_build_owns_its_layers(
    tool: str, session_store: Store, tool_image: str, flow_inputs, tmp_path: Path
) -> None:
    base, install, upgrade, upgraded = flow_inputs
    store = session_store
    ctx, layers = tmp_path / "ctx", tmp_path / "layers"
    (ctx / "debs").mkdir(parents=True)
    layers.mkdir()
    shutil.copy2(EXAMPLE, ctx / "Containerfile")
    for deb in install:
        shutil.copy2(deb, ctx / "debs" / deb.name)

    # The base image's config, as `podman image inspect` or `skopeo inspect --config` prints it.
    base_config = run(["skopeo", "inspect", "--config", base])

    def build(n: int) -> tuple[str, dict]:
        name = f"localhost/app-{tool}:{n}"
        # The build system's half of /layers: the previous image's blobs and plan as input.
        init = pkglayer_json("layers", "init", layers, "--from", f"oci:{layers}/image:latest")
        assert (init["image"] is None) == (n == 1), init
        store.build(
            # --layers=false: podman build caches RUN steps by default, and would skip
            # both RUNs of the second build (their text is unchanged).
            tool, ctx, "--layers=false", "--skip-unused-stages=false", "-v", f"{layers}:/layers",
            "--build-arg", f"BASE={base}", "--build-arg", f"PKGLAYER={tool_image}",
            "--build-arg", f"LAYERS={layers}", "--build-arg", f"BASE_CONFIG={base_config}", "-t", name,
            # Few layers: vfs copies the whole tree for each one.
            "--build-arg", "PKGLAYER_OPTIONS=--max-layers 12",
        )
        return name, json.loads((layers / "history.json").read_text())

    first, history1 = build(1)
    digests1 = [layer["digest"] for layer in history1["layers"]]
    assert _blobs(layers, "output") == set(digests1)

    for deb in upgrade:
        shutil.copy2(deb, ctx / "debs" / deb.name)
    second, history2 = build(2)
    digests2 = [layer["digest"] for layer in history2["layers"]]

    # The second build wrote exactly the layers whose content changed: the upgraded
    # package's and the top layers that follow every transaction.
    changed = [layer for layer in history2["layers"] if layer["digest"] not in set(digests1)]
    assert _blobs(layers, "output") == {layer["digest"] for layer in changed}
    for package, (_old, version) in upgraded.items():
        assert any(f"{package}-{version}-" in member for layer in changed for member in layer["packages"]), (
            package, [layer["packages"] for layer in changed])
    assert 1 <= len(changed) <= 4 < len(digests2), [layer["name"] for layer in changed]

    # In local storage: the image is pkglayer's (its manifest digest, the one podman
    # reports), and every layer but the changed ones keeps the first build's digest and
    # diff_id at the same place.
    layout_digest, layout_config = _layout_config(layers / "image", "latest")
    info1, info2 = store.inspect(first), store.inspect(second)
    assert info2["Digest"] == layout_digest
    m1 = store.manifest(f"{first.rsplit(':', 1)[0]}@{info1['Digest']}")
    m2 = store.manifest(f"{second.rsplit(':', 1)[0]}@{info2['Digest']}")
    assert [layer["digest"] for layer in m1["layers"]] == digests1
    assert [layer["digest"] for layer in m2["layers"]] == digests2
    diff1, diff2 = info1["RootFS"]["Layers"], info2["RootFS"]["Layers"]
    assert diff2 == layout_config["rootfs"]["diff_ids"]
    assert len(diff1) == len(diff2) == len(digests2)
    new = {layer["digest"] for layer in changed}
    for i, (d1, d2) in enumerate(zip(digests1, digests2)):
        if d2 not in new:
            assert (d1, diff1[i]) == (d2, diff2[i]), i
    assert sum(d not in new for d in digests2) == len(digests2) - len(changed)

    # The result runs: the upgrade is in, ping kept its capability through every
    # stage, the -v mount point did not reach the image, the label did.
    for package, (_old, version) in upgraded.items():
        got = store.podman("run", "--rm", second, "dpkg-query", "-W", "-f", "${Version}", package)
        assert got == version, package
    assert "cap_net_raw" in store.podman("run", "--rm", second, "getcap", "/usr/bin/ping")
    store.podman("run", "--rm", second, "sh", "-c", "test ! -e /layers")
    config = store.inspect(second)["Config"]
    assert config["Labels"]["org.opencontainers.image.title"] == "app"
    # The base image's config came through --config-from (its label and command).
    assert config["Labels"]["org.example.base"] == "bookworm" and config["Cmd"] == ["/bin/bash"]
