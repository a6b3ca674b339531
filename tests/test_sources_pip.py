"""The pip reader, on a Debian root where Debian's pip installed PyPI wheels (conftest)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from pkglayer.rootfs import Rootfs
from pkglayer.sources.base import Package
from pkglayer.sources.dpkg import DpkgSource
from pkglayer.sources.pip import PipSource
from tests import rootfs_factory as factory

SYSTEM_SITE = "usr/local/lib/python3.11/dist-packages"
VENV_SITE = "opt/app/venv/lib/python3.11/site-packages"
DEBIAN_SITE = "usr/lib/python3/dist-packages"


def _by_name(pkgs: list[Package]) -> dict[str, Package]:
    return {p.name: p for p in pkgs}


def _inspect(*sites: Path) -> list[dict]:
    """`pip inspect --path SITE...` by the test interpreter's pip: what is installed there."""
    paths = [arg for site in sites for arg in ("--path", str(site))]
    out = subprocess.run(
        [sys.executable, "-m", "pip", "inspect", *paths],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)["installed"]


def _pip_show_files(root: Path, names: list[str], python: str | None = None) -> dict[str, set[str]]:
    """`pip show -f NAMES` by the root's own pip (in a chroot): canonical name ->
    rootfs-absolute paths."""
    target = ["--python", python] if python else []
    out = subprocess.run(
        ["chroot", str(root), "python3", "-m", "pip", "--no-cache-dir", *target, "show", "-f", *names],
        check=True, capture_output=True, text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "PYTHONDONTWRITEBYTECODE": "1"},
    ).stdout
    shown = {}
    for block in out.split("\n---\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        files = block.split("\nFiles:\n", 1)[1].splitlines()
        location = fields["Location"]
        shown[canonicalize_name(fields["Name"])] = {
            os.path.normpath(os.path.join(location, f.strip())) for f in files if f.strip()
        }
    return shown


def test_reads_what_pip_installed(pip_rootfs: Path) -> None:
    src = PipSource(Rootfs(pip_rootfs))
    assert [s.path for s in src.site_dirs()] == sorted([VENV_SITE, DEBIAN_SITE, SYSTEM_SITE])
    assert {s.path: s.prefix for s in src.site_dirs()}[VENV_SITE] == "opt/app/venv"
    expected = set()
    seen_installers = set()
    for dist in _inspect(*(pip_rootfs / site for site in (SYSTEM_SITE, VENV_SITE, DEBIAN_SITE))):
        seen_installers.add(dist.get("installer"))
        if dist.get("installer") == "pip":
            meta = dist["metadata"]
            expected.add(f"pip-{canonicalize_name(meta['name'])}-{meta['version']}")
    # the oracle also saw Debian's own dist-info (python3-pip's), which has no INSTALLER
    assert None in seen_installers or "" in seen_installers
    pkgs = src.packages()
    assert {p.key for p in pkgs} == expected
    assert expected == {f"pip-{r.replace('==', '-')}" for r in factory.PIP_SYSTEM + factory.PIP_VENV_PACKAGES}
    for p in pkgs:
        assert p.arch == "" and p.source == p.name and p.epoch is None and p.changelog == ()
    assert PipSource.detect(Rootfs(pip_rootfs))
    assert src.database_paths() == [] and src.architecture() is None


def test_files_match_pip_show_and_the_disk(pip_rootfs: Path) -> None:
    pkgs = _by_name(PipSource(Rootfs(pip_rootfs)).packages())
    dists = [name.removeprefix("pip-") for name in pkgs]
    shown = _pip_show_files(pip_rootfs, dists)
    venv = _pip_show_files(pip_rootfs, [r.split("==")[0] for r in factory.PIP_VENV_PACKAGES],
                           python=f"{factory.PIP_VENV}/bin/python")
    for name, pkg in pkgs.items():
        dist = name.removeprefix("pip-")
        # one version in two environments: one package holding both copies
        expected = shown[dist] | venv.get(dist, set())
        files = {f.path for f in pkg.files if not (pip_rootfs / f.path[1:]).is_dir()}
        assert files == expected
        recorded = 0
        for f in pkg.files:
            on_disk = pip_rootfs / f.path.lstrip("/")
            if on_disk.is_dir():
                # directories the distribution made, below its site directory
                assert f.digest is None and any(f.path[1:].startswith(s + "/") for s in (SYSTEM_SITE, VENV_SITE))
            elif f.digest:
                assert f.digest_algo == "sha256"
                assert f.digest == hashlib.sha256(on_disk.read_bytes()).hexdigest()
                recorded += 1
        assert recorded > 0
        assert pkg.size == sum(os.path.getsize(pip_rootfs / p[1:]) for p in expected
                               if not p.endswith((".pyc", "/RECORD")))
    # the console script pip wrote to /usr/local/bin (`../../../bin/pyflakes` in RECORD)
    assert "/usr/local/bin/pyflakes" in {f.path for f in pkgs["pip-pyflakes"].files}


def test_distro_files_are_not_claimed(pip_rootfs: Path) -> None:
    """Debian's python3-six and python3-pip stay dpkg's: no path is listed by both."""
    rootfs = Rootfs(pip_rootfs)
    pip_paths = {rootfs.resolve(f.path[1:], follow_final=False)
                 for p in PipSource(rootfs).packages() for f in p.files}
    dpkg_pkgs = _by_name(DpkgSource(rootfs).packages())
    dpkg_paths = {rootfs.resolve(f.path[1:], follow_final=False)
                  for p in dpkg_pkgs.values() for f in p.files}
    assert dpkg_paths & pip_paths == set()
    assert any(f.path.endswith("/six.py") for f in dpkg_pkgs["python3-six"].files)
    assert any(".dist-info/" in f.path for f in dpkg_pkgs["python3-pip"].files)


def test_upgrade_changes_one_package(pip_upgrade_pair: factory.UpgradePair) -> None:
    assert pip_upgrade_pair.upgraded == {"idna": ("3.7", "3.10")}
    old = {p.key: p for p in PipSource(Rootfs(pip_upgrade_pair.old)).packages()}
    new = {p.key: p for p in PipSource(Rootfs(pip_upgrade_pair.new)).packages()}
    assert set(old) - set(new) == {"pip-idna-3.7"}
    assert set(new) - set(old) == {"pip-idna-3.10"}
    for key in set(old) & set(new):
        assert old[key].files == new[key].files


# -- hostile and damaged records --------------------------------------------------------


@pytest.fixture
def site_root(pip_rootfs: Path, tmp_path: Path) -> Path:
    """A rootfs holding a copy of the root's /usr/local (pip's system environment)."""
    root = tmp_path / "root"
    shutil.copytree(pip_rootfs / "usr/local", root / "usr/local", symlinks=True)
    return root


def _dist_info(root: Path, name: str) -> Path:
    (found,) = (root / SYSTEM_SITE).glob(f"{name}-*.dist-info")
    return found


def _read(root: Path, caplog: pytest.LogCaptureFixture) -> dict[str, Package]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pkglayer.sources.pip"):
        return _by_name(PipSource(Rootfs(root)).packages())


@pytest.mark.parametrize(
    "row",
    [
        "../../../../../../../../etc/passwd,,",  # leaves the rootfs
        "../../../../bin/evil,,",  # usr/bin: inside the rootfs, outside /usr/local
        "/etc/shadow,,",  # absolute, outside the environment
        "evil/passwd,,",  # through site/evil -> /etc
        "evil2/passwd,,",  # through site/evil2 -> ../../../../../etc
    ],
)
def test_record_paths_leaving_the_environment_are_not_claimed(
    site_root: Path, caplog: pytest.LogCaptureFixture, row: str
) -> None:
    (site_root / SYSTEM_SITE / "evil").symlink_to("/etc")
    (site_root / SYSTEM_SITE / "evil2").symlink_to("../../../../../etc")
    (site_root / "etc").mkdir()
    (site_root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    record = _dist_info(site_root, "six") / "RECORD"
    with open(record, "a") as f:
        f.write(row + "\n")
    six = _read(site_root, caplog)["pip-six"]
    assert "is outside /usr/local; not claimed" in caplog.text
    assert row.partition(",")[0] in caplog.text
    paths = {f.path for f in six.files}
    assert not any(p.startswith(("/etc", "/usr/bin")) or "evil" in p for p in paths)
    assert "/usr/local/lib/python3.11/dist-packages/six.py" in paths


def test_absolute_record_path_inside_the_environment(site_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open(_dist_info(site_root, "six") / "RECORD", "a") as f:
        f.write("/usr/local/share/six/data.txt,,\n")
    six = _read(site_root, caplog)["pip-six"]
    assert "/usr/local/share/six/data.txt" in {f.path for f in six.files}
    assert caplog.text == ""


def test_site_directory_symlinked_out_of_its_environment(
    site_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = site_root / SYSTEM_SITE
    os.rename(site, site_root / "srv-site")
    site.symlink_to("/srv-site")
    assert _read(site_root, caplog) == {}
    assert "a symlink out of its environment /usr/local; not read" in caplog.text


def test_dist_info_symlinked_to_the_host_is_read_inside_the_root(
    site_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    planted = tmp_path / "host" / "evil-1.0.dist-info"
    shutil.copytree(_dist_info(site_root, "six"), planted)
    (planted / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (site_root / SYSTEM_SITE / "evil-1.0.dist-info").symlink_to(planted)
    pkgs = _read(site_root, caplog)
    assert "pip-evil" not in pkgs and "pip-six" in pkgs


@pytest.mark.parametrize(
    "metadata, message",
    [
        (b"\x7fELF\x02\x01\x01\0\xff\xfe garbage", "no valid Name and Version"),
        (b"Metadata-Version: 2.1\nName: six\n", "no valid Name and Version"),
        (b"Metadata-Version: 2.1\nName: ../../etc\nVersion: 1.0\n", "no valid Name and Version"),
        (b"Metadata-Version: 2.1\nName: six\nVersion: 1.0 evil/..\n", "invalid version"),
        (b"Metadata-Version: 2.1\nName: s\xc3\xafx\nVersion: 1.0\n", "no valid Name and Version"),  # not ASCII
        (b"Metadata-Version: 2.1\nName: six\n  folded\nVersion: 1.0\n", "no valid Name and Version"),
    ],
)
def test_malformed_metadata(site_root: Path, caplog: pytest.LogCaptureFixture, metadata: bytes, message: str) -> None:
    (_dist_info(site_root, "six") / "METADATA").write_bytes(metadata)
    pkgs = _read(site_root, caplog)
    assert "pip-six" not in pkgs and "pip-idna" in pkgs
    assert message in caplog.text and "six-1.17.0.dist-info/METADATA" in caplog.text


def test_versions_beyond_the_usual(site_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    metadata = _dist_info(site_root, "six") / "METADATA"
    metadata.write_text("Metadata-Version: 2.1\nName: Six_Extra\nVersion: 1!2.0.post1+local.7\n")
    pkg = _read(site_root, caplog)["pip-six-extra"]
    assert (pkg.epoch, pkg.version) == ("1", "2.0.post1+local.7")
    assert pkg.key == "pip-six-extra-1:2.0.post1+local.7"
    metadata.write_text("Metadata-Version: 2.1\nName: six\nVersion: 2004d-custom\n")
    assert _read(site_root, caplog)["pip-six"].key == "pip-six-2004d-custom"


def test_enormous_record(site_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open(_dist_info(site_root, "six") / "RECORD", "r+b") as f:
        f.truncate(65 << 20)  # sparse, past the 64 MiB limit
    pkgs = _read(site_root, caplog)
    assert "pip-six" not in pkgs and "pip-idna" in pkgs
    assert "RECORD: unreadable" in caplog.text and "larger than" in caplog.text


def test_installer_decides(site_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    installer = _dist_info(site_root, "six") / "INSTALLER"
    for value, claimed in ((b"rpm\n", False), (b"", False), (b"uv\n", True), (b"debian", False)):
        installer.write_bytes(value)
        assert ("pip-six" in _read(site_root, caplog)) is claimed, value
    installer.unlink()
    assert "pip-six" not in _read(site_root, caplog)


def test_record_rows_and_digests(site_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    record = _dist_info(site_root, "six") / "RECORD"
    text = record.read_text()
    six_py = next(line for line in text.splitlines() if line.startswith("six.py,"))
    digest = hashlib.sha256((site_root / SYSTEM_SITE / "six.py").read_bytes()).hexdigest()
    rows = [
        f"six.py,sha256={digest},1",  # Debian's dh_python rewrites digests as hex
        "broken-row-without-fields",
        "bad-digest.py,sha256=!!!notbase64,3",
        "short-digest.py,sha256=AAAA,3",
        "unknown-algo.py,crc32=AAAA,3",
    ]
    record.write_text(text.replace(six_py + "\n", "") + "\n".join(rows) + "\n")
    files = {f.path.rsplit("/", 1)[1]: f for f in _read(site_root, caplog)["pip-six"].files}
    assert (files["six.py"].digest, files["six.py"].digest_algo) == (digest, "sha256")
    assert "broken-row-without-fields" not in files
    assert "line" in caplog.text and "not path,hash,size" in caplog.text
    for name in ("bad-digest.py", "short-digest.py", "unknown-algo.py"):
        assert files[name].digest is None and files[name].digest_algo is None
