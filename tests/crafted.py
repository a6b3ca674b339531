"""OCI layouts made by hand (Python's tarfile, gzip and json), the way an unusual or
hostile tool could write them, for the tests of reading and unpacking images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from pkglayer.layout import DEFAULT_LIMITS, Limits, open_layout
from pkglayer.unpack import unpack
from tests import tarcraft
from tests.helpers import sha256_digest


class Layer:
    """A tar stream built member by member, the way a hostile or unusual tool might."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT,
                                encoding="utf-8", errors="surrogateescape")

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
            uid: int = 0, gid: int = 0, mtime: int = 1_600_000_000, linkname: str = "",
            xattrs: dict[str, bytes] | None = None, dev: tuple[int, int] = (0, 0)) -> Layer:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
        info.linkname = linkname
        info.devmajor, info.devminor = dev
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
        if kind == tarfile.REGTYPE:
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        else:
            self.tar.addfile(info)
        return self

    def dir(self, name: str, mode: int = 0o755, **kw) -> Layer:
        return self.add(name, tarfile.DIRTYPE, mode=mode, **kw)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def make_layout(path: Path, layers: list[bytes], tag: str = "t", runtime: dict | None = None,
                extra_config: dict | None = None) -> Path:
    """An OCI layout with gzip layers, written the way umoci or skopeo would
    (tests/tarcraft.py's layout, with a runtime config)."""
    config = {**({"config": runtime} if runtime is not None else {}), **(extra_config or {})}
    return tarcraft.layout(path, layers, tag=tag, config=config)


def unpack_layout(layout: Path, dest: Path, tag: str = "t", limits: Limits = DEFAULT_LIMITS):
    dest.mkdir()
    return unpack(open_layout(str(layout), tag, limits), str(dest), limits)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def manifest_file(layout: Path) -> Path:
    index = json.loads((layout / "index.json").read_text())
    return layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]


def rewrite_layout(layout: Path, manifest: dict, config: dict) -> None:
    config_raw = json.dumps(config).encode()
    (layout / "blobs/sha256" / sha256_digest(config_raw)[7:]).write_bytes(config_raw)
    manifest["config"] = {**manifest["config"], "digest": sha256_digest(config_raw), "size": len(config_raw)}
    raw = json.dumps(manifest).encode()
    (layout / "blobs/sha256" / sha256_digest(raw)[7:]).write_bytes(raw)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest=sha256_digest(raw), size=len(raw))
    (layout / "index.json").write_text(json.dumps(index))
