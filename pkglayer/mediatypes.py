"""OCI and Docker media types, in one table.

pkglayer writes OCI media types only; it reads Docker's too (images pulled from
registries or made by Docker). The layer table maps a media type to the compression of
its blob.
"""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# compression -> the OCI layer media type pkglayer writes (zstd:chunked is zstd to
# every reader; its table of contents is found through layer annotations)
LAYER_MEDIA_TYPES = {"none": OCI_TAR, "gzip": OCI_TAR_GZIP, "zstd": OCI_TAR_ZSTD, "zstd:chunked": OCI_TAR_ZSTD}
# every layer media type pkglayer reads -> the compression format of its blob
LAYER_COMPRESSION = {
    OCI_TAR: "none",
    OCI_TAR_GZIP: "gzip",
    OCI_TAR_ZSTD: "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}


def is_oci_layer(media_type: str) -> bool:
    """A layer media type pkglayer writes (and records in history.json)."""
    return media_type in LAYER_MEDIA_TYPES.values()


# The layer annotations of zstd:chunked (zstd_chunked.py writes them), here so that
# history.py can check them without loading the encoder and its libraries.
OLD_PREFIX = "io.containers.zstd-chunked."  # containers-storage 1.43
NEW_PREFIX = "io.github.containers.zstd-chunked."  # containers-storage 1.44 and later
TOC_CHECKSUM = "manifest-checksum"
TOC_POSITION = "manifest-position"
TARSPLIT_POSITION = "tarsplit-position"
TARSPLIT_CHECKSUM = "tarsplit-checksum"
ANNOTATION_KEYS = (
    OLD_PREFIX + TOC_CHECKSUM,
    OLD_PREFIX + TOC_POSITION,
    NEW_PREFIX + TOC_CHECKSUM,
    NEW_PREFIX + TOC_POSITION,
    NEW_PREFIX + TARSPLIT_CHECKSUM,
    NEW_PREFIX + TARSPLIT_POSITION,
)
