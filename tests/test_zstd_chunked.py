"""zstd:chunked layers, checked with a reader written here from the format's description
(containers-storage's docs and sources, see pkglayer/zstd_chunked.py), not with the
encoder's own code: zstd frames are walked from the zstd format's block headers, every
file's frame is decompressed alone, the tar is rebuilt from the tar-split and compared
with what `zstd -d` gives and with the diff_id, and the TOC is compared with the tar
headers and with the files in the source tree.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import tarfile
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard

from pkglayer.config import DEFAULT_EXCLUDES
from pkglayer.errors import HistoryError
from pkglayer.history import parse_history
from pkglayer.tarwriter import Member
from pkglayer.zstd_chunked import ChunkedEncoder, read_annotations
from tests.clients import fixed_by_design, snapshot
from tests.helpers import PKGLAYER, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="test trees need root (owners, devices)")

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SKIPPABLE = 0x184D2A50
OLD = "io.containers.zstd-chunked."
NEW = "io.github.containers.zstd-chunked."


# ------------------------------------------------------------------ a reader from the spec


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0xD800000000000000 if crc & 1 else crc >> 1  # ISO, reflected
        table.append(crc)
    return table


_CRC_TABLE = _crc64_table()


def crc64_iso(data: bytes) -> int:
    """Go's hash/crc64 with crc64.ISO, which tar-split uses."""
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def zstd_frame(blob: bytes, pos: int) -> tuple[int, int | None]:
    """(end, declared content size) of the zstd frame at pos, from its header and block
    headers (RFC 8878 section 3.1.1)."""
    assert blob[pos:pos + 4] == ZSTD_MAGIC, f"no zstd frame at {pos}"
    fhd = blob[pos + 4]
    fcs_flag, single, has_checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    p = pos + 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    size = int.from_bytes(blob[p:p + fcs_len], "little") + (256 if fcs_len == 2 else 0) if fcs_len else None
    p += fcs_len
    while True:
        header = int.from_bytes(blob[p:p + 3], "little")
        last, kind, block_size = header & 1, (header >> 1) & 3, header >> 3
        assert kind != 3, "reserved block type"
        p += 3 + (1 if kind == 1 else block_size)
        if last:
            break
    return p + (4 if has_checksum else 0), size


def frames(blob: bytes) -> list[tuple[str, int, int, int | None]]:
    """Every frame of the blob: (kind, start, end, content size or skippable payload size)."""
    out: list[tuple[str, int, int, int | None]] = []
    pos = 0
    while pos < len(blob):
        magic = struct.unpack_from("<I", blob, pos)[0]
        if SKIPPABLE <= magic <= SKIPPABLE + 15:
            size = struct.unpack_from("<I", blob, pos + 4)[0]
            out.append(("skip", pos, pos + 8 + size, size))
            pos += 8 + size
        else:
            end, size = zstd_frame(blob, pos)
            out.append(("zstd", pos, end, size))
            pos = end
    assert pos == len(blob)
    return out


def unzstd(data: bytes, size: int) -> bytes:
    return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ChunkedLayer:
    """One layer blob read the way a partial-pull client does, then checked against a
    plain decompression."""

    def __init__(self, blob: bytes, annotations: dict[str, str], diff_id: str, pure_crc: bool = False):
        self.blob = blob
        self.frames = frames(blob)
        kinds = [f[0] for f in self.frames]
        # Content frames first, then exactly three skippable frames: TOC, tar-split, footer.
        assert kinds[-3:] == ["skip"] * 3 and "skip" not in kinds[:-3], kinds
        footer = blob[-64:]
        assert self.frames[-1][3] == 64 and footer[56:] == b"GNUlInUx"
        toc_off, toc_len, toc_size, kind, split_off, split_len, split_size = struct.unpack("<7Q", footer[:56])
        assert kind == 1
        assert (toc_off, split_off) == (self.frames[-3][1] + 8, self.frames[-2][1] + 8)
        # The annotations say the same as the footer, under both prefixes.
        position = f"{toc_off}:{toc_len}:{toc_size}:1"
        toc_raw = blob[toc_off:toc_off + toc_len]
        split_raw = blob[split_off:split_off + split_len]
        toc_digest = "sha256:" + hashlib.sha256(toc_raw).hexdigest()
        split_digest = "sha256:" + hashlib.sha256(split_raw).hexdigest()
        assert annotations == {
            OLD + "manifest-checksum": toc_digest,
            OLD + "manifest-position": position,
            NEW + "manifest-checksum": toc_digest,
            NEW + "manifest-position": position,
            NEW + "tarsplit-checksum": split_digest,
            NEW + "tarsplit-position": f"{split_off}:{split_len}:{split_size}",
        }
        self.toc = json.loads(unzstd(toc_raw, toc_size))
        assert self.toc["version"] == 1 and self.toc["tarSplitDigest"] == split_digest
        self.entries = self.toc["entries"]
        split = unzstd(split_raw, split_size)
        self.split = [json.loads(line) for line in split.decode("utf-8").splitlines()]

        # A plain decoder gives the tar of the diff_id (skippable frames skipped).
        self.tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
        assert "sha256:" + hashlib.sha256(self.tar).hexdigest() == diff_id

        # Each file's frame on its own, as a range request would fetch it.
        self.contents: dict[str, bytes] = {}
        starts = {f[1]: f for f in self.frames}
        for e in self.entries:
            if e["type"] == "reg" and e.get("size"):
                frame = starts[e["offset"]]  # the range starts at a frame ...
                assert frame[2] == e["endOffset"] and frame[3] == e["size"]  # ... is one frame, sized
                data = unzstd(blob[e["offset"]:e["endOffset"]], e["size"])
                assert "sha256:" + hashlib.sha256(data).hexdigest() == e["digest"]
                self.contents[e["name"]] = data
            else:
                assert not {"digest", "offset", "endOffset", "size"} & e.keys(), e
        self._rebuild_from_tar_split(pure_crc)

    def _rebuild_from_tar_split(self, pure_crc: bool) -> None:
        out = bytearray()
        names = []
        pad = 0
        for i, s in enumerate(self.split):
            assert s["position"] == i
            payload = base64.b64decode(s["payload"]) if s["payload"] is not None else None
            if s["type"] == 2:
                # After the previous file's padding, one whole header (PAX records included).
                assert payload is not None and payload[:pad] == b"\0" * pad
                header = payload[pad:]
                out += payload
                if any(header):
                    ti = tarfile.TarInfo.frombuf(header[:512], "utf-8", "surrogateescape")
                    if ti.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                        ti = tarfile.open(fileobj=io.BytesIO(header + b"\0" * 1024)).next()
                    names.append(ti.name)
                pad = 0
            else:
                assert s["type"] == 1
                data = self.contents.get(s["name"], b"")
                assert s.get("size", 0) == len(data)
                if data:
                    crc = crc64_iso(data) if pure_crc else None
                    assert payload is not None and len(payload) == 8
                    if crc is not None:
                        assert int.from_bytes(payload, "big") == crc
                    out += data
                    pad = -len(data) % 512
                else:
                    assert payload is None
        assert bytes(out) == self.tar
        split_names = [s["name"] for s in self.split if s["type"] == 1]
        assert split_names == [e["name"] for e in self.entries]
        assert [n.rstrip("/") or "." for n in split_names] == [n if n else "." for n in names]


def read_image(layout: Path, tag: str = "t") -> tuple[dict, dict, list[bytes]]:
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)

    def blob(digest: str) -> bytes:
        return (layout / "blobs/sha256" / digest.split(":")[1]).read_bytes()

    manifest = json.loads(blob(entry["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    return manifest, config, [blob(layer["digest"]) for layer in manifest["layers"]]


def chunked_layers(layout: Path, tag: str = "t", pure_crc: bool = False) -> list[ChunkedLayer]:
    manifest, config, blobs = read_image(layout, tag)
    out = []
    for desc, diff_id, blob in zip(manifest["layers"], config["rootfs"]["diff_ids"], blobs, strict=True):
        assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        notes = {k: v for k, v in desc["annotations"].items() if "zstd-chunked" in k}
        out.append(ChunkedLayer(blob, notes, diff_id, pure_crc))
    return out


def build(rootfs: Path, layout: Path, *extra: str) -> dict:
    out = run([*PKGLAYER, "build", rootfs, "--output", f"oci:{layout}:t", "--compression", "zstd:chunked",
               "--no-hash-cache", "--json", "-q", *extra])
    return json.loads(out)


# ------------------------------------------------------------------ trees


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of tar member and the header paths that need PAX records."""
    root = tmp_path_factory.mktemp("odd") / "root"
    (root / "etc/deep").mkdir(parents=True)
    os.chmod(root / "etc/deep", 0o750)
    os.chown(root / "etc/deep", 1000, 1001)
    (root / "etc/empty").write_bytes(b"")
    (root / "etc/deep/text").write_text("hello\n" * 1000)
    (root / "etc/deep/random").write_bytes(os.urandom(300_000))
    os.chown(root / "etc/deep/random", 1000, 1001)
    (root / "etc/holes").write_bytes(b"\0" * 100_000 + b"x")
    (root / "bin").mkdir()
    (root / "bin/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin/suid", 0o4755)
    (root / "bin/cap").write_bytes(b"\x7fELF" + os.urandom(1000))
    run(["setcap", "cap_net_raw+ep", root / "bin/cap"])
    os.setxattr(root / "bin/suid", "user.blob", b"\x00\xff\x01 binary")
    os.link(root / "etc/deep/text", root / "etc/hardlink")
    os.symlink("deep/text", root / "etc/link")
    os.symlink("t" * 150, root / "etc/longlink")
    long_dir = root / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    (long_dir / "file-with-a-long-path").write_bytes(b"long\n")
    (root / "etc/naïve-ü.txt").write_text("utf-8 name\n")
    os.mkfifo(root / "etc/fifo")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for path in (root / "etc/link", root / "etc/longlink"):
        os.utime(path, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    return root


@pytest.fixture(scope="module")
def deb_image(deb_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    layout = tmp_path_factory.mktemp("deb") / "layout"
    return layout, build(deb_rootfs, layout, "--jobs", "1")


# ------------------------------------------------------------------ tests


def test_every_member_kind_reads_back(odd_tree: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build(odd_tree, layout)
    (layer,) = chunked_layers(layout, pure_crc=True)  # no package database: one layer
    by_name = {e["name"]: e for e in layer.entries}
    assert layer.entries[0] == {"type": "dir", "name": "./", "mode": 0o755, "modtime": "1970-01-01T00:00:00Z",
                                "ModTime": "1970-01-01T00:00:00Z"}
    assert by_name["etc/deep/"]["mode"] == 0o750
    assert (by_name["etc/deep/"]["uid"], by_name["etc/deep/"]["gid"]) == (1000, 1001)
    assert (by_name["etc/deep/"]["UID"], by_name["etc/deep/"]["GID"]) == (1000, 1001)
    assert by_name["bin/suid"]["mode"] == 0o4755
    assert base64.b64decode(by_name["bin/suid"]["xattrs"]["user.blob"]) == b"\x00\xff\x01 binary"
    assert base64.b64decode(by_name["bin/cap"]["xattrs"]["security.capability"]) == os.getxattr(
        odd_tree / "bin/cap", "security.capability")
    assert by_name["etc/empty"].keys() == {"type", "name", "mode", "modtime", "ModTime"}
    linked = by_name["etc/hardlink"] if by_name["etc/hardlink"]["type"] == "hardlink" else by_name["etc/deep/text"]
    assert linked["type"] == "hardlink" and linked["linkName"] in ("etc/deep/text", "etc/hardlink")
    assert by_name["etc/link"] == {"type": "symlink", "name": "etc/link", "linkName": "deep/text", "mode": 0o777,
                                   "modtime": "2020-09-13T12:26:40Z", "ModTime": "2020-09-13T12:26:40Z"}
    assert by_name["etc/longlink"]["linkName"] == "t" * 150
    assert by_name["etc/fifo"]["type"] == "fifo"
    assert by_name["dev/null"]["type"] == "char"
    assert (by_name["dev/null"]["devMajor"], by_name["dev/null"]["devMinor"]) == (1, 3)
    assert "naïve-ü.txt" in {n.rsplit("/", 1)[-1] for n in by_name}
    assert f"{'d' * 60}/{'e' * 60}/file-with-a-long-path" in by_name
    compare_toc_with_tree(layer, odd_tree)


def compare_toc_with_tree(layer: ChunkedLayer, root: Path) -> int:
    """Every TOC entry against the tar header and the file in the source tree; returns
    the number of regular files compared."""
    members = {ti.name: ti for ti in tarfile.open(fileobj=io.BytesIO(layer.tar), encoding="utf-8",
                                                  errors="surrogateescape")}
    kinds = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
             "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
    files = 0
    assert len(members) == len(layer.entries)
    for e in layer.entries:
        ti = members[e["name"].rstrip("/") or "."]
        assert kinds[e["type"]] == ti.type, e
        assert (e.get("mode", 0), e.get("uid", 0), e.get("gid", 0)) == (ti.mode, ti.uid, ti.gid), e
        assert (e.get("UID", 0), e.get("GID", 0)) == (ti.uid, ti.gid), e
        assert e["modtime"] == e["ModTime"] == rfc3339(ti.mtime), e
        assert e.get("linkName", "") == ti.linkname, e
        assert (e.get("devMajor", 0), e.get("devMinor", 0)) == (
            (ti.devmajor, ti.devminor) if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE) else (0, 0))
        pax = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape") for k, v in ti.pax_headers.items()
               if k.startswith("SCHILY.xattr.")}
        assert {k: base64.b64decode(v) for k, v in e.get("xattrs", {}).items()} == pax, e
        if e["name"] == "./":
            continue
        path = root / e["name"]
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == e.get("mode", 0) and (st.st_uid, st.st_gid) == (ti.uid, ti.gid), e
        if e["type"] == "reg":
            assert st.st_size == e.get("size", 0)
            # the layer's mtime is the tree's, or the fixed one where that is by design
            assert int(st.st_mtime) == ti.mtime or (ti.mtime == 0 and fixed_by_design(e["name"])), e
            if e.get("size"):
                assert e["digest"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
                files += 1
        elif e["type"] == "symlink":
            assert os.readlink(path) == e["linkName"]
    return files


def test_plain_zstd_reads_the_layers_as_the_tar(deb_image: tuple[Path, dict]) -> None:
    layout, _ = deb_image
    manifest, config, _ = read_image(layout)
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        tar = subprocess.run(["zstd", "-dc", layout / "blobs/sha256" / desc["digest"].split(":")[1]],
                             check=True, capture_output=True).stdout
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id


def test_toc_describes_the_tree(deb_image: tuple[Path, dict], deb_rootfs: Path) -> None:
    layout, _ = deb_image
    layers = chunked_layers(layout)
    files = sum(compare_toc_with_tree(layer, deb_rootfs) for layer in layers)
    # Together the TOCs list every path of the tree (minus excludes) ...
    listed = {e["name"].rstrip("/") for layer in layers for e in layer.entries} - {"."}
    assert listed == set(snapshot(deb_rootfs, DEFAULT_EXCLUDES)) - {""}
    # ... and a real number of files was compared, ping's capability among them.
    assert files > 3000
    assert any("security.capability" in e.get("xattrs", {}) for layer in layers for e in layer.entries)


def test_two_fresh_builds_give_the_same_bytes(deb_image: tuple[Path, dict], deb_rootfs: Path,
                                              tmp_path: Path) -> None:
    layout, first = deb_image
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    second = json.loads(run([*PKGLAYER, "build", deb_rootfs, "--output", f"oci:{tmp_path / 'b'}:t",
                             "--compression", "zstd:chunked", "--jobs", "2", "--json", "-q"], env=env))
    assert second["manifestDigest"] == first["manifestDigest"]
    assert [layer["digest"] for layer in second["layers"]] == [layer["digest"] for layer in first["layers"]]


def test_reused_layers_keep_their_annotations(deb_image: tuple[Path, dict], deb_rootfs: Path,
                                              tmp_path: Path) -> None:
    layout, first = deb_image
    # The same tag again: every layer is reused from the earlier image's descriptors.
    again = build(deb_rootfs, layout)
    assert again["reused"] == len(again["layers"]) and again["manifestDigest"] == first["manifestDigest"]
    # Through a /layers history.json too.
    layers_dir = tmp_path / "layers"
    run([*PKGLAYER, "build", deb_rootfs, "--layers", layers_dir, "--compression", "zstd:chunked",
         "--no-hash-cache", "-q"])
    history = parse_history((layers_dir / "history.json").read_bytes())
    manifest, _, blobs = read_image(layout)
    for record, desc, blob in zip(history.layers, manifest["layers"], blobs, strict=True):
        notes = {k: v for k, v in desc["annotations"].items() if "zstd-chunked" in k}
        assert dict(record.annotations) == notes == read_annotations(io.BytesIO(blob), len(blob))
        assert record.compression == "zstd:chunked-3"
    (layers_dir / "output").rename(layers_dir / "input")
    rebuilt = json.loads(run([*PKGLAYER, "build", deb_rootfs, "--layers", layers_dir, "--output",
                              f"oci:{tmp_path / 'c'}:t", "--compression", "zstd:chunked", "--json", "-q"]))
    assert rebuilt["reused"] == len(rebuilt["layers"]) and rebuilt["manifestDigest"] == first["manifestDigest"]


def test_history_annotations_are_checked() -> None:
    layer = {"name": "a", "packages": [], "contentKey": "sha256:" + "1" * 64, "digest": "sha256:" + "2" * 64,
             "diffID": "sha256:" + "3" * 64, "size": 1, "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
             "compression": "zstd:chunked-3",
             "annotations": {OLD + "manifest-position": "10:20:30:1", "x.unknown": "dropped"}}
    doc = {"schemaVersion": 1, "architecture": "amd64", "os": "linux", "generator": "t", "tarFormat": 1}
    history = parse_history(json.dumps({**doc, "layers": [layer]}).encode())
    assert history.layers[0].annotations == ((OLD + "manifest-position", "10:20:30:1"),)
    for bad in ({**layer, "annotations": {OLD + "manifest-position": "10:20; rm -rf"}},
                {**layer, "compression": "zstd-3"},
                {**layer, "annotations": []}):
        with pytest.raises(HistoryError):
            parse_history(json.dumps({**doc, "layers": [bad]}).encode())


def test_a_name_a_toc_cannot_hold_fails_before_writing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok").write_text("x")
    os.mkdir(os.path.join(os.fsencode(root), b"latin1-\xe9"))
    proc = subprocess.run([*PKGLAYER, "build", root, "--output", f"oci:{tmp_path / 'out'}:t",
                           "--compression", "zstd:chunked", "--no-hash-cache", "-q"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "not UTF-8" in proc.stderr and "zstd:chunked" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out/index.json").exists()
    blobs = tmp_path / "out/blobs/sha256"
    assert not blobs.exists() or not any(blobs.iterdir())


def _encode(members_data: list[tuple[Member, bytes]], chunk: int) -> bytes:
    out = io.BytesIO()
    enc = ChunkedEncoder(3, out)
    for m, data in members_data:
        enc.add_member(m, m.header())
        if data:
            for i in range(0, len(data), chunk):
                enc.write_data(data[i:i + chunk])
            enc.end_file()
            enc.write(b"\0" * (-len(data) % 512))
    enc.write(b"\0" * 1024)
    enc.finish()
    return out.getvalue()


def test_bytes_do_not_depend_on_how_data_arrives() -> None:
    data = os.urandom(50_000) + b"abc" * 100_000
    members = [
        (Member(name="d", type=tarfile.DIRTYPE, mode=0o755, uid=0, gid=0, mtime=0), b""),
        (Member(name="d/f", type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=5, size=len(data)), data),
        (Member(name="d/g", type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=5, size=3), b"xyz"),
    ]
    outputs = {_encode(members, chunk) for chunk in (1 << 20, 4096, 777)}
    assert len(outputs) == 1


def test_memory_does_not_grow_with_file_size() -> None:
    size = 512 << 20
    m = Member(name="big", type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=0, size=size)
    counted = 0

    class Sink:
        def write(self, data: bytes) -> None:
            nonlocal counted
            counted += len(data)

    enc = ChunkedEncoder(3, Sink())
    chunk = bytes(range(256)) * 4096  # 1 MiB
    tracemalloc.start()
    try:
        enc.add_member(m, m.header())
        for _ in range(size // len(chunk)):
            enc.write_data(chunk)
        enc.end_file()
        enc.write(b"\0" * 1024)
        enc.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert enc.tar_size == size + 512 + 1024 and 0 < counted < size // 10


def test_layers_from_the_daemon_cache_get_their_annotations(odd_tree: Path, tmp_path: Path) -> None:
    from pkglayer.build import build as build_in_process
    from pkglayer.config import BuildSettings
    from pkglayer.daemon.cache import LayerCache
    from pkglayer.layout import ImageOptions
    from pkglayer.outputs import ImageContent, Outputs, build_to, write_outputs
    from pkglayer.prior import PriorRequest, resolve_prior

    settings = BuildSettings(compression="zstd:chunked", hash_cache="")
    _, direct = build_to(str(odd_tree), settings, layout=(str(tmp_path / "a"), "t"))
    cache = LayerCache(str(tmp_path / "cache"), 10**9)
    build_in_process(str(odd_tree), settings, resolve_prior(PriorRequest(cache=cache)), cache.blobs)  # a prebuild
    outputs = Outputs(layout=(str(tmp_path / "b"), "t"))
    prior = resolve_prior(outputs.prior_request(cache=cache))
    cached = build_in_process(str(odd_tree), settings, prior, outputs.new_blobs())
    report = write_outputs(ImageContent.of_build(cached, prior), outputs, ImageOptions(), 0)
    assert cached.layers and all(o.cached for o in cached.layers)
    assert report.image is not None and direct.image is not None
    assert report.image.manifest_digest == direct.image.manifest_digest
