"""pkglayer: turn a distro root filesystem into an OCI image whose layers follow its packages."""

__version__ = "0.1.0"
