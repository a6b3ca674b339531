"""Write an OCI image layout (image-spec v1.1) from layer blobs that already exist.

The layers are pkglayer's LayerRecords; their blobs are imported (hard link or copy,
always verified) from the first BlobDir that has them. The config and manifest are
serialised canonically, so the same layers and config always give the same manifest
digest. `index.json` is updated like skopeo does: the manifest with the same ref name is
replaced, others are kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from .blobstore import BlobDir, write_file_atomic
from .errors import HistoryError, PkglayerError
from .history import MEDIA_TYPES, NAME_RE, ComponentRecord, LayerRecord, checked_annotations, parse_history

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
LAYER_NAME = "org.pkglayer.layer.name"
CONTENT_KEY = "org.pkglayer.content-key"
COMPRESSION = "org.pkglayer.compression"
# space-separated package keys and planner components of a layer: the prior plan
# when a build writes over its own earlier image
LAYER_PACKAGES = "org.pkglayer.layer.packages"
LAYER_COMPONENTS = "org.pkglayer.layer.components"
# The build's plan (its history.json, compact) as a config label: layer annotations are
# dropped by some tools (Docker v2s2, buildah), the config travels with every copy.
HISTORY_LABEL = "org.pkglayer.history"
OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
MAX_INDEX_BYTES = 64 << 20

# Ref names as the image-spec annotation grammar (and skopeo's oci: transport) define them.
_ALNUM = r"[A-Za-z0-9]+"
_COMPONENT = rf"{_ALNUM}(?:(?:[-._:@+]|--){_ALNUM})*"
REF_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")

# Top layers have no packages; say what they hold.
_TOP_LAYER_DESCRIPTIONS = {
    "unowned": "files owned by no package",
    "modified": "package files changed since installation",
    "pkgdb": "package database",
}
_MAX_CREATED_BY = 200


@dataclass
class ImageConfig:
    architecture: str
    os: str = "linux"
    variant: str | None = None
    env: list[str] = field(default_factory=list)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    labels: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    exposed_ports: dict[str, dict] | None = None
    volumes: dict[str, dict] | None = None
    stop_signal: str | None = None
    created: str | None = None  # RFC 3339, e.g. "1970-01-01T00:00:00Z"; None → omitted


@dataclass(frozen=True)
class ImageResult:
    manifest_digest: str
    config_digest: str
    manifest_size: int


def parse_oci_ref(ref: str) -> tuple[str, str]:
    """"oci:DIR:TAG" or "oci:DIR" (tag "latest") → (DIR, TAG).

    Like skopeo, DIR ends at the first ":" after "oci:", so TAG may contain ":"."""
    if not ref.startswith("oci:"):
        raise PkglayerError(f"image reference {ref!r} is not of the form oci:DIR[:TAG]")
    directory, _, tag = ref[len("oci:"):].partition(":")
    if not directory:
        raise PkglayerError(f"image reference {ref!r} has an empty directory (expected oci:DIR[:TAG])")
    if ":" not in ref[len("oci:"):]:
        tag = "latest"
    if not REF_RE.fullmatch(tag):
        raise PkglayerError(
            f"image reference {ref!r}: tag {tag!r} is not a valid OCI ref name "
            "(letters, digits and . _ - : @ + separators, components split by /)"
        )
    return directory, tag


def created_by(layer: LayerRecord) -> str:
    """The config history's created_by for a layer: its packages, or what a top layer holds."""
    if not layer.packages:
        return "pkglayer: " + _TOP_LAYER_DESCRIPTIONS.get(layer.name, layer.name)
    text = "pkglayer: " + layer.packages[0]
    for i, package in enumerate(layer.packages[1:], start=1):
        rest = len(layer.packages) - i
        if len(text) + 2 + len(package) > _MAX_CREATED_BY:
            return f"{text} and {rest} more"
        text += ", " + package
    return text


def write_image(
    layout_dir: str | os.PathLike[str],
    tag: str,
    layers: Sequence[LayerRecord],
    config: ImageConfig,
    blob_sources: Sequence[BlobDir],
    fresh: Collection[str] = (),
    external: Collection[str] = (),
) -> ImageResult:
    """Write an image tagged `tag` into the OCI layout `layout_dir` (created if missing).

    `fresh` names blobs this process has just written and hashed itself: when already in
    the layout they are not read back to be verified again. `external` names layer blobs
    that live only in the registry the image is pushed to: the layout does not get them."""
    layout_dir = os.fspath(layout_dir)
    if not REF_RE.fullmatch(tag):
        raise PkglayerError(f"tag {tag!r} is not a valid OCI ref name")
    dest = BlobDir(layout_dir, create=True)
    for layer in layers:
        if layer.digest in external and not dest.has(layer.digest):
            continue
        if not (layer.digest in fresh and dest.has(layer.digest)):
            _import_layer(dest, layer, blob_sources)

    config_digest, config_size = dest.add_bytes(_canonical(_config_json(layers, config)))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_size},
        "layers": [
            {
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
                "annotations": {
                    LAYER_NAME: layer.name,
                    CONTENT_KEY: layer.content_key,
                    COMPRESSION: layer.compression,
                    LAYER_PACKAGES: " ".join(layer.packages),
                    LAYER_COMPONENTS: " ".join(layer.components),
                    **dict(layer.annotations),
                },
            }
            for layer in layers
        ],
    }
    manifest_digest, manifest_size = dest.add_bytes(_canonical(manifest))

    write_file_atomic(os.path.join(layout_dir, "oci-layout"), _canonical(OCI_LAYOUT))
    descriptor = {
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": manifest_digest,
        "size": manifest_size,
        "annotations": {REF_NAME: tag},
    }
    _update_index(layout_dir, tag, descriptor)
    return ImageResult(manifest_digest=manifest_digest, config_digest=config_digest, manifest_size=manifest_size)


def prior_layers(layout_dir: str | os.PathLike[str], tag: str) -> list[LayerRecord]:
    """Layers of the image tagged `tag` in an existing layout, as a previous pkglayer
    build annotated them; [] when there is none. Used to reuse blobs when a build
    writes over its own earlier output. Blobs are verified before any reuse."""
    return prior_image(layout_dir, tag)[0]


def prior_image(
    layout_dir: str | os.PathLike[str], tag: str
) -> tuple[list[LayerRecord], dict[str, ComponentRecord]]:
    """prior_layers, plus the planner's observations from the image's plan label
    (empty when the label is missing, damaged, or describes other layers)."""
    layout_dir = os.fspath(layout_dir)
    if not os.path.exists(os.path.join(layout_dir, "index.json")):
        return [], {}
    index = _read_index(os.path.join(layout_dir, "index.json"))
    blobs = BlobDir(layout_dir)
    entry = next(
        (
            e for e in index["manifests"]
            if isinstance(e, dict) and (e.get("annotations") or {}).get(REF_NAME) == tag
        ),
        None,
    )
    try:
        if entry is None or not blobs.verify(entry["digest"]):
            return [], {}
        manifest = json.loads(_read_blob(blobs, entry["digest"]))
        if not blobs.verify(manifest["config"]["digest"]):
            return [], {}
        config = json.loads(_read_blob(blobs, manifest["config"]["digest"]))
        diff_ids = config["rootfs"]["diff_ids"]
        records = []
        for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
            notes = desc.get("annotations") or {}
            if CONTENT_KEY not in notes:
                return [], {}  # not written by pkglayer
            records.append(
                LayerRecord(
                    name=notes[LAYER_NAME],
                    packages=_names(notes.get(LAYER_PACKAGES, "")),
                    components=_names(notes.get(LAYER_COMPONENTS, "")),
                    content_key=notes[CONTENT_KEY],
                    digest=desc["digest"],
                    diff_id=diff_id,
                    size=desc["size"],
                    media_type=desc["mediaType"],
                    compression=notes.get(COMPRESSION, ""),
                    annotations=checked_annotations(notes, "layer annotations"),
                )
            )
    except (KeyError, TypeError, ValueError, PkglayerError):
        return [], {}  # anything unexpected: build without reuse rather than trust it
    return records, _observations(config, records)


def _observations(config: dict, records: list[LayerRecord]) -> dict[str, ComponentRecord]:
    label = ((config.get("config") or {}).get("Labels") or {}).get(HISTORY_LABEL)
    if not isinstance(label, str):
        return {}
    try:
        history = parse_history(label.encode("utf-8"), f"label {HISTORY_LABEL}")
    except HistoryError:
        return {}
    if [r.digest for r in history.layers] != [r.digest for r in records]:
        return {}
    return history.components


def _names(text: str) -> tuple[str, ...]:
    names = tuple(text.split())
    if not all(NAME_RE.fullmatch(n) for n in names):
        raise ValueError("unsafe name in layer annotation")
    return names


def _read_blob(blobs: BlobDir, digest: str, limit: int = MAX_INDEX_BYTES) -> bytes:
    fd = os.open(blobs.path(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def _import_layer(dest: BlobDir, layer: LayerRecord, sources: Sequence[BlobDir]) -> None:
    if layer.media_type not in MEDIA_TYPES:
        raise PkglayerError(f"layer {layer.name}: unknown media type {layer.media_type!r}")
    if not dest.verify(layer.digest):
        problems: list[str] = []
        for source in sources:
            if not source.has(layer.digest):
                continue
            try:
                dest.import_blob(source, layer.digest)
                break
            except PkglayerError as e:  # a corrupt copy: try the next source
                problems.append(str(e))
        else:
            where = ", ".join(s.root for s in sources) or "no blob sources"
            detail = f" ({'; '.join(problems)})" if problems else ""
            raise PkglayerError(f"layer {layer.name}: blob {layer.digest} not found in {where}{detail}")
    actual = dest.size(layer.digest)
    if actual != layer.size:
        raise PkglayerError(f"layer {layer.name}: blob {layer.digest} is {actual} bytes, history says {layer.size}")


def _config_json(layers: Sequence[LayerRecord], config: ImageConfig) -> dict[str, Any]:
    runtime: dict[str, Any] = {}
    if config.env:
        runtime["Env"] = list(config.env)
    if config.labels:
        runtime["Labels"] = dict(config.labels)
    for key, value in (
        ("Cmd", config.cmd),
        ("Entrypoint", config.entrypoint),
        ("WorkingDir", config.workdir),
        ("User", config.user),
        ("ExposedPorts", config.exposed_ports),
        ("Volumes", config.volumes),
        ("StopSignal", config.stop_signal),
    ):
        if value is not None:
            runtime[key] = value
    history = []
    for layer in layers:
        entry = {"created_by": created_by(layer), "comment": layer.name}
        if config.created:
            entry["created"] = config.created
        history.append(entry)
    obj: dict[str, Any] = {
        "architecture": config.architecture,
        "os": config.os,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": history,
    }
    if config.variant:
        obj["variant"] = config.variant
    if runtime:
        obj["config"] = runtime
    if config.created:
        obj["created"] = config.created
    return obj


def _canonical(obj: Any) -> bytes:
    # Sorted keys and compact separators: the digest depends only on the content.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _update_index(layout_dir: str, tag: str, descriptor: dict[str, Any]) -> None:
    # Serialise concurrent writers of one layout: flock on the layout directory itself.
    dir_fd = os.open(layout_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        index = _read_index(os.path.join(layout_dir, "index.json"))
        manifests: list[Any] = []
        replaced = False
        for entry in index["manifests"]:
            if isinstance(entry, dict) and (entry.get("annotations") or {}).get(REF_NAME) == tag:
                if not replaced:  # keep the tag's position in the list
                    manifests.append(descriptor)
                    replaced = True
                continue
            manifests.append(entry)
        if not replaced:
            manifests.append(descriptor)
        index["manifests"] = manifests
        write_file_atomic(os.path.join(layout_dir, "index.json"), _canonical(index))
    finally:
        os.close(dir_fd)


def _read_index(path: str) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
    except OSError as e:
        raise PkglayerError(f"{path}: cannot open (a symlink?): {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX_BYTES:
            raise PkglayerError(f"{path}: not a regular file of at most {MAX_INDEX_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise PkglayerError(f"{path}: not valid JSON ({e}); refusing to overwrite it") from None
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise PkglayerError(f"{path}: not an OCI image index (no manifests array); refusing to overwrite it")
    return index
