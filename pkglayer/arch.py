"""The image's OCI platform, from the distribution's architecture name or, for a rootfs
without a package database, from the ELF header of its shell."""

from __future__ import annotations

from .rootfs import Rootfs

# distribution spelling -> (GOARCH, variant)
_ARCH = {
    "amd64": ("amd64", None), "x86_64": ("amd64", None),
    "arm64": ("arm64", "v8"), "aarch64": ("arm64", "v8"),
    "armhf": ("arm", "v7"), "armv7hl": ("arm", "v7"), "armel": ("arm", "v5"),
    "armv7h": ("arm", "v7"), "armv6h": ("arm", "v6"),  # Arch Linux ARM
    "i386": ("386", None), "i686": ("386", None), "i586": ("386", None),
    "pentium4": ("386", None),  # Arch Linux 32
    "ppc64el": ("ppc64le", None), "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "mips64el": ("mips64le", None),
    "loong64": ("loong64", None), "loongarch64": ("loong64", None),
}

# ELF e_machine -> GOARCH (little-endian unless noted)
_ELF_MACHINE = {3: "386", 40: "arm", 62: "amd64", 183: "arm64", 21: "ppc64le", 22: "s390x", 243: "riscv64"}


def oci_platform(distro_arch: str | None, rootfs: Rootfs) -> tuple[str, str | None]:
    """(architecture, variant) for the image config."""
    if distro_arch and distro_arch in _ARCH:
        return _ARCH[distro_arch]
    goarch = _elf_arch(rootfs)
    if goarch:
        return goarch, ("v8" if goarch == "arm64" else None)
    if distro_arch:
        return distro_arch, None
    return "amd64", None


def _elf_arch(rootfs: Rootfs) -> str | None:
    for candidate in ("bin/sh", "usr/bin/sh", "bin/busybox"):
        if not rootfs.is_file(candidate):
            continue
        try:
            with rootfs.open(candidate) as f:
                head = f.read(20)
        except OSError:
            continue
        if len(head) >= 20 and head[:4] == b"\x7fELF":
            order = "little" if head[5] == 1 else "big"
            return _ELF_MACHINE.get(int.from_bytes(head[18:20], order))
    return None
