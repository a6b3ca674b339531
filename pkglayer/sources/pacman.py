"""Reader for pacman's local database (ALPM: Arch Linux and its derivatives).

What pacman records, and where (`var/lib/pacman/local/NAME-VERSION/`, one directory per
installed package; `ALPM_DB_VERSION` beside them):
- `desc`: `%FIELD%` sections (name, `[epoch:]pkgver-pkgrel` version, arch, `%BASE%` the
  pkgbase a split package was built from, build date, installed size);
- `files`: `%FILES%`, every path the package installed, relative to the root, directories
  with a trailing "/"; `%BACKUP%`, the config files (`path<TAB>md5`) that upgrades keep;
- `mtree`: the gzipped `.MTREE` of the package archive (bsdtar's mtree format): type,
  mode, mtime, sha256 and link target of each entry.

`var/lib/pacman/sync/*.db` are downloaded repository indexes (like apt's lists), and
`var/cache/pacman/pkg` holds downloaded packages: neither is part of this database.
pacman keeps no changelog with dates, so a package's only evidence of change is its
%BUILDDATE%.
"""

from __future__ import annotations

import logging
import re
import stat
import zlib
from collections import Counter

from ..errors import DatabaseError, RootfsError
from ..rootfs import Rootfs
from .base import FileRecord, Package, PackageSource

log = logging.getLogger(__name__)

DBPATH = "var/lib/pacman"
LOCAL = f"{DBPATH}/local"
DB_VERSION = f"{LOCAL}/ALPM_DB_VERSION"
PACMAN_CONF = "etc/pacman.conf"

# Far above what real packages need (texlive's `files` is a few MB), far below what
# would exhaust memory.
_MAX_DESC = 1 << 20
_MAX_FILES = 64 << 20
_MAX_MTREE_GZ = 16 << 20
_MAX_MTREE = 64 << 20
_MAX_CONF = 1 << 20

# pacman's own rules: names of [a-z0-9@._+-] not starting with "-" or "." (upper case
# seen in old packages is allowed); pkgver and pkgrel hold neither ":", "-" nor "/".
_NAME = re.compile(r"[A-Za-z0-9@_+][A-Za-z0-9@._+-]*")
_VERSION = re.compile(r"(?:(?P<epoch>[0-9]+):)?(?P<ver>[^:/\s-]+)-(?P<rel>[^:/\s-]+)")
_SECTION = re.compile(r"%[A-Z0-9]+%")
_MD5 = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(rb"[0-9a-f]{64}")
_MD5_BYTES = re.compile(rb"[0-9a-f]{32}")
_MODE = re.compile(rb"[0-7]{1,4}")
_ESCAPE = re.compile(rb"\\([0-7]{3}|\\)")

_MTREE_TYPES = {
    b"file": stat.S_IFREG,
    b"dir": stat.S_IFDIR,
    b"link": stat.S_IFLNK,
    b"char": stat.S_IFCHR,
    b"block": stat.S_IFBLK,
    b"fifo": stat.S_IFIFO,
}


def _decode(data: bytes) -> str:
    # pacman stores names as bytes; names that are not UTF-8 must survive to the disk.
    return data.decode("utf-8", "surrogateescape")


class PacmanSource(PackageSource):
    format = "pacman"

    def __init__(self, rootfs: Rootfs):
        super().__init__(rootfs)
        self._packages: list[Package] | None = None

    @classmethod
    def detect(cls, rootfs: Rootfs) -> bool:
        # pacman writes ALPM_DB_VERSION when it creates the local database (since 4.2).
        return rootfs.is_file(DB_VERSION)

    def database_paths(self) -> list[str]:
        return [LOCAL]

    def architecture(self) -> str | None:
        configured = self._configured_architecture()
        if configured:
            return configured
        pkgs = self.packages()
        for p in pkgs:
            if p.name == "pacman" and p.arch != "any":
                return p.arch
        counts = Counter(p.arch for p in pkgs if p.arch != "any")
        if not counts:
            return None
        return min(counts, key=lambda a: (-counts[a], a))  # ties broken by name

    def packages(self) -> list[Package]:
        if self._packages is None:
            pkgs = [
                self._package(entry)
                for entry in self.rootfs.listdir(LOCAL)
                if entry != "ALPM_DB_VERSION"
            ]
            seen: dict[str, Package] = {}
            for p in pkgs:
                if p.name in seen:
                    raise DatabaseError(
                        f"{LOCAL}: package {p.name} is installed twice"
                        f" ({seen[p.name].name}-{_evr(seen[p.name])} and {p.name}-{_evr(p)})"
                    )
                seen[p.name] = p
            self._packages = sorted(pkgs, key=lambda p: p.key)
        return self._packages

    # -- one package -------------------------------------------------------------------

    def _package(self, entry: str) -> Package:
        where = f"{LOCAL}/{entry}"
        desc = _parse_desc(self._read(f"{where}/desc", _MAX_DESC), f"{where}/desc")
        name = _single(desc, "NAME", f"{where}/desc")
        version = _single(desc, "VERSION", f"{where}/desc")
        arch = _single(desc, "ARCH", f"{where}/desc")
        if not _NAME.fullmatch(name):
            raise DatabaseError(f"{where}/desc: invalid package name {name!r}")
        m = _VERSION.fullmatch(version)
        if m is None:
            raise DatabaseError(f"{where}/desc: invalid version {version!r}")
        if not _NAME.fullmatch(arch):
            raise DatabaseError(f"{where}/desc: invalid architecture {arch!r}")
        if entry != f"{name}-{version}":
            # pacman finds a package by its directory: a mismatch is a forged entry.
            raise DatabaseError(f"{where}: directory does not match its desc ({name} {version})")
        listed, backup = _parse_files(self._read(f"{where}/files", _MAX_FILES), f"{where}/files")
        mtree = self._mtree(f"{where}/mtree")
        files = []
        for path in listed:
            attrs = mtree.get(path.rstrip("/"), {})
            files.append(_record(path, attrs, path in backup))
        built = _int(desc.get("BUILDDATE"))
        return Package(
            name=name,
            version=m["ver"],
            arch=arch,
            epoch=m["epoch"] if m["epoch"] not in (None, "0") else None,
            release=m["rel"],
            source=(desc.get("BASE") or [name])[0],
            size=_int(desc.get("SIZE")),
            # pacman has no dated changelog; the build date is the one dated change.
            changelog=(built,) if built > 0 else (),
            files=tuple(files),
        )

    def _read(self, relpath: str, limit: int) -> bytes:
        try:
            return self.rootfs.read_bytes(relpath, max_size=limit)
        except FileNotFoundError:
            raise DatabaseError(f"{relpath}: missing") from None
        except (OSError, RootfsError) as e:
            raise DatabaseError(f"{relpath}: cannot read: {e}") from None

    def _mtree(self, relpath: str) -> dict[str, dict[bytes, bytes]]:
        """Path (relative, no "./") → mtree keywords. The mtree is advisory, like dpkg's
        md5sums: a missing or damaged one leaves the package without digests."""
        try:
            packed = self.rootfs.read_bytes(relpath, max_size=_MAX_MTREE_GZ)
        except FileNotFoundError:
            log.debug("%s: missing, no digests for this package", relpath)
            return {}
        except (OSError, RootfsError) as e:
            log.warning("%s: unreadable (%s), no digests for this package", relpath, e)
            return {}
        try:
            inflate = zlib.decompressobj(wbits=47)  # gzip or zlib header
            text = inflate.decompress(packed, _MAX_MTREE)
            if inflate.unconsumed_tail:
                raise ValueError(f"larger than {_MAX_MTREE} bytes uncompressed")
            if not inflate.eof:
                raise ValueError("truncated")
            return _parse_mtree(text)
        except (zlib.error, ValueError) as e:
            log.warning("%s: damaged (%s), no digests for this package", relpath, e)
            return {}

    def _configured_architecture(self) -> str | None:
        """The first Architecture of pacman.conf's [options] that is not "auto"."""
        try:
            text = _decode(self.rootfs.read_bytes(PACMAN_CONF, max_size=_MAX_CONF))
        except (OSError, RootfsError):
            return None
        section = None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif section == "options" and "=" in line:
                key, _, value = line.partition("=")
                if key.strip() == "Architecture":
                    for arch in value.split():
                        if arch != "auto":
                            return arch
        return None


def _evr(p: Package) -> str:
    evr = f"{p.epoch}:{p.version}" if p.epoch else p.version
    return f"{evr}-{p.release}"


def _int(values: list[str] | None) -> int:
    if values and values[0].isdigit():
        return int(values[0])
    return 0


def _single(desc: dict[str, list[str]], field: str, where: str) -> str:
    values = desc.get(field)
    if not values or len(values) != 1:
        raise DatabaseError(f"{where}: no single %{field}% value")
    return values[0]


def _sections(data: bytes, where: str) -> list[tuple[int, str, list[str]]]:
    """(line number, name, value lines) of each `%NAME%` section of a desc/files file."""
    if b"\0" in data:
        raise DatabaseError(f"{where}: binary data, not an ALPM database file")
    out: list[tuple[int, str, list[str]]] = []
    current: list[str] | None = None
    for number, line in enumerate(_decode(data).split("\n"), 1):
        if not line:
            current = None
        elif current is not None:
            current.append(line)
        elif _SECTION.fullmatch(line):
            current = []
            out.append((number, line[1:-1], current))
        else:
            raise DatabaseError(f"{where}: line {number}: not an ALPM database file")
    return out


def _parse_desc(data: bytes, where: str) -> dict[str, list[str]]:
    return {name: values for _, name, values in _sections(data, where)}


def _parse_files(data: bytes, where: str) -> tuple[list[str], set[str]]:
    """Listed paths (relative, directories with a trailing "/") and the %BACKUP% paths."""
    listed: list[str] = []
    backup: set[str] = set()
    for number, name, values in _sections(data, where):
        for offset, value in enumerate(values, 1):
            if name == "FILES":
                path = value
            elif name == "BACKUP":
                path, _, md5 = value.rpartition("\t")
                if not path or not _MD5.fullmatch(md5):
                    raise DatabaseError(f"{where}: line {number + offset}: malformed backup entry")
            else:
                continue
            if not _safe(path):
                # pacman writes normalised relative paths only: anything else is forged.
                raise DatabaseError(
                    f"{where}: line {number + offset}: path outside the root: {path!r}"
                )
            if name == "FILES":
                listed.append(path)
            else:
                backup.add(path)
    return listed, backup


def _safe(path: str) -> bool:
    if not path or path.startswith("/") or "\0" in path:
        return False
    parts = path.rstrip("/").split("/")
    return all(p not in ("", ".", "..") for p in parts)


def _unescape(word: bytes) -> str:
    """bsdtar writes unsafe bytes of names and link targets as \\ooo (octal)."""
    if b"\\" in word:
        word = _ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1], 8)]), word)
    return _decode(word)


def _parse_mtree(text: bytes) -> dict[str, dict[bytes, bytes]]:
    """The entries of an mtree in bsdtar's full-path form (`./path key=value...`, with
    `/set` and `/unset` defaults), keywords left as bytes. Raises ValueError on
    anything else."""
    defaults: dict[bytes, bytes] = {}
    out: dict[str, dict[bytes, bytes]] = {}
    pending = b""
    for number, raw in enumerate(text.split(b"\n"), 1):
        line = pending + raw if pending else raw
        if line.endswith(b"\\") and not line.endswith(b"\\\\"):
            pending = line[:-1] + b" "
            continue
        pending = b""
        words = line.split()
        if not words or words[0].startswith(b"#"):
            continue
        head = words[0]
        if head.startswith(b"./") or head == b".":
            attrs = defaults.copy()
            _keywords(words, number, attrs)
            out[_unescape(head)[2:]] = attrs
        elif head == b"/set":
            _keywords(words, number, defaults)
        elif head == b"/unset":
            for w in words[1:]:
                if w == b"all":
                    defaults.clear()
                else:
                    defaults.pop(w, None)
        else:
            raise ValueError(f"line {number}: not a full-path mtree entry")
    return out


def _keywords(words: list[bytes], number: int, into: dict[bytes, bytes]) -> None:
    for w in words[1:]:
        key, sep, value = w.partition(b"=")
        if not sep:
            raise ValueError(f"line {number}: keyword without a value")
        into[key] = value


def _record(path: str, attrs: dict[bytes, bytes], config: bool) -> FileRecord:
    kind = _MTREE_TYPES.get(attrs.get(b"type", b""))
    mode = None
    if kind is not None and _MODE.fullmatch(attrs.get(b"mode", b"")):
        mode = kind | int(attrs[b"mode"], 8)
    digest = algo = None
    if kind == stat.S_IFREG:
        if _SHA256.fullmatch(attrs.get(b"sha256digest", b"")):
            digest, algo = attrs[b"sha256digest"].decode(), "sha256"
        elif _MD5_BYTES.fullmatch(attrs.get(b"md5digest", b"")):
            digest, algo = attrs[b"md5digest"].decode(), "md5"
    seconds = attrs.get(b"time", b"").partition(b".")[0]
    link = attrs.get(b"link") if kind == stat.S_IFLNK else None
    return FileRecord(
        path="/" + path.rstrip("/"),
        digest=digest,
        digest_algo=algo,
        mode=mode,
        linkto=_unescape(link) if link is not None else None,
        mtime=int(seconds) if seconds.isdigit() else None,
        config=config,
    )
