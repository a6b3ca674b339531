"""The pacman (ALPM) reader, on roots that makepkg and pacman built (see conftest)."""

from __future__ import annotations

import calendar
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from pkglayer.arch import oci_platform
from pkglayer.errors import DatabaseError
from pkglayer.rootfs import Rootfs
from pkglayer.sources import open_source
from pkglayer.sources.base import Package
from pkglayer.sources.dpkg import DpkgSource
from pkglayer.sources.pacman import PacmanSource
from pkglayer.sources.rpmdb import RpmSource
from tests import rootfs_factory as factory

LOCAL = "var/lib/pacman/local"


def _by_name(pkgs: list[Package]) -> dict[str, Package]:
    return {p.name: p for p in pkgs}


def _qi(root: Path, name: str) -> dict[str, str]:
    """`pacman -Qii NAME` as field -> value (continuation lines joined by newlines)."""
    out = subprocess.run(
        ["pacman", "--root", str(root), "--dbpath", str(root / factory.PACMAN_DBPATH),
         "--config", str(root / "etc/pacman.conf"), "-Qii", name],
        check=True, capture_output=True, text=True, env={**os.environ, "TZ": "UTC", "LC_ALL": "C"},
    ).stdout
    fields: dict[str, str] = {}
    last = ""
    for line in out.splitlines():
        m = re.match(r"(\S[^:]*?)\s+:(?: (.*))?$", line)
        if m:
            last = m[1]
            fields[last] = m[2] or ""
        elif line.strip():
            fields[last] += "\n" + line.strip()
    return fields


def _ql(root: Path) -> dict[str, list[str]]:
    """`pacman -Ql`: package name -> its listed paths, rootfs-absolute, no trailing "/"."""
    out = factory.pacman(root, "-Ql")
    listed: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, path = line.split(" ", 1)
        listed.setdefault(name, []).append("/" + os.path.relpath(path, root))
    return listed


def test_reads_every_installed_package(pacman_rootfs: Path) -> None:
    src = PacmanSource(Rootfs(pacman_rootfs))
    pkgs = src.packages()
    assert [p.key for p in pkgs] == sorted(p.key for p in pkgs)
    versions = factory.pacman_versions(pacman_rootfs)
    assert {p.name: f"{p.version}-{p.release}" for p in pkgs} == versions
    for p in pkgs:
        info = _qi(pacman_rootfs, p.name)
        assert p.key == f"{p.name}-{info['Version']}-{info['Architecture']}"
        # pacman prints sizes under 1 KiB in bytes ("46.00 B")
        assert info["Installed Size"] == f"{p.size:.2f} B"
        built = calendar.timegm(time.strptime(info["Build Date"], "%a %b %d %H:%M:%S %Y"))
        assert p.changelog == (built,)
    by_name = _by_name(pkgs)
    assert by_name["pkglayer-hello"].source == "pkglayer-hello"
    # a split package: both halves name their pkgbase, so they form one component
    assert {by_name[n].source for n in ("pkglayer-split-lib", "pkglayer-split-tools")} == {"pkglayer-split"}
    assert by_name["pkglayer-split-lib"].arch == "any"
    assert src.architecture() == "x86_64"
    assert src.database_paths() == [LOCAL]


def test_detection_and_format_choice(pacman_rootfs: Path) -> None:
    rootfs = Rootfs(pacman_rootfs)
    assert PacmanSource.detect(rootfs)
    assert not DpkgSource.detect(rootfs) and not RpmSource.detect(rootfs)
    assert isinstance(open_source(rootfs), PacmanSource)
    assert isinstance(open_source(rootfs, "pacman"), PacmanSource)


def test_file_records_match_pacman_and_the_disk(pacman_rootfs: Path) -> None:
    pkgs = _by_name(PacmanSource(Rootfs(pacman_rootfs)).packages())
    listed = _ql(pacman_rootfs)
    for name, pkg in pkgs.items():
        assert [f.path for f in pkg.files] == listed[name]
    backups = {  # "STATE<TAB>/root/path" lines, or "(none)"
        "/" + os.path.relpath(line.split("\t", 1)[1], pacman_rootfs)
        for p in pkgs for line in _qi(pacman_rootfs, p)["Backup Files"].splitlines()
        if "\t" in line
    }
    assert {f.path for p in pkgs.values() for f in p.files if f.config} == backups == {"/etc/pkglayer-hello.conf"}
    checked = 0
    for pkg in pkgs.values():
        for f in pkg.files:
            on_disk = pacman_rootfs / f.path.lstrip("/")
            st = os.lstat(on_disk)
            assert f.mode == st.st_mode, f.path
            assert f.mtime is not None
            if os.path.islink(on_disk):
                assert f.linkto == os.readlink(on_disk) and f.digest is None
            elif on_disk.is_file():
                assert f.digest_algo == "sha256"
                assert f.digest == hashlib.sha256(on_disk.read_bytes()).hexdigest()
                assert f.mtime == int(st.st_mtime)
                checked += 1
            else:
                assert f.digest is None and f.linkto is None
    assert checked == 6
    hello = {f.path: f for f in pkgs["pkglayer-hello"].files}
    assert hello["/usr/bin/pkglayer-hello"].mode == 0o104755  # setuid, from the mtree
    assert "/usr/share/pkglayer-hello/name with space=1.txt" in hello  # mtree-escaped name


def test_upgrade_changes_one_key(pacman_upgrade_pair: factory.UpgradePair) -> None:
    old = {p.name: p for p in PacmanSource(Rootfs(pacman_upgrade_pair.old)).packages()}
    new = {p.name: p for p in PacmanSource(Rootfs(pacman_upgrade_pair.new)).packages()}
    assert pacman_upgrade_pair.upgraded == {"pkglayer-hello": ("1.0-1", "1:1.1-1")}
    hello = new["pkglayer-hello"]
    assert (hello.epoch, hello.version, hello.release) == ("1", "1.1", "1")
    assert hello.key == "pkglayer-hello-1:1.1-1-x86_64" != old["pkglayer-hello"].key
    assert hello.changelog[0] > old["pkglayer-hello"].changelog[0]
    assert {n: p.key for n, p in new.items() if n != "pkglayer-hello"} == {
        n: p.key for n, p in old.items() if n != "pkglayer-hello"
    }


def test_scan_cli_reports_pacman_packages(pacman_rootfs: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pkglayer", "scan", str(pacman_rootfs), "--json"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["format"] == "pacman" and out["architecture"] == "x86_64"
    versions = factory.pacman_versions(pacman_rootfs)
    assert {p["name"]: f"{p['version']}-{p['release']}" for p in out["packages"]} == versions
    assert out["modified"] == [] and out["shared"] == {}
    assert all(p["missing"] == 0 and p["files"] > 0 for p in out["packages"])
    # the database is the local/ directory; the sync db and the package cache are not part of it
    assert "var/lib/pacman/sync/pkglayer.db" in out["unowned"] + out["excluded"]
    local = pacman_rootfs / LOCAL
    assert out["homes"]["pkgdb"]["files"] == 1 + len(list(local.rglob("*")))


# -- damaged and hostile databases ------------------------------------------------------


@pytest.fixture
def pacman_root(pacman_rootfs: Path, tmp_path: Path) -> Path:
    """A private copy of the pacman root (a few dozen small files), cheap to damage."""
    root = tmp_path / "root"
    factory.copy_tree(pacman_rootfs, root)
    return root


def _entry(root: Path, name: str) -> Path:
    (entry,) = (root / LOCAL).glob(f"{name}-[0-9]*")
    return entry


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("../../../etc/passwd", "path outside the root"),
        ("/etc/shadow", "path outside the root"),
        ("usr/../../etc/passwd", "path outside the root"),
        ("usr/./bin", "path outside the root"),
    ],
)
def test_files_escaping_the_root_are_refused(pacman_root: Path, bad_line: str, message: str) -> None:
    files = _entry(pacman_root, "pkglayer-hello") / "files"
    files.write_text(files.read_text().replace("%FILES%\n", f"%FILES%\n{bad_line}\n", 1))
    with pytest.raises(DatabaseError, match=rf"pkglayer-hello-1.0-1/files: line 2: {message}"):
        PacmanSource(Rootfs(pacman_root)).packages()


def test_backup_escaping_the_root_is_refused(pacman_root: Path) -> None:
    files = _entry(pacman_root, "pkglayer-hello") / "files"
    text = files.read_text().replace("etc/pkglayer-hello.conf\t", "../etc/pkglayer-hello.conf\t")
    files.write_text(text)
    with pytest.raises(DatabaseError, match="path outside the root: '../etc/pkglayer-hello.conf'"):
        PacmanSource(Rootfs(pacman_root)).packages()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x7fELF\x02\x01\x01\0garbage", "desc: binary data"),
        (b"hello world\n", "desc: line 1: not an ALPM database file"),
        (b"%VERSION%\n1.0-1\n\n%ARCH%\nx86_64\n", r"desc: no single %NAME% value"),
        (b"%NAME%\npkglayer-hello\n\n%VERSION%\n1.0\n\n%ARCH%\nx86_64\n", "invalid version '1.0'"),
        (b"%NAME%\n../evil\n\n%VERSION%\n1.0-1\n\n%ARCH%\nx86_64\n", "invalid package name"),
        (b"%NAME%\nother\n\n%VERSION%\n1.0-1\n\n%ARCH%\nx86_64\n", "directory does not match its desc"),
    ],
)
def test_malformed_desc(pacman_root: Path, content: bytes, message: str) -> None:
    (_entry(pacman_root, "pkglayer-hello") / "desc").write_bytes(content)
    with pytest.raises(DatabaseError, match=message):
        PacmanSource(Rootfs(pacman_root)).packages()


def test_oversized_and_missing_files(pacman_root: Path) -> None:
    entry = _entry(pacman_root, "pkglayer-hello")
    with open(entry / "files", "r+b") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB of NULs, above the 64 MiB limit
    with pytest.raises(DatabaseError, match="files: cannot read: .* is larger than"):
        PacmanSource(Rootfs(pacman_root)).packages()
    (entry / "files").unlink()
    with pytest.raises(DatabaseError, match="pkglayer-hello-1.0-1/files: missing"):
        PacmanSource(Rootfs(pacman_root)).packages()


def test_entry_symlinked_out_of_the_root_is_read_inside_it(pacman_root: Path, tmp_path: Path) -> None:
    """A database entry that is a symlink to an absolute path resolves inside the
    rootfs: a valid entry planted on the host is never read."""
    planted = tmp_path / "host-entry"
    shutil.copytree(_entry(pacman_root, "pkglayer-hello"), planted)
    shutil.rmtree(_entry(pacman_root, "pkglayer-hello"))
    (pacman_root / LOCAL / "pkglayer-hello-1.0-1").symlink_to(planted)
    assert not (pacman_root / str(planted).lstrip("/")).exists()
    with pytest.raises(DatabaseError, match="pkglayer-hello-1.0-1/desc: missing"):
        PacmanSource(Rootfs(pacman_root)).packages()


def test_package_installed_twice(pacman_root: Path) -> None:
    entry = _entry(pacman_root, "pkglayer-hello")
    twin = entry.with_name("pkglayer-hello-0.9-1")
    shutil.copytree(entry, twin)
    desc = twin / "desc"
    desc.write_text(desc.read_text().replace("\n1.0-1\n", "\n0.9-1\n"))
    with pytest.raises(DatabaseError, match="package pkglayer-hello is installed twice"):
        PacmanSource(Rootfs(pacman_root)).packages()


def test_damaged_mtree_leaves_the_package_without_digests(
    pacman_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _entry(pacman_root, "pkglayer-hello")
    original = gzip.decompress((entry / "mtree").read_bytes())
    cases = {
        b"not gzip at all": "damaged",
        gzip.compress(original)[:-20]: "damaged (truncated)",
        gzip.compress(b"#mtree\nusr/bin type=dir\n"): "not a full-path mtree entry",
    }
    for content, message in cases.items():
        (entry / "mtree").write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pkglayer.sources.pacman"):
            hello = _by_name(PacmanSource(Rootfs(pacman_root)).packages())["pkglayer-hello"]
        assert message in caplog.text
        assert all(f.digest is None and f.mode is None for f in hello.files)
        assert len(hello.files) == 10


def test_mtree_bomb_is_cut_off(pacman_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A small mtree that inflates past the limit is dropped, not inflated in full."""
    # Deflate restarts after a full flush, so each MiB of NULs compresses to the same
    # ~1 KB: 100 MiB inflated from 100 KB (no trailer: the reader must stop before it).
    chunk = b"\0" * (1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    entry = _entry(pacman_root, "pkglayer-hello")
    (entry / "mtree").write_bytes(first + again * 99)
    with caplog.at_level(logging.WARNING, logger="pkglayer.sources.pacman"):
        hello = _by_name(PacmanSource(Rootfs(pacman_root)).packages())["pkglayer-hello"]
    assert "bytes uncompressed" in caplog.text
    assert all(f.digest is None for f in hello.files)


def test_architecture_without_pacman_conf(pacman_root: Path) -> None:
    (pacman_root / "etc/pacman.conf").unlink()
    # from the packages: x86_64 (pkglayer-hello) beats "any"
    assert PacmanSource(Rootfs(pacman_root)).architecture() == "x86_64"
    (pacman_root / "etc/pacman.conf").write_text("[options]\nArchitecture = auto aarch64\n")
    assert PacmanSource(Rootfs(pacman_root)).architecture() == "aarch64"


@pytest.mark.parametrize(
    "arch, platform",
    [("x86_64", ("amd64", None)), ("aarch64", ("arm64", "v8")), ("armv7h", ("arm", "v7")),
     ("pentium4", ("386", None))],
)
def test_pacman_architectures_map_to_oci(tmp_path: Path, arch: str, platform: tuple) -> None:
    assert oci_platform(arch, Rootfs(tmp_path)) == platform
