"""The tar writer (pkglayer.tarwriter): its own header packing against Python's tarfile,
and layers written from small trees made here, read back with independent readers."""

from __future__ import annotations

import calendar
import codecs
import gzip
import hashlib
import io
import os
import random
import re
import socket
import stat
import subprocess
import tarfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import zstandard

from pkglayer import tarwriter
from pkglayer.build import scan_rootfs
from pkglayer.compress import GZIP_BLOCK
from pkglayer.config import BuildSettings
from pkglayer.errors import RootfsError
from pkglayer.ownership import scan_ownership
from pkglayer.rootfs import Rootfs
from pkglayer.scan import FsObject
from pkglayer.sources import open_source
from pkglayer.tarwriter import Member, content_key, layer_members, write_layer
from tests.clients import Coverage, compare_trees
from tests.helpers import CAP_VALUE, require_root, require_tools
from tests.rootfs_factory import copy_tree


def reference(m: Member) -> bytes:
    return m.tarinfo().tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_headers_match_tarfile_on_a_real_tree(deb_rootfs: Path) -> None:
    settings = BuildSettings()
    with Rootfs(deb_rootfs) as rootfs:
        own = scan_ownership(
            rootfs, open_source(rootfs), settings.all_excludes, settings.drop_xattrs, hash_content=False
        )
        members = layer_members(own.objects.values(), own.objects, 0)
    kinds = {m.type for m in members}
    assert {tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE} <= kinds
    assert any(m.xattrs for m in members)  # at least one goes the PAX way
    for m in members:
        assert m.header() == reference(m), m.name


@pytest.mark.parametrize(
    "member",
    [
        Member(name="a" * 100, type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=1, size=3),
        Member(name="a" * 101, type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=1, size=3),
        Member(name="d" * 100, type=tarfile.DIRTYPE, mode=0o755, uid=0, gid=0, mtime=0),
        Member(name="l", type=tarfile.SYMTYPE, mode=0o777, uid=0, gid=0, mtime=1, linkname="x" * 101),
        Member(name="é", type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=1),
        Member(name="bad\udcff", type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=1),
        Member(name="big", type=tarfile.REGTYPE, mode=0o4755, uid=3000000, gid=4000000, mtime=1),
        Member(name="old", type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=-100),
        Member(name="future", type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, mtime=9_000_000_000),
        Member(name="dev", type=tarfile.BLKTYPE, mode=0o660, uid=0, gid=6, mtime=5, devmajor=8, devminor=1),
        Member(name="fifo", type=tarfile.FIFOTYPE, mode=0o600, uid=0, gid=0, mtime=5),
        # a size only counts for regular files
        Member(name="sized-link", type=tarfile.SYMTYPE, mode=0o777, uid=0, gid=0, mtime=5, size=7, linkname="x"),
        Member(name="cap", type=tarfile.REGTYPE, mode=0o755, uid=0, gid=0, mtime=5,
               xattrs=(("security.capability", b"\x01\x00\x00\x02\x00\x20"),)),
    ],
    ids=lambda m: m.name[:12],
)
def test_headers_match_tarfile_on_edge_cases(member: Member) -> None:
    assert member.header() == reference(member)


# ------------------------------------------------------------------ layers of a tree made here, read back
#
# Everything below builds layers the way build() does (scan, layer_members, content_key,
# write_layer) from a small tree made by the test, and reads them back with readers that
# share no code with the writer: Python's tarfile, GNU tar, gzip and zstd.

CAP_OTHER = bytes.fromhex("0100000200300000000000000000000000000000")  # + cap_net_admin
BIG = 5 * 1024 * 1024 + 123  # several MB, not a multiple of 512 or of the writer's buffers
SIZES = (0, 1, 511, 512, 513, 1024, BIG)
ODD_NAME = b"names/caf\xe9 latin-1"  # not UTF-8
LONG_NAME = "names/" + "n" * 120  # longer than a ustar name field
HUGE_UID, HUGE_GID = 3_000_000, 4_000_000  # above 2097151, the largest a ustar field holds
FAR_FUTURE, BEFORE_1970 = 9_000_000_000, -100  # mtimes a ustar field cannot hold
DIR_MTIME = 1_234_567


def _fill(path: Path, size: int, seed: int) -> None:
    path.write_bytes(random.Random(seed).randbytes(size))


def make_tree(root: Path) -> None:
    """Every kind of object a layer can hold, and the attributes that need PAX records."""
    files = root / "files"
    files.mkdir(parents=True)
    for size in SIZES:
        _fill(files / f"size-{size}", size, size)
    os.utime(files / "size-1", (1_600_000_000, 1_600_000_000))
    # two hard-link sets, one with three names in three directories
    (root / "links/a").mkdir(parents=True)
    (root / "links/b").mkdir()
    _fill(root / "links/a/one", 700, 1)
    os.link(root / "links/a/one", root / "links/b/one-again")
    _fill(root / "links/b/three", 3000, 3)
    os.setxattr(root / "links/b/three", "user.linked", b"every name")
    os.link(root / "links/b/three", root / "links/a/three-2")
    os.link(root / "links/b/three", root / "links/three-3")
    (root / "links/rel").symlink_to("../files/size-1")
    (root / "links/abs").symlink_to("/etc/passwd")
    (root / "links/dangling").symlink_to("does/not/exist")
    (root / "links/long-target").symlink_to("t" * 150)
    devices = root / "devices"
    devices.mkdir()
    os.mknod(devices / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(devices / "sda1", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.mknod(devices / "big-minor", 0o600 | stat.S_IFCHR, os.makedev(4095, 1048575))
    os.mkfifo(devices / "fifo", 0o620)
    os.chown(devices / "sda1", 0, 6)
    xa = root / "xattrs"
    xa.mkdir()
    _fill(xa / "ping", 4000, 7)
    os.chmod(xa / "ping", 0o755)
    os.setxattr(xa / "ping", "security.capability", CAP_VALUE)
    _fill(xa / "noted", 10, 8)
    os.setxattr(xa / "noted", "user.note", b"\xffbinary\x00value")
    os.setxattr(xa / "noted", "user.empty", b"")
    os.setxattr(xa / "noted", "user.comment", "text ☃".encode())
    os.setxattr(xa, "user.dir", b"on a directory")
    names = root / "names"
    names.mkdir()
    # b"x\x80" sorts before "xé" as bytes (the order of tar --sort=name), after it as str
    for name in (ODD_NAME, b"names/new\nline", LONG_NAME.encode(), "names/unicode-é☃".encode(), b"names/x\x80",
                 "names/xé".encode()):
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(name)
    os.symlink(b"caf\xe9", os.path.join(os.fsencode(root), b"names/latin-1-target"))
    modes = root / "modes"
    modes.mkdir()
    for name, mode in (("setuid", 0o4755), ("setgid", 0o2711), ("sticky-file", 0o1644), ("none", 0o000)):
        _fill(modes / name, 64, mode)
        os.chmod(modes / name, mode)
    (modes / "sticky-dir").mkdir()
    os.chmod(modes / "sticky-dir", 0o1777)
    (modes / "private").mkdir()
    os.chmod(modes / "private", 0o700)
    os.chown(modes / "private", 1234, 5678)
    ids = root / "ids"
    ids.mkdir()
    _fill(ids / "huge-ids", 5, 9)
    os.chown(ids / "huge-ids", HUGE_UID, HUGE_GID)
    os.lchown(root / "links/dangling", 4321, 8765)
    _fill(ids / "future", 3, 10)
    os.utime(ids / "future", (FAR_FUTURE, FAR_FUTURE))
    _fill(ids / "past", 3, 11)
    os.utime(ids / "past", (BEFORE_1970, BEFORE_1970))
    os.utime(root / "links/rel", (1_500_000_000, 1_500_000_000), follow_symlinks=False)
    (root / "deep/er/still").mkdir(parents=True)
    _fill(root / "deep/er/still/file", 100, 12)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root("device nodes, foreign owners and security.capability")
    root = tmp_path_factory.mktemp("tree") / "root"
    make_tree(root)
    return root


@dataclass
class Layer:
    members: list[Member]
    key: str | None
    blob: bytes
    diff_id: str
    tar_size: int
    annotations: dict[str, str]


def scan_members(root: Path, select: Callable[[str], bool] = lambda path: True,
                 dir_mtime: int = DIR_MTIME) -> list[Member]:
    """The members of a layer holding the objects of ROOT whose path SELECT accepts
    (with every file hashed, as when earlier layers may be reused)."""
    with Rootfs(root) as rootfs:
        own = scan_rootfs(rootfs, BuildSettings(), hash_content=True)
    return layer_members([o for p, o in own.objects.items() if select(p)], own.objects, dir_mtime)


def build_layer(root: Path, compression: str = "gzip", level: int = 6) -> Layer:
    """A layer of every object of ROOT, as build() writes it."""
    with Rootfs(root) as rootfs:
        own = scan_rootfs(rootfs, BuildSettings(), hash_content=True)
        members = layer_members(own.objects.values(), own.objects, DIR_MTIME)
        key = content_key(members)
        out = io.BytesIO()
        written = write_layer(rootfs, members, compression, level, out)
    return Layer(members, key, out.getvalue(), written.diff_id, written.tar_size, written.annotations)


def tar_of(blob: bytes, compression: str) -> bytes:
    """The tar stream of a layer, as gzip/zstd themselves decompress it after testing it
    (several gzip members or zstd frames are fine), and as Python decompresses it."""
    assert compression in ("gzip", "zstd", "zstd:chunked")
    compression = compression.partition(":")[0]  # zstd:chunked is zstd to any other reader
    subprocess.run([compression, "-t"], input=blob, check=True, capture_output=True)
    tar = subprocess.run([compression, "-dc"], input=blob, check=True, capture_output=True).stdout
    if compression == "gzip":
        assert blob[:3] == b"\x1f\x8b\x08"  # gzip, deflate: not a bare zlib stream
        assert gzip.decompress(blob) == tar
    else:
        assert blob[:4] == b"\x28\xb5\x2f\xfd"
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
        assert reader.read() == tar
    return tar


def test_stream_checks_accept_several_gzip_members_and_zstd_frames() -> None:
    """The checks below must not break when the writer starts new gzip members or zstd
    frames: the formats allow them and clients read them."""
    parts = [b"a" * 1000, b"b" * 3000]
    assert tar_of(b"".join(gzip.compress(p, mtime=0) for p in parts), "gzip") == b"".join(parts)
    frames = b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)
    assert tar_of(frames, "zstd") == b"".join(parts)
    with pytest.raises(subprocess.CalledProcessError):
        tar_of(zlib.compress(parts[0]), "gzip")  # zlib framing is not gzip


def _on_disk(root: Path, name: str) -> bytes:
    return os.path.join(os.fsencode(root), os.fsencode(name))


def _xattrs(path: bytes) -> dict[str, bytes]:
    names = sorted(os.listxattr(path, follow_symlinks=False))
    return {os.fsdecode(n): os.getxattr(path, n, follow_symlinks=False) for n in names}


def _sha256_of(path: bytes) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# file type on disk -> (tar type, GNU tar's listing letter)
_TYPES = {stat.S_IFREG: (tarfile.REGTYPE, "-"), stat.S_IFDIR: (tarfile.DIRTYPE, "d"),
          stat.S_IFLNK: (tarfile.SYMTYPE, "l"), stat.S_IFCHR: (tarfile.CHRTYPE, "c"),
          stat.S_IFBLK: (tarfile.BLKTYPE, "b"), stat.S_IFIFO: (tarfile.FIFOTYPE, "p")}


def check_with_tarfile(root: Path, tar: bytes, dir_mtime: int = DIR_MTIME) -> dict[bytes, int]:
    """Every member of TAR against the object of the same name under ROOT: type, mode,
    ids, mtime, size, data, link target, device numbers, xattrs; every object of ROOT is
    a member. Returns the count of members by tar type."""
    seen: dict[bytes, os.stat_result] = {}
    first_name: dict[tuple[int, int], str] = {}
    kinds: dict[bytes, int] = {}
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        infos = tf.getmembers()
        names = [os.fsencode(ti.name) for ti in infos]
        assert names == sorted(names), "members are sorted by name bytes"
        assert len(set(names)) == len(names)
        for ti in infos:
            path = _on_disk(root, ti.name)
            st = os.lstat(path)
            what = f"{ti.name!r}"
            parent = os.path.dirname(os.fsencode(ti.name))
            assert not parent or parent in seen, f"{what} comes before its parent"
            seen[os.fsencode(ti.name)] = st
            inode = (st.st_dev, st.st_ino)
            expected_type = _TYPES[stat.S_IFMT(st.st_mode)][0]
            if expected_type == tarfile.REGTYPE and st.st_nlink > 1 and inode in first_name:
                expected_type = tarfile.LNKTYPE
            assert ti.type == expected_type, what
            assert ti.mode == stat.S_IMODE(st.st_mode), f"{what}: mode {ti.mode:o}"
            assert (ti.uid, ti.gid, ti.uname, ti.gname) == (st.st_uid, st.st_gid, "", ""), what
            if ti.isdir():
                assert ti.mtime == dir_mtime, what
            else:
                assert ti.mtime == int(st.st_mtime), what
            xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                      for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            assert xattrs == _xattrs(path), what
            if ti.type == tarfile.REGTYPE:
                first_name.setdefault(inode, ti.name)
                assert ti.size == st.st_size, what
                data = tf.extractfile(ti).read()
                assert hashlib.sha256(data).hexdigest() == _sha256_of(path), what
            else:
                assert ti.size == 0, what
            if ti.type == tarfile.LNKTYPE:
                assert ti.linkname == first_name[inode], what
                target = os.lstat(_on_disk(root, ti.linkname))
                assert (target.st_dev, target.st_ino) == inode, what
            elif ti.type == tarfile.SYMTYPE:
                assert os.fsencode(ti.linkname) == os.readlink(path), what
            else:
                assert ti.linkname == "", what
            if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                assert (ti.devmajor, ti.devminor) == (os.major(st.st_rdev), os.minor(st.st_rdev)), what
            kinds[ti.type] = kinds.get(ti.type, 0) + 1
    everything = {os.fsencode(os.path.relpath(os.path.join(d, n), os.fsencode(root)))
                  for d, dirs, files in os.walk(os.fsencode(root)) for n in dirs + files}
    assert everything == set(seen), f"missing from the layer: {everything - set(seen)}"
    return kinds


_LISTING = re.compile(
    r"(?P<type>[-dlcbph])(?P<perms>[-rwxsStT]{9})[*+]? +(?P<uid>\d+)/(?P<gid>\d+) +(?P<size>\d+|\d+,\d+) +"
    r"(?P<when>-?\d{4,}-\d\d-\d\d \d\d:\d\d:\d\d) +(?P<rest>.*)"
)
_PERMS = ((0o400, "r"), (0o200, "w"), (0o100, "x"), (0o40, "r"), (0o20, "w"), (0o10, "x"),
          (0o4, "r"), (0o2, "w"), (0o1, "x"))


def _mode_of(perms: str) -> int:
    """Permission bits from ls-style letters (s/S: setuid or setgid, t/T: sticky)."""
    mode = 0
    for i, ((bit, letter), ch) in enumerate(zip(_PERMS, perms)):
        if ch in (letter, "s", "t"):
            mode |= bit
        if ch in "sStT":
            mode |= (stat.S_ISUID, stat.S_ISGID, stat.S_ISVTX)[i // 3]
    return mode


def _unescape(text: str) -> bytes:
    """A name as GNU tar's escape quoting prints it in the C locale (\\ooo, \\n, \\\\)."""
    return codecs.escape_decode(text.encode("ascii"))[0]


def gnu_tar_listing(tar: bytes) -> list[dict]:
    """`tar --xattrs --numeric-owner --full-time -tvv` (every xattr listed), parsed: one dict per member."""
    proc = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--full-time",
                           "--quoting-style=escape", "-tvvf", "-"], input=tar, capture_output=True, check=True,
                          env={"PATH": os.environ["PATH"], "LC_ALL": "C", "TZ": "UTC"})
    # Names that are not UTF-8 carry the POSIX record hdrcharset=BINARY (tarfile's PAX
    # writer), which GNU tar does not know: it warns, and reads the name's bytes as they are.
    warnings = set(proc.stderr.decode().splitlines())
    assert warnings <= {"tar: Ignoring unknown extended header keyword 'hdrcharset'"}, proc.stderr
    entries: list[dict] = []
    for line in proc.stdout.decode("ascii").splitlines():
        if line.startswith("  x: "):
            length, key = line[5:].split(" ", 1)
            entries[-1]["xattrs"][key] = int(length)
            continue
        m = _LISTING.fullmatch(line)
        assert m, f"unexpected line from GNU tar: {line!r}"
        rest, target = m["rest"], None
        if m["type"] == "l":
            rest, target = rest.split(" -> ", 1)
        elif m["type"] == "h":
            rest, target = rest.split(" link to ", 1)
        mtime = calendar.timegm(time.strptime(m["when"], "%Y-%m-%d %H:%M:%S"))
        entries.append({"type": m["type"], "mode": _mode_of(m["perms"]), "ids": (int(m["uid"]), int(m["gid"])),
                        "size": m["size"], "mtime": mtime, "name": _unescape(rest).rstrip(b"/"),
                        "target": None if target is None else _unescape(target), "xattrs": {}})
    return entries


def check_with_gnu_tar(root: Path, tar: bytes) -> int:
    """GNU tar's listing of TAR against ROOT, member by member; returns how many."""
    entries = gnu_tar_listing(tar)
    for e in entries:
        path = os.path.join(os.fsencode(root), e["name"])
        st = os.lstat(path)
        what = repr(e["name"])
        letter = _TYPES[stat.S_IFMT(st.st_mode)][1]
        assert letter == "-" if e["type"] == "h" else e["type"] == letter, what
        assert e["mode"] == stat.S_IMODE(st.st_mode), f"{what}: {e['mode']:o}"
        assert e["ids"] == (st.st_uid, st.st_gid), what
        assert e["mtime"] == (DIR_MTIME if letter == "d" else int(st.st_mtime)), what
        if letter in "cb":
            assert e["size"] == f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}", what
        else:
            assert int(e["size"]) == (st.st_size if e["type"] == "-" else 0), what
        if e["type"] == "l":
            assert e["target"] == os.readlink(path), what
        elif e["type"] == "h":
            target = os.lstat(os.path.join(os.fsencode(root), e["target"]))
            assert (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino), what
        assert e["xattrs"] == {k: len(v) for k, v in _xattrs(path).items()}, what
    return len(entries)


def _walk(root: Path) -> set[bytes]:
    base = os.fsencode(root)
    return {os.path.relpath(os.path.join(d, n), base) for d, dirs, files in os.walk(base) for n in dirs + files}


# ------------------------------------------------------------------ the tests of layers read back


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_every_member_read_back_matches_the_file_on_disk(tree: Path, compression: str) -> None:
    require_tools("tar", "gzip", "zstd")
    layer = build_layer(tree, compression, 3)
    tar = tar_of(layer.blob, compression)
    assert layer.annotations == {}  # only zstd:chunked has a table of contents to point at
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() and layer.tar_size == len(tar)
    # ends with two zero blocks, padded to a whole 10 KiB record as tarfile and GNU tar do
    assert len(tar) % tarfile.RECORDSIZE == 0 and tar[-1024:] == bytes(1024)
    kinds = check_with_tarfile(tree, tar)
    # every kind was checked; two sets of hard links make three second names
    assert set(kinds) == {tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE,
                          tarfile.BLKTYPE, tarfile.FIFOTYPE} and kinds[tarfile.LNKTYPE] == 3, kinds
    assert check_with_gnu_tar(tree, tar) == sum(kinds.values()) == len(layer.members) == len(_walk(tree))


def test_a_zstd_chunked_layer_reads_back_as_the_tar(tree: Path, tmp_path: Path) -> None:
    """The same checks for zstd:chunked, on the names its table of contents can hold."""
    require_tools("zstd")
    root = tmp_path / "root"
    copy_tree(tree, root)
    for d, _, files in os.walk(os.fsencode(root)):
        for name in files:
            path = os.path.join(d, name)
            try:
                name.decode("utf-8")
                if os.path.islink(path):
                    os.readlink(path).decode("utf-8")
            except UnicodeDecodeError:
                os.unlink(path)
    layer = build_layer(root, "zstd:chunked", 3)
    tar = tar_of(layer.blob, "zstd:chunked")
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() and layer.tar_size == len(tar)
    kinds = check_with_tarfile(root, tar)
    assert sum(kinds.values()) == len(layer.members) == len(_walk(root)) and kinds[tarfile.REGTYPE] > 10
    assert {k.rpartition(".")[2] for k in layer.annotations} == {
        "manifest-checksum", "manifest-position", "tarsplit-checksum", "tarsplit-position"}


def test_gnu_tar_extracts_the_same_tree(tree: Path, tmp_path: Path) -> None:
    require_tools("tar")
    tar = tar_of(build_layer(tree).blob, "gzip")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-", "-C", out],
                   input=tar, check=True, capture_output=True)
    coverage = Coverage()
    assert compare_trees(tree, out, [], coverage) == []
    assert coverage.capabilities == ["xattrs/ping"] and len(coverage.hardlink_sets) == 2
    assert coverage.devices == 3 and coverage.fifos == 1 and coverage.setuid
    for path in _walk(tree):
        assert _xattrs(os.path.join(os.fsencode(tree), path)) == _xattrs(os.path.join(os.fsencode(out), path))


def test_identical_trees_give_identical_bytes(tree: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy_tree(tree, copy)  # other inodes, other path: same content and attributes
    for compression in ("gzip", "zstd"):
        a, b, c = build_layer(tree, compression), build_layer(tree, compression), build_layer(copy, compression)
        assert a.blob == b.blob == c.blob
        assert a.key == b.key == c.key and a.key is not None
        assert a.diff_id == c.diff_id


@pytest.mark.parametrize("size", [8192, 8704, 8705])
def test_the_archive_ends_with_two_zero_blocks_and_a_whole_record(tmp_path: Path, size: int) -> None:
    # one member: its header, its data padded to 512, then two zero blocks, and zeros up
    # to the next multiple of 10240 (8704: the two blocks end exactly on a record)
    (tmp_path / "f").write_bytes(b"\xff" * size)
    members = scan_members(tmp_path)
    assert [m.name for m in members] == ["f"]
    with Rootfs(tmp_path) as rootfs:
        out = io.BytesIO()
        write_layer(rootfs, members, "gzip", 1, out)
    tar = gzip.decompress(out.getvalue())
    data_end = 512 + -(-size // 512) * 512
    assert len(tar) == -(-(data_end + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
    assert tar[512:512 + size] == b"\xff" * size and tar[512 + size:].count(0) == len(tar) - 512 - size


def test_a_layer_root_is_a_root_owned_0755_directory_first(tree: Path) -> None:
    members = scan_members(tree, lambda path: path == "files/size-1")
    with Rootfs(tree) as rootfs:
        own = scan_rootfs(rootfs, BuildSettings(), hash_content=True)
    rooted = layer_members([own.objects["files/size-1"]], own.objects, 42, with_root=True)
    # the same members after it (their sources are two scans' stats: atimes may differ)
    assert [replace(m, source=None) for m in rooted[1:]] == [
        replace(m, source=None, mtime=42 if m.type == tarfile.DIRTYPE else m.mtime) for m in members]
    (ti,) = tarfile.open(fileobj=io.BytesIO(rooted[0].header()), mode="r:").getmembers()
    assert (ti.name, ti.type, ti.mode, ti.uid, ti.gid, ti.mtime) == (".", tarfile.DIRTYPE, 0o755, 0, 0, 42)


def test_only_regular_files_become_hard_links(tmp_path: Path) -> None:
    """Only sets of regular files are kept in one layer (keep_hardlinks_together): a FIFO
    or a symlink with two names is written twice as itself, never as a link to a name
    that may be in another layer."""
    os.mkfifo(tmp_path / "fifo")
    os.link(tmp_path / "fifo", tmp_path / "fifo-again")
    (tmp_path / "sym").symlink_to("fifo")
    os.link(tmp_path / "sym", tmp_path / "sym-again", follow_symlinks=False)
    members = scan_members(tmp_path)
    assert [(m.name, m.type, m.linkname) for m in members] == [
        ("fifo", tarfile.FIFOTYPE, ""), ("fifo-again", tarfile.FIFOTYPE, ""),
        ("sym", tarfile.SYMTYPE, "fifo"), ("sym-again", tarfile.SYMTYPE, "fifo")]


def test_a_socket_cannot_be_a_member(tmp_path: Path) -> None:
    """The scan skips sockets; an object of a kind tar cannot hold that reaches the writer
    anyway is an error that names it."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        obj = FsObject("sock", os.lstat(tmp_path / "sock"))
    with pytest.raises(RootfsError) as e:
        layer_members([obj], {"sock": obj}, 0)
    assert str(e.value) == "/sock: cannot store file type 140000 in a layer"


def test_parents_come_with_the_normalised_directory_mtime(tree: Path) -> None:
    members = scan_members(tree, lambda path: path == "deep/er/still/file", dir_mtime=42)
    assert [m.name for m in members] == ["deep", "deep/er", "deep/er/still", "deep/er/still/file"]
    for m in members[:3]:
        st = os.lstat(tree / m.name)
        assert (m.type, m.mtime, m.mode, m.uid, m.gid) == (
            tarfile.DIRTYPE, 42, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    assert members[3].mtime == int(os.lstat(tree / "deep/er/still/file").st_mtime)


def test_hard_links_point_at_the_first_name_of_their_own_set_in_the_layer(tree: Path) -> None:
    links = {m.name: m for m in scan_members(tree, lambda path: path.startswith("links/"))}
    assert links["links/a/one"].type == tarfile.REGTYPE
    assert (links["links/b/one-again"].type, links["links/b/one-again"].linkname) == (tarfile.LNKTYPE, "links/a/one")
    assert links["links/a/three-2"].type == tarfile.REGTYPE  # sorts first of its set
    for name in ("links/b/three", "links/three-3"):
        assert (links[name].type, links[name].linkname) == (tarfile.LNKTYPE, "links/a/three-2"), name
    # a layer holding part of a set links only inside itself
    part = {m.name: m for m in scan_members(tree, lambda path: path in ("links/b/three", "links/three-3"))}
    assert part["links/b/three"].type == tarfile.REGTYPE and part["links/b/three"].size == 3000
    assert (part["links/three-3"].type, part["links/three-3"].linkname) == (tarfile.LNKTYPE, "links/b/three")


def test_files_hashed_while_writing_give_the_key_of_files_hashed_before(tree: Path) -> None:
    """A build that could reuse nothing hashes file data only while writing; the key it
    then records must be the one a build hashing first computes."""
    with Rootfs(tree) as rootfs:
        own = scan_rootfs(rootfs, BuildSettings(), hash_content=False)
        members = layer_members(own.objects.values(), own.objects, DIR_MTIME)
        assert content_key(members) is None  # not hashed yet
        hashes = write_layer(rootfs, members, "gzip", 1, io.BytesIO()).hashes
    # every regular file, the empty ones too, and nothing else
    assert set(hashes) == {m.name for m in members if m.type == tarfile.REGTYPE}
    written = content_key(members, hashes)  # with the hashes the writer took
    assert written is not None and written == build_layer(tree).key
    hashed = scan_members(tree)
    with Rootfs(tree) as rootfs:
        assert write_layer(rootfs, hashed, "gzip", 1, io.BytesIO()).hashes == {}  # none left to take


@pytest.mark.parametrize("change", ["edited", "removed", "shrinking"])
def test_a_file_changed_since_the_scan_stops_the_layer(tmp_path: Path, change: str) -> None:
    """The content key was taken from what the scan saw: a file that differs when its data
    is copied would make the key lie."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"a")
    (root / "f").write_bytes(os.urandom(2 * GZIP_BLOCK))  # read in parts: more than a block
    members = scan_members(root)
    real_readv = os.readv

    def shrinking(fd, buffers):
        n = real_readv(fd, buffers)
        if n > 1:  # f's first part (a has one byte): cut f short after it
            os.truncate(root / "f", n)
        return n

    with pytest.MonkeyPatch.context() as mp:
        if change == "edited":
            with open(root / "f", "r+b") as f:
                f.write(b"x")  # in place: same inode and size, a new ctime
            message = "changed"
        elif change == "removed":
            (root / "f").unlink()
            message = "disappeared"
        else:
            mp.setattr(tarwriter.os, "readv", shrinking)
            message = "shrank"
        with Rootfs(root) as rootfs, pytest.raises(RootfsError) as e:
            write_layer(rootfs, members, "gzip", 1, io.BytesIO())
    assert str(e.value) == f"/f {message} during the build; nothing was written, rerun"


# ------------------------------------------------------------------ the content key


def _mutations(members: list[Member]) -> dict[str, tuple[int, Member]]:
    """For every field a member writes, one member of the layer with that field changed
    (its index and the changed member)."""
    by_name = {m.name: (i, m) for i, m in enumerate(members)}

    def changed(path: str, **values: object) -> tuple[int, Member]:
        i, m = by_name[path]
        return i, replace(m, **values)

    cap = by_name["xattrs/ping"][1].xattrs
    noted = dict(by_name["xattrs/noted"][1].xattrs)
    return {
        "name": changed("files/size-1", name="files/size-2"),
        "type": changed("devices/null", type=tarfile.BLKTYPE),
        "mode": changed("files/size-1", mode=0o600),
        "mode of a directory": changed("files", mode=0o750),
        "uid": changed("files/size-1", uid=1),
        "gid": changed("files/size-1", gid=1),
        "mtime": changed("files/size-1", mtime=1_600_000_001),
        "mtime of a directory": changed("files", mtime=DIR_MTIME + 1),
        "size": changed("files/size-512", size=511),
        "linkname": changed("links/rel", linkname="../files/size-0"),
        "linkname of a hard link": changed("links/b/one-again", linkname="links/a/three-2"),
        "devmajor": changed("devices/sda1", devmajor=9),
        "devminor": changed("devices/sda1", devminor=2),
        "xattrs: security.capability": changed("xattrs/ping", xattrs=(("security.capability", CAP_OTHER),)),
        "xattrs: no security.capability": changed("xattrs/ping", xattrs=()),
        "xattrs: security.capability elsewhere": changed("files/size-1", xattrs=cap),
        **{
            f"xattrs: {k}": changed("xattrs/noted", xattrs=tuple(sorted({**noted, k: v + b"!"}.items())))
            for k, v in noted.items()
        },
        **{
            f"xattrs: no {k}": changed("xattrs/noted", xattrs=tuple((a, b) for a, b in sorted(noted.items()) if a != k))
            for k in noted
        },
        "xattrs: on a directory": changed("xattrs", xattrs=()),
        "content_hash": changed("files/size-1", source=None, content_hash="0" * 64),
    }


def test_the_content_key_changes_with_every_written_field(tree: Path) -> None:
    members = scan_members(tree)
    base = content_key(members)
    assert base is not None and content_key(list(members)) == base
    keys = {"unchanged": base}
    for what, (i, member) in _mutations(members).items():
        keys[what] = content_key([*members[:i], member, *members[i + 1:]])
    assert len(set(keys.values())) == len(keys), "two different layers share a key"
    # every field of Member but the data's source is covered above
    covered = {what.split(" ")[0].rstrip(":") for what in keys} - {"unchanged"}
    assert covered == {f.name for f in fields(Member)} - {"source"}
    # and every one of them changes the tar bytes (what the key stands for)
    for what, (i, member) in _mutations(members).items():
        if what != "content_hash":
            assert member.header() != members[i].header(), what


def test_the_content_key_follows_the_files_on_disk(tree: Path, tmp_path: Path) -> None:
    """Changes made on disk the way a package manager or an admin would make them; after
    each, the layer gets a key it never had before."""
    root = tmp_path / "root"
    copy_tree(tree, root)

    def in_place(path: str, offset: int) -> None:  # same size, same mtime: only the data
        p = root / path
        st = p.stat()
        with open(p, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 1]))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))

    def relink(path: str, target: str) -> None:
        (root / path).unlink()
        os.link(root / target, root / path)

    def retarget(path: str, target: str) -> None:
        (root / path).unlink()
        (root / path).symlink_to(target)

    def renode(path: str, major: int, minor: int) -> None:
        st = os.lstat(root / path)
        (root / path).unlink()
        os.mknod(root / path, st.st_mode, os.makedev(major, minor))

    changes: list[tuple[str, Callable[[], None]]] = [
        ("data of a small file", lambda: in_place("files/size-511", 0)),
        ("data deep in a large file", lambda: in_place(f"files/size-{BIG}", BIG - 100)),
        ("data of a hard-linked file", lambda: in_place("links/b/three", 10)),
        ("mode", lambda: os.chmod(root / "files/size-1", 0o640)),
        ("setuid bit", lambda: os.chmod(root / "modes/setuid", 0o755)),
        ("directory mode", lambda: os.chmod(root / "modes/private", 0o750)),
        ("uid", lambda: os.chown(root / "files/size-0", 1, -1)),
        ("gid", lambda: os.chown(root / "files/size-0", -1, 1)),
        ("directory owner", lambda: os.chown(root / "deep", 7, 7)),
        ("mtime", lambda: os.utime(root / "files/size-1024", (1_700_000_000, 1_700_000_000))),
        ("size", lambda: os.truncate(root / "files/size-513", 512)),
        ("symlink target", lambda: retarget("links/rel", "../files/size-0")),
        ("hard-link target", lambda: relink("links/three-3", "links/a/one")),
        ("device minor", lambda: renode("devices/sda1", 8, 2)),
        ("device major", lambda: renode("devices/null", 2, 3)),
        ("security.capability", lambda: os.setxattr(root / "xattrs/ping", "security.capability", CAP_OTHER)),
        ("security.capability removed", lambda: os.removexattr(root / "xattrs/ping", "security.capability")),
        ("user xattr", lambda: os.setxattr(root / "xattrs/noted", "user.note", b"other")),
        ("empty user xattr given a value", lambda: os.setxattr(root / "xattrs/noted", "user.empty", b"x")),
        ("user xattr removed", lambda: os.removexattr(root / "xattrs/noted", "user.comment")),
        ("user xattr added", lambda: os.setxattr(root / "files/size-1", "user.new", b"1")),
        ("name", lambda: os.rename(root / "names/unicode-é☃", root / "names/unicode-e")),
        ("new file", lambda: (root / "files/new").write_bytes(b"")),
    ]
    seen = {build_key(root): "the copy"}
    assert seen == {build_key(tree): "the copy"}
    for what, change in changes:
        change()
        key = build_key(root)
        assert key not in seen, f"{what}: same key as after {seen.get(key)}"
        seen[key] = what


def build_key(root: Path) -> str:
    key = content_key(scan_members(root))
    assert key is not None
    return key
