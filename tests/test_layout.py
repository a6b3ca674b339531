"""write_image against real OCI clients: oci-image-tool, umoci, skopeo."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib

import pytest

from pkglayer.blobstore import BlobDir
from pkglayer.errors import PkglayerError
from pkglayer.history import LayerRecord
from pkglayer.layout import LAYER_NAME, REF_NAME, ImageOptions, Platform, created_by, parse_layout_ref, write_image
from tests.helpers import read_blob, run, sha256_digest

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def make_layer(blobs: BlobDir, name: str, packages: tuple[str, ...], files: dict[str, bytes]) -> LayerRecord:
    """A small deterministic gzip layer written with tarfile + zlib, stored in `blobs`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({os.path.dirname(p) for p in files} - {""})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(files[path]), 0o644
            tar.addfile(info, io.BytesIO(files[path]))
    raw = buf.getvalue()
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    blob = compressor.compress(raw) + compressor.flush()
    digest, size = blobs.add_bytes(blob)
    return LayerRecord(
        name=name,
        packages=packages,
        content_key=sha256_digest(b"key:" + raw),
        digest=digest,
        diff_id=sha256_digest(raw),
        size=size,
        media_type=GZIP,
        compression="gzip-6",
    )


@pytest.fixture
def built(tmp_path):
    out = BlobDir(tmp_path / "output", create=True)
    layers = [
        make_layer(out, "base-files-12.4-amd64", ("base-files-12.4-amd64",), {"etc/os-release": b"ID=test\n"}),
        make_layer(out, "unowned", (), {"etc/hostname": b"box\n", "usr/bin/hello": b"#!/bin/sh\necho hi\n"}),
    ]
    config = (
        ImageOptions(env=["PATH=/usr/bin:/bin"], cmd=["/bin/sh"], labels={"org.example": "yes"}),
        Platform("amd64"),
        "1970-01-01T00:00:00Z",
    )
    return tmp_path, out, layers, config


def read_json(layout, digest: str) -> dict:
    return json.loads(read_blob(layout, digest))


def test_parse_oci_ref() -> None:
    assert parse_layout_ref("oci:out/img:v1", "latest") == ("out/img", "v1")
    assert parse_layout_ref("oci:/abs/dir", "latest") == ("/abs/dir", "latest")
    assert parse_layout_ref("oci:dir:a:b", "latest") == ("dir", "a:b")  # as skopeo splits it
    assert parse_layout_ref("oci:dir:quay.io/x/y:1.0", "latest") == ("dir", "quay.io/x/y:1.0")
    for bad in ["docker://x", "dir:x", "oci:", "oci::tag", "oci:dir:", "oci:dir:-bad", "oci:dir:a b", "oci:dir:a//b"]:
        with pytest.raises(PkglayerError):
            parse_layout_ref(bad, "latest")


def test_created_by() -> None:
    base = dict(content_key="sha256:" + "0" * 64, digest="sha256:" + "0" * 64, diff_id="sha256:" + "0" * 64,
                size=0, media_type=GZIP, compression="gzip-6")
    assert created_by(LayerRecord(name="bash-5.2", packages=("bash-5.2",), **base)) == "pkglayer: bash-5.2"
    assert created_by(LayerRecord(name="unowned", packages=(), **base)) == "pkglayer: files owned by no package"
    many = tuple(f"libpackage{i}-1.0-1-amd64" for i in range(40))
    text = created_by(LayerRecord(name="libpackage0-1.0-1-amd64+39", packages=many, **base))
    assert text.startswith("pkglayer: libpackage0-1.0-1-amd64, libpackage1-1.0-1-amd64, ")
    assert text.endswith(" more") and len(text) < 230
    shown = text.count(",") + 1
    assert text.endswith(f" and {40 - shown} more")


def test_write_image_structure(built) -> None:
    tmp_path, out, layers, config = built
    layout = tmp_path / "layout"
    result = write_image(layout, "v1", layers, *config, [out])

    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [result.manifest_digest]
    assert index["manifests"][0]["annotations"] == {REF_NAME: "v1"}
    assert index["manifests"][0]["size"] == result.manifest_size

    manifest = read_json(layout, result.manifest_digest)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["digest"] == result.config_digest
    assert [(d["digest"], d["size"], d["annotations"][LAYER_NAME]) for d in manifest["layers"]] == [
        (layer.digest, layer.size, layer.name) for layer in layers
    ]
    cfg = read_json(layout, result.config_digest)
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    assert cfg["history"] == [
        {"created_by": "pkglayer: base-files-12.4-amd64", "comment": "base-files-12.4-amd64",
         "created": "1970-01-01T00:00:00Z"},
        {"created_by": "pkglayer: files owned by no package", "comment": "unowned",
         "created": "1970-01-01T00:00:00Z"},
    ]
    assert cfg["config"] == {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], "Labels": {"org.example": "yes"}}
    assert "variant" not in cfg and cfg["architecture"] == "amd64" and cfg["os"] == "linux"
    # The layers were hard-linked from output/, not copied.
    assert os.stat(BlobDir(layout).path(layers[0].digest)).st_ino == os.stat(out.path(layers[0].digest)).st_ino


def test_real_clients_accept_the_image(built) -> None:
    tmp_path, out, layers, config = built
    layout = str(tmp_path / "layout")
    result = write_image(layout, "v1", layers, *config, [out])

    run(["oci-image-tool", "validate", "--type", "image", "--ref", "name=v1", layout])

    bundle = str(tmp_path / "bundle")
    run(["umoci", "unpack", "--image", f"{layout}:v1", bundle])
    rootfs = os.path.join(bundle, "rootfs")
    with open(os.path.join(rootfs, "etc/os-release"), "rb") as f:
        assert f.read() == b"ID=test\n"
    with open(os.path.join(rootfs, "usr/bin/hello"), "rb") as f:
        assert f.read() == b"#!/bin/sh\necho hi\n"
    assert os.path.isfile(os.path.join(rootfs, "etc/hostname"))

    inspect = json.loads(run(["skopeo", "inspect", f"oci:{layout}:v1"]))
    assert inspect["Digest"] == result.manifest_digest
    assert inspect["Layers"] == [layer.digest for layer in layers]
    assert inspect["Architecture"] == "amd64"

    copy_dir = str(tmp_path / "copy")
    run(["skopeo", "copy", "--quiet", f"oci:{layout}:v1", f"dir:{copy_dir}"])  # reads and checks every blob
    for layer in layers:
        assert os.path.isfile(os.path.join(copy_dir, layer.digest.split(":")[1]))


def test_deterministic_and_second_tag_keeps_first(built) -> None:
    tmp_path, out, layers, config = built
    first = write_image(tmp_path / "a", "v1", layers, *config, [out])
    again = write_image(tmp_path / "b", "v1", layers, *config, [out])
    assert again == first
    rewrite = write_image(tmp_path / "a", "v1", layers, *config, [out])  # same tag, same image: unchanged
    assert rewrite == first
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert len(index["manifests"]) == 1

    config2 = (ImageOptions(cmd=["/usr/bin/hello"]), Platform("amd64"), None)
    second = write_image(tmp_path / "a", "v2", layers[:1], *config2, [out])
    assert second.manifest_digest != first.manifest_digest
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [(m["annotations"][REF_NAME], m["digest"]) for m in index["manifests"]] == [
        ("v1", first.manifest_digest),
        ("v2", second.manifest_digest),
    ]
    layout = str(tmp_path / "a")
    assert json.loads(run(["skopeo", "inspect", f"oci:{layout}:v1"]))["Digest"] == first.manifest_digest
    assert json.loads(run(["skopeo", "inspect", f"oci:{layout}:v2"]))["Digest"] == second.manifest_digest

    # Retagging v1 replaces only v1, in place.
    third = write_image(tmp_path / "a", "v1", layers[1:], *config2, [out])
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [third.manifest_digest, second.manifest_digest]


def test_blob_sources_fallback_and_errors(built) -> None:
    tmp_path, out, layers, config = built
    # A corrupt copy in the first source is skipped in favour of a good one in the second.
    bad = BlobDir(tmp_path / "input", create=True)
    os.link(out.path(layers[1].digest), bad.path(layers[0].digest))
    result = write_image(tmp_path / "layout", "v1", layers, *config, [bad, out])
    assert BlobDir(tmp_path / "layout").verify(layers[0].digest)
    assert result.manifest_digest

    with pytest.raises(PkglayerError, match=r"layer base-files-12.4-amd64: blob sha256:\w+ not found in .*corrupt"):
        write_image(tmp_path / "other", "v1", layers, *config, [bad])
    empty = BlobDir(tmp_path / "empty", create=True)
    with pytest.raises(PkglayerError, match="layer base-files-12.4-amd64: blob .* not found in"):
        write_image(tmp_path / "other", "v1", layers, *config, [empty])

    wrong_size = LayerRecord(**{**layers[0].__dict__, "size": layers[0].size + 1})
    with pytest.raises(PkglayerError, match="history says"):
        write_image(tmp_path / "other", "v1", [wrong_size], *config, [out])


def test_refuses_to_clobber_a_broken_index(built) -> None:
    tmp_path, out, layers, config = built
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "index.json").write_text("not json")
    with pytest.raises(PkglayerError, match="refusing to overwrite"):
        write_image(layout, "v1", layers, *config, [out])
    assert (layout / "index.json").read_text() == "not json"


def test_variant_and_runtime_fields(built) -> None:
    tmp_path, out, layers, _ = built
    config = (ImageOptions(entrypoint=["/bin/sh", "-c"], workdir="/root", user="0:0"),
              Platform("arm64", "linux", "v8"), None)
    result = write_image(tmp_path / "layout", "arm", layers, *config, [out])
    cfg = read_json(tmp_path / "layout", result.config_digest)
    assert cfg["variant"] == "v8" and "created" not in cfg and "created" not in cfg["history"][0]
    assert cfg["config"] == {"Entrypoint": ["/bin/sh", "-c"], "WorkingDir": "/root", "User": "0:0"}
