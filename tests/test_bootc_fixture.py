"""The bootc-style test image is what it claims to be: a real ostree repository under
sysroot/ostree/repo holding the tree's commit, the tree's files hard links into it, an
rpm database pkglayer reads, and the labels of a bootc image."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from tests import containers
from tests import rootfs_factory as factory
from tests.clients import run, scan

bootc_image = containers.bootc_image  # the fixture, found by name here

REPO_DIR = "sysroot/ostree/repo"


def test_bootc_image(bootc_image, tmp_path: Path) -> None:
    ref, labels, rootfs = bootc_image
    layout = Path(ref.removeprefix("oci:").rsplit(":", 1)[0])
    commit = labels["ostree.commit"]

    # The repository is real: ostree verifies every object of a copy of it, and the
    # commit's tree has the files the image has.
    copy = tmp_path / "repo"
    factory.copy_tree(rootfs / REPO_DIR, copy)
    assert "no errors found" in run(["ostree", f"--repo={copy}", "fsck"])
    assert run(["ostree", f"--repo={copy}", "rev-parse", factory.BOOTC_REF]).strip() == commit
    assert "/usr/bin/bash" in run(["ostree", f"--repo={copy}", "ls", "-R", commit, "/usr/bin"])

    # The image: one layer whose diff_id the label names, holding the commit object and
    # /usr files as hard links into the repository's objects, capabilities kept.
    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: layout / "blobs/sha256" / d.split(":")[1]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    assert config["config"]["Labels"] == labels
    assert labels["containers.bootc"] == "1" and labels["ostree.bootable"] == "true"
    assert config["rootfs"]["diff_ids"] == [labels["ostree.final-diffid"]]
    with tarfile.open(blob(manifest["layers"][0]["digest"])) as tar:
        members = {m.name.removeprefix("./"): m for m in tar}
    assert f"{REPO_DIR}/objects/{commit[:2]}/{commit[2:]}.commit" in members
    objects = f"{REPO_DIR}/objects/"
    linked = [m for m in members.values()
              if m.islnk() and (m.name.removeprefix("./").startswith(objects)
                                or m.linkname.removeprefix("./").startswith(objects))]
    assert len(linked) > 1000
    assert members["ostree"].issym() and members["ostree"].linkname == "sysroot/ostree"
    ping = members["usr/bin/pkglayer-ping"]
    if ping.islnk():  # the inode's first name in the tar holds its data and xattrs
        ping = members[ping.linkname.removeprefix("./")]
    assert "SCHILY.xattr.security.capability" in ping.pax_headers

    # pkglayer finds the rpm database where this variant keeps it.
    found = scan(rootfs)
    assert found["format"] == "rpm" and len(found["packages"]) > 50
