"""Reader for Python distributions installed by pip (or uv, poetry... any PEP 376/627
installer) beside the distribution's own packages.

Each `NAME-VERSION.dist-info` directory in a site directory is one installed
distribution: `METADATA` (email headers) gives its name and version, `RECORD` (CSV:
path, `algo=urlsafe-base64 digest`, size) the files it installed, relative to the site
directory (`../../../bin/x` for scripts), and `INSTALLER` the tool that installed it.
Distro packages carry no INSTALLER (Debian, Arch) or "rpm" (Fedora, which also drops
RECORD): those are the distro database's and are skipped here.

This is not a distro format (it is not in `SOURCES`): it runs beside the rootfs's
package database, and the distro database wins where both list a path.

Where it looks (rootfs-relative; `python3*` matches each version):
- the system site directories: usr/lib/python3/dist-packages (Debian's distro
  packages), usr/{lib,lib64}/python3*/{site,dist}-packages, and the same under usr/local
  (where `pip install` as root writes on Debian, Fedora and Arch);
- user sites of `pip install --user`: root/.local and home/*/.local;
- virtual environments: a directory holding `pyvenv.cfg` at the top level (/venv,
  /.venv) or up to three levels below opt, srv, app, home, root, usr/local and
  workspace (/opt/venv, /opt/app/venv, /app/.venv, /home/u/proj/.venv...), with its
  {lib,lib64}/python3*/site-packages. Conda environments and Python 2 are not read.

A RECORD path must stay inside its environment (the prefix the site directory belongs
to: /usr/local for /usr/local/lib/python3.11/dist-packages), also after resolving the
symlinks of its parent directories in the rootfs; paths that do not are skipped with a
warning, as are distributions whose METADATA or RECORD is unusable. Nothing a RECORD
names is ever read: this reader reads only dist-info files, through `Rootfs`.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import io
import logging
import os
import posixpath
import re
import stat
from dataclasses import dataclass

from ..errors import RootfsError
from ..rootfs import Rootfs
from .base import FileRecord, Package, PackageSource, settled_times

log = logging.getLogger(__name__)

# Package.name prefix: keeps pip's "six" apart from a distro package or source "six",
# so the two never merge into one component.
NAME_PREFIX = "pip-"
# INSTALLER values distributions write into the dist-info of their own packages.
DISTRO_INSTALLERS = frozenset({"rpm", "debian", "dpkg"})

SYSTEM_SITES = (
    "usr/lib/python3/dist-packages",
    "usr/lib/python3*/site-packages",
    "usr/lib/python3*/dist-packages",
    "usr/lib64/python3*/site-packages",
    "usr/local/lib/python3*/site-packages",
    "usr/local/lib/python3*/dist-packages",
    "usr/local/lib64/python3*/site-packages",
    "root/.local/lib/python3*/site-packages",
    "home/*/.local/lib/python3*/site-packages",
)
VENV_PARENTS = ("opt", "srv", "app", "home", "root", "usr/local", "workspace")
VENV_DEPTH = 3
VENV_SITES = ("lib/python3*/site-packages", "lib64/python3*/site-packages")

_MAX_INSTALLER = 4096
_MAX_METADATA = 16 << 20
# tensorflow's RECORD is ~3 MB
_MAX_RECORD = 64 << 20
# PEP 508 names; versions that are not PEP 440 are taken only in these characters
_NAME = re.compile(r"[A-Z0-9](?:[A-Z0-9._-]*[A-Z0-9])?", re.I)
_LEGACY_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")


@dataclass(frozen=True)
class SiteDir:
    path: str  # rootfs-relative, symlinks resolved
    prefix: str  # the environment it belongs to (path without lib*/python*/site-packages)


class PipSource(PackageSource):
    format = "pip"

    def __init__(self, rootfs: Rootfs):
        super().__init__(rootfs)
        self._packages: list[Package] | None = None

    @classmethod
    def detect(cls, rootfs: Rootfs) -> bool:
        """True when some site directory holds a distribution that pip (not the distro) installed."""
        src = cls(rootfs)
        return any(
            src._installer(f"{site.path}/{d}") is not None
            for site in src.site_dirs()
            for d in src._dist_infos(site)
        )

    def database_paths(self) -> list[str]:
        # The dist-info directories are in RECORD: they go with their distribution.
        return []

    def architecture(self) -> str | None:
        return None

    def site_dirs(self) -> list[SiteDir]:
        """Every site directory searched, symlinks resolved, each once, sorted."""
        found: dict[str, SiteDir] = {}
        patterns = list(SYSTEM_SITES)
        for venv in self._venvs():
            patterns += [f"{venv}/{site}" for site in VENV_SITES]
        for pattern in patterns:
            for path in _glob_dirs(self.rootfs, pattern):
                # Every pattern ends in lib*/python*/*-packages below its prefix.
                prefix = self.rootfs.resolve(path.rsplit("/", 3)[0])
                real = self.rootfs.resolve(path)
                if not _inside(real, prefix):
                    log.warning("/%s: a symlink out of its environment /%s; not read", path, prefix)
                    continue
                found.setdefault(real, SiteDir(real, prefix))
        return [found[k] for k in sorted(found)]

    def packages(self) -> list[Package]:
        """One Package per distribution name and version; the same version installed in
        several environments is one package with the files of all of them."""
        if self._packages is None:
            merged: dict[str, Package] = {}
            for site in self.site_dirs():
                for name in self._dist_infos(site):
                    pkg = self._package(site, name)
                    if pkg is None:
                        continue
                    first = merged.get(pkg.key)
                    if first is not None:
                        settled = (first.files_settled_ns, pkg.files_settled_ns)
                        pkg = Package(
                            name=pkg.name, version=pkg.version, arch=pkg.arch, epoch=pkg.epoch,
                            source=pkg.source, size=first.size + pkg.size,
                            files=first.files + pkg.files,
                            # the earlier of the two RECORDs vouches for the files of both,
                            # by mtimes alone only if both were copied
                            files_settled_ns=None if None in settled else min(settled),
                            files_copied=first.files_copied and pkg.files_copied,
                        )
                    merged[pkg.key] = pkg
            self._packages = [merged[k] for k in sorted(merged)]
        return self._packages

    # -- discovery ---------------------------------------------------------------------

    def _venvs(self) -> list[str]:
        found = [d for d in _glob_dirs(self.rootfs, "*") if self.rootfs.is_file(f"{d}/pyvenv.cfg")]
        for parent in VENV_PARENTS:
            level = [parent] if _is_dir(self.rootfs, parent) else []
            for _ in range(VENV_DEPTH):
                level = [f"{d}/{e}" for d in level for e in self.rootfs.listdir(d)
                         if _is_dir(self.rootfs, f"{d}/{e}")]
                found += [d for d in level if self.rootfs.is_file(f"{d}/pyvenv.cfg")]
        return found

    def _dist_infos(self, site: SiteDir) -> list[str]:
        return [
            e for e in self.rootfs.listdir(site.path)
            if e.endswith(".dist-info") and _is_dir(self.rootfs, f"{site.path}/{e}")
        ]

    def _installer(self, dist_info: str) -> str | None:
        """The INSTALLER of a dist-info when it is not a distro's, else None."""
        try:
            raw = self.rootfs.read_bytes(f"{dist_info}/INSTALLER", max_size=_MAX_INSTALLER)
        except FileNotFoundError:
            return None  # distro packages (Debian, Arch) write none
        except (OSError, RootfsError) as e:
            log.warning("/%s/INSTALLER: unreadable (%s); not a pip package", dist_info, e)
            return None
        installer = raw.decode("utf-8", "replace").strip()
        if not installer or installer in DISTRO_INSTALLERS:
            return None
        return installer

    # -- one distribution --------------------------------------------------------------

    def _package(self, site: SiteDir, dist: str) -> Package | None:
        where = f"{site.path}/{dist}"
        if self._installer(where) is None:
            return None
        ident = self._identity(where)
        if ident is None:
            return None
        name, epoch, version = ident
        record = self._read(f"{where}/RECORD", _MAX_RECORD)
        if record is None:
            return None
        files, size = self._files(site, where, record)
        # pip, uv and installer write RECORD last, after the files and their bytecode:
        # its mtime vouches for files not changed since (ownership.vouched_for).
        settled_ns, copied = settled_times(self.rootfs.stamp(f"{where}/RECORD"))
        return Package(
            name=name, version=version, arch="", epoch=epoch, source=name, size=size, files=files,
            files_settled_ns=settled_ns, files_copied=copied,
        )

    def _read(self, relpath: str, limit: int) -> bytes | None:
        try:
            return self.rootfs.read_bytes(relpath, max_size=limit)
        except FileNotFoundError:
            log.warning("/%s: missing; its distribution's files stay unowned", relpath)
        except (OSError, RootfsError) as e:
            log.warning("/%s: unreadable (%s); its distribution's files stay unowned", relpath, e)
        return None

    def _identity(self, where: str) -> tuple[str, str | None, str] | None:
        """(Package name, PEP 440 epoch or None, version) from METADATA."""
        # Imported here: a rebuild that finds the databases unchanged never needs them.
        # METADATA is an email header block (core metadata spec), read as
        # importlib.metadata reads it: packaging.metadata's parser, which also checks
        # every field, cost 35 ms of imports on the critical path of a first scan.
        from email.parser import BytesHeaderParser
        from email.policy import compat32

        from packaging.utils import canonicalize_name
        from packaging.version import InvalidVersion, Version

        data = self._read(f"{where}/METADATA", _MAX_METADATA)
        if data is None:
            return None
        headers = BytesHeaderParser(policy=compat32).parsebytes(data)
        name, version = _header_text(headers.get("Name")), _header_text(headers.get("Version"))
        if not name or not _NAME.fullmatch(name) or not version:
            log.warning("/%s/METADATA: no valid Name and Version; files stay unowned", where)
            return None
        try:
            parsed = Version(version)
        except InvalidVersion:
            if not _LEGACY_VERSION.fullmatch(version):
                log.warning("/%s/METADATA: invalid version %r; files stay unowned", where, version)
                return None
            return NAME_PREFIX + canonicalize_name(name), None, version
        # "1!2.0": the epoch goes where distro epochs go (the key shows "1:2.0").
        public = str(parsed).partition("!")[2] if parsed.epoch else str(parsed)
        return NAME_PREFIX + canonicalize_name(name), str(parsed.epoch) if parsed.epoch else None, public

    def _files(self, site: SiteDir, where: str, record: bytes) -> tuple[tuple[FileRecord, ...], int]:
        """FileRecords for RECORD's rows that stay in the environment, plus the
        directories below the site directory that hold them; and the recorded size."""
        import csv  # here: an unchanged rebuild reads no database, and every start would pay

        files: dict[str, FileRecord] = {}
        size = 0
        text = record.decode("utf-8", "surrogateescape")
        try:
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as e:
            log.warning("/%s/RECORD: not CSV (%s); files stay unowned", where, e)
            return (), 0
        for number, row in enumerate(rows, 1):
            if not row:
                continue
            if len(row) != 3 or not row[0]:
                log.warning("/%s/RECORD: line %d: not path,hash,size; skipped", where, number)
                continue
            path = self._locate(site, row[0])
            if path is None:
                log.warning(
                    "/%s/RECORD: line %d: %r is outside %s; not claimed",
                    where, number, row[0], "/" + site.prefix,
                )
                continue
            if row[2].isdigit():
                size += int(row[2])
            digest, algo = _digest(row[1])
            files[path] = FileRecord(path="/" + path, digest=digest, digest_algo=algo)
            parent = posixpath.dirname(path)
            while parent.startswith(site.path + "/") and parent not in files:
                files[parent] = FileRecord(path="/" + parent)
                parent = posixpath.dirname(parent)
        return tuple(files[p] for p in sorted(files)), size

    def _locate(self, site: SiteDir, recorded: str) -> str | None:
        """The rootfs-relative path a RECORD row names, its directories' symlinks
        resolved, or None when it leaves the environment (lexically, or through a
        symlinked directory)."""
        if "\0" in recorded:
            return None
        if recorded.startswith("/"):
            path = posixpath.normpath(recorded).lstrip("/")
        else:
            path = posixpath.normpath(f"{site.path}/{recorded}")
            if path == ".." or path.startswith("../"):
                return None
        if not _inside(path, site.prefix):
            return None
        try:
            parent = self.rootfs.resolve(posixpath.dirname(path))
        except RootfsError:
            return None
        if not _inside(parent, site.prefix):
            return None
        # the real path: a symlinked directory on the way is not one the distribution made
        return posixpath.join(parent, posixpath.basename(path))


def _header_text(value: object) -> str | None:
    # compat32 hands back a Header object for bytes that are not ASCII: never a valid
    # name or version.
    return value.strip() if isinstance(value, str) else None


def _inside(path: str, prefix: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _digest(field: str) -> tuple[str | None, str | None]:
    """RECORD's `algo=urlsafe-base64-nopad` as (hex, algo); Debian rewrites it as hex."""
    algo, sep, value = field.partition("=")
    if not sep or algo not in hashlib.algorithms_guaranteed or algo.startswith("shake"):
        return None, None
    size = hashlib.new(algo).digest_size
    if len(value) == 2 * size and re.fullmatch(r"[0-9a-fA-F]+", value):
        return value.lower(), algo
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None, None
    if len(raw) != size:
        return None, None
    return raw.hex(), algo


def _is_dir(rootfs: Rootfs, relpath: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(rootfs.path, rootfs.resolve(relpath))).st_mode)
    except (OSError, RootfsError):
        return False


def _glob_dirs(rootfs: Rootfs, pattern: str) -> list[str]:
    """Directories matching a rootfs-relative pattern whose components may hold
    fnmatch wildcards; symlinks are followed inside the rootfs."""
    level = [""]
    for comp in pattern.split("/"):
        nxt = []
        for d in level:
            names = fnmatch.filter(rootfs.listdir(d), comp) if any(c in comp for c in "*?[") else [comp]
            nxt += [f"{d}/{n}" if d else n for n in names if _is_dir(rootfs, f"{d}/{n}" if d else n)]
        level = nxt
    return level
