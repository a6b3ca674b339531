"""Hostile tar streams and OCI layouts, byte by byte.

Python's tarfile refuses to write most of what an attacker (or a broken tool) can put in
a header: negative or huge numbers in base-256, PAX records with 40-digit times, sparse
maps. These helpers write raw 512-byte blocks, so tests can feed the unpacker anything a
real stream may contain.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

from tests.helpers import sha256_digest

BLOCK = 512
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def number(value: int, width: int) -> bytes:
    """A numeric header field: octal when it fits, else GNU base-256 (negative too)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if value < 0:
        value += 256 ** (width - 1)
        if value < 0:
            raise ValueError("too negative for the field")
        return b"\xff" + value.to_bytes(width - 1, "big")
    if value >= 256 ** (width - 1):
        raise ValueError("too large for the field")
    return b"\x80" + value.to_bytes(width - 1, "big")


def header(
    name: bytes | str,
    kind: bytes = b"0",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime: int = 1_600_000_000,
    linkname: bytes | str = b"",
    devmajor: int = 0,
    devminor: int = 0,
    raw: dict[int, bytes] | None = None,
) -> bytes:
    """One ustar header block. `raw` overwrites bytes at offsets (fields tarfile
    would never write), before the checksum is computed."""
    name_b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    link_b = linkname.encode("utf-8", "surrogateescape") if isinstance(linkname, str) else linkname
    block = bytearray(BLOCK)
    block[0:100] = name_b[:100].ljust(100, b"\0")
    block[100:108] = number(mode, 8)
    block[108:116] = number(uid, 8)
    block[116:124] = number(gid, 8)
    block[124:136] = number(size, 12)
    block[136:148] = number(mtime, 12)
    block[156:157] = kind
    block[157:257] = link_b[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    block[329:337] = number(devmajor, 8)
    block[337:345] = number(devminor, 8)
    for offset, data in (raw or {}).items():
        block[offset:offset + len(data)] = data
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def pax_records(records: dict[str, bytes | str]) -> bytes:
    out = b""
    for key, value in records.items():
        v = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        body = b" " + key.encode() + b"=" + v + b"\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n).encode() + body
    return out


def pax(records: dict[str, bytes | str], kind: bytes = b"x") -> bytes:
    """A PAX extended header (for the next member) or global header ("g")."""
    data = pax_records(records)
    return header(b"././@PaxHeader", kind, size=len(data)) + pad(data)


def member(name: bytes | str, kind: bytes = b"0", data: bytes = b"", records: dict | None = None, **fields) -> bytes:
    """A member: a PAX header when `records` are given or a name or link target is
    longer than a ustar field, the header block, its data (regular files)."""
    records = dict(records or {})
    for key, value in (("path", name), ("linkpath", fields.get("linkname", b""))):
        raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        if len(raw) > 100:
            records.setdefault(key, raw)
    out = pax(records) if records else b""
    fields.setdefault("size", len(data))
    return out + header(name, kind, **fields) + pad(data)


def end() -> bytes:
    return b"\0" * (2 * BLOCK)


def stream(members: Iterable[bytes]) -> bytes:
    return b"".join(members) + end()


def layout(path: Path, layers: list[bytes], *, tag: str = "t", config: dict | None = None,
           compress: bool = True) -> Path:
    """An OCI layout holding `layers` (raw tar streams), gzip-compressed by default,
    with a config whose diff_ids match. `config` entries replace the default ones."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    descs = []
    for raw in layers:
        blob = gzip.compress(raw, mtime=0) if compress else raw
        descs.append({"mediaType": LAYER_GZIP if compress else LAYER_TAR, "digest": put(blob), "size": len(blob)})
    cfg = {"architecture": "amd64", "os": "linux",
           "rootfs": {"type": "layers", "diff_ids": [sha256_digest(raw) for raw in layers]},
           "history": [{"created_by": "test"} for _ in layers]}
    cfg.update(config or {})
    config_raw = json.dumps(cfg).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config_raw),
                   "size": len(config_raw)},
        "layers": descs,
    }).encode()
    digest = put(manifest)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return path
