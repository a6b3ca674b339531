"""The file-safety primitives (pkglayer.fsutil): the atomic small-file write leaves the
old file or the new one, never a temp file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pkglayer.fsutil import write_file_atomic
from tests.helpers import tmpfs


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_file_atomic(str(target), b"old", mode=0o640)
    assert target.read_bytes() == b"old" and target.stat().st_mode & 0o777 == 0o640
    # Renaming a file over a directory fails after the temp file was written.
    blocker = tmp_path / "blocker"
    (blocker / "inside").mkdir(parents=True)
    with pytest.raises(OSError) as err:
        write_file_atomic(str(blocker), b"new")
    assert err.value.errno in (errno.EISDIR, errno.ENOTEMPTY)
    assert sorted(os.listdir(tmp_path)) == ["blocker", "state.json"]
    assert target.read_bytes() == b"old"


def test_atomic_write_keeps_its_temp_file_on_the_target_filesystem(tmp_path: Path) -> None:
    # A temp file elsewhere (/tmp) could not be renamed onto the tmpfs.
    with tmpfs(tmp_path / "t", size="64k") as mnt:
        write_file_atomic(str(mnt / "f"), b"data")
        assert (mnt / "f").read_bytes() == b"data" and os.listdir(mnt) == ["f"]


def test_a_file_that_already_holds_the_data_is_left_as_it_is(tmp_path: Path) -> None:
    """An unchanged rebuild's history.json is not written (and synced) again; any other
    content, mode or kind of file is replaced."""
    target = tmp_path / "history.json"
    write_file_atomic(str(target), b"same")
    before = target.stat()
    write_file_atomic(str(target), b"same")
    assert target.stat().st_ino == before.st_ino  # not replaced
    write_file_atomic(str(target), b"same", mode=0o600)
    assert target.stat().st_ino != before.st_ino and target.stat().st_mode & 0o777 == 0o600
    inode = target.stat().st_ino
    write_file_atomic(str(target), b"other", mode=0o600)
    assert target.read_bytes() == b"other" and target.stat().st_ino != inode
    # A symlink to a file of the same bytes is replaced by a file, not followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(elsewhere)
    os.chmod(elsewhere, 0o644)
    write_file_atomic(str(link), b"data")
    assert not link.is_symlink() and link.read_bytes() == b"data"
