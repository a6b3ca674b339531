"""Images in and out through every transport the containers tools know (skopeo, a private
containers-storage, podman load), --compression none, --config-from, and the build
system's half of the /layers protocol (`pkglayer layers init|assemble`).

The trees are small real dpkg roots: packages built with dpkg-deb in the test and
installed with `dpkg --root`, so that layers follow packages and an upgrade changes one.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from pkglayer.errors import PkglayerError
from pkglayer.transports import DOCKER_ARCHIVE, OCI, OCI_ARCHIVE, STORAGE, parse_image_ref
from tests.clients import podman, podman_argv
from tests.helpers import (
    PKGLAYER,
    deb_package,
    dpkg_install,
    dpkg_root,
    needs_root,
    pkglayer,
    pkglayer_json,
    run,
    sha256_digest,
)

pytestmark = needs_root("dpkg --root, containers-storage and --from")

PACKAGES = {
    # name -> {version: {path: content}}
    "pkglayer-tiny-a": {"1.0": {"usr/share/tiny-a/data": b"a" * 5000, "usr/bin/tiny-a": b"#!/bin/sh\n"}},
    "pkglayer-tiny-b": {"1.0": {"usr/share/tiny-b/data": b"b1" * 4000}, "1.1": {"usr/share/tiny-b/data": b"b2" * 4100}},
    "pkglayer-tiny-c": {"1.0": {"usr/lib/tiny-c/libc.so": b"c" * 9000}},
}


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    work = tmp_path_factory.mktemp("debs")
    return {(n, v): deb_package(work, n, v, files, source=n)
            for n, versions in PACKAGES.items() for v, files in versions.items()}


def tiny_root(path: Path, debs: dict[tuple[str, str], Path]) -> Path:
    """An empty root with a dpkg database and the three packages at 1.0 installed."""
    dpkg_root(path)
    for d in ("etc", "usr/bin"):
        (path / d).mkdir(parents=True, exist_ok=True)
    (path / "etc/hostname").write_text("tiny\n")
    dpkg_install(path, *(debs[(n, "1.0")] for n in PACKAGES))
    return path


def build_json(*args: str) -> dict:
    return pkglayer_json("build", "--no-hash-cache", *args)


def store(tmp: Path) -> str:
    """A private vfs containers-storage (graph root and run root under `tmp`)."""
    return f"containers-storage:[vfs@{tmp / 'store'}+{tmp / 'run'}]"


def storage_inspect(ref: str) -> dict:
    return json.loads(run(["skopeo", "inspect", ref]))


def storage_config(ref: str) -> dict:
    return json.loads(run(["skopeo", "inspect", "--config", ref]))


def by_package(result: dict) -> dict[str, str]:
    """package name -> the digest of the layer holding it (top layers by their name)."""
    out = {}
    for layer in result["layers"]:
        for key in layer["packages"] or [layer["name"]]:
            out[key.split("-1.")[0]] = layer["digest"]
    return out


# ------------------------------------------------------------------ references


def test_references_of_every_transport_parse_and_others_are_refused() -> None:
    r = parse_image_ref("containers-storage:[overlay@/var/lib/x+/run/x:opt=1]localhost/app:v2")
    assert (r.transport, r.store_root, r.tag) == (STORAGE, "/var/lib/x", "v2")
    assert parse_image_ref("containers-storage:localhost/app").tag is None
    assert parse_image_ref("oci-archive:-").is_stdout
    a = parse_image_ref("oci-archive:/tmp/a.tar:localhost/a:1")
    assert (a.transport, a.path, a.tag) == (OCI_ARCHIVE, "/tmp/a.tar", "localhost/a:1")
    d = parse_image_ref("docker-archive:/tmp/d.tar:app:1")
    assert (d.transport, d.path, d.tag) == (DOCKER_ARCHIVE, "/tmp/d.tar", "app:1")
    assert parse_image_ref("oci:dir:t").transport == OCI
    for bad, why in (("dir:/tmp/x", "unknown transport"), ("/tmp/layout", "unknown transport"),
                     ("containers-storage:", "no image name"), ("containers-storage:[vfs@/x+/y]", "no image name"),
                     ("oci-archive:", "no archive path"), ("oci-archive:/a.tar:bad tag", "not a valid OCI ref")):
        with pytest.raises(PkglayerError, match=why):
            parse_image_ref(bad)


def test_bad_references_are_one_line_errors_and_write_nothing(tmp_path: Path, debs) -> None:
    root = tiny_root(tmp_path / "root", debs)
    not_an_archive = tmp_path / "junk.tar"
    not_an_archive.write_bytes(os.urandom(3000))
    out = tmp_path / "out"
    cases = [
        (["build", str(root), "--output", "ftp://x/y"], "unknown transport"),
        (["build", "--from", "containers-storage:[vfs@/nonexistent/store+/nonexistent/run]x", "--output", f"oci:{out}"],
         "the store /nonexistent/store does not exist"),
        (["build", "--from", f"oci-archive:{not_an_archive}", "--output", f"oci:{out}"], "skopeo failed"),
        (["build", "--from", f"docker-archive:{tmp_path}/missing.tar", "--output", f"oci:{out}"], "does not exist"),
        (["build", str(root), "--output", "oci-archive:-", "--json"], "both want standard output"),
        (["layers", "assemble", str(tmp_path / "nothing"), "--output", f"oci:{out}"], "nothing to assemble"),
    ]
    for args, message in cases:
        proc = pkglayer(*args, check=False)
        err = proc.stderr
        assert proc.returncode == 1, (args, err)
        assert err.startswith("pkglayer: error:") and message in err and err.count("\n") == 1, (args, err)
        assert not out.exists()


# ------------------------------------------------------------ containers-storage


def test_rechunking_local_storage_into_local_storage_keeps_unchanged_layers(tmp_path: Path, debs) -> None:
    """The everyday case: an image in local storage rechunked back into it. After a
    package upgrade, only that package's layer and the top layers change; every other
    layer keeps its digest, and is neither written nor copied again."""
    root = tiny_root(tmp_path / "root", debs)
    s = store(tmp_path)
    app, layered = f"{s}localhost/app:latest", f"{s}localhost/app:layered"
    build_json(str(root), "--output", app)  # the "application image" as a build would leave it

    first = build_json("--from", app, "--output", layered)
    assert first["written"] == len(first["layers"]) and first["published"] == [layered]
    stored = storage_inspect(layered)
    assert stored["Layers"] == [layer["digest"] for layer in first["layers"]]

    dpkg_install(root, debs[("pkglayer-tiny-b", "1.1")])
    build_json(str(root), "--output", app)
    second = build_json("--from", app, "--output", layered)
    before, after = by_package(first), by_package(second)
    changed = {name for name in after if before.get(name) != after[name]}
    assert "pkglayer-tiny-b" in changed and changed <= {"pkglayer-tiny-b", "unowned", "modified", "pkgdb"}, changed
    unchanged = [layer for layer in second["layers"] if layer["digest"] in before.values()]
    assert unchanged and all(layer["reused"] for layer in unchanged)
    assert second["written"] == len(second["layers"]) - len(unchanged)
    # Reused from the store itself: no local blob was needed, nor copied again.
    assert sorted(second["externalBlobs"]) == sorted(layer["digest"] for layer in unchanged)
    stored = storage_inspect(layered)
    assert stored["Layers"] == [layer["digest"] for layer in second["layers"]]
    label = json.loads(storage_config(layered)["config"]["Labels"]["org.pkglayer.history"])
    assert [rec["digest"] for rec in label["layers"]] == stored["Layers"]
    assert label["components"]["pkglayer-tiny-b"]["changes"] == 1


def test_compression_none_layers_are_uncompressed_and_reused(tmp_path: Path, debs) -> None:
    root = tiny_root(tmp_path / "root", debs)
    s = store(tmp_path)
    first = build_json(str(root), "--compression", "none", "--output", f"{s}localhost/raw:1")
    for layer in first["layers"]:
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
        assert layer["digest"] == layer["diffID"]
    again = build_json(str(root), "--compression", "none", "--output", f"{s}localhost/raw:1")
    assert again["written"] == 0 and [x["digest"] for x in again["layers"]] == [x["digest"] for x in first["layers"]]
    # The layers round-trip through local storage unchanged: a /layers init takes them all.
    layers = tmp_path / "layers"
    init = pkglayer_json("layers", "init", str(layers), "--from", f"{s}localhost/raw:1")
    assert init["blobs"] == init["layers"] == len(first["layers"]) and init["fromPlanLabel"]
    rebuilt = build_json(str(root), "--compression", "none", "--layers", str(layers))
    assert rebuilt["written"] == 0


# ------------------------------------------------------------------ archives


def test_oci_archive_on_standard_output_loads_into_podman(tmp_path: Path, debs, podman_store: Path) -> None:
    root = tiny_root(tmp_path / "root", debs)
    to_stdout = ("build", str(root), "--no-hash-cache", "-q", "--output", "oci-archive:-:localhost/tiny:v1")
    archive = pkglayer(*to_stdout, binary=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert {"oci-layout", "index.json"} <= set(tar.getnames())
    # The same image gives the same archive, byte for byte.
    assert hashlib.sha256(pkglayer(*to_stdout, binary=True).stdout).digest() == hashlib.sha256(archive).digest()
    pipeline = f"{shlex.join([*PKGLAYER, *to_stdout])} | {shlex.join(podman_argv(podman_store))} load"
    loaded = subprocess.run(["sh", "-c", pipeline], capture_output=True, check=False)
    assert loaded.returncode == 0, loaded.stderr.decode()
    assert b"localhost/tiny:v1" in loaded.stdout
    inspect = json.loads(podman(podman_store, "image", "inspect", "localhost/tiny:v1"))[0]
    assert "org.pkglayer.history" in inspect["Labels"]
    assert len(inspect["RootFS"]["Layers"]) == len(json.loads(inspect["Labels"]["org.pkglayer.history"])["layers"])


def test_archives_round_trip_as_outputs_and_sources(tmp_path: Path, debs) -> None:
    root = tiny_root(tmp_path / "root", debs)
    oci_tar, docker_tar = tmp_path / "image.oci.tar", tmp_path / "image.docker.tar"
    first = build_json(str(root), "--output", f"oci-archive:{oci_tar}:v1", "--output",
                       f"docker-archive:{docker_tar}:localhost/tiny:v1")
    assert oci_tar.is_file() and docker_tar.is_file()
    assert not list(tmp_path.glob(".*pkglayer-tmp"))
    keys = [x["contentKey"] for x in first["layers"]]
    for source in (f"oci-archive:{oci_tar}:v1", f"docker-archive:{docker_tar}"):
        rechunked = build_json("--from", source, "--output", f"oci:{tmp_path}/re:latest")
        assert [x["contentKey"] for x in rechunked["layers"]] == keys, source
    # Writing over an existing archive reuses its layers (its earlier image).
    again = build_json(str(root), "--output", f"oci-archive:{oci_tar}:v1")
    assert again["written"] == 0


# ------------------------------------------------------------------ image config


def test_config_from_an_inspect_file_or_an_image_and_label_removal(tmp_path: Path, debs) -> None:
    root = tiny_root(tmp_path / "root", debs)
    inspect = [{"Id": "x", "Config": {"Env": ["PATH=/bin", "APP=1"], "Cmd": ["/app"], "WorkingDir": "/srv",
                                      "Labels": {"containers.bootc": "1", "keep": "k", "drop": "d"},
                                      "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGINT", "User": "app"}}]
    (tmp_path / "inspect.json").write_text(json.dumps(inspect))
    out = tmp_path / "img"
    build_json(str(root), "--output", f"oci:{out}:a", "--config-from", str(tmp_path / "inspect.json"),
               "--label", "drop-", "--label", "new=n", "--env", "APP=2")
    config = json.loads(run(["skopeo", "inspect", "--config", f"oci:{out}:a"]))["config"]
    assert config["Env"] == ["PATH=/bin", "APP=2"] and config["Cmd"] == ["/app"] and config["WorkingDir"] == "/srv"
    assert config["ExposedPorts"] == {"80/tcp": {}} and config["StopSignal"] == "SIGINT" and config["User"] == "app"
    labels = config["Labels"]
    assert labels["containers.bootc"] == "1" and labels["keep"] == "k" and labels["new"] == "n"
    assert "drop" not in labels and "org.pkglayer.history" in labels
    # From an image (any transport): the image just written.
    build_json(str(root), "--output", f"oci:{out}:b", "--config-from", f"oci:{out}:a")
    assert json.loads(run(["skopeo", "inspect", "--config", f"oci:{out}:b"]))["config"]["Cmd"] == ["/app"]


# ------------------------------------------------------------ /layers, both halves


def _app_layer(tmp_path: Path) -> tuple[bytes, str, str]:
    """A producer's own layer: a gzip'd tar of an application directory."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("opt/app/run.sh", b"#!/bin/sh\necho app\n"), ("opt/app/VERSION", b"1.0\n")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o755
            tar.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    blob = gzip.compress(raw, mtime=0)
    return blob, sha256_digest(blob), sha256_digest(raw)


def test_assemble_takes_a_layer_from_another_producer(tmp_path: Path, debs) -> None:
    root = tiny_root(tmp_path / "root", debs)
    layers = tmp_path / "layers"
    build_json(str(root), "--layers", str(layers))
    # A producer that is not pkglayer appends a layer of its own, as docs/history-json.md says.
    blob, digest, diff_id = _app_layer(tmp_path)
    (layers / "output/blobs/sha256" / digest[7:]).write_bytes(blob)
    history = json.loads((layers / "history.json").read_text())
    history["layers"].append({"name": "app-1.0", "packages": [], "contentKey": diff_id, "digest": digest,
                              "diffID": diff_id, "size": len(blob), "compression": "gzip",
                              "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"})
    (layers / "history.json").write_text(json.dumps(history))

    out = tmp_path / "out"
    proc = pkglayer("layers", "assemble", str(layers), "--output", f"oci:{out}:v1", "--json", "--label", "a=b")
    assert json.loads(proc.stdout)["layers"] == len(history["layers"])
    unpacked = tmp_path / "unpacked"
    run(["umoci", "unpack", "--image", f"{out}:v1", str(unpacked)])
    assert (unpacked / "rootfs/opt/app/run.sh").read_bytes() == b"#!/bin/sh\necho app\n"
    assert (unpacked / "rootfs/usr/share/tiny-b/data").read_bytes() == b"b1" * 4000

    # The next build system run seeds input/ from that image: copies, never links into it.
    layers2 = tmp_path / "layers2"
    init = pkglayer_json("layers", "init", str(layers2), "--from", f"oci:{out}:v1")
    assert init["fromPlanLabel"] and init["blobs"] == init["layers"] == len(history["layers"])
    for blob_path in (layers2 / "input/blobs/sha256").iterdir():
        published = out / "blobs/sha256" / blob_path.name
        assert os.stat(blob_path).st_ino != os.stat(published).st_ino
    again = build_json(str(root), "--layers", str(layers2))
    assert again["written"] == 0

    # A history naming a blob that is not there: one line naming the layer, nothing written.
    (layers / "output/blobs/sha256" / digest[7:]).unlink()
    out2 = tmp_path / "out2"
    proc = pkglayer("layers", "assemble", str(layers), "--output", f"oci:{out2}", check=False)
    assert proc.returncode == 1 and "layer app-1.0: blob" in proc.stderr and not out2.exists()
    # A blob whose uncompressed content is not its diffID.
    (layers / "output/blobs/sha256" / digest[7:]).write_bytes(blob)
    history["layers"][-1]["diffID"] = "sha256:" + "0" * 64
    (layers / "history.json").write_text(json.dumps(history))
    proc = pkglayer("layers", "assemble", str(layers), "--output", f"oci:{out2}", check=False)
    assert proc.returncode == 1 and "diffID" in proc.stderr and not out2.exists()


def _foreign_image(tmp_path: Path) -> Path:
    """An OCI layout tagged v1 that umoci made: one layer, /etc/hello, made by "COPY"."""
    layout = tmp_path / "foreign"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:v1"])
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    (content / "etc/hello").write_text("hello\n")
    run(["umoci", "insert", "--history.created_by", "COPY hello /etc/hello", "--image", f"{layout}:v1",
         str(content / "etc/hello"), "/etc/hello"])
    return layout


def test_the_platform_variant_goes_through_layers_assemble_and_init(tmp_path: Path) -> None:
    from pkglayer.layout import open_layout

    layout = _foreign_image(tmp_path)
    layers = tmp_path / "layers"
    pkglayer_json("layers", "init", str(layers), "--from", f"oci:{layout}:v1")
    history = json.loads((layers / "history.json").read_text())
    assert "variant" not in history  # umoci's image has none
    history["variant"] = "v3"  # as for an x86-64-v3 build
    (layers / "history.json").write_text(json.dumps(history))
    out = tmp_path / "out"
    pkglayer("layers", "assemble", str(layers), "--output", f"oci:{out}:v1")
    image = open_layout(str(out), "v1")
    assert (image.architecture, image.variant) == (history["architecture"], "v3")
    # And back: the next build system run starts from a history with the same platform.
    layers2 = tmp_path / "layers2"
    pkglayer_json("layers", "init", str(layers2), "--from", f"oci:{out}:v1")
    assert json.loads((layers2 / "history.json").read_text())["variant"] == "v3"


def test_init_from_an_image_pkglayer_did_not_write_and_from_no_image(tmp_path: Path) -> None:
    layout = _foreign_image(tmp_path)
    layers = tmp_path / "layers"
    init = pkglayer_json("layers", "init", str(layers), "--from", f"oci:{layout}:v1")
    assert not init["fromPlanLabel"] and init["layers"] == init["blobs"] == 1
    history = json.loads((layers / "history.json").read_text())
    assert history["layers"][0]["name"] == "000-COPY-hello-etc-hello"
    assert history["layers"][0]["compression"] == "gzip"
    out = tmp_path / "out"
    pkglayer("layers", "assemble", str(layers), "--output", f"oci:{out}")
    assert (out / "index.json").exists()

    empty = tmp_path / "first"
    proc = pkglayer("layers", "init", str(empty), "--from", f"oci:{tmp_path}/none:v1")
    assert proc.returncode == 0 and "first build" in proc.stdout
    assert not (empty / "history.json").exists() and (empty / "input").is_dir()
    shutil.rmtree(empty)
