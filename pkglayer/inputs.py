"""What a build reads: a root filesystem directory, or an image (`--from`) unpacked into a
private working tree first. An image's platform and configuration come with it."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from .errors import PkglayerError
from .fsutil import Workspace
from .imageconfig import merge_config
from .layout import DEFAULT_LIMITS, Image, ImageError, ImageOptions, Limits, Platform, open_layout
from .scan import Progress
from .transports import STORAGE, check_readable, fetch, parse_image_ref

log = logging.getLogger(__name__)

# OCI platform values (GOOS, GOARCH, variant): copied into the output config and the plan label.
_PLATFORM_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class SourceInfo:
    ref: str
    manifest_digest: str
    layers: int
    entries: int
    bytes: int
    whiteouts: int
    opaque: int

    def as_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "manifestDigest": self.manifest_digest, "layers": self.layers,
            "entries": self.entries, "bytes": self.bytes, "whiteouts": self.whiteouts, "opaqueDirs": self.opaque,
        }


@dataclass
class BuildInputs:
    rootfs: str  # the directory to build from
    image: Image | None = None  # the source image (--from): its config carries over
    platform: Platform | None = None  # the source image's; None: from the package database
    source: SourceInfo | None = None

    @property
    def unpacked(self) -> bool:
        """The tree is a fresh temporary copy: the digest cache can never hit it."""
        return self.image is not None


def is_ostree_tree(rootfs: str) -> bool:
    """The tree holds an ostree repository in /sysroot: a bootc or ostree-container image."""
    from .rootfs import Rootfs

    with Rootfs(rootfs) as root:
        return root.exists("sysroot/ostree/repo")


def image_platform(image: Image, where: str) -> Platform:
    """The platform of an image, checked: pkglayer copies it into what it writes."""
    values = {"architecture": image.architecture, "os": image.os, "variant": image.variant}
    for key, value in values.items():
        if value is not None and not _PLATFORM_RE.fullmatch(value):
            raise ImageError(f"{where}: config {key} {value[:80]!r} is not a valid OCI platform value")
    return Platform(image.architecture, image.os, image.variant or None)


def open_inputs(
    rootfs: str | None,
    source_ref: str | None,
    work: Workspace,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
    registry_options=None,
) -> BuildInputs:
    """The build's inputs: `rootfs` as it is, or the image `source_ref` (any transport)
    copied into `work` where it is not an oci: layout, then unpacked there."""
    if (rootfs is None) == (source_ref is None):
        raise PkglayerError("give either a ROOTFS directory or --from IMAGE, not both" if rootfs
                            else "give a ROOTFS directory or --from IMAGE")
    if rootfs is not None:
        return BuildInputs(rootfs)
    assert source_ref is not None
    ref = parse_image_ref(source_ref, "--from")
    check_readable(ref, "--from")
    if os.geteuid() != 0:
        raise PkglayerError("--from needs root: unpacking keeps file owners and device nodes")
    # Local storage keeps layers uncompressed: take them so rather than compressed anew.
    layout, tag = fetch(ref, work, "source", registry_options, decompress=ref.transport == STORAGE, what="--from")
    image = open_layout(layout, tag, limits)
    # Everything copied from the source config is checked before anything is written.
    platform = image_platform(image, source_ref)
    merge_config(image.runtime, ImageOptions())  # an unusable config fails before the unpack
    tree = work.path("rootfs")
    os.mkdir(tree, 0o755)
    from .unpack import unpack  # here: a build from a directory never loads the unpacker

    stats = unpack(image, tree, limits, progress=progress)
    log.info("unpacked %s: %d layers, %d entries", source_ref, stats.layers, stats.entries)
    return BuildInputs(
        rootfs=tree,
        image=image,
        platform=platform,
        source=SourceInfo(
            ref=source_ref, manifest_digest=image.manifest_digest, layers=stats.layers,
            entries=stats.entries, bytes=stats.bytes, whiteouts=stats.whiteouts, opaque=stats.opaque,
        ),
    )
