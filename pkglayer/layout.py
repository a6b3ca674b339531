"""OCI image layouts (image-spec v1.1), read and written in one place.

Reading treats the layout as untrusted, whoever wrote it: every blob (index, manifest,
config) is read from a regular file opened without following a symlink, its size must be
the descriptor's and within `Limits`, and its sha256 must be the descriptor's digest.
Layer blobs are not read here (see unpack.py for applying them, blobstore.py for copying).

Writing takes pkglayer's LayerRecords, whose blobs already exist somewhere: they are
imported (always verified; a hard link only to a file nobody else can write, else a
copy: blobstore.shareable) from the first BlobDir that has them. The
config and manifest are serialised canonically, so the same layers and config always
give the same manifest digest. `index.json` is updated as skopeo does: the manifest with
the same ref name is replaced, others are kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from .blobstore import BlobDir
from .digests import is_digest
from .errors import PkglayerError
from .fsutil import read_regular, write_file_atomic
from .hashcache import HashCache, TreeRecords
from .history import COMPRESSOR_RE, NAME_RE, LayerRecord, checked_annotations
from .mediatypes import (
    CONFIG_TYPES,
    INDEX_TYPES,
    LAYER_COMPRESSION,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    is_oci_layer,
)

REF_NAME = "org.opencontainers.image.ref.name"
LAYER_NAME = "org.pkglayer.layer.name"
CONTENT_KEY = "org.pkglayer.content-key"
COMPRESSION = "org.pkglayer.compression"
COMPRESSOR = "org.pkglayer.compressor"  # what made the blob (libraries, versions, framing)
# space-separated package keys and planner components of a layer: the prior plan
# when a build writes over its own earlier image
LAYER_PACKAGES = "org.pkglayer.layer.packages"
LAYER_COMPONENTS = "org.pkglayer.layer.components"
# The build's plan (its history.json, compact) as a config label: layer annotations are
# dropped by some tools (Docker v2s2, buildah), the config travels with every copy.
HISTORY_LABEL = "org.pkglayer.history"
OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}

# Ref names as the image-spec annotation grammar (and skopeo's oci: transport) define them.
_ALNUM = r"[A-Za-z0-9]+"
_COMPONENT = rf"{_ALNUM}(?:(?:[-._:@+]|--){_ALNUM})*"
REF_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "ppc64le": "ppc64le",
           "s390x": "s390x", "riscv64": "riscv64"}

# Top layers have no packages; say what they hold.
_TOP_LAYER_DESCRIPTIONS = {
    "unowned": "files owned by no package",
    "modified": "package files changed since installation",
    "pkgdb": "package database",
}
_MAX_CREATED_BY = 200


class ImageError(PkglayerError):
    """An image is malformed, hostile, too large, or unsupported."""


@dataclass(frozen=True)
class Limits:
    """Bounds for reading an untrusted image. The defaults fit any real OS image."""

    index_bytes: int = 4 << 20
    manifest_bytes: int = 4 << 20
    config_bytes: int = 16 << 20
    layers: int = 512
    # total of the uncompressed layer streams, and so also of each compressed blob
    image_bytes: int = 64 << 30
    entries: int = 5_000_000
    path_bytes: int = 4096


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass
class Image:
    """A validated manifest and config of an image (its layer blobs not yet read).
    `layout` is the OCI layout holding its blobs, "" for an image read from a registry."""

    layout: str
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]
    config_raw: bytes
    layers: list[Descriptor]
    diff_ids: list[str]

    @property
    def architecture(self) -> str:
        return self.config["architecture"]

    @property
    def os(self) -> str:
        return self.config["os"]

    @property
    def variant(self) -> str | None:
        return self.config.get("variant")

    @property
    def runtime(self) -> dict[str, Any]:
        """The config's `config` object (Env, Cmd, Labels...); {} when absent."""
        return self.config.get("config") or {}

    @property
    def labels(self) -> dict[str, Any]:
        labels = self.runtime.get("Labels")
        return labels if isinstance(labels, dict) else {}


# ---------------------------------------------------------------- references


def parse_layout_ref(ref: str, default_tag: str | None = None) -> tuple[str, str | None]:
    """"oci:DIR[:TAG]" -> (DIR, TAG), TAG being `default_tag` when none is given.

    As with skopeo, DIR ends at the first ":" after "oci:", so TAG may contain ":".
    Reading uses no default (the layout's only image); writing uses "latest"."""
    if not ref.startswith("oci:"):
        raise PkglayerError(f"image reference {ref!r} is not of the form oci:DIR[:TAG]")
    directory, sep, tag = ref[len("oci:"):].partition(":")
    if not directory:
        raise PkglayerError(f"image reference {ref!r} has an empty directory (expected oci:DIR[:TAG])")
    if not sep:
        return directory, default_tag
    if not REF_RE.fullmatch(tag):
        raise PkglayerError(
            f"image reference {ref!r}: tag {tag!r} is not a valid OCI ref name "
            "(letters, digits and . _ - : @ + separators, components split by /)"
        )
    return directory, tag


# ---------------------------------------------------------------- reading


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ImageError(f"{what}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: not a JSON object")
    return obj


def check_bytes(data: bytes, desc: Descriptor, what: str) -> bytes:
    """`data` is what `desc` describes (size, then digest), or ImageError."""
    if len(data) != desc.size:
        raise ImageError(f"{what} {desc.digest} is {len(data)} bytes, its descriptor says {desc.size}")
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != desc.digest:
        raise ImageError(f"{what} {desc.digest} does not match its digest: the content has {actual}")
    return data


def descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: descriptor is not a JSON object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str):
        raise ImageError(f"{what}: descriptor has no mediaType")
    if not is_digest(digest):
        raise ImageError(f"{what}: unsupported or malformed digest {str(digest)[:100]!r} (expected sha256:<64 hex>)")
    if type(size) is not int or size < 0:
        raise ImageError(f"{what}: descriptor size must be a non-negative integer")
    notes = obj.get("annotations")
    annotations = {k: v for k, v in notes.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(notes, dict) else {}
    return Descriptor(media_type, digest, size, annotations)


def read_blob(layout: str, desc: Descriptor, limit: int, what: str) -> bytes:
    """A small blob (manifest, config, index) of a layout, checked against its descriptor."""
    return BlobDir(layout).read(desc.digest, desc.size, limit, what, ImageError)


def read_index(layout: str, limit: int, missing_ok: bool = False) -> dict[str, Any]:
    """The layout's index.json, checked to be an image index. A missing index is an empty
    one with `missing_ok` (a layout about to be written), else an error."""
    where = os.path.join(layout, "index.json")
    raw = read_regular(where, limit, "image index", ImageError, missing_ok=missing_ok)
    if raw is None:
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    index = parse_json(raw, where)
    if not isinstance(index.get("manifests"), list):
        raise ImageError(f"{where}: not an OCI image index (no manifests array)")
    return index


def _ref_name(entry: object) -> object:
    """An index entry's ref name; None when the entry or its annotations are malformed."""
    notes = entry.get("annotations") if isinstance(entry, dict) else None
    return notes.get(REF_NAME) if isinstance(notes, dict) else None


def host_platform() -> tuple[str, str]:
    import platform  # here: ~4 ms to load, for a multi-platform index only

    machine = platform.machine()
    return "linux", _GOARCH.get(machine, machine)


def pick_from_index(index: dict[str, Any], what: str, tag: str | None = None) -> Descriptor:
    """The manifest an index names `tag`, or for a platform index the host's platform."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ImageError(f"{what}: no manifests array")
    if tag is not None:
        named = [m for m in manifests if _ref_name(m) == tag]
        if len(named) > 1:
            raise ImageError(f"{what}: {len(named)} manifests are tagged {tag!r}")
        if named:
            return descriptor(named[0], f"{what}: tag {tag!r}")
        raise ImageError(f"{what}: no image tagged {tag!r}")
    if len(manifests) == 1:
        return descriptor(manifests[0], what)
    want_os, want_arch = host_platform()
    by_platform = [
        m for m in manifests
        if isinstance(m, dict) and isinstance(m.get("platform"), dict)
        and m["platform"].get("os") == want_os and m["platform"].get("architecture") == want_arch
    ]
    if by_platform:
        return descriptor(by_platform[0], f"{what}: {want_os}/{want_arch}")
    raise ImageError(f"{what}: {len(manifests)} manifests and none for {want_os}/{want_arch}")


def tag_of(layout: str, digest: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """The ref name index.json gives the manifest `digest` (skopeo needs one)."""
    for m in read_index(layout, limits.index_bytes)["manifests"]:
        if isinstance(m, dict) and m.get("digest") == digest:
            name = _ref_name(m)
            if isinstance(name, str) and REF_RE.fullmatch(name):
                return name
    raise PkglayerError(f"oci:{layout}: the image has no tag; give oci:{layout}:TAG")


def open_layout(layout: str, tag: str | None, limits: Limits = DEFAULT_LIMITS) -> Image:
    """Find the image `tag` (None: the only image, or the host platform's) in an OCI
    layout and validate its manifest and config. Layer blobs are not read here."""
    where = f"oci:{layout}" + (f":{tag}" if tag else "")
    index = read_index(layout, limits.index_bytes)
    desc = pick_from_index(index, f"{where}: index.json", tag)
    for _ in range(2):  # one nested index (a multi-platform image) at most
        if desc.media_type not in INDEX_TYPES:
            break
        nested = parse_json(read_blob(layout, desc, limits.index_bytes, "image index"), f"{where}: image index")
        desc = pick_from_index(nested, f"{where}: image index {desc.digest}")
    raw = read_blob(layout, desc, limits.manifest_bytes, "manifest")
    return image_from_manifest(layout, desc.digest, raw, lambda d: read_blob(layout, d, limits.config_bytes, "config"),
                               limits, where)


def image_from_manifest(layout: str, manifest_digest: str, raw: bytes, read_config, limits: Limits,
                        where: str) -> Image:
    """Validate a manifest (already checked against its digest) and the config it names."""
    manifest = parse_json(raw, f"{where}: manifest")
    media_type = manifest.get("mediaType", OCI_MANIFEST)
    if media_type in INDEX_TYPES:
        raise ImageError(f"{where}: is a multi-platform index, not an image manifest")
    if media_type not in MANIFEST_TYPES or manifest.get("schemaVersion") != 2:
        raise ImageError(f"{where}: unsupported manifest type {str(media_type)[:100]!r}")
    config_desc = descriptor(manifest.get("config"), f"{where}: manifest config")
    if config_desc.media_type not in CONFIG_TYPES:
        raise ImageError(f"{where}: unsupported config type {config_desc.media_type[:100]!r}")
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{where}: manifest has no layers array")
    if len(raw_layers) > limits.layers:
        raise ImageError(f"{where}: {len(raw_layers)} layers, more than the limit of {limits.layers}")
    layers = [descriptor(d, f"{where}: layer {i}") for i, d in enumerate(raw_layers)]
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_COMPRESSION:
            raise ImageError(f"{where}: layer {i} has unsupported media type {layer.media_type[:100]!r}")
        if layer.size > limits.image_bytes:
            raise ImageError(f"{where}: layer {i} is {layer.size} bytes, more than the limit of {limits.image_bytes}")
    config_raw = read_config(config_desc)
    config = parse_json(config_raw, f"{where}: config")
    for key in ("architecture", "os"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise ImageError(f"{where}: config has no {key}")
    if "variant" in config and not isinstance(config["variant"], str):
        raise ImageError(f"{where}: config variant is not a string")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(is_digest(d) for d in diff_ids):
        raise ImageError(f"{where}: config rootfs.diff_ids is missing or malformed")
    if len(diff_ids) != len(layers):
        raise ImageError(f"{where}: config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    runtime = config.get("config")
    if runtime is not None and not isinstance(runtime, dict):
        raise ImageError(f"{where}: config.config is not a JSON object")
    return Image(
        layout=layout, manifest_digest=manifest_digest, manifest=manifest, config_digest=config_desc.digest,
        config=config, config_raw=config_raw, layers=layers, diff_ids=list(diff_ids),
    )


def annotated_layers(image: Image) -> list[LayerRecord] | None:
    """The image's layers as a pkglayer build annotated them; None when some layer lacks
    the annotations (not written by pkglayer) or they are unusable."""
    records = []
    for desc, diff_id in zip(image.layers, image.diff_ids):
        notes = desc.annotations
        names = [tuple(notes.get(key, "").split()) for key in (LAYER_PACKAGES, LAYER_COMPONENTS)]
        name = notes.get(LAYER_NAME, "")
        if (
            not is_digest(notes.get(CONTENT_KEY))
            or not NAME_RE.fullmatch(name)
            or not is_oci_layer(desc.media_type)
            or not all(NAME_RE.fullmatch(n) for group in names for n in group)
        ):
            return None
        try:
            annotations = checked_annotations(notes, f"layer {name}")
        except PkglayerError:
            return None
        compressor = notes.get(COMPRESSOR, "")
        if not COMPRESSOR_RE.fullmatch(compressor):
            return None
        records.append(
            LayerRecord(
                name=name,
                packages=names[0],
                components=names[1],
                content_key=notes[CONTENT_KEY],
                digest=desc.digest,
                diff_id=diff_id,
                size=desc.size,
                media_type=desc.media_type,
                compression=notes.get(COMPRESSION, ""),
                annotations=annotations,
                compressor=compressor,
            )
        )
    return records


# ---------------------------------------------------------------- writing


@dataclass
class ImageOptions:
    """What an image config holds besides its layers: from the command line, a source
    image, or another image's config."""

    env: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    workdir: str | None = None
    user: str | None = None
    exposed_ports: dict[str, dict] | None = None
    volumes: dict[str, dict] | None = None
    stop_signal: str | None = None


@dataclass(frozen=True)
class Platform:
    architecture: str
    os: str = "linux"
    variant: str | None = None


@dataclass(frozen=True)
class ImageResult:
    manifest_digest: str
    config_digest: str
    manifest_size: int


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
    options: ImageOptions,
    platform_: Platform,
    created: str | None,
    blob_sources: Sequence[BlobDir],
    fresh: Collection[str] = (),
    external: Collection[str] = (),
    records: TreeRecords | None = None,
) -> ImageResult:
    """Write an image tagged `tag` into the OCI layout `layout_dir` (created if missing).

    `created` is an RFC 3339 time or None (left out). `fresh` names blobs this process has
    just written and hashed itself: when already in the layout they are not read back to
    be verified again. `external` names layer blobs that live only in the registry the
    image is pushed to: the layout does not get them. `records` remembers the blobs of
    the layout found valid while their files stay unchanged (BlobDir.verify)."""
    layout_dir = os.fspath(layout_dir)
    if not REF_RE.fullmatch(tag):
        raise PkglayerError(f"tag {tag!r} is not a valid OCI ref name")
    dest = BlobDir(layout_dir, create=True)
    known = records.of(layout_dir) if records is not None else None
    for layer in layers:
        if layer.digest in external and not dest.has(layer.digest):
            continue
        if not (layer.digest in fresh and dest.has(layer.digest)):
            _import_layer(dest, layer, blob_sources, known)

    config = _config_json(layers, options, platform_, created)
    config_digest, config_size = dest.add_bytes(canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
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
                    **({COMPRESSOR: layer.compressor} if layer.compressor else {}),
                    **dict(layer.annotations),
                },
            }
            for layer in layers
        ],
    }
    manifest_digest, manifest_size = dest.add_bytes(canonical_json(manifest))

    write_file_atomic(os.path.join(layout_dir, "oci-layout"), canonical_json(OCI_LAYOUT))
    descriptor_ = {
        "mediaType": OCI_MANIFEST,
        "digest": manifest_digest,
        "size": manifest_size,
        "annotations": {REF_NAME: tag},
    }
    _update_index(layout_dir, tag, descriptor_)
    return ImageResult(manifest_digest=manifest_digest, config_digest=config_digest, manifest_size=manifest_size)


def _import_layer(dest: BlobDir, layer: LayerRecord, sources: Sequence[BlobDir], known: HashCache | None) -> None:
    if not is_oci_layer(layer.media_type):
        raise PkglayerError(f"layer {layer.name}: unknown media type {layer.media_type!r}")
    if not dest.has_own(layer.digest, layer.size, known):
        problems: list[str] = []
        for source in sources:
            if not source.has(layer.digest):
                continue
            try:
                dest.import_blob(source, layer.digest, layer.size)
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


def _config_json(
    layers: Sequence[LayerRecord], options: ImageOptions, platform_: Platform, created: str | None
) -> dict[str, Any]:
    runtime: dict[str, Any] = {}
    if options.env:
        runtime["Env"] = list(options.env)
    if options.labels:
        runtime["Labels"] = dict(options.labels)
    for key, value in (
        ("Cmd", options.cmd),
        ("Entrypoint", options.entrypoint),
        ("WorkingDir", options.workdir),
        ("User", options.user),
        ("ExposedPorts", options.exposed_ports),
        ("Volumes", options.volumes),
        ("StopSignal", options.stop_signal),
    ):
        if value is not None:
            runtime[key] = value
    history = []
    for layer in layers:
        entry = {"created_by": created_by(layer), "comment": layer.name}
        if created:
            entry["created"] = created
        history.append(entry)
    obj: dict[str, Any] = {
        "architecture": platform_.architecture,
        "os": platform_.os,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": history,
    }
    if runtime:
        obj["config"] = runtime
    if platform_.variant:
        obj["variant"] = platform_.variant
    if created:
        obj["created"] = created
    return obj


def canonical_json(obj: Any) -> bytes:
    """Sorted keys and compact separators: the digest depends only on the content."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _update_index(layout_dir: str, tag: str, descriptor_: dict[str, Any]) -> None:
    # Serialise concurrent writers of one layout: flock on the layout directory itself.
    dir_fd = os.open(layout_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            index = read_index(layout_dir, DEFAULT_LIMITS.index_bytes * 16, missing_ok=True)
        except ImageError as e:
            raise PkglayerError(f"{e}; refusing to overwrite it") from None
        manifests: list[Any] = []
        replaced = False
        for entry in index["manifests"]:
            if _ref_name(entry) == tag:
                if not replaced:  # keep the tag's position in the list
                    manifests.append(descriptor_)
                    replaced = True
                continue
            manifests.append(entry)
        if not replaced:
            manifests.append(descriptor_)
        index["manifests"] = manifests
        write_file_atomic(os.path.join(layout_dir, "index.json"), canonical_json(index))
    finally:
        os.close(dir_fd)
