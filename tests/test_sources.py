"""The dpkg and rpm database readers, on real root filesystems built by conftest."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import rpm

from pkglayer.errors import DatabaseError
from pkglayer.rootfs import Rootfs
from pkglayer.sources import open_source
from pkglayer.sources.base import Package
from pkglayer.sources.dpkg import DpkgSource
from pkglayer.sources.rpmdb import RpmSource

RPMDB = "usr/lib/sysimage/rpm"


def _by_name(pkgs: list[Package]) -> dict[str, Package]:
    return {p.name: p for p in pkgs}


def _digest(path: Path, algo: str) -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


def _on_disk(root: Path, path: str) -> Path:
    """Where a database path is in the rootfs, merged-/usr symlinks resolved."""
    return root / Rootfs(root).resolve(path.lstrip("/"))


# -- dpkg ------------------------------------------------------------------------------


@pytest.fixture
def dpkg_db(deb_rootfs: Path, tmp_path: Path) -> Path:
    """A rootfs holding only a copy of the real dpkg database, cheap to damage."""
    root = tmp_path / "root"
    shutil.copytree(deb_rootfs / "var/lib/dpkg", root / "var/lib/dpkg", symlinks=True)
    return root


def test_dpkg_reads_every_installed_package(deb_rootfs: Path) -> None:
    out = subprocess.run(
        ["dpkg-query", f"--admindir={deb_rootfs}/var/lib/dpkg", "-W",
         "-f", "${Package} ${Version} ${Architecture}\n"],
        check=True, capture_output=True, text=True,
    ).stdout
    expected = sorted(f"{n}-{v}-{a}" for n, v, a in (line.split() for line in out.splitlines()))

    src = DpkgSource(Rootfs(deb_rootfs))
    pkgs = src.packages()
    assert [p.key for p in pkgs] == sorted(p.key for p in pkgs)
    assert sorted(p.key for p in pkgs) == expected
    bash = _by_name(pkgs)["bash"]
    assert bash.key.startswith("bash-5.2.15-") and bash.key.endswith("-amd64")
    assert bash.release is None and bash.source == "bash" and bash.size > 1024 * 1024
    assert _by_name(pkgs)["libc6"].source == "glibc"  # "Source: glibc (version)" or plain
    assert src.architecture() == "amd64"
    assert src.database_paths() == ["var/lib/dpkg"]
    assert DpkgSource.detect(Rootfs(deb_rootfs)) and not RpmSource.detect(Rootfs(deb_rootfs))


def test_dpkg_epoch_is_split_from_version(dpkg_db: Path) -> None:
    status = dpkg_db / "var/lib/dpkg/status"
    text = status.read_text().replace("Package: bash\n", "Package: bash\nX-Dummy: 1\n")
    text = text.replace("\nVersion: 5.2.15", "\nVersion: 3:5.2.15", 1)
    status.write_text(text)
    bash = _by_name(DpkgSource(Rootfs(dpkg_db)).packages())["bash"]
    assert bash.epoch == "3" and bash.version.startswith("5.2.15-")
    assert bash.key == f"bash-3:{bash.version}-amd64"


def test_dpkg_multiarch_list_files(deb_rootfs: Path) -> None:
    info = deb_rootfs / "var/lib/dpkg/info"
    qualified = sorted(p.name for p in info.glob("*:*.list"))
    assert qualified, "minbase has Multi-Arch: same packages"
    pkgs = {f"{p.name}:{p.arch}": p for p in DpkgSource(Rootfs(deb_rootfs)).packages()}
    for listname in qualified:
        pkg = pkgs[listname.removesuffix(".list")]
        listed = [ln for ln in (info / listname).read_text().splitlines() if ln and ln != "/."]
        assert [f.path for f in pkg.files] == listed


def test_dpkg_digests_from_md5sums_and_conffiles(deb_rootfs: Path) -> None:
    pkgs = _by_name(DpkgSource(Rootfs(deb_rootfs)).packages())
    files = {f.path: f for f in pkgs["bash"].files}
    assert "/." not in files
    bash = next(f for p, f in files.items() if p.endswith("bin/bash"))
    assert bash.digest_algo == "md5" and not bash.config
    assert bash.digest == _digest(_on_disk(deb_rootfs, bash.path), "md5")
    assert files["/usr/share/doc/bash"].digest is None  # a directory

    conffiles = [f for p in pkgs.values() for f in p.files if f.config]
    assert {f.path for f in conffiles} >= {"/etc/bash.bashrc", "/etc/adduser.conf"}
    for f in conffiles:
        assert f.digest_algo == "md5" and len(f.digest or "") == 32
    bashrc = next(f for f in conffiles if f.path == "/etc/bash.bashrc")
    assert bashrc.digest == _digest(deb_rootfs / "etc/bash.bashrc", "md5")


def test_dpkg_obsolete_conffile_is_a_ghost(dpkg_db: Path) -> None:
    status = dpkg_db / "var/lib/dpkg/status"
    text = status.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith(" /etc/bash.bashrc "))
    status.write_text(text.replace(line, f"{line} obsolete"))
    bashrc = next(f for f in _by_name(DpkgSource(Rootfs(dpkg_db)).packages())["bash"].files
                  if f.path == "/etc/bash.bashrc")
    assert bashrc.config and bashrc.ghost and bashrc.digest is None


def test_dpkg_diversion_moves_the_path(deb_rootfs: Path, dpkg_db: Path) -> None:
    root = dpkg_db  # plus the one file dpkg-divert moves, under merged /usr as in Debian
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    shutil.copy2(deb_rootfs / "usr/bin/sed", root / "usr/bin/sed")
    subprocess.run(
        ["dpkg-divert", f"--root={root}", "--local", "--rename",
         "--divert", "/bin/sed.distrib", "--add", "/bin/sed"],
        check=True, capture_output=True,
    )
    # A package's own diversion does not move its file; a diversion by another one does.
    with open(root / "var/lib/dpkg/diversions", "a") as f:
        f.write("/bin/tar\n/bin/tar.own\ntar\n/bin/gzip\n/bin/gzip.other\ndash\n")
    pkgs = _by_name(DpkgSource(Rootfs(root)).packages())

    sed = {f.path: f for f in pkgs["sed"].files}
    assert "/bin/sed" not in sed
    moved = sed["/bin/sed.distrib"]
    assert moved.digest == _digest(_on_disk(root, "/bin/sed.distrib"), "md5")
    tar = {f.path for f in pkgs["tar"].files}
    assert "/bin/tar" in tar and "/bin/tar.own" not in tar
    gzip = {f.path: f for f in pkgs["gzip"].files}
    assert "/bin/gzip" not in gzip and gzip["/bin/gzip.other"].digest is not None


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x7fELF\x02\x01\x01\x00\x00\x00garbage", "binary data"),
        (b"hello world\nthis is not a status file\n", "line 1: not a dpkg status file"),
        (b"Package: a\nStatus: install ok installed\nVersion: 1\n", "has no Architecture"),
        (b"Status: install ok installed\nVersion: 1\nArchitecture: all\n", "without a Package"),
        (b"Package: a\nStatus: broken\n", "no valid Status"),
        (b"Package: a\nStatus: install ok installed\n\n  stray\n", "line 4: continuation"),
        (b"Package: \xff\n\n\xff\xfe garbage\n", "line 3: not a dpkg status file"),
    ],
)
def test_dpkg_garbage_status(dpkg_db: Path, content: bytes, message: str) -> None:
    (dpkg_db / "var/lib/dpkg/status").write_bytes(content)
    with pytest.raises(DatabaseError, match=f"var/lib/dpkg/status: .*{message}"):
        DpkgSource(Rootfs(dpkg_db)).packages()


def test_dpkg_empty_status_and_absent_states(dpkg_db: Path) -> None:
    status = dpkg_db / "var/lib/dpkg/status"
    status.write_bytes(b"")
    assert DpkgSource(Rootfs(dpkg_db)).packages() == []
    # Removed-but-not-purged and leftover entries have no files (and may lack fields).
    status.write_bytes(
        b"Package: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: all\n\n"
        b"Package: never\nStatus: purge ok not-installed\n\n"
        b"Package: half\nStatus: install reinstreq half-installed\nVersion: 2\nArchitecture: amd64\n"
    )
    (dpkg_db / "var/lib/dpkg/info/half.list").write_text("/.\n/usr\n/usr/bin/half\n")
    src = DpkgSource(Rootfs(dpkg_db))
    assert [p.key for p in src.packages()] == ["half-2-amd64"]
    assert [f.path for f in src.packages()[0].files] == ["/usr", "/usr/bin/half"]
    assert src.architecture() == "amd64"


def test_dpkg_names_that_are_not_utf8(dpkg_db: Path) -> None:
    raw = b"/usr/share/caf\xe9"  # latin-1, as an old package might ship it
    with open(dpkg_db / "var/lib/dpkg/info/bash.list", "ab") as f:
        f.write(raw + b"\n")
    with open(dpkg_db / "var/lib/dpkg/info/bash.md5sums", "ab") as f:
        f.write(b"0123456789abcdef0123456789abcdef  " + raw[1:] + b"\n")
    bash = _by_name(DpkgSource(Rootfs(dpkg_db)).packages())["bash"]
    odd = next(f for f in bash.files if os.fsencode(f.path) == raw)
    assert odd.digest == "0123456789abcdef0123456789abcdef"


def test_dpkg_missing_list_and_bad_diversions(dpkg_db: Path) -> None:
    admin = dpkg_db / "var/lib/dpkg"
    (admin / "diversions").write_text("/bin/a\n/bin/a.real\n")
    with pytest.raises(DatabaseError, match="var/lib/dpkg/diversions: 2 lines"):
        DpkgSource(Rootfs(dpkg_db)).packages()
    (admin / "diversions").write_text("")
    (admin / "info/bash.list").unlink()
    with pytest.raises(DatabaseError, match="info/bash.list: missing for installed package"):
        DpkgSource(Rootfs(dpkg_db)).packages()


# -- rpm -------------------------------------------------------------------------------


def _rpm_qa(dbdir: Path, tmp_path: Path) -> list[str]:
    """Keys as rpm itself lists them, read from a copy so the rootfs stays untouched."""
    copy = tmp_path / "qa-db"
    shutil.copytree(dbdir, copy, ignore=shutil.ignore_patterns("*-shm"))
    fmt = "%{NAME}-%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}-%|ARCH?{%{ARCH}}:{noarch}|\\n"
    out = subprocess.run(["rpm", "--dbpath", str(copy), "-qa", "--qf", fmt],
                         check=True, capture_output=True, text=True).stdout
    # Package.key leaves out a zero epoch, %{EPOCH} does not.
    keys = (re.sub(r"^(.*?)-0:", r"\1-", k, count=1) for k in out.splitlines())
    return sorted(k for k in keys if not k.startswith("gpg-pubkey-"))


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path with its type, size and mtime; database files also with their hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            content = _digest(Path(p), "sha256") if rel.startswith(RPMDB + "/") else None
            out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return out


def test_rpm_reads_every_installed_package(rpm_rootfs: Path, tmp_path: Path) -> None:
    src = RpmSource(Rootfs(rpm_rootfs))
    pkgs = src.packages()
    assert [p.key for p in pkgs] == _rpm_qa(rpm_rootfs / RPMDB, tmp_path)
    assert src.database_paths() == [RPMDB]
    assert src.architecture() == "x86_64"
    demo = _by_name(pkgs)["pkglayer-demo"]
    assert (demo.version, demo.release, demo.arch, demo.epoch) == ("1.0", "1", "noarch", None)
    assert demo.source == "pkglayer-demo" and demo.size > 0
    assert DpkgSource.detect(Rootfs(rpm_rootfs)) is False
    assert isinstance(open_source(Rootfs(rpm_rootfs)), RpmSource)


def test_rpm_file_records(rpm_rootfs: Path) -> None:
    demo = _by_name(RpmSource(Rootfs(rpm_rootfs)).packages())["pkglayer-demo"]
    files = {f.path: f for f in demo.files}
    assert not any("/doc/" in p for p in files)  # installed with --excludedocs
    assert files["/var/log/pkglayer-demo.log"].ghost
    assert files["/var/log/pkglayer-demo.log"].digest is None
    conf = files["/etc/pkglayer-demo.conf"]
    assert conf.config and not conf.ghost
    assert files["/usr/share/pkglayer-demo/data-link"].linkto == "data.txt"
    assert files["/usr/share/pkglayer-demo/data-link"].digest is None
    assert files["/usr/share/pkglayer-demo"].digest is None
    for path in ("/usr/share/pkglayer-demo/data.txt", "/usr/bin/pkglayer-ping",
                 "/etc/pkglayer-demo.conf", "/usr/share/pkglayer-demo/hardlink-b"):
        f = files[path]
        assert f.digest_algo == "sha256" and not f.ghost
        assert f.digest == _digest(rpm_rootfs / path.lstrip("/"), "sha256")
        assert f.mode == os.lstat(rpm_rootfs / path.lstrip("/")).st_mode
    assert files["/usr/bin/pkglayer-ping"].mode == 0o100755


def test_rpm_reading_leaves_rootfs_and_process_untouched(rpm_rootfs: Path) -> None:
    before = _snapshot(rpm_rootfs)
    macros = rpm.expandMacro("%_dbpath %_db_backend")
    for _ in range(2):
        RpmSource(Rootfs(rpm_rootfs)).packages()
    assert _snapshot(rpm_rootfs) == before
    assert not (rpm_rootfs / "root/.rpmdb").exists()
    assert rpm.expandMacro("%_dbpath %_db_backend") == macros


@pytest.mark.parametrize("location", ["var/lib/rpm", "usr/share/rpm"])
def test_rpm_other_locations(rpm_rootfs: Path, tmp_path: Path, location: str) -> None:
    root = tmp_path / "root"
    shutil.copytree(rpm_rootfs / RPMDB, root / location, ignore=shutil.ignore_patterns("*-shm"))
    src = RpmSource(Rootfs(root))
    assert RpmSource.detect(Rootfs(root))
    assert src.database_paths() == [location]
    assert [p.key for p in src.packages()] == [p.key for p in RpmSource(Rootfs(rpm_rootfs)).packages()]


@pytest.fixture
def rpm_db(rpm_rootfs: Path, tmp_path: Path) -> Path:
    """A rootfs holding only a copy of the real rpm database, cheap to damage."""
    root = tmp_path / "root"
    shutil.copytree(rpm_rootfs / RPMDB, root / RPMDB, ignore=shutil.ignore_patterns("*-shm"))
    return root


def test_rpm_truncated_database(rpm_db: Path) -> None:
    db = rpm_db / RPMDB / "rpmdb.sqlite"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    with pytest.raises(DatabaseError, match=r"rpmdb.sqlite: corrupt rpm database \("):
        RpmSource(Rootfs(rpm_db)).packages()


def test_rpm_garbage_database(rpm_db: Path) -> None:
    (rpm_db / RPMDB / "rpmdb.sqlite").write_bytes(b"no database here\n" * 1000)
    with pytest.raises(DatabaseError, match=r"rpmdb.sqlite: corrupt rpm database \("):
        RpmSource(Rootfs(rpm_db)).packages()


def test_rpm_damaged_header(rpm_db: Path) -> None:
    """A valid sqlite file whose header blob rpm rejects: not a silently shorter list."""
    con = sqlite3.connect(rpm_db / RPMDB / "rpmdb.sqlite")
    (hnum, blob), = con.execute("SELECT hnum, blob FROM Packages LIMIT 1")
    con.execute("UPDATE Packages SET blob = ? WHERE hnum = ?", (blob[: len(blob) // 2], hnum))
    con.commit()
    con.close()
    with pytest.raises(DatabaseError, match="corrupt rpm database"):
        RpmSource(Rootfs(rpm_db)).packages()


def test_rpm_reads_committed_wal(rpm_db: Path) -> None:
    """A transaction still in rpmdb.sqlite-wal (not checkpointed) counts."""
    db = rpm_db / RPMDB / "rpmdb.sqlite"
    script = (
        "import os, sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1])\n"
        "assert con.execute('PRAGMA journal_mode=WAL').fetchone()[0] == 'wal'\n"
        "con.execute('PRAGMA wal_autocheckpoint=0')\n"
        "con.execute(\"DELETE FROM Packages WHERE hnum IN"
        " (SELECT hnum FROM Name WHERE key='pkglayer-extra')\")\n"
        "con.commit()\n"
        "os._exit(0)  # no close, so no checkpoint\n"
    )
    subprocess.run([sys.executable, "-c", script, str(db)], check=True)
    assert (rpm_db / RPMDB / "rpmdb.sqlite-wal").stat().st_size > 0
    names = {p.name for p in RpmSource(Rootfs(rpm_db)).packages()}
    assert "pkglayer-demo" in names and "pkglayer-extra" not in names


def test_rpm_berkeley_db(rpm_rootfs: Path, tmp_path: Path) -> None:
    """A BDB `Packages` (RHEL <= 8) built from the same headers reads the same."""
    con = sqlite3.connect(f"file:{rpm_rootfs / RPMDB / 'rpmdb.sqlite'}?immutable=1", uri=True)
    rows = con.execute("SELECT hnum, blob FROM Packages").fetchall()
    con.close()
    dump = ["VERSION=3", "format=bytevalue", "type=hash", "HEADER=END"]
    for hnum, blob in [(0, struct.pack("=I", len(rows) + 1)), *rows]:
        dump += [" " + struct.pack("=I", hnum).hex(), " " + bytes(blob).hex()]
    dump.append("DATA=END\n")
    dbdir = tmp_path / "root/var/lib/rpm"
    dbdir.mkdir(parents=True)
    subprocess.run(["db5.3_load", str(dbdir / "Packages")], input="\n".join(dump),
                   text=True, check=True)
    src = RpmSource(Rootfs(tmp_path / "root"))
    assert src.database_paths() == ["var/lib/rpm"]
    assert [p.key for p in src.packages()] == [p.key for p in RpmSource(Rootfs(rpm_rootfs)).packages()]

    (dbdir / "Packages").write_bytes(b"\0" * 8192)
    with pytest.raises(DatabaseError, match="Packages: corrupt rpm database"):
        RpmSource(Rootfs(tmp_path / "root")).packages()


def test_rpm_ndb_is_refused(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/sysimage/rpm").mkdir(parents=True)
    (tmp_path / "usr/lib/sysimage/rpm/Packages.db").write_bytes(b"RpmP" + b"\0" * 4092)
    assert RpmSource.detect(Rootfs(tmp_path))
    with pytest.raises(DatabaseError, match="ndb rpm databases are not supported here"):
        RpmSource(Rootfs(tmp_path)).packages()


def test_no_database(tmp_path: Path) -> None:
    (tmp_path / "var/lib/rpm").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    rootfs = Rootfs(tmp_path)
    assert not RpmSource.detect(rootfs) and not DpkgSource.detect(rootfs)
    assert open_source(rootfs) is None


def test_dpkg_parses_again_only_paragraphs_that_changed(dpkg_db: Path) -> None:
    status = dpkg_db / "var/lib/dpkg/status"
    first = {p["Package"]: p for p in DpkgSource(Rootfs(dpkg_db))._status()}
    text = status.read_text()
    status.write_text(text.replace("\nVersion: 5.2.15", "\nVersion: 3:5.2.15", 1))
    again = {p["Package"]: p for p in DpkgSource(Rootfs(dpkg_db))._status()}
    assert again["bash"]["Version"].startswith("3:5.2.15") and first["bash"]["Version"].startswith("5.2.15")
    assert again["dpkg"] is first["dpkg"]  # the same bytes: not parsed again
    # A paragraph made invalid is parsed and refused, with its own line number.
    line = text[: text.index("Package: dpkg\n")].count("\n") + 1
    paragraph = text.index("Package: dpkg\n")
    end = text.index("\n\n", paragraph)
    broken = text[:paragraph] + re.sub(r"\nArchitecture: .*", "", text[paragraph:end]) + text[end:]
    status.write_text(broken)
    with pytest.raises(DatabaseError, match=f"status: line {line}: package dpkg has no Architecture field"):
        DpkgSource(Rootfs(dpkg_db)).packages()
