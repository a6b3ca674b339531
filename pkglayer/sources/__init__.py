"""Package-database readers. Each format is one module; `SOURCES` lists them in the
order they are tried."""

from __future__ import annotations

from ..errors import DatabaseError
from ..rootfs import Rootfs
from .base import FileRecord, Package, PackageSource
from .dpkg import DpkgSource
from .pacman import PacmanSource
from .rpmdb import RpmSource

SOURCES: list[type[PackageSource]] = [RpmSource, DpkgSource, PacmanSource]

__all__ = ["FileRecord", "Package", "PackageSource", "SOURCES", "open_source", "source_formats"]


def open_source(rootfs: Rootfs, fmt: str | None = None) -> PackageSource | None:
    """The package database of the rootfs, or None when it has none (all files unowned).

    fmt picks a format when a rootfs holds more than one ("none": read no database)."""
    if fmt == "none":
        return None
    if fmt is not None:
        cls = next((c for c in SOURCES if c.format == fmt), None)
        if cls is None:
            known = ", ".join(c.format for c in SOURCES)
            raise DatabaseError(f"unknown package format {fmt!r} (known: {known}, none)")
        if not cls.detect(rootfs):
            raise DatabaseError(f"no {fmt} database in {rootfs.path}")
        return cls(rootfs)
    found = [cls for cls in SOURCES if cls.detect(rootfs)]
    if len(found) > 1:
        names = ", ".join(c.format for c in found)
        raise DatabaseError(f"rootfs holds several package databases ({names}); pick one with --format")
    return found[0](rootfs) if found else None


def source_formats() -> list[str]:
    return [c.format for c in SOURCES]
