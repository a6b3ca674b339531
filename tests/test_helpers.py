"""The test helpers' own promises: on CI a skip is a failure that names what is missing,
tmpfs mounts left by a killed run are unmounted by the next one, and a passed test's
temporary directory is deleted when it ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO, require_root, run, tmpfs, unmount_stale_tmpfs

_SKIPPING = textwrap.dedent(
    """
    import pytest
    from tests.helpers import needs_root, require_tools

    def test_tool():
        require_tools("pkglayer-no-such-tool")

    @pytest.fixture
    def fixture_needing_a_tool():
        require_tools("pkglayer-missing-in-fixture")

    def test_through_a_fixture(fixture_needing_a_tool):
        pass

    @pytest.mark.skipif(True, reason="needs root: a marked module")
    def test_marked():
        pass

    def test_runs():
        pass
    """
)


@pytest.mark.parametrize("ci", ["true", None])
def test_a_skip_fails_on_ci_and_names_the_tool(tmp_path: Path, ci: str | None) -> None:
    (tmp_path / "test_skipping.py").write_text(_SKIPPING)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.helpers", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_skipping.py")],
        capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=300,
    )
    out = proc.stdout
    if ci:
        # failed in the call, or at setup (an error) when a fixture or mark skipped
        assert proc.returncode == 1 and "1 failed, 1 passed, 2 errors" in out, out
        for reason in ("needs pkglayer-no-such-tool on PATH", "needs pkglayer-missing-in-fixture on PATH",
                       "needs root: a marked module"):
            assert f"skipped on CI (CI=true), where every test must run: {reason}" in out, out
    else:
        assert proc.returncode == 0, out
        assert "1 passed, 3 skipped" in out and "pkglayer-no-such-tool" in out


_TWO_OUTCOMES = textwrap.dedent(
    """
    def test_passes(tmp_path):
        (tmp_path / "copied-root").write_bytes(b"x" * 4096)

    def test_fails(tmp_path):
        (tmp_path / "evidence").write_text("kept for the developer")
        assert False
    """
)


def test_a_passed_tests_tmp_path_is_deleted_and_a_failed_ones_kept(tmp_path: Path) -> None:
    """The project's pytest settings (pyproject.toml) delete what a passed test wrote: the
    suite copies whole roots into tmp_path, and keeping them all filled a CI disk."""
    (tmp_path / "test_two_outcomes.py").write_text(_TWO_OUTCOMES)
    base = tmp_path / "base"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
         "--rootdir", str(tmp_path), "--basetemp", str(base), str(tmp_path / "test_two_outcomes.py")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 1 and "1 failed, 1 passed" in proc.stdout, proc.stdout
    assert sorted(p.name for p in base.iterdir() if not p.is_symlink()) == ["test_fails0"]
    assert (base / "test_fails0" / "evidence").read_text() == "kept for the developer"


def test_tmpfs_left_by_a_dead_process_is_unmounted(tmp_path: Path) -> None:
    require_root("mounting a tmpfs")
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    stale = tmp_path / "stale"
    stale.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=64k", f"pkglayer-test-tmpfs-{gone.pid}", stale])
    (stale / "f").write_text("x")
    live = tmp_path / "live"
    live.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=64k", f"pkglayer-test-tmpfs-{os.getpid()}", live])
    try:
        assert unmount_stale_tmpfs() == [str(stale)]
        assert not os.path.ismount(stale) and not (stale / "f").exists()
        assert os.path.ismount(live)  # a live process's mount stays
    finally:
        for point in (stale, live):
            if os.path.ismount(point):
                run(["umount", point])


def test_tmpfs_is_unmounted_after_the_block(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "t", size="64k") as mnt:
        assert os.path.ismount(mnt)
        (mnt / "f").write_text("x")
    assert not os.path.ismount(mnt) and not (mnt / "f").exists()
