"""Session fixtures: real, cached root filesystems (see tests/rootfs_factory.py), the
third-party clients' fixtures of tests/clients.py, and the CI rule of tests/helpers.py:
on CI a skipped test fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import rootfs_factory as factory
from tests.clients import podman_store, registry, shared_podman_store  # noqa: F401  (fixtures)
from tests.helpers import pytest_runtest_makereport, require_root, require_tools  # noqa: F401  (hook)

_TOOLS = ("debootstrap", "chroot", "getcap", "alien", "rpm", "rpmbuild")


def _require_builder(tools: tuple[str, ...] = _TOOLS) -> None:
    require_root("building the real rootfs fixtures (chroot, device nodes, ownership, capabilities)")
    require_tools(*tools)


@pytest.fixture(scope="session")
def deb_base() -> Path:
    """Debian bookworm minbase as debootstrap left it (every package file older than its
    dpkg list, but the conffiles). Read-only."""
    _require_builder()
    return factory.deb_base()


@pytest.fixture(scope="session")
def deb_rootfs() -> Path:
    """Debian bookworm minbase + iputils-ping (ping has security.capability). Read-only."""
    _require_builder()
    return factory.deb_rootfs()


@pytest.fixture(scope="session")
def deb_upgrade_pair() -> factory.UpgradePair:
    """Minbase at point-release versions, and a copy with one bookworm-security upgrade."""
    _require_builder()
    return factory.deb_upgrade_pair()


@pytest.fixture(scope="session")
def rpm_rootfs() -> Path:
    """Alien-converted minbase RPMs + pkglayer-demo/extra, Fedora-style rpmdb. Read-only."""
    _require_builder()
    return factory.rpm_rootfs()


@pytest.fixture(scope="session")
def rpm_upgrade_pair() -> factory.UpgradePair:
    """rpm_rootfs and a copy with pkglayer-demo upgraded 1.0-1 -> 1.0-2."""
    _require_builder()
    return factory.rpm_upgrade_pair()


@pytest.fixture(scope="session")
def pacman_rootfs() -> Path:
    """pkglayer-hello 1.0-1 and the split pkglayer-split-{lib,tools} 2.0-3, built by
    makepkg and installed by pacman -S from a local repository. Read-only."""
    _require_builder(factory.PACMAN_TOOLS)
    return factory.pacman_rootfs()


@pytest.fixture(scope="session")
def pacman_upgrade_pair() -> factory.UpgradePair:
    """pacman_rootfs and a copy with pkglayer-hello upgraded to 1:1.1-1 by pacman -U."""
    _require_builder(factory.PACMAN_TOOLS)
    return factory.pacman_upgrade_pair()


@pytest.fixture(scope="session")
def pip_rootfs() -> Path:
    """Debian minbase + python3-pip/venv/six, then six, idna 3.7 and pyflakes from PyPI
    wheels installed by that pip into /usr/local, and six into the venv /opt/app/venv."""
    _require_builder()
    return factory.pip_rootfs()


@pytest.fixture(scope="session")
def pip_upgrade_pair() -> factory.UpgradePair:
    """pip_rootfs and a copy where pip upgraded idna 3.7 -> 3.10."""
    _require_builder()
    return factory.pip_upgrade_pair()


@pytest.fixture(scope="session")
def app_upgrade_pair() -> factory.UpgradePair:
    """An application image (minbase, a venv of PyPI requirements, /opt/app, a model
    file) and a copy where pip upgraded urllib3 2.2.2 -> 2.2.3."""
    _require_builder()
    return factory.app_upgrade_pair()


@pytest.fixture(scope="session")
def rpm_specs_dir() -> Path:
    """tests/specs: spec files for factory.build_rpm(spec, version, release, outdir)."""
    return factory.SPECS_DIR


@pytest.fixture(scope="session", autouse=True)
def _private_digest_cache(tmp_path_factory: pytest.TempPathFactory):
    """Builds in the tests (in-process and CLI subprocesses) use a digest cache of their
    own, not the user's ~/.cache/pkglayer."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture
def daemons():
    """Daemon processes a test started (see tests/daemon_harness.py); killed at its end."""
    from tests.daemon_harness import DaemonProcess

    started: list[DaemonProcess] = []
    yield started
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
