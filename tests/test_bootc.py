"""bootc/ostree-container images: the test image is what it claims to be (a real ostree
repository under sysroot/ostree/repo holding the tree's commit, the tree's files hard
links into it, an rpm database pkglayer reads, the labels of a bootc image), and
rechunking it leaves the repository and its stale labels out."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from tests import containers
from tests import rootfs_factory as factory
from tests.helpers import layout_manifest, pkglayer, pkglayer_json, read_layer, run

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
    found = pkglayer_json("scan", rootfs, "-q")
    assert found["format"] == "rpm" and len(found["packages"]) > 50


def test_rechunking_a_bootc_image_leaves_the_ostree_repository_out(bootc_image, tmp_path: Path) -> None:
    """`--from` a bootc image: /sysroot's contents (the ostree repository, which describes
    the image as it was) are left out and an empty /sysroot stays; the stale ostree.*
    labels go, with a warning; containers.bootc=1 and the rest of the config stay; the
    rpm database is read where the image keeps it, and no package file counts as
    modified although the ostree checkout set every mtime to 0."""
    ref, labels, rootfs = bootc_image
    out = tmp_path / "out"
    proc = pkglayer("build", "--from", ref, "--output", f"oci:{out}:rechunked", "--json", "-q")
    result = json.loads(proc.stdout)
    assert "ostree.commit" in proc.stderr and "leaving out the contents of /sysroot" in proc.stderr
    packaged = [layer for layer in result["layers"] if layer["packages"]]
    assert len(packaged) > 20
    assert "modified" not in {layer["name"] for layer in result["layers"]}

    _, manifest, config = layout_manifest(out, "rechunked")
    kept = config["config"]["Labels"]
    assert kept["containers.bootc"] == "1"
    assert kept["org.opencontainers.image.version"] == labels["org.opencontainers.image.version"]
    assert not any(k.startswith("ostree.") for k in kept)
    assert config["config"]["Cmd"] == ["/sbin/init"]

    names: dict[str, tarfile.TarInfo] = {}
    for desc in manifest["layers"]:
        with read_layer(out, desc["digest"]) as tar:
            names.update((m.name, m) for m in tar)
    assert names["sysroot"].isdir()
    assert not any(n.startswith("sysroot/") for n in names)
    assert "usr/bin/bash" in names and names["ostree"].issym()
    # What was a hard link into the repository's objects is a plain file again.
    assert names["usr/bin/bash"].isreg()
