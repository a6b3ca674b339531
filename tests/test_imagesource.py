"""Reading untrusted OCI layouts (pkglayer.imagesource): whiteouts, attributes, and hostile
layers crafted with Python's tarfile. Also the plan label (org.pkglayer.history) and how a
source image's config is carried over.

Needs root (the unpacker keeps owners and makes device nodes).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from pkglayer.errors import PkglayerError
from pkglayer.imageconfig import merge_config
from pkglayer.inputs import image_platform
from pkglayer.layout import DEFAULT_LIMITS, ImageError, ImageOptions, Limits, Platform, open_layout
from pkglayer.prior import plan_from_image
from pkglayer.unpack import unpack
from tests.clients import pkglayer_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking keeps owners: needs root")

CAP = "security.capability"
# A real file capability (cap_net_raw=ep), as setcap writes it.
CAP_VALUE = bytes.fromhex("0100000200200000000000000000000000000000")


# ------------------------------------------------------------------ crafting layouts


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
    """An OCI layout with gzip layers, written the way umoci or skopeo would."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    descs = []
    for raw in layers:
        gz = gzip.compress(raw, mtime=0)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [sha(raw) for raw in layers]},
              "history": [{"created_by": "test"} for _ in layers]}
    if runtime is not None:
        config["config"] = runtime
    config.update(extra_config or {})
    config_raw = json.dumps(config).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(config_raw),
                   "size": len(config_raw)},
        "layers": descs,
    }).encode()
    mdigest = put(manifest)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return path


def unpack_layout(layout: Path, dest: Path, tag: str = "t", limits: Limits = DEFAULT_LIMITS):
    dest.mkdir()
    return unpack(open_layout(str(layout), tag, limits), str(dest), limits)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


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
             .add("usr/bin/ping", data=b"\x7fELF ping", mode=0o4755, uid=0, gid=0, xattrs={CAP: CAP_VALUE})
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
    assert os.getxattr(t / "usr/bin/ping", CAP) == CAP_VALUE
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
    import zstandard

    raw = Layer().add("f", data=b"zstd layer").bytes()
    layout = make_layout(tmp_path / "img", [raw])
    # rewrite the layer as zstd, and add an uncompressed one
    manifest_path = _manifest_path(layout)
    manifest = json.loads(manifest_path.read_bytes())
    zst = zstandard.ZstdCompressor().compress(raw)
    plain = Layer().add("g", data=b"plain layer").bytes()
    for data in (zst, plain):
        (layout / "blobs/sha256" / sha(data)[7:]).write_bytes(data)
    manifest["layers"] = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": sha(zst), "size": len(zst)},
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(plain), "size": len(plain)},
    ]
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"] = [sha(raw), sha(plain)]
    _rewrite(layout, manifest, config)
    unpack_layout(layout, tmp_path / "tree")
    assert (tmp_path / "tree/f").read_bytes() == b"zstd layer"
    assert (tmp_path / "tree/g").read_bytes() == b"plain layer"


# ------------------------------------------------------------------ hostile layers


def _manifest_path(layout: Path) -> Path:
    index = json.loads((layout / "index.json").read_text())
    return layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs/sha256" / digest[7:]).read_bytes()


def _rewrite(layout: Path, manifest: dict, config: dict) -> None:
    config_raw = json.dumps(config).encode()
    (layout / "blobs/sha256" / sha(config_raw)[7:]).write_bytes(config_raw)
    manifest["config"] = {**manifest["config"], "digest": sha(config_raw), "size": len(config_raw)}
    raw = json.dumps(manifest).encode()
    (layout / "blobs/sha256" / sha(raw)[7:]).write_bytes(raw)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest=sha(raw), size=len(raw))
    (layout / "index.json").write_text(json.dumps(index))


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
    manifest = json.loads(_manifest_path(layout).read_bytes())
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
    manifest = json.loads(_manifest_path(layout).read_bytes())
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"] = [sha(b"something else")]
    _rewrite(layout, manifest, config)
    with pytest.raises(ImageError, match="diff_id"):
        unpack_layout(layout, tmp_path / "tree")


def test_manifest_and_config_digests_are_checked(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "img", [Layer().add("f", data=b"a").bytes()])
    manifest_path = _manifest_path(layout)
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


def test_cli_refuses_hostile_image_and_cleans_up(sandbox: Path) -> None:
    outside = sandbox / "outside"
    layout = make_layout(sandbox / "img", [Layer().add("x", tarfile.SYMTYPE, linkname=str(outside))
                                           .add("x/passwd", data=b"pwned").bytes()])
    work = sandbox / "work"
    work.mkdir()
    proc = subprocess.run(
        [pkglayer_cli(), "build", "--from", f"oci:{layout}:t", "--output", f"oci:{sandbox}/out", "--tmpdir", str(work)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("pkglayer: error: layer 0 (sha256:"), proc.stderr
    assert "/x/passwd: /x is a symlink" in proc.stderr and "refusing to write through it" in proc.stderr
    assert os.listdir(outside) == [] and os.listdir(work) == [], "the working tree is removed"
    assert not (sandbox / "out").exists(), "nothing is written when the source is refused"


def test_cli_needs_exactly_one_input(tmp_path: Path) -> None:
    for args in ([], [str(tmp_path), "--from", "oci:x:y"]):
        proc = subprocess.run([pkglayer_cli(), "build", *args, "--output", f"oci:{tmp_path}/o"],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and "give " in proc.stderr and "--from IMAGE" in proc.stderr, proc.stderr


# ------------------------------------------------------------------ config and plan


def test_source_config_is_carried_over_and_overridable(tmp_path: Path) -> None:
    runtime = {
        "Env": ["PATH=/usr/bin", "LANG=C"], "Entrypoint": ["/init"], "Cmd": ["--serve"],
        "WorkingDir": "/srv", "User": "1000:1000", "ExposedPorts": {"8080/tcp": {}},
        "Volumes": {"/data": {}}, "Labels": {"containers.bootc": "1", "a": "b"}, "StopSignal": "SIGRTMIN+3",
    }
    layout = make_layout(tmp_path / "img", [Layer().add("f").bytes()], runtime=runtime,
                         extra_config={"architecture": "arm64", "variant": "v8"})
    src = open_layout(str(layout), "t")
    kept = merge_config(src.runtime, ImageOptions())
    assert (kept.env, kept.entrypoint, kept.cmd, kept.workdir, kept.user) == (
        ["PATH=/usr/bin", "LANG=C"], ["/init"], ["--serve"], "/srv", "1000:1000")
    assert (kept.exposed_ports, kept.volumes, kept.stop_signal) == ({"8080/tcp": {}}, {"/data": {}}, "SIGRTMIN+3")
    assert kept.labels == {"containers.bootc": "1", "a": "b"}
    assert image_platform(src, "src") == Platform("arm64", "linux", "v8")
    cli = ImageOptions(env=["LANG=C.UTF-8", "X=1"], labels={"a": "c"}, cmd=["other"], user="0")
    over = merge_config(src.runtime, cli)
    assert over.env == ["PATH=/usr/bin", "LANG=C.UTF-8", "X=1"]
    assert over.labels == {"containers.bootc": "1", "a": "c"}
    assert (over.cmd, over.entrypoint, over.user) == (["other"], ["/init"], "0")


def test_bad_source_config_is_refused(tmp_path: Path) -> None:
    layout = make_layout(tmp_path / "img", [Layer().add("f").bytes()], runtime={"Env": "PATH=/bin"})
    with pytest.raises(ImageError, match="Env must be an array of strings"):
        merge_config(open_layout(str(layout), "t").runtime, ImageOptions())


def _tiny_rootfs(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("tiny\n")
    (root / "bin").mkdir()
    (root / "bin/tool").write_bytes(b"#!/bin/true\n")
    return root


def _build(rootfs: Path, out: str, *args: str) -> dict:
    proc = subprocess.run([pkglayer_cli(), "build", str(rootfs), "--format", "none", "--output", out, "--json",
                           "-q", "--no-hash-cache", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plan_label_round_trip_and_cross_checks(tmp_path: Path) -> None:
    rootfs = _tiny_rootfs(tmp_path / "rootfs")
    layout = tmp_path / "img"
    result = _build(rootfs, f"oci:{layout}:v1")
    image = open_layout(str(layout), "v1")
    plan = plan_from_image(image, "oci:img:v1")
    assert [r.digest for r in plan.layers] == [r["digest"] for r in result["layers"]]
    assert [r.content_key for r in plan.layers] == [r["contentKey"] for r in result["layers"]]
    label = image.runtime["Labels"]["org.pkglayer.history"]
    assert "\n" not in label and ": " not in label, "compact JSON"

    manifest = json.loads(_manifest_path(layout).read_bytes())
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    # A label whose layer does not match the manifest (consistent digests otherwise) is refused.
    tampered = json.loads(label)
    tampered["layers"][0]["digest"] = sha(b"elsewhere")
    config["config"]["Labels"]["org.pkglayer.history"] = json.dumps(tampered)
    _rewrite(layout, manifest, config)
    with pytest.raises(ImageError, match="does not match the manifest's layer"):
        plan_from_image(open_layout(str(layout), "v1"), "x")
    # A label that is not a valid plan at all.
    config["config"]["Labels"]["org.pkglayer.history"] = '{"schemaVersion": 1, "layers": "../../etc"}'
    _rewrite(layout, manifest, config)
    with pytest.raises(PkglayerError, match="label org.pkglayer.history"):
        plan_from_image(open_layout(str(layout), "v1"), "x")
    del config["config"]["Labels"]["org.pkglayer.history"]
    _rewrite(layout, manifest, config)
    with pytest.raises(ImageError, match="no org.pkglayer.history label"):
        plan_from_image(open_layout(str(layout), "v1"), "x")


def test_prior_from_oci_layout_reuses_its_blobs(tmp_path: Path) -> None:
    rootfs = _tiny_rootfs(tmp_path / "rootfs")
    first = _build(rootfs, f"oci:{tmp_path}/a:v1")
    # A different layout: only --prior oci: makes the first image's layers reusable.
    second = _build(rootfs, f"oci:{tmp_path}/b:v2", "--prior", f"oci:{tmp_path}/a:v1")
    assert second["reused"] == len(second["layers"]) and second["written"] == 0
    assert second["manifestDigest"] == first["manifestDigest"]
    third = _build(rootfs, f"oci:{tmp_path}/c:v3")
    assert third["written"] == len(third["layers"])


def test_rechunk_keeps_the_tree_and_config(tmp_path: Path) -> None:
    """Small end-to-end: a crafted two-layer image through `pkglayer build --from oci:`."""
    lower = (Layer().dir(".").dir("etc").add("etc/hostname", data=b"h\n").add("etc/gone", data=b"g")
             .dir("usr").dir("usr/bin").add("usr/bin/ping", data=b"ELF", mode=0o755, xattrs={CAP: CAP_VALUE})
             .add("usr/bin/ping6", tarfile.LNKTYPE, linkname="usr/bin/ping").bytes())
    upper = Layer().add("etc/.wh.gone").add("etc/new", data=b"n", uid=1000, mode=0o600).bytes()
    layout = make_layout(tmp_path / "img", [lower, upper],
                         runtime={"Cmd": ["/bin/sh"], "Labels": {"containers.bootc": "1"}, "StopSignal": "SIGTERM"})
    out = tmp_path / "out"
    proc = subprocess.run([pkglayer_cli(), "build", "--from", f"oci:{layout}:t", "--output", f"oci:{out}:r",
                           "--json", "-q", "--tmpdir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["source"]["layers"] == 2 and result["source"]["whiteouts"] == 1
    assert sorted(os.listdir(tmp_path)) == ["img", "out"], "the working tree is removed"
    back = tmp_path / "back"
    stats = unpack_layout(out, back, tag="r")
    assert stats.layers == 1  # no package database: one unowned layer
    assert listing(back) == ["etc", "etc/hostname", "etc/new", "usr", "usr/bin", "usr/bin/ping", "usr/bin/ping6"]
    assert os.getxattr(back / "usr/bin/ping", CAP) == CAP_VALUE
    assert os.lstat(back / "usr/bin/ping").st_ino == os.lstat(back / "usr/bin/ping6").st_ino
    new = os.lstat(back / "etc/new")
    assert (new.st_uid, stat.S_IMODE(new.st_mode)) == (1000, 0o600)
    image = open_layout(str(out), "r")
    assert image.runtime["Cmd"] == ["/bin/sh"] and image.runtime["StopSignal"] == "SIGTERM"
    assert image.runtime["Labels"]["containers.bootc"] == "1"
