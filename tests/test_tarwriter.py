"""The tar writer's own header packing against Python's tarfile, on a real tree and on
the edge cases that need PAX records."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from pkglayer.config import BuildSettings
from pkglayer.ownership import scan_ownership
from pkglayer.rootfs import Rootfs
from pkglayer.sources import open_source
from pkglayer.tarwriter import Member, layer_members


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
        Member(name="cap", type=tarfile.REGTYPE, mode=0o755, uid=0, gid=0, mtime=5,
               xattrs=(("security.capability", b"\x01\x00\x00\x02\x00\x20"),)),
    ],
    ids=lambda m: m.name[:12],
)
def test_headers_match_tarfile_on_edge_cases(member: Member) -> None:
    assert member.header() == reference(member)
