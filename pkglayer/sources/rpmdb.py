"""Reader for rpm's database (Fedora, RHEL, openSUSE, ...), through the rpm bindings.

The database is copied out of the rootfs before rpm opens it: opening it in place would
create `-shm`/`-wal`/lock files there (and Debian's rpm, whose %_dbpath defaults to
~/.rpmdb, may even create `root/.rpmdb`). rpm's own integrity checks are weak (a
damaged sqlite file can read as an empty database), so the copy is checked with sqlite3
first and the header count compared with the row count.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import DatabaseError, RootfsError
from ..lazy import lazy_import
from ..rootfs import Rootfs
from .base import MAX_CHANGELOG_ENTRIES, FileRecord, Package, PackageSource

# The bindings take ~80 ms to import; a dpkg build never needs them.
rpm = lazy_import("rpm")

# Where distributions keep the database, in the order rpm-based systems look for it:
# Fedora >= 36, older Fedora/RHEL/SUSE, ostree systems.
LOCATIONS = ("usr/lib/sysimage/rpm", "var/lib/rpm", "usr/share/rpm")
# Database file → kind; a directory holding several (left over from a conversion) is
# read with the first.
DB_FILES = (("rpmdb.sqlite", "sqlite"), ("Packages", "bdb"), ("Packages.db", "ndb"))

# RPMTAG_FILEDIGESTALGO values (PGPHASHALGO_*) → hashlib names.
DIGEST_ALGOS = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
_BDB_HASH_MAGIC = 0x061561  # at offset 12 of the metadata page, in the writer's byte order
RPMFILE_CONFIG = 1 << 0
RPMFILE_GHOST = 1 << 6
# Only "normal" files are on disk as this package installed them. "replaced" (1) means
# another package overwrote the path (it lists the file as normal itself); "not
# installed" (2: --excludedocs, %_install_langs), "netshared" (3) and "wrong color"
# (4: the multilib loser) were never written by this package.
RPMFILE_STATE_NORMAL = 0

# rpm keeps the database path and log level in process-wide state.
_RPM_LOCK = threading.Lock()


class RpmSource(PackageSource):
    format = "rpm"

    def __init__(self, rootfs: Rootfs):
        super().__init__(rootfs)
        self._packages: list[Package] | None = None

    @classmethod
    def detect(cls, rootfs: Rootfs) -> bool:
        return _find(rootfs) is not None

    def database_paths(self) -> list[str]:
        found = _find(self.rootfs)
        return [found[0]] if found else []

    def architecture(self) -> str | None:
        pkgs = self.packages()
        for name in ("rpm", "filesystem", "glibc"):
            for p in pkgs:
                if p.name == name:
                    return p.arch
        counts = Counter(p.arch for p in pkgs if p.arch != "noarch")
        if not counts:
            return None
        return min(counts, key=lambda a: (-counts[a], a))  # ties broken by name

    def packages(self) -> list[Package]:
        if self._packages is None:
            self._packages = self._read()
        return self._packages

    def _read(self) -> list[Package]:
        import tempfile  # here: (with shutil) a start that reads no rpm database skips them

        found = _find(self.rootfs)
        if found is None:
            raise DatabaseError("no rpm database found")
        dbdir, dbfile, kind = found
        where = f"{dbdir}/{dbfile}"
        if kind == "ndb":
            raise DatabaseError(f"{where}: ndb rpm databases are not supported here")
        with tempfile.TemporaryDirectory(prefix="pkglayer-rpmdb-") as tmp:
            self._copy_db(dbdir, dbfile, tmp)
            copy = os.path.join(tmp, dbfile)
            rows = _check_sqlite(copy, where) if kind == "sqlite" else _check_bdb(copy, where)
            headers = 0  # gpg-pubkey included, to compare with the row count
            pkgs = []
            with _rpm_db(tmp, "sqlite" if kind == "sqlite" else "bdb_ro") as ts:
                try:
                    for h in ts.dbMatch():
                        headers += 1
                        if h[rpm.RPMTAG_NAME] != "gpg-pubkey":
                            pkgs.append(_package(h))
                except (rpm.error, ValueError) as e:  # ValueError: file arrays of unequal length
                    raise DatabaseError(f"{where}: corrupt rpm database ({e})") from None
        if rows is not None and headers != rows:
            raise DatabaseError(
                f"{where}: corrupt rpm database ({rows} rows, but rpm read {headers} headers)"
            )
        return sorted(pkgs, key=lambda p: p.key)

    def _copy_db(self, dbdir: str, dbfile: str, dest: str) -> None:
        # Committed sqlite transactions may still sit in the WAL; the -shm is host state.
        # Berkeley DB: rpm iterates Packages without its index files (it just warns).
        import shutil

        wal = f"{dbfile}-wal"
        names = [dbfile] + ([wal] if self.rootfs.is_file(f"{dbdir}/{wal}") else [])
        for name in names:
            try:
                with self.rootfs.open(f"{dbdir}/{name}") as src, open(
                    os.path.join(dest, name), "wb"
                ) as dst:
                    shutil.copyfileobj(src, dst, 1024 * 1024)
            except (OSError, RootfsError) as e:
                raise DatabaseError(f"{dbdir}/{name}: cannot read: {e}") from None


def _find(rootfs: Rootfs) -> tuple[str, str, str] | None:
    """(resolved directory, database file name, kind) of the first database found."""
    for loc in LOCATIONS:
        d = rootfs.resolve(loc)
        for name, kind in DB_FILES:
            if rootfs.is_file(f"{d}/{name}"):
                return d, name, kind
    return None


def _check_bdb(path: str, where: str) -> None:
    """Berkeley DB has no cheap full check; at least make sure it is a BDB hash file
    (rpm reads anything else as an empty database)."""
    with open(path, "rb") as f:
        magic = f.read(16)[12:16]
    if magic not in (_BDB_HASH_MAGIC.to_bytes(4, "little"), _BDB_HASH_MAGIC.to_bytes(4, "big")):
        raise DatabaseError(f"{where}: corrupt rpm database (not a Berkeley DB hash file)")


def _check_sqlite(path: str, where: str) -> int:
    """Number of headers the (copied) database holds; DatabaseError when it is damaged."""
    try:
        con = sqlite3.connect(path)
        try:
            problems = [r[0] for r in con.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise DatabaseError(f"{where}: corrupt rpm database ({problems[0]})")
            return con.execute("SELECT count(*) FROM Packages").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error as e:
        raise DatabaseError(f"{where}: corrupt rpm database ({e})") from None


@contextmanager
def _rpm_db(dbpath: str, backend: str) -> Iterator[rpm.TransactionSet]:
    """A transaction set reading the database in dbpath, with rpm's global state restored
    afterwards."""
    with _RPM_LOCK:
        # %_dbpath must be set before the TransactionSet exists; macros form a stack,
        # so delMacro brings back whatever was defined before.
        rpm.addMacro("_dbpath", dbpath)
        rpm.addMacro("_db_backend", backend)
        # Our own checks report corruption; rpm's messages would only be stderr noise.
        rpm.setVerbosity(rpm.RPMLOG_EMERG)
        ts = rpm.TransactionSet("/")
        try:
            # Signature checks would look for keys (in the host's keyring); header
            # digests stay on, as one more corruption check.
            ts.setVSFlags(rpm.RPMVSF_MASK_NOSIGNATURES)
            yield ts
        finally:
            ts.closeDB()
            del ts
            # The bindings cannot read the level back; NOTICE is rpm's default.
            rpm.setVerbosity(rpm.RPMLOG_NOTICE)
            rpm.delMacro("_db_backend")
            rpm.delMacro("_dbpath")


def _package(h: rpm.hdr) -> Package:
    name = h[rpm.RPMTAG_NAME]
    epoch = h[rpm.RPMTAG_EPOCH]
    return Package(
        name=name,
        version=h[rpm.RPMTAG_VERSION],
        release=h[rpm.RPMTAG_RELEASE],
        # Only gpg-pubkey pseudo-packages lack an arch in practice; treat others alike.
        arch=h[rpm.RPMTAG_ARCH] or "noarch",
        epoch=None if epoch is None else str(epoch),
        source=_srpm_name(h[rpm.RPMTAG_SOURCERPM]) or name,
        size=h[rpm.RPMTAG_LONGSIZE] or h[rpm.RPMTAG_SIZE] or 0,
        changelog=tuple(sorted(h[rpm.RPMTAG_CHANGELOGTIME] or (), reverse=True)[:MAX_CHANGELOG_ENTRIES]),
        files=tuple(_files(h)),
    )


def _srpm_name(srpm: str | None) -> str | None:
    """`bash-5.2.26-3.fc40.src.rpm` → `bash`."""
    if not srpm:
        return None
    parts = srpm.rsplit(".", 2)[0].rsplit("-", 2)  # drop ".src.rpm", then version-release
    return parts[0] if len(parts) == 3 else None


def _files(h: rpm.hdr) -> Iterator[FileRecord]:
    # The per-file tag arrays, read once each, are faster than rpm.files(h) (one object
    # per file), and give "" rather than a string of zeros for a missing digest.
    names = h[rpm.RPMTAG_FILENAMES]
    if not names:
        return
    algo = DIGEST_ALGOS.get(h[rpm.RPMTAG_FILEDIGESTALGO] or 1)
    # Headers may omit an array whose entries are all empty; zip must not stop short.
    blank = [""] * len(names)
    for name, digest, mode, linkto, mtime, fflags, state in zip(
        names,
        h[rpm.RPMTAG_FILEDIGESTS] or blank,
        h[rpm.RPMTAG_FILEMODES],
        h[rpm.RPMTAG_FILELINKTOS] or blank,
        h[rpm.RPMTAG_FILEMTIMES],
        h[rpm.RPMTAG_FILEFLAGS],
        h[rpm.RPMTAG_FILESTATES] or [RPMFILE_STATE_NORMAL] * len(names),
        strict=True,
    ):
        if state != RPMFILE_STATE_NORMAL:
            continue
        has_digest = bool(digest) and algo is not None  # an unknown algorithm is no digest
        yield FileRecord(
            path=name,
            digest=digest if has_digest else None,
            digest_algo=algo if has_digest else None,
            mode=mode,
            linkto=linkto or None,
            mtime=mtime,
            config=bool(fflags & RPMFILE_CONFIG),
            ghost=bool(fflags & RPMFILE_GHOST),
        )
