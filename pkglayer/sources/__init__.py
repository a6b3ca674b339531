"""Package-database readers. Each format is one module; `SOURCES` lists them in the
order they are tried."""

from __future__ import annotations

from ..errors import DatabaseError
from ..rootfs import Rootfs
from .base import FileRecord, Package, PackageSource
from .dpkg import DpkgSource
from .rpmdb import RpmSource

SOURCES: list[type[PackageSource]] = [RpmSource, DpkgSource]

__all__ = ["FileRecord", "Package", "PackageSource", "SOURCES", "open_source"]


def open_source(rootfs: Rootfs) -> PackageSource | None:
    """The package database of the rootfs, or None when it has none (all files unowned)."""
    found = [cls for cls in SOURCES if cls.detect(rootfs)]
    if len(found) > 1:
        names = ", ".join(c.format for c in found)
        raise DatabaseError(f"rootfs holds several package databases ({names}); pick one with --format")
    return found[0](rootfs) if found else None
