"""The /layers `history.json`: which blob holds which package layer, schema-versioned.

The file comes from a previous build and may be stale, damaged or written by someone
hostile, so `load_history` validates every field and raises HistoryError with a one-line
message naming the layer and field. Unknown extra keys are ignored so that a newer
pkglayer can add fields without breaking an older reader of the same schemaVersion;
anything that changes the meaning of an existing field needs a new schemaVersion.
The format is documented in docs/history-json.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .digests import is_digest
from .errors import HistoryError
from .fsutil import read_regular, write_file_atomic
from .mediatypes import ANNOTATION_KEYS, LAYER_COMPRESSION, is_oci_layer

SCHEMA_VERSION = 1
MAX_HISTORY_BYTES = 64 << 20

# Safe as a file name and in a config history comment: no "/", no leading "." or "-",
# no NUL or whitespace. "^" is allowed because rpm versions use it ("1.0^20230101git"),
# "_" because rpm names do ("pam_krb5").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:@^_-]{0,254}")
_MAX_COUNT = 2**31 - 1
# A bare "gzip"/"zstd": a blob another tool compressed, at a level nobody recorded.
COMPRESSION_RE = re.compile(r"none|gzip(?:-[1-9])?|zstd(?::chunked)?(?:-(?:[1-9]|1[0-9]|2[0-2]))?")
COMPRESSOR_RE = re.compile(r"[A-Za-z0-9._/+-]{0,128}")
# Layer annotations a record may carry (those locating a zstd:chunked TOC), and their values.
_ANNOTATION_VALUE_RE = re.compile(r"sha256:[0-9a-f]{64}|[0-9]{1,19}(?::[0-9]{1,19}){2,3}")
_PLATFORM_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_GENERATOR = 256
_MAX_SIZE = 2**63 - 1  # OCI descriptor sizes are int64


@dataclass(frozen=True)
class LayerRecord:
    name: str  # e.g. "bash-5.2.15-2+b7-amd64", "unowned", "modified", "pkgdb", "libacl1-2.3.1-3-amd64+4"
    packages: tuple[str, ...]  # package keys in this layer (empty for the top layers)
    content_key: str  # "sha256:<hex>": hash of everything that determines the uncompressed tar
    digest: str  # "sha256:<hex>" of the compressed blob
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int  # compressed blob size in bytes
    media_type: str  # application/vnd.oci.image.layer.v1.tar(+gzip|+zstd)
    compression: str  # "gzip-6", "zstd-3", "none"
    # planner components (source packages) in this layer; () for top layers and for
    # histories written before components were recorded
    components: tuple[str, ...] = ()
    # annotations the layer descriptor must carry: (key, value) pairs, sorted; those of
    # zstd:chunked (the TOC's place and digest), none for the other compressions
    annotations: tuple[tuple[str, str], ...] = ()
    # what made the blob (compress.implementation: libraries and their versions, framing):
    # same compressor, same bytes. "" for blobs of pkglayer before this was recorded
    # (zlib gzip, one streamed zstd frame) and of other tools.
    compressor: str = ""


@dataclass(frozen=True)
class ComponentRecord:
    """What the planner remembers of one component between builds."""

    packages: tuple[str, ...]  # package keys at the last build: a different set means it changed
    builds: int  # builds that observed this component after its first
    changes: int  # of those, builds in which its packages differed from the build before


@dataclass(frozen=True)
class History:
    layers: tuple[LayerRecord, ...]  # bottom layer first, as in the image
    architecture: str
    os: str
    generator: str  # "pkglayer 0.1.0"
    tar_format: int  # version of pkglayer's tar format (part of content keys too)
    components: dict[str, ComponentRecord] = field(default_factory=dict)
    # the OCI platform variant ("v8" for arm64, "v7" for arm...); "" when there is none.
    # Written only when set, so histories of platforms without one are what they were.
    variant: str = ""


def load_history(path: str | os.PathLike[str]) -> History | None:
    """Read and validate history.json; None if the file does not exist.

    The file must be a regular file reached without following a symlink in its last
    component, and at most 64 MiB (checked before reading)."""
    path = os.fspath(path)
    raw = read_regular(path, MAX_HISTORY_BYTES, "history", HistoryError, missing_ok=True)
    return None if raw is None else parse_history(raw, path)


def parse_history(raw: bytes, source: str = "history.json") -> History:
    """Validate the bytes of a history.json; `source` names it in error messages."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise HistoryError(f"{source}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise HistoryError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        # Duplicate keys, NaN/Infinity, integers beyond the digit limit, absurd nesting.
        raise HistoryError(f"{source}: not acceptable JSON: {e}") from None
    return _from_json(obj, source)


def save_history(path: str | os.PathLike[str], history: History) -> None:
    """Write history.json atomically: temp file in the same directory, fsync, rename, fsync dir.

    The history is validated exactly as load_history would, so a written file always loads."""
    path = os.fspath(path)
    data = dumps_history(history)
    parse_history(data, f"history to be written to {path}")
    write_file_atomic(path, data)


def dumps_history(history: History) -> bytes:
    """The canonical serialisation: sorted keys, 2-space indent, trailing newline."""
    obj = {
        "schemaVersion": SCHEMA_VERSION,
        "architecture": history.architecture,
        "os": history.os,
        **({"variant": history.variant} if history.variant else {}),
        "generator": history.generator,
        "tarFormat": history.tar_format,
        "layers": [
            {
                "name": layer.name,
                "packages": list(layer.packages),
                "contentKey": layer.content_key,
                "digest": layer.digest,
                "diffID": layer.diff_id,
                "size": layer.size,
                "mediaType": layer.media_type,
                "compression": layer.compression,
                "components": list(layer.components),
                **({"annotations": dict(layer.annotations)} if layer.annotations else {}),
                **({"compressor": layer.compressor} if layer.compressor else {}),
            }
            for layer in history.layers
        ],
        "components": {
            name: {"packages": list(rec.packages), "builds": rec.builds, "changes": rec.changes}
            for name, rec in sorted(history.components.items())
        },
    }
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise HistoryError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is an int subclass; true/false is never a valid size or version.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HistoryError(f"{where}: field {key!r} must be {_KIND_NAMES[kind]}, not {_json_type(value)}")
    return value


_KIND_NAMES = {str: "a string", int: "an integer", list: "an array", dict: "an object"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a number"
    return _KIND_NAMES.get(type(value), type(value).__name__)


def _short(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _from_json(obj: object, source: str) -> History:
    if not isinstance(obj, dict):
        raise HistoryError(f"{source}: top level must be a JSON object, not {_json_type(obj)}")
    if "schemaVersion" not in obj:
        raise HistoryError(f"{source}: missing schemaVersion (this pkglayer supports schemaVersion {SCHEMA_VERSION})")
    version = obj["schemaVersion"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise HistoryError(
            f"{source}: unsupported schemaVersion {json.dumps(version)[:40]} "
            f"(this pkglayer supports schemaVersion {SCHEMA_VERSION})"
        )
    architecture = _field(obj, "architecture", str, source)
    os_name = _field(obj, "os", str, source)
    variant = _field(obj, "variant", str, source) if "variant" in obj else None
    for key, value in (("architecture", architecture), ("os", os_name), ("variant", variant)):
        if value is not None and not _PLATFORM_RE.fullmatch(value):
            raise HistoryError(f"{source}: field {key!r} has invalid value {_short(value)}")
    generator = _field(obj, "generator", str, source)
    if len(generator) > _MAX_GENERATOR or not generator.isprintable():
        raise HistoryError(f"{source}: field 'generator' must be printable and at most {_MAX_GENERATOR} characters")
    tar_format = _field(obj, "tarFormat", int, source)
    if tar_format < 1:
        raise HistoryError(f"{source}: field 'tarFormat' must be a positive integer, not {tar_format}")
    raw_layers = _field(obj, "layers", list, source)
    layers: list[LayerRecord] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_layers):
        layer = _layer_from_json(raw, f"{source}: layers[{index}]")
        if layer.name in seen:
            raise HistoryError(f"{source}: layers[{index}]: duplicate layer name {layer.name!r}")
        seen.add(layer.name)
        layers.append(layer)
    components = _components_from_json(obj.get("components", {}), source)
    return History(
        layers=tuple(layers),
        architecture=architecture,
        os=os_name,
        generator=generator,
        tar_format=tar_format,
        components=components,
        variant=variant or "",
    )


def _names(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    """An optional-or-required list of unique safe names."""
    values = _field(raw, key, list, where)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise HistoryError(f"{where}: {key}[{i}] must be a string, not {_json_type(value)}")
        if not NAME_RE.fullmatch(value):
            raise HistoryError(f"{where}: {key}[{i}] has unsafe value {_short(value)}")
    if len(set(values)) != len(values):
        raise HistoryError(f"{where}: field {key!r} lists a name more than once")
    return tuple(values)


def _components_from_json(raw: object, source: str) -> dict[str, ComponentRecord]:
    """The optional top-level `components` map (added after schemaVersion 1 shipped:
    older files lack it, and older readers ignore it)."""
    if not isinstance(raw, dict):
        raise HistoryError(f"{source}: field 'components' must be an object, not {_json_type(raw)}")
    out: dict[str, ComponentRecord] = {}
    for name, rec in raw.items():
        where = f"{source}: components[{_short(name)}]"
        if not NAME_RE.fullmatch(name):
            raise HistoryError(f"{source}: component name {_short(name)} is unsafe")
        if not isinstance(rec, dict):
            raise HistoryError(f"{where}: must be a JSON object, not {_json_type(rec)}")
        counts = {}
        for key in ("builds", "changes"):
            value = _field(rec, key, int, where)
            if not 0 <= value <= _MAX_COUNT:
                raise HistoryError(f"{where}: field {key!r} must be between 0 and {_MAX_COUNT}, not {value}")
            counts[key] = value
        if counts["changes"] > counts["builds"]:
            raise HistoryError(f"{where}: more changes ({counts['changes']}) than builds ({counts['builds']})")
        out[name] = ComponentRecord(packages=_names(rec, "packages", where), **counts)
    return out


def _layer_from_json(raw: object, where: str) -> LayerRecord:
    if not isinstance(raw, dict):
        raise HistoryError(f"{where}: must be a JSON object, not {_json_type(raw)}")
    name = _field(raw, "name", str, where)
    if not NAME_RE.fullmatch(name):
        raise HistoryError(f"{where}: field 'name' has unsafe value {_short(name)}")
    where = f"{where} ({name})"
    packages = _names(raw, "packages", where)
    components = _names(raw, "components", where) if "components" in raw else ()
    digests = {}
    for key in ("contentKey", "digest", "diffID"):
        value = _field(raw, key, str, where)
        if not is_digest(value):
            raise HistoryError(f"{where}: field {key!r} must be sha256:<64 lower-case hex>, not {_short(value)}")
        digests[key] = value
    size = _field(raw, "size", int, where)
    if size < 0:
        raise HistoryError(f"{where}: field 'size' must not be negative, not {size}")
    if size > _MAX_SIZE:
        raise HistoryError(f"{where}: field 'size' is beyond the int64 range of OCI descriptors")
    media_type = _field(raw, "mediaType", str, where)
    if not is_oci_layer(media_type):
        raise HistoryError(f"{where}: unknown mediaType {_short(media_type)}")
    compression = _field(raw, "compression", str, where)
    if not COMPRESSION_RE.fullmatch(compression):
        raise HistoryError(f"{where}: unknown compression {_short(compression)}")
    if compression.split("-")[0].split(":")[0] != LAYER_COMPRESSION[media_type]:
        raise HistoryError(f"{where}: compression {compression!r} does not match mediaType {media_type!r}")
    annotations = checked_annotations(raw.get("annotations", {}), where)
    if annotations and not compression.startswith("zstd:chunked-"):
        raise HistoryError(f"{where}: annotations on a layer that is not zstd:chunked")
    compressor = raw.get("compressor", "")
    if not isinstance(compressor, str) or not COMPRESSOR_RE.fullmatch(compressor):
        raise HistoryError(f"{where}: field 'compressor' must be a short library/version name, not "
                           f"{_short(str(compressor))}")
    return LayerRecord(
        name=name,
        packages=tuple(packages),
        content_key=digests["contentKey"],
        digest=digests["digest"],
        diff_id=digests["diffID"],
        size=size,
        media_type=media_type,
        compression=compression,
        components=components,
        annotations=annotations,
        compressor=compressor,
    )


def checked_annotations(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    """The optional `annotations` of a layer (added after schemaVersion 1 shipped).
    Keys this pkglayer does not know are left out, not trusted into a manifest."""
    if not isinstance(raw, dict):
        raise HistoryError(f"{where}: field 'annotations' must be an object, not {_json_type(raw)}")
    known = {k: v for k, v in raw.items() if k in ANNOTATION_KEYS}
    for key, value in known.items():
        if not isinstance(value, str) or not _ANNOTATION_VALUE_RE.fullmatch(value):
            raise HistoryError(f"{where}: annotation {key!r} has invalid value")
    return tuple(sorted(known.items()))
