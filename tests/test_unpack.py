"""Reading untrusted OCI layouts (pkglayer.unpack, and layout.open_layout): whiteouts, attributes, and hostile
layers crafted with Python's tarfile; digests, diff_ids and sizes checked.

Needs root (the unpacker keeps owners and makes device nodes).
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from pkglayer.layout import ImageError, Limits, open_layout
from tests.crafted import Layer, listing, make_layout, manifest_file, rewrite_layout, unpack_layout
from tests.helpers import CAP_VALUE, CAPABILITY_XATTR, needs_root, read_blob, sha256_digest

pytestmark = needs_root("unpacking keeps owners and makes device nodes")


# ------------------------------------------------------------------ faithful unpacking


def test_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    lower = (Layer().dir("a").add("a/x", data=b"x").dir("a/sub").add("a/sub/y", data=b"y")
             .add("b", data=b"b").dir("c").add("c/z", data=b"z").dir("c/d").add("c/d/deep", data=b"d")
             .dir("e").add("e/keep", data=b"k").bytes())
    upper = (Layer().add("a/.wh.x").add(".wh.b")
             # a file added before the opaque marker in the same layer survives it
             .dir("c").add("c/new", data=b"new").add("c/.wh..wh..opq")
             .add("e/.wh..wh..opq").add("e/later", data=b"l")
             .add(".wh.missing").add("nowhere/.wh.x").bytes())
    layout = make_layout(tmp_path / "img", [lower, upper])
    stats = unpack_layout(layout, tmp_path / "tree")
    tree = tmp_path / "tree"
    assert listing(tree) == ["a", "a/sub", "a/sub/y", "c", "c/new", "e", "e/later"]
    assert (stats.whiteouts, stats.opaque, stats.layers) == (4, 2, 2)
    assert (tree / "c/new").read_bytes() == b"new"


def test_a_later_layer_replaces_types(tmp_path: Path) -> None:
    lower = (Layer().dir("d").add("d/f", data=b"1").add("f", data=b"file")
             .add("l", tarfile.SYMTYPE, linkname="f").bytes())
    upper = (Layer().add("d", data=b"now a file")  # a file replaces a directory and its contents
             .dir("f", mode=0o700)                   # a directory replaces a file
             .add("l", data=b"not a link")).bytes()
    layout = make_layout(tmp_path / "img", [lower, upper])
    unpack_layout(layout, tmp_path / "tree")
    tree = tmp_path / "tree"
    assert (tree / "d").read_bytes() == b"now a file"
    assert stat.S_IMODE((tree / "f").stat().st_mode) == 0o700 and (tree / "f").is_dir()
    assert not (tree / "l").is_symlink() and (tree / "l").read_bytes() == b"not a link"


def test_attributes_links_devices_and_xattrs(tmp_path: Path) -> None:
    layer = (Layer().dir(".", mode=0o755).dir("usr", mode=0o755).dir("usr/bin", mode=0o755)
             .add("usr/bin/ping", data=b"\x7fELF ping", mode=0o4755, uid=0, gid=0, xattrs={CAPABILITY_XATTR: CAP_VALUE})
             .add("usr/bin/tool", data=b"tool", mode=0o2750, uid=1000, gid=42, mtime=1_234_567_890)
             .add("usr/bin/tool2", tarfile.LNKTYPE, linkname="usr/bin/tool")
             .add("usr/bin/sh", tarfile.SYMTYPE, linkname="/usr/bin/dash", uid=7, gid=8, mtime=1_111_111_111)
             .add("etc/localtime", tarfile.SYMTYPE, linkname="/usr/share/zoneinfo/Etc/UTC")
             .dir("dev").add("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
             .add("run/fifo", tarfile.FIFOTYPE, mode=0o620, uid=5)
             .dir("tmp", mode=0o1777, mtime=1_500_000_000)
             .add("user", data=b"u", xattrs={"user.note": b"\xffbinary\x00value", "security.selinux": b"x_t"})
             .bytes())
    layout = make_layout(tmp_path / "img", [layer])
    stats = unpack_layout(layout, tmp_path / "tree")
    t = tmp_path / "tree"
    ping = os.lstat(t / "usr/bin/ping")
    assert stat.S_IMODE(ping.st_mode) == 0o4755
    assert os.getxattr(t / "usr/bin/ping", CAPABILITY_XATTR) == CAP_VALUE
    tool = os.lstat(t / "usr/bin/tool")
    assert (stat.S_IMODE(tool.st_mode), tool.st_uid, tool.st_gid) == (0o2750, 1000, 42)
    assert int(tool.st_mtime) == 1_234_567_890
    assert os.lstat(t / "usr/bin/tool2").st_ino == tool.st_ino and tool.st_nlink == 2
    sh = os.lstat(t / "usr/bin/sh")
    assert os.readlink(t / "usr/bin/sh") == "/usr/bin/dash" and (sh.st_uid, sh.st_gid) == (7, 8)
    assert int(sh.st_mtime) == 1_111_111_111
    assert os.readlink(t / "etc/localtime") == "/usr/share/zoneinfo/Etc/UTC"  # stored, never followed
    null = os.lstat(t / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_IMODE(null.st_mode) == 0o666
    fifo = os.lstat(t / "run/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620 and fifo.st_uid == 5
    # the missing parent "run" was created 0755
    assert stat.S_IMODE(os.lstat(t / "run").st_mode) == 0o755
    tmp = os.lstat(t / "tmp")
    assert stat.S_IMODE(tmp.st_mode) == 0o1777 and int(tmp.st_mtime) == 1_500_000_000
    assert os.getxattr(t / "user", "user.note") == b"\xffbinary\x00value"
    assert "security.selinux" not in os.listxattr(t / "user")
    assert stats.skipped_xattrs == {"security.selinux"}


def test_zstd_and_uncompressed_layers(tmp_path: Path) -> None:
    raw = Layer().add("f", data=b"zstd layer").bytes()
    layout = make_layout(tmp_path / "img", [raw])
    # rewrite the layer as zstd, and add an uncompressed one
    manifest_path = manifest_file(layout)
    manifest = json.loads(manifest_path.read_bytes())
    zst = zstandard.ZstdCompressor().compress(raw)
    plain = Layer().add("g", data=b"plain layer").bytes()
    for data in (zst, plain):
        (layout / "blobs/sha256" / sha256_digest(data)[7:]).write_bytes(data)
    manifest["layers"] = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": sha256_digest(zst), "size": len(zst)},
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256_digest(plain), "size": len(plain)},
    ]
    config = json.loads(read_blob(layout, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"] = [sha256_digest(raw), sha256_digest(plain)]
    rewrite_layout(layout, manifest, config)
    unpack_layout(layout, tmp_path / "tree")
    assert (tmp_path / "tree/f").read_bytes() == b"zstd layer"
    assert (tmp_path / "tree/g").read_bytes() == b"plain layer"


# ------------------------------------------------------------------ hostile layers


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """tmp_path/outside: a directory a hostile layer aims at; must stay empty."""
    (tmp_path / "outside").mkdir()
    return tmp_path


HOSTILE = {
    "dotdot": (lambda out: [Layer().add("../evil", data=b"x").bytes()], "contains '..'"),
    "dotdot-deep": (lambda out: [Layer().dir("a").add("a/../../evil", data=b"x").bytes()], "contains '..'"),
    "absolute": (lambda out: [Layer().add(f"{out}/evil", data=b"x").bytes()], "absolute path"),
    "symlink-then-write": (
        lambda out: [Layer().add("x", tarfile.SYMTYPE, linkname=str(out)).add("x/passwd", data=b"pwned").bytes()],
        "/x is a symlink (-> {out}); refusing to write through it",
    ),
    "symlink-in-lower-layer": (
        lambda out: [Layer().add("etc", tarfile.SYMTYPE, linkname=str(out)).bytes(),
                     Layer().add("etc/passwd", data=b"pwned").bytes()],
        "/etc is a symlink (-> {out}); refusing to write through it",
    ),
    "relative-symlink-escape": (
        lambda out: [Layer().add("x", tarfile.SYMTYPE, linkname="../outside").add("x/evil", data=b"x").bytes()],
        "/x is a symlink (-> ../outside)",
    ),
    "hardlink-escape": (lambda out: [Layer().add("h", tarfile.LNKTYPE, linkname="../outside/f").bytes()],
                        "contains '..'"),
    "hardlink-through-symlink": (
        lambda out: [Layer().add("x", tarfile.SYMTYPE, linkname=str(out)).add("h", tarfile.LNKTYPE,
                                                                              linkname="x/secret").bytes()],
        "/x is a symlink",
    ),
    "whiteout-through-symlink": (
        lambda out: [Layer().add("x", tarfile.SYMTYPE, linkname=str(out)).bytes(),
                     Layer().add("x/.wh.keep").bytes()],
        "/x is a symlink",
    ),
    "opaque-through-symlink": (
        lambda out: [Layer().add("x", tarfile.SYMTYPE, linkname=str(out)).bytes(),
                     Layer().add("x/.wh..wh..opq").bytes()],
        "/x is a symlink",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused(sandbox: Path, case: str) -> None:
    outside = sandbox / "outside"
    (outside / "keep").write_text("precious")
    (outside / "secret").write_text("secret")
    make, message = HOSTILE[case]
    layout = make_layout(sandbox / "img", make(outside))
    with pytest.raises(ImageError) as err:
        unpack_layout(layout, sandbox / "tree")
    assert message.format(out=outside) in str(err.value)
    assert sorted(os.listdir(outside)) == ["keep", "secret"]
    assert (outside / "keep").read_text() == "precious"
    assert not (sandbox / "evil").exists() and not (sandbox / "passwd").exists()


def test_layer_not_matching_its_digest_is_refused(sandbox: Path) -> None:
    good = Layer().add("f", data=b"good").bytes()
    layout = make_layout(sandbox / "img", [good])
    manifest = json.loads(manifest_file(layout).read_bytes())
    blob = layout / "blobs/sha256" / manifest["layers"][0]["digest"][7:]
    # Same size, one bit different: only the digest can tell.
    evil = bytearray(blob.read_bytes())
    evil[20] ^= 1
    blob.write_bytes(bytes(evil))
    with pytest.raises(ImageError, match="does not match its digest"):
        unpack_layout(layout, sandbox / "tree")
    assert listing(sandbox / "tree") == []


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "img", [Layer().add("f", data=b"a").bytes()])
    manifest = json.loads(manifest_file(layout).read_bytes())
    config = json.loads(read_blob(layout, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"] = [sha256_digest(b"something else")]
    rewrite_layout(layout, manifest, config)
    with pytest.raises(ImageError, match="diff_id"):
        unpack_layout(layout, tmp_path / "tree")


def test_manifest_and_config_digests_are_checked(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "img", [Layer().add("f", data=b"a").bytes()])
    manifest_path = manifest_file(layout)
    config_digest = json.loads(manifest_path.read_bytes())["config"]["digest"]
    config_path = layout / "blobs/sha256" / config_digest[7:]
    original = config_path.read_bytes()
    config_path.write_bytes(original.replace(b"amd64", b"arm64"))
    with pytest.raises(ImageError, match="config .* does not match its digest"):
        open_layout(str(layout), "t")
    config_path.write_bytes(original)
    manifest_path.write_bytes(manifest_path.read_bytes() + b" ")
    with pytest.raises(ImageError, match="manifest .* (does not match its digest|bytes, its descriptor says)"):
        open_layout(str(layout), "t")


def test_sizes_are_bounded(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "img", [Layer().add("big", data=b"\0" * 200_000).bytes()])
    with pytest.raises(ImageError, match="more than the limit of 100000 bytes"):
        unpack_layout(layout, tmp_path / "tree", limits=Limits(image_bytes=100_000))
    with pytest.raises(ImageError, match=r"more than the limit of 100\b"):
        open_layout(str(layout), "t", Limits(config_bytes=100))
    many = make_layout(tmp_path / "many", [Layer().add("a").add("b").add("c").bytes()])
    with pytest.raises(ImageError, match="limit of 2 entries"):
        unpack_layout(many, tmp_path / "tree2", limits=Limits(entries=2))
