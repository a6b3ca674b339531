"""Images written by pkglayer, read back by real third-party clients: umoci, oci-image-tool,
podman (containers-storage), skopeo and a distribution registry.

Slow (podman's vfs driver copies every layer: about a minute per image) and needs root.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from tests.clients import Coverage, Registry, compare_trees, podman, snapshot, umoci_unpack
from tests.helpers import (
    CAPABILITY_XATTR,
    build_json,
    layout_manifest,
    needs_root,
    pkglayer_json,
    read_blob,
    run,
    sha256_digest,
)

pytestmark = needs_root("umoci without --rootless and podman")

HELLO = "/bin/sh -c 'echo hello from pkglayer; id -u'"
GZIP_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_MT = "application/vnd.oci.image.layer.v1.tar+zstd"


@dataclass(frozen=True)
class Image:
    rootfs: Path
    layout: Path
    tag: str
    result: dict  # pkglayer build --json

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


# ------------------------------------------------------------------ helpers


def manifest(image: Image) -> dict:
    return layout_manifest(image.layout, image.tag)[1]


def config(image: Image) -> dict:
    return layout_manifest(image.layout, image.tag)[2]


def units(data: bytes, zstd: bool = False) -> int:
    """How many gzip members (or zstd frames) follow one another in data."""
    count = 0
    while data:
        d = zstandard.ZstdDecompressor().decompressobj() if zstd else zlib.decompressobj(31)
        d.decompress(data)
        assert d.eof, "truncated gzip member or zstd frame"
        data, count = d.unused_data, count + 1
    return count


def _build(tmp_path_factory: pytest.TempPathFactory, rootfs: Path, name: str, *args: str) -> Image:
    layout = tmp_path_factory.mktemp(name) / "layout"
    result = build_json(rootfs, "--output", f"oci:{layout}:{name}", *args)
    return Image(rootfs, layout, name, result)


# ------------------------------------------------------------------ images (built once per module)


@pytest.fixture(scope="module")
def deb_image(tmp_path_factory: pytest.TempPathFactory, deb_rootfs: Path) -> Image:
    return _build(tmp_path_factory, deb_rootfs, "deb")


@pytest.fixture(scope="module")
def rpm_image(tmp_path_factory: pytest.TempPathFactory, rpm_rootfs: Path) -> Image:
    return _build(tmp_path_factory, rpm_rootfs, "rpm")


@pytest.fixture(scope="module")
def deb_zstd_image(tmp_path_factory: pytest.TempPathFactory, deb_rootfs: Path) -> Image:
    return _build(tmp_path_factory, deb_rootfs, "deb-zstd", "--compression", "zstd")


@pytest.fixture(scope="module")
def pulled(shared_podman_store: Path) -> dict[str, str]:
    """Image IDs already pulled into the shared podman storage, by image ref."""
    return {}


def pull(store: Path, image: Image, cache: dict[str, str] | None = None) -> str:
    """`podman pull oci:LAYOUT:TAG` into store; the image ID."""
    if cache is not None and image.ref in cache:
        return cache[image.ref]
    image_id = podman(store, "pull", "--quiet", image.ref).strip().splitlines()[-1]
    assert image_id, "podman pull printed no image ID"
    if cache is not None:
        cache[image.ref] = image_id
    return image_id


def mounted_capability(store: Path, image_id: str, path: str) -> bytes:
    """security.capability of PATH as podman's storage holds it in a container of the
    image (vfs: `podman mount` returns the container's root directory)."""
    cid = podman(store, "create", image_id, "/bin/true").strip()
    try:
        root = podman(store, "mount", cid).strip()
        try:
            return os.getxattr(os.path.join(root, path), CAPABILITY_XATTR, follow_symlinks=False)
        finally:
            podman(store, "unmount", cid)
    finally:
        podman(store, "rm", "--force", cid)


# ------------------------------------------------------------------ umoci round trip


def _round_trip(image: Image, tmp_path: Path) -> tuple[list[str], Coverage, dict]:
    summary = pkglayer_json("scan", image.rootfs)
    exclude = [*summary["excluded"], *(item["path"] for item in summary["skipped"])]
    unpacked = umoci_unpack(image.layout, image.tag, tmp_path / "bundle")
    coverage = Coverage()
    diffs = compare_trees(image.rootfs, unpacked, exclude, coverage)
    return diffs, coverage, summary


def _special_files(root: Path, exclude: list[str]) -> int:
    return sum(n.kind in ("chr", "blk", "fifo") for n in snapshot(root, exclude).values())


def test_umoci_round_trip_deb(deb_image: Image, tmp_path: Path) -> None:
    diffs, cov, summary = _round_trip(deb_image, tmp_path)
    assert diffs == [], "\n".join(diffs[:100])
    # The comparison really looked at every kind of thing it claims to check.
    assert summary["excluded"], "the default exclusions should hit apt's cache and lists"
    assert cov.files > 1000 and cov.symlinks > 0
    assert "usr/bin/ping" in cov.capabilities
    assert cov.setuid, "minbase has setuid binaries (su, passwd, mount)"
    assert cov.hardlink_sets, "minbase has hard links (gunzip/uncompress, perl)"
    assert cov.devices >= 1
    assert cov.devices + cov.fifos == _special_files(deb_image.rootfs, summary["excluded"])


def test_umoci_round_trip_rpm(rpm_image: Image, tmp_path: Path) -> None:
    diffs, cov, summary = _round_trip(rpm_image, tmp_path)
    assert diffs == [], "\n".join(diffs[:100])
    assert cov.files > 1000 and cov.symlinks > 0
    assert "usr/bin/pkglayer-ping" in cov.capabilities  # %caps in pkglayer-demo.spec
    assert frozenset(
        {"usr/share/pkglayer-demo/hardlink-a", "usr/share/pkglayer-demo/hardlink-b"}
    ) in cov.hardlink_sets
    # Whatever device nodes or FIFOs the tree has were compared.
    assert cov.devices + cov.fifos == _special_files(rpm_image.rootfs, summary["excluded"])


# ------------------------------------------------------------------ oci-image-tool


@pytest.mark.parametrize("which", ["deb_image", "rpm_image"])
def test_oci_image_tool_validates(which: str, request: pytest.FixtureRequest) -> None:
    image: Image = request.getfixturevalue(which)
    assert {layer["mediaType"] for layer in manifest(image)["layers"]} == {GZIP_MT}
    out = run(["oci-image-tool", "validate", "--type", "image", "--ref", f"name={image.tag}", image.layout])
    assert "validation succeeded" in out.lower(), out


# ------------------------------------------------------------------ image config


@pytest.mark.parametrize("which", ["deb_image", "rpm_image"])
def test_image_config(which: str, request: pytest.FixtureRequest) -> None:
    image: Image = request.getfixturevalue(which)
    man, cfg = manifest(image), config(image)
    layers, history, diff_ids = man["layers"], cfg["history"], cfg["rootfs"]["diff_ids"]
    assert cfg["architecture"] == "amd64" and cfg["os"] == "linux"
    assert cfg["rootfs"]["type"] == "layers"
    assert len(layers) == len(diff_ids) == len(history) == len(image.result["layers"]) > 2
    assert not any(h.get("empty_layer") for h in history)
    # Layer i of the manifest is the one the CLI reported as layer i, and its history
    # entry names the packages it holds.
    package_layers = members = 0
    for desc, diff_id, hist, reported in zip(layers, diff_ids, history, image.result["layers"]):
        assert desc["digest"] == reported["digest"] and diff_id == reported["diffID"]
        listed = [p for p in reported["packages"] if p in hist["created_by"]]
        unlisted = len(reported["packages"]) - len(listed)
        # long lists are cut short: "pkglayer: a, b, c and 5 more"
        assert listed == reported["packages"][: len(listed)] and listed or not reported["packages"]
        if unlisted:
            assert hist["created_by"].endswith(f" and {unlisted} more"), hist
        package_layers += bool(reported["packages"])
        # diff_id is the sha256 of the uncompressed tar, the descriptor's digest that of the blob.
        data = read_blob(image.layout, desc["digest"])
        assert sha256_digest(data) == desc["digest"] and len(data) == desc["size"]
        assert sha256_digest(gzip.decompress(data)) == diff_id
        members = max(members, units(data))
    # Large layers are several gzip members (pkglayer/compress.py): every client in this
    # module must read them as one stream.
    assert members > 1
    assert package_layers >= len(layers) - 3, "nearly every layer should be one package's"
    packages = {p["key"] for p in pkglayer_json("scan", image.rootfs)["packages"]}
    named = {p for r in image.result["layers"] for p in r["packages"]}
    assert named == packages


# ------------------------------------------------------------------ podman


def test_podman_runs_deb_image(shared_podman_store: Path, pulled: dict[str, str], deb_image: Image) -> None:
    image_id = pull(shared_podman_store, deb_image, pulled)
    out = podman(shared_podman_store, "run", "--rm", image_id, "/bin/sh", "-c", "echo hello from pkglayer; id -u")
    assert out == "hello from pkglayer\n0\n"


def test_podman_keeps_ping_capability(
    shared_podman_store: Path, pulled: dict[str, str], deb_image: Image
) -> None:
    want = os.getxattr(deb_image.rootfs / "usr/bin/ping", CAPABILITY_XATTR, follow_symlinks=False)
    image_id = pull(shared_podman_store, deb_image, pulled)
    # Inside the container, with the image's own getcap (libcap2-bin, a dependency of iputils-ping) ...
    out = podman(shared_podman_store, "run", "--rm", image_id, "/usr/sbin/getcap", "/usr/bin/ping")
    assert "cap_net_raw" in out, out
    # ... and byte for byte in podman's storage.
    assert mounted_capability(shared_podman_store, image_id, "usr/bin/ping") == want


def test_podman_runs_rpm_image(shared_podman_store: Path, pulled: dict[str, str], rpm_image: Image) -> None:
    assert stat.S_ISREG((rpm_image.rootfs / "usr/bin/dash").stat().st_mode)
    image_id = pull(shared_podman_store, rpm_image, pulled)
    out = podman(
        shared_podman_store, "run", "--rm", image_id,
        "/bin/sh", "-c", "echo hello from pkglayer; id -u; /usr/bin/pkglayer-ping",
    )
    assert out == "hello from pkglayer\n0\npkglayer-demo ping\n"
    want = os.getxattr(rpm_image.rootfs / "usr/bin/pkglayer-ping", CAPABILITY_XATTR, follow_symlinks=False)
    assert mounted_capability(shared_podman_store, image_id, "usr/bin/pkglayer-ping") == want


def test_podman_runs_zstd_image(podman_store: Path, deb_zstd_image: Image) -> None:
    # A fresh storage: no gzip twin of these layers to reuse, so podman must decompress zstd.
    assert {layer["mediaType"] for layer in manifest(deb_zstd_image)["layers"]} == {ZSTD_MT}
    assert {r["mediaType"] for r in deb_zstd_image.result["layers"]} == {ZSTD_MT}
    # Large layers are several zstd frames (pkglayer/compress.py): podman must read them all.
    layers = manifest(deb_zstd_image)["layers"]
    frames = [units(read_blob(deb_zstd_image.layout, d["digest"]), zstd=True) for d in layers]
    assert max(frames) > 1
    image_id = pull(podman_store, deb_zstd_image)
    out = podman(podman_store, "run", "--rm", image_id, "/bin/sh", "-c", "echo hello from pkglayer; id -u")
    assert out == "hello from pkglayer\n0\n"
    want = os.getxattr(deb_zstd_image.rootfs / "usr/bin/ping", CAPABILITY_XATTR, follow_symlinks=False)
    assert mounted_capability(podman_store, image_id, "usr/bin/ping") == want


def test_zstd_and_gzip_layers_have_same_diff_ids(deb_image: Image, deb_zstd_image: Image) -> None:
    # Same rootfs, same tars: only the compression differs.
    assert config(deb_zstd_image)["rootfs"] == config(deb_image)["rootfs"]
    assert [r["diffID"] for r in deb_zstd_image.result["layers"]] == [
        r["diffID"] for r in deb_image.result["layers"]
    ]
    assert layout_manifest(deb_zstd_image.layout, deb_zstd_image.tag)[0] != layout_manifest(
        deb_image.layout, deb_image.tag
    )[0]


# ------------------------------------------------------------------ skopeo and a registry


def _registry_round_trip(image: Image, registry: Registry, repo: str, tmp_path: Path) -> None:
    """Push image to the registry and pull it back into a new layout; the manifest
    digest must be the build's on every side."""
    built = image.result["manifestDigest"]
    assert built == layout_manifest(image.layout, image.tag)[0]
    remote = registry.ref(f"{repo}:{image.tag}")
    run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false", image.ref, remote])
    raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false", remote]).encode()
    assert sha256_digest(raw) == built
    assert raw == read_blob(image.layout, built), "the registry should serve the manifest bytes pushed"
    inspected = json.loads(run(["skopeo", "inspect", "--tls-verify=false", remote]))
    assert inspected["Digest"] == built

    back = tmp_path / "back"
    run(["skopeo", "copy", "--preserve-digests", "--src-tls-verify=false", remote, f"oci:{back}:{image.tag}"])
    assert layout_manifest(back, image.tag)[0] == built
    man = json.loads(read_blob(back, built))
    assert man["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    # Every blob came back byte-identical (skopeo verifies digests as it copies).
    for desc in [man["config"], *man["layers"]]:
        assert read_blob(back, desc["digest"]) == read_blob(image.layout, desc["digest"])
    raw_back = run(["skopeo", "inspect", "--raw", f"oci:{back}:{image.tag}"]).encode()
    assert sha256_digest(raw_back) == built


def test_skopeo_registry_round_trip_gzip(deb_image: Image, registry: Registry, tmp_path: Path) -> None:
    _registry_round_trip(deb_image, registry, "pkglayer/deb", tmp_path)


@pytest.mark.parametrize("which", ["deb_image", "deb_zstd_image"])
def test_skopeo_decompresses_multi_unit_layers(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # containers/image's own gzip and zstd readers, not just digest checks: each
    # decompressed layer must be the whole tar the config names (a reader that stopped
    # after the first gzip member or zstd frame would give a different diff_id).
    image: Image = request.getfixturevalue(which)
    run(["skopeo", "copy", "--dest-decompress", image.ref, f"dir:{tmp_path / 'dir'}"])
    man = json.loads((tmp_path / "dir" / "manifest.json").read_bytes())
    got = [sha256_digest((tmp_path / "dir" / d["digest"].split(":", 1)[1]).read_bytes()) for d in man["layers"]]
    assert got == config(image)["rootfs"]["diff_ids"]


def test_skopeo_registry_round_trip_zstd(deb_zstd_image: Image, registry: Registry, tmp_path: Path) -> None:
    _registry_round_trip(deb_zstd_image, registry, "pkglayer/deb-zstd", tmp_path)
    # skopeo also reads every zstd blob into a dir: transport, checking each digest.
    run(["skopeo", "copy", "--preserve-digests", deb_zstd_image.ref, f"dir:{tmp_path / 'dir'}"])
    layers = manifest(deb_zstd_image)["layers"]
    assert {layer["mediaType"] for layer in layers} == {ZSTD_MT}
    for desc in layers:
        assert (tmp_path / "dir" / desc["digest"].split(":", 1)[1]).stat().st_size == desc["size"]
