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

# compression -> the OCI layer media type pkglayer writes
LAYER_MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
# every layer media type pkglayer reads -> the compression of its blob
LAYER_COMPRESSION = {
    **{media_type: compression for compression, media_type in LAYER_MEDIA_TYPES.items()},
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}


def is_oci_layer(media_type: str) -> bool:
    """A layer media type pkglayer writes (and records in history.json)."""
    return media_type in LAYER_MEDIA_TYPES.values()
