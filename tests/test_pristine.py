"""Recognising an earlier layer as the pristine form of a package whose file was edited
(pkglayer.pristine), with a real package installed by dpkg and layers written by the tar
writer: accepted only when every byte is what a pristine install gives."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from pkglayer.blobstore import BlobDir
from pkglayer.build import scan_rootfs
from pkglayer.config import BuildSettings
from pkglayer.history import LayerRecord
from pkglayer.mediatypes import LAYER_MEDIA_TYPES
from pkglayer.pristine import is_pristine_layer
from pkglayer.rootfs import Rootfs
from pkglayer.tarwriter import content_key, layer_members, write_layer
from tests.helpers import deb_package, decompress, dpkg_install, dpkg_root, require_tools, sha256_digest
from tests.rootfs_factory import copy_tree

CONF = "etc/app/app.conf"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with one real package: a config file, a program and a data file."""
    require_tools("dpkg", "dpkg-deb")
    work = tmp_path_factory.mktemp("pristine")
    deb = deb_package(work, "app", "1.0-1", {CONF: b"setting = default\n", "usr/bin/app": b"#!/bin/sh\n" * 50,
                                            "usr/share/app/data": os.urandom(70_000)})
    root = dpkg_root(work / "root")
    dpkg_install(root, deb)
    os.chmod(root / "usr/bin/app", 0o4755)  # as a postinst might
    return root


def _members(root: Path):
    """What this build would write for the package, edited files included (as build()
    asks for a pristine layer), and its edited files with their database records."""
    with Rootfs(root) as rootfs:
        own = scan_rootfs(rootfs, BuildSettings(), hash_content=True)
    (key,) = own.packages
    edited = own.modified_by_package.get(key, [])
    members = layer_members([*own.homes.get(key, []), *(obj for obj, _ in edited)], own.objects, 0)
    return key, members, {obj.path: (obj, rec) for obj, rec in edited}


def _layer(root: Path, blobs: BlobDir, compression: str = "gzip") -> LayerRecord:
    """A layer of the package written from ROOT into BLOBS, as a build records it,
    holding the files of ROOT as they are (edited ones too)."""
    key, members, _ = _members(root)
    with Rootfs(root) as rootfs, blobs.writer() as w:
        diff_id = write_layer(rootfs, members, compression, 6, w).diff_id
        digest, size = w.commit()
    return LayerRecord(name=key, packages=(key,), content_key=content_key(members) or "", digest=digest,
                       diff_id=diff_id, size=size, media_type=LAYER_MEDIA_TYPES[compression],
                       compression=f"{compression}-6")


def _expected(root: Path):
    _, members, wanted = _members(root)
    return members, wanted


@pytest.fixture
def edited(installed: Path, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    copy_tree(installed, root)
    with open(root / CONF, "a") as f:
        f.write("setting = local\n")
    return root


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_the_layer_of_the_pristine_install_is_recognised(installed: Path, edited: Path, tmp_path: Path,
                                                         compression: str) -> None:
    blobs = BlobDir(tmp_path / "blobs", create=True)
    prior = _layer(installed, blobs, compression)
    expected, wanted = _expected(edited)
    assert list(wanted) == [CONF]
    assert is_pristine_layer(blobs, prior, expected, wanted)


def test_a_prior_from_another_tar_writer_with_more_padding_is_recognised(
    installed: Path, edited: Path, tmp_path: Path
) -> None:
    """Zero blocks after the end of the archive (a larger blocking factor) are part of
    the tar the diff_id covers."""
    blobs = BlobDir(tmp_path / "blobs", create=True)
    prior = _layer(installed, blobs)
    tar = decompress(Path(blobs.path(prior.digest)).read_bytes()) + bytes(2 * tarfile.RECORDSIZE)
    digest, size = blobs.add_bytes(gzip.compress(tar, mtime=0))
    padded = replace(prior, digest=digest, size=size, diff_id=sha256_digest(tar))
    expected, wanted = _expected(edited)
    assert is_pristine_layer(blobs, padded, expected, wanted)
    assert not is_pristine_layer(blobs, replace(padded, diff_id=prior.diff_id), expected, wanted)


def test_any_other_difference_is_refused(installed: Path, edited: Path, tmp_path: Path) -> None:
    blobs = BlobDir(tmp_path / "blobs", create=True)
    prior = _layer(installed, blobs)
    expected, wanted = _expected(edited)
    assert is_pristine_layer(blobs, prior, expected, wanted)
    # the recorded diff_id is not the tar's
    assert not is_pristine_layer(blobs, replace(prior, diff_id="sha256:" + "0" * 64), expected, wanted)
    # one member more, one less, or one with other attributes than this build would write
    assert not is_pristine_layer(blobs, prior, expected[:-1], wanted)
    assert not is_pristine_layer(blobs, prior, [*expected, expected[-1]], wanted)
    i = next(i for i, m in enumerate(expected) if m.name == "usr/bin/app")
    other_mode = [*expected[:i], replace(expected[i], mode=0o700), *expected[i + 1:]]
    assert not is_pristine_layer(blobs, prior, other_mode, wanted)
    # a blob that is missing, or cut short
    gone = replace(prior, digest="sha256:" + "1" * 64)
    assert not is_pristine_layer(blobs, gone, expected, wanted)
    path = blobs.path(prior.digest)
    data = Path(path).read_bytes()
    os.chmod(path, 0o644)
    Path(path).write_bytes(data[: len(data) // 2])
    assert not is_pristine_layer(blobs, prior, expected, wanted)


def test_the_edited_file_must_match_the_database_digest(installed: Path, edited: Path, tmp_path: Path) -> None:
    """The prior's copy of the edited file is compared with the package database's digest,
    not with anything on disk: a prior layer from a tree edited differently is refused."""
    other = tmp_path / "other"
    copy_tree(installed, other)
    (other / CONF).write_bytes(b"setting = something else\n")
    blobs = BlobDir(tmp_path / "blobs", create=True)
    prior = _layer(other, blobs)
    assert CONF in _names(blobs, prior)
    expected, wanted = _expected(edited)
    assert not is_pristine_layer(blobs, prior, expected, wanted)
    # the same prior accepted once the database's digest says its content is pristine
    obj, rec = wanted[CONF]
    md5 = hashlib.md5((other / CONF).read_bytes()).hexdigest()
    assert is_pristine_layer(blobs, prior, expected, {CONF: (obj, rec._replace(digest=md5))})


def _names(blobs: BlobDir, rec: LayerRecord) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(decompress(Path(blobs.path(rec.digest)).read_bytes()))) as tf:
        return tf.getnames()
