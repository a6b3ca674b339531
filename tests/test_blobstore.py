"""BlobDir / BlobWriter against real files, real processes and a real full filesystem."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pkglayer import blobstore
from pkglayer.blobstore import TMP_DIR, BlobDir
from pkglayer.digests import is_digest
from pkglayer.errors import DigestError, HistoryError, PkglayerError
from tests.helpers import run, sha256_digest, tmpfs


def blob_names(bd: BlobDir) -> list[str]:
    return sorted(os.listdir(bd.blobs))


def tmp_names(bd: BlobDir) -> list[str]:
    return sorted(os.listdir(bd.tmp))


def test_is_digest() -> None:
    assert is_digest("sha256:" + "a" * 64)
    for bad in ["sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha512:" + "a" * 64, "sha256:" + "a" * 64 + "\n", 5]:
        assert not is_digest(bad)


def test_add_bytes_roundtrip(tmp_path) -> None:
    bd = BlobDir(tmp_path / "d", create=True)
    digest, size = bd.add_bytes(b"hello")
    assert (digest, size) == (sha256_digest(b"hello"), 5)
    assert bd.has(digest) and bd.verify(digest)
    assert bd.path(digest) == str(tmp_path / "d/blobs/sha256" / digest[7:])  # the OCI layout's place
    with open(tmp_path / "d/blobs/sha256" / digest[7:], "rb") as f:
        assert f.read() == b"hello"
    assert os.stat(bd.path(digest)).st_mode & 0o777 == 0o444
    assert bd.add_bytes(b"hello") == (digest, 5)  # no-op the second time
    assert tmp_names(bd) == []


def test_path_rejects_bad_digests(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    for bad in ["sha256:../../etc/passwd", "sha256:" + "0" * 63, "md5:abc", ""]:
        with pytest.raises(DigestError) as e:
            bd.path(bad)
        assert str(e.value) == f"invalid blob digest {bad!r}: expected sha256:<64 lower-case hex>"


def test_missing_root_without_create(tmp_path) -> None:
    with pytest.raises(PkglayerError, match="does not exist"):
        BlobDir(tmp_path / "nope")
    empty = BlobDir(tmp_path)  # exists, but has no blobs/sha256 yet
    assert not empty.has(sha256_digest(b"x")) and not empty.verify(sha256_digest(b"x"))


def test_writer_streams_and_commits(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    chunks = [os.urandom(100_000) for _ in range(30)]
    with bd.writer() as w:
        for c in chunks:
            w.write(c)
        assert blob_names(bd) == []  # nothing under the final name before commit
        digest, size = w.commit()
    assert digest == sha256_digest(b"".join(chunks)) and size == 3_000_000
    assert bd.verify(digest) and tmp_names(bd) == []


def test_a_held_blob_stays_locked_until_another_process_commits_it(tmp_path) -> None:
    """What a build's writer processes do (build._write_in_processes): the writer holds
    the finished temp file, the parent fsyncs and renames it."""
    bd = BlobDir(tmp_path, create=True)
    data = os.urandom(300_000)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: holds the blob, says where, then waits to be killed
        try:
            with bd.writer() as w:
                w.write(data)
                digest, size = w.hold()
            os.write(write_end, f"{w.tmp_path}\0{digest}\0{size}".encode())
            del w  # as a writer process's layer ends: the blob stays held all the same
            gc.collect()
            signal.pause()
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        held, digest, size = os.read(read_end, 4096).decode().split("\0")
        assert digest == sha256_digest(data) and blob_names(bd) == []
        BlobDir(tmp_path, create=True)  # another build's start cleans dead writers' temps: not this one
        assert tmp_names(bd) == [Path(held).name]
        bd.commit_held(held, digest, int(size))
        assert bd.verify(digest) and tmp_names(bd) == []
        assert stat.S_IMODE(os.stat(bd.path(digest)).st_mode) == 0o444
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_held_file_that_is_not_the_blob_is_not_published(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    with bd.writer() as w:
        w.write(b"abc")
        digest, size = w.hold()
    with pytest.raises(PkglayerError, match="not the blob"):
        bd.commit_held(w.tmp_path, digest, size + 1)
    assert blob_names(bd) == [] and tmp_names(bd) == []


def test_writer_without_commit_leaves_nothing(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    with pytest.raises(KeyboardInterrupt):
        with bd.writer() as w:
            w.write(b"partial")
            raise KeyboardInterrupt
    assert blob_names(bd) == [] and tmp_names(bd) == []


def test_commit_expected_digest_mismatch(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    with bd.writer() as w:
        w.write(b"abc")
        with pytest.raises(PkglayerError, match="expected"):
            w.commit(expected_digest=sha256_digest(b"abd"))
    assert blob_names(bd) == [] and tmp_names(bd) == []


def test_commit_repairs_corrupt_existing_blob(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    digest, _ = bd.add_bytes(b"good")
    os.chmod(bd.path(digest), 0o644)
    with open(bd.path(digest), "wb") as f:
        f.write(b"evil")
    assert bd.has(digest) and not bd.verify(digest)
    bd.add_bytes(b"good")
    assert bd.verify(digest)


def test_verify_false_on_tampered_and_symlinked_blobs(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    digest, _ = bd.add_bytes(b"content")
    os.chmod(bd.path(digest), 0o644)
    with open(bd.path(digest), "r+b") as f:
        f.write(b"C")
    assert not bd.verify(digest)

    with open("/etc/shadow", "rb") as f:
        shadow_digest = sha256_digest(f.read())
    os.symlink("/etc/shadow", bd.path(shadow_digest))
    assert not bd.has(shadow_digest)
    assert not bd.verify(shadow_digest)

    fifo_digest = sha256_digest(b"fifo")
    os.mkfifo(bd.path(fifo_digest))
    assert not bd.has(fifo_digest) and not bd.verify(fifo_digest)  # and does not block


def test_import_blob_hard_links_on_same_fs(tmp_path) -> None:
    src = BlobDir(tmp_path / "in", create=True)
    dst = BlobDir(tmp_path / "out", create=True)
    digest, _ = src.add_bytes(b"layer data")
    dst.import_blob(src, digest)
    assert dst.verify(digest)
    assert os.stat(dst.path(digest)).st_ino == os.stat(src.path(digest)).st_ino
    dst.import_blob(src, digest)  # already present: no-op
    assert tmp_names(dst) == []


def test_import_blob_copies_across_filesystems(tmp_path, small_tmpfs) -> None:
    src = BlobDir(tmp_path / "in", create=True)
    dst = BlobDir(small_tmpfs, create=True)
    digest, _ = src.add_bytes(b"cross-device")
    dst.import_blob(src, digest)
    assert dst.verify(digest)
    assert os.stat(dst.path(digest)).st_dev != os.stat(src.path(digest)).st_dev


def test_import_blob_rejects_corrupt_missing_and_symlinked_sources(tmp_path) -> None:
    src = BlobDir(tmp_path / "in", create=True)
    dst = BlobDir(tmp_path / "out", create=True)
    digest, _ = src.add_bytes(b"original")
    os.chmod(src.path(digest), 0o644)
    with open(src.path(digest), "wb") as f:
        f.write(b"tampered")
    with pytest.raises(PkglayerError, match="corrupt"):
        dst.import_blob(src, digest)
    with pytest.raises(PkglayerError, match="missing"):
        dst.import_blob(src, sha256_digest(b"absent"))
    with open("/etc/shadow", "rb") as f:
        shadow_digest = sha256_digest(f.read())
    os.symlink("/etc/shadow", src.path(shadow_digest))
    with pytest.raises(PkglayerError, match="not a regular file"):
        dst.import_blob(src, shadow_digest)
    assert blob_names(dst) == [] and tmp_names(dst) == []


_CHILD = textwrap.dedent(
    """
    import sys
    from pkglayer.blobstore import BlobDir
    w = BlobDir({root!r}, create=True).writer()
    w.write(b"x" * 1_500_000)  # more than the 1 MiB write buffer: some of it reaches the file
    print("half", flush=True)
    sys.stdin.readline()  # wait to be killed
    """
)


def test_writer_killed_mid_write_then_rerun(tmp_path) -> None:
    root = str(tmp_path / "layout")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(root=root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"half\n"
        bd = BlobDir(root)
        assert len(tmp_names(bd)) == 1  # the half-written temp file
        assert os.path.getsize(os.path.join(bd.tmp, tmp_names(bd)[0])) > 0
        assert bd.remove_stale_temps() == []  # its writer is alive and holds the lock
        assert len(tmp_names(bd)) == 1
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    bd = BlobDir(root)
    assert blob_names(bd) == []  # nothing was published
    assert len(tmp_names(bd)) == 1
    bd = BlobDir(root, create=True)  # a rerun cleans up after the dead writer
    assert tmp_names(bd) == []
    digest, size = bd.add_bytes(b"x" * 3_000_000)
    assert bd.verify(digest) and size == 3_000_000


_LINKER = textwrap.dedent(
    """
    from pkglayer.blobstore import BlobDir
    BlobDir({dst!r}, create=True).import_blob(BlobDir({src!r}), {digest!r}, {size!r})
    """
)


def test_a_link_temp_left_by_a_killed_import_is_cleaned_up_later(tmp_path) -> None:
    """An import killed between linking the source to a temp name and publishing it (it
    hashes in between) leaves the temp behind; a later cleanup recognises it as ours."""
    src = BlobDir(tmp_path / "in", create=True)
    size = 256 << 20  # sparse: hashing it takes long enough to be caught
    h = hashlib.sha256()
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        h.update(zeros)
    digest = "sha256:" + h.hexdigest()
    with open(src.path(digest), "wb") as f:
        f.truncate(size)
    os.chmod(src.path(digest), 0o444)  # shareable: imported by a link
    dst_tmp = tmp_path / "out" / TMP_DIR
    child = subprocess.Popen([sys.executable, "-c", _LINKER.format(dst=str(tmp_path / "out"), src=src.root,
                                                                  digest=digest, size=size)])
    try:
        deadline = time.monotonic() + 60
        while not (dst_tmp.is_dir() and list(dst_tmp.glob("link-*"))):
            assert child.poll() is None, "the import ended before it was caught"
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        child.kill()
        child.wait()
    dst = BlobDir(tmp_path / "out")
    (left,) = tmp_names(dst)
    assert left.startswith("link-") and blob_names(dst) == []
    assert dst.remove_stale_temps() == []  # young: maybe another import's, still hashing
    two_hours_ago = time.time() - 7200
    os.utime(os.path.join(dst.tmp, left), (two_hours_ago, two_hours_ago))
    assert dst.remove_stale_temps() == [left]
    assert tmp_names(dst) == [] and os.stat(src.path(digest)).st_nlink == 1
    # an import run here (mutmut then knows this test runs _link) finishes the job
    dst.import_blob(src, digest, size)
    assert os.stat(dst.path(digest)).st_ino == os.stat(src.path(digest)).st_ino and tmp_names(dst) == []


def test_stale_link_temps_removed_only_when_old(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    young = os.path.join(bd.tmp, "link-" + "a" * 32 + ".tmp")
    old = os.path.join(bd.tmp, "link-" + "b" * 32 + ".tmp")
    foreign = os.path.join(bd.tmp, "somebody-elses-file")
    for p in (young, old, foreign):
        open(p, "w").close()
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(foreign, (two_hours_ago, two_hours_ago))
    assert bd.remove_stale_temps() == [os.path.basename(old)]
    assert sorted(os.listdir(bd.tmp)) == sorted([os.path.basename(young), "somebody-elses-file"])
    # a temp that another cleanup removed meanwhile is not old: nothing to remove
    assert not blobstore._older_than(old, 0)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A real 1 MiB tmpfs, unmounted afterwards."""
    with tmpfs(tmp_path / "tmpfs", size="1M") as mnt:
        yield mnt


def test_enospc_gives_clear_error_and_no_temp(small_tmpfs) -> None:
    bd = BlobDir(small_tmpfs, create=True)
    with pytest.raises(PkglayerError, match=r"^no space left on device while writing blob to .*tmpfs"):
        with bd.writer() as w:
            for _ in range(32):
                w.write(os.urandom(64 * 1024))  # 2 MiB in all
            w.commit()
    assert blob_names(bd) == [] and tmp_names(bd) == []
    assert BlobDir(small_tmpfs).add_bytes(b"small")[1] == 5  # the directory still works
    assert TMP_DIR in os.listdir(small_tmpfs)


# ------------------------------------------------------------------ error paths


def test_a_quota_error_says_so() -> None:
    """tmpfs here has no quota support (CONFIG_TMPFS_QUOTA), so EDQUOT cannot be made
    real: the mapping from errno to message is checked on the error itself."""
    quota = blobstore._space_error(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "/r")
    assert str(quota) == "disk quota exceeded while writing blob to /r"
    space = blobstore._space_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "/r")
    assert str(space) == "no space left on device while writing blob to /r"
    assert blobstore._space_error(OSError(errno.EIO, os.strerror(errno.EIO)), "/r") is None


@contextmanager
def file_size_limit(limit: int):
    """Writes past LIMIT bytes of a file fail with EFBIG (SIGXFSZ ignored) in this process:
    a write error that is neither ENOSPC nor EDQUOT."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_other_write_errors_are_reported_as_such_and_leave_nothing(tmp_path) -> None:
    bd = BlobDir(tmp_path / "d", create=True)
    reason = os.strerror(errno.EFBIG)  # "File too large"
    with file_size_limit(100_000):
        # in write(), past the 1 MiB buffer
        with pytest.raises(PkglayerError) as e, bd.writer() as w:
            w.write(b"x" * 3_000_000)
        assert str(e.value) == f"cannot write blob to {bd.root}: {reason}"
        assert e.value.__cause__.errno == errno.EFBIG
        # in commit(), the final flush
        with bd.writer() as w:
            w.write(b"x" * 200_000)
            with pytest.raises(PkglayerError) as e:
                w.commit()
        assert str(e.value) == f"cannot write blob to {bd.root}: {reason}"
    assert tmp_names(bd) == [] and blob_names(bd) == []


def test_a_finished_writer_refuses_more(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    committed = bd.writer()
    committed.write(b"data")
    committed.commit()
    aborted = bd.writer()
    aborted.write(b"data")
    aborted.abort()
    aborted.abort()  # twice is fine
    for w in (committed, aborted):
        with pytest.raises(ValueError, match="^write to a committed or aborted BlobWriter$"):
            w.write(b"more")
        with pytest.raises(ValueError, match="^BlobWriter already committed or aborted$"):
            w.commit()
    assert blob_names(bd) == [sha256_digest(b"data")[7:]] and tmp_names(bd) == []


def test_stale_temps_among_foreign_files(tmp_path) -> None:
    """Every dead writer's temp file goes, wherever it sorts among files that are not
    ours, a live writer's temp file and a symlink, which all stay."""
    bd = BlobDir(tmp_path / "d", create=True)
    live = bd.writer()
    live.write(b"in progress")
    live_name = os.path.basename(live.tmp_path)
    outside = tmp_path / "outside"
    outside.write_text("not to be touched")
    dead = ["blob-" + "0" * 32 + ".tmp", "blob-" + "7" * 32 + ".tmp", "blob-" + "f" * 32 + ".tmp"]
    old_links = ["link-" + "1" * 32 + ".tmp", "link-" + "9" * 32 + ".tmp"]
    young_link = "link-" + "5" * 32 + ".tmp"
    foreign = ["0-first", "blob-0.tmp", "blob-" + "3" * 32 + ".tmp.keep", "m-middle", "zz-last"]
    for name in [*dead, *old_links, young_link, *foreign]:
        Path(bd.tmp, name).write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    for name in [*old_links, *foreign]:
        os.utime(os.path.join(bd.tmp, name), (two_hours_ago, two_hours_ago))
    not_files = ["blob-" + "8" * 32 + ".tmp", "blob-" + "9" * 32 + ".tmp"]
    os.symlink(outside, os.path.join(bd.tmp, not_files[0]))
    os.mkfifo(os.path.join(bd.tmp, not_files[1]))
    assert dead[0] < live_name < dead[-1]  # the live one sorts among the dead ones


    assert bd.remove_stale_temps() == sorted([*dead, *old_links])
    assert tmp_names(bd) == sorted([*foreign, young_link, live_name, *not_files])
    assert outside.read_text() == "not to be touched"
    live.write(b" and done")
    digest, _ = live.commit()
    assert bd.verify(digest)


def test_read_only_filesystem_is_a_clear_error(tmp_path) -> None:
    with tmpfs(tmp_path / "ro", size="1M") as mnt:
        BlobDir(mnt / "ready", create=True)
        run(["mount", "-o", "remount,ro", mnt])
        with pytest.raises(PkglayerError, match=rf"^cannot create blob directory in {mnt}/new: Read-only file system$"):
            BlobDir(mnt / "new", create=True)
        with pytest.raises(PkglayerError, match=r"^cannot create a temp file in .*: Read-only file system$"):
            BlobDir(mnt / "ready").writer()


# ------------------------------------------------------------------ reading, sizes, copies, and who may share a file


def test_read_checks_size_limit_and_digest(tmp_path) -> None:
    bd = BlobDir(tmp_path, create=True)
    digest, size = bd.add_bytes(b'{"config": 1}')
    assert bd.read(digest, size, 100, "config") == b'{"config": 1}'
    assert bd.read(digest, size, size, "config") == b'{"config": 1}'  # the limit itself is allowed
    assert bd.size(digest) == size
    with pytest.raises(HistoryError) as e:
        bd.read(digest, 101, 100, "config", HistoryError)
    assert str(e.value) == f"config {digest} is 101 bytes, more than the limit of 100"
    with pytest.raises(HistoryError) as e:
        bd.read(digest, size + 1, 100, "config", HistoryError)
    assert str(e.value) == f"config {digest} is {size} bytes, its descriptor says {size + 1}"
    os.chmod(bd.path(digest), 0o644)
    tampered = b'{"config": 2}'
    Path(bd.path(digest)).write_bytes(tampered)
    with pytest.raises(PkglayerError) as e:
        bd.read(digest, size, 100, "manifest")
    assert str(e.value) == f"manifest {digest} does not match its digest: the content has {sha256_digest(tampered)}"
    absent = sha256_digest(b"absent")
    with pytest.raises(HistoryError, match=f"^index {absent}: .* does not exist$"):
        bd.read(absent, 1, 100, "index", HistoryError)
    os.symlink(bd.path(digest), bd.path(absent))
    with pytest.raises(PkglayerError, match=f"^blob {absent} in {bd.root} is not a regular file$"):
        bd.size(absent)


def test_copy_blob_copies_checked_bytes(tmp_path) -> None:
    src = BlobDir(tmp_path / "in", create=True)
    dst = BlobDir(tmp_path / "out", create=True)
    digest, size = src.add_bytes(b"published")  # shareable, and copied all the same
    dst.copy_blob(src, digest, size)
    assert dst.verify(digest, size)
    copied = os.stat(dst.path(digest)).st_ino
    assert copied != os.stat(src.path(digest)).st_ino
    dst.copy_blob(src, digest, size)  # present: kept
    assert os.stat(dst.path(digest)).st_ino == copied
    with pytest.raises(PkglayerError) as e:  # present, but not of the size asked for
        dst.copy_blob(src, digest, size + 1)
    assert str(e.value) == f"blob {digest} in {src.root} is corrupt: it is {size} bytes, history says {size + 1}"
    other = BlobDir(tmp_path / "other", create=True)
    with pytest.raises(PkglayerError) as e:
        other.copy_blob(src, digest, size + 1)
    assert str(e.value) == f"blob {digest} in {src.root} is corrupt: it is {size} bytes, history says {size + 1}"
    absent = sha256_digest(b"absent")
    with pytest.raises(PkglayerError) as e:
        other.copy_blob(src, absent)
    assert str(e.value) == f"blob {absent} is missing from {src.root} or is not a regular file"
    os.chmod(src.path(digest), 0o644)
    Path(src.path(digest)).write_bytes(b"PUBLISHED")
    with pytest.raises(PkglayerError, match=f"^blob {digest} in {src.root} is corrupt: blob content has digest"):
        other.copy_blob(src, digest, size)
    assert blob_names(other) == [] and tmp_names(other) == []


def test_a_known_blob_with_a_wrong_recorded_size_is_refused(tmp_path) -> None:
    src = BlobDir(tmp_path / "in", create=True)
    dst = BlobDir(tmp_path / "out", create=True)
    digest, size = src.add_bytes(b"layer")
    dst.import_blob(src, digest, size)
    assert dst.verify(digest, size) and not dst.verify(digest, size + 1)
    with pytest.raises(PkglayerError) as e:
        dst.import_blob(src, digest, size + 1)
    assert str(e.value) == f"blob {digest} in {src.root} is corrupt: it is {size} bytes, history says {size + 1}"


@pytest.mark.parametrize("mode, uid, linked", [
    (0o444, 0, True),
    (0o555, 0, True),  # executable, still writable by nobody
    (0o400, 0, True),
    (0o644, 0, False),  # its owner can write to it
    (0o464, 0, False),
    (0o446, 0, False),
    (0o444, 1234, False),  # someone else's: they could make it writable
])
def test_imports_link_only_files_nobody_else_can_change(tmp_path, mode: int, uid: int, linked: bool) -> None:
    src = BlobDir(tmp_path / "in", create=True)
    dst = BlobDir(tmp_path / "out", create=True)
    digest, size = src.add_bytes(b"layer data")
    os.chown(src.path(digest), uid, -1)
    os.chmod(src.path(digest), mode)
    dst.import_blob(src, digest, size)
    assert dst.verify(digest, size)
    assert (os.stat(dst.path(digest)).st_ino == os.stat(src.path(digest)).st_ino) == linked
    assert stat.S_IMODE(os.stat(dst.path(digest)).st_mode) == (mode if linked else 0o444)
    assert tmp_names(dst) == []


def test_a_blob_hard_linked_to_a_writable_file_is_not_our_own(tmp_path) -> None:
    bd = BlobDir(tmp_path / "d", create=True)
    digest, size = bd.add_bytes(b"data")
    os.chmod(bd.path(digest), 0o644)
    assert bd.has_own(digest, size)  # writable, but only through this name
    os.link(bd.path(digest), tmp_path / "elsewhere")
    assert not bd.has_own(digest, size) and bd.verify(digest, size)
    os.chmod(bd.path(digest), 0o444)
    assert bd.has_own(digest, size)  # linked, but nobody but us can change it
    src = BlobDir(tmp_path / "in", create=True)
    src.add_bytes(b"data")
    os.chmod(bd.path(digest), 0o644)
    bd.import_blob(src, digest, size)  # replaced by a file of its own
    assert os.stat(bd.path(digest)).st_ino != os.stat(tmp_path / "elsewhere").st_ino


def test_a_tampered_shareable_source_is_refused_after_linking(tmp_path) -> None:
    src = BlobDir(tmp_path / "in", create=True)
    dst = BlobDir(tmp_path / "out", create=True)
    digest, _ = src.add_bytes(b"original")
    os.chmod(src.path(digest), 0o644)
    Path(src.path(digest)).write_bytes(b"tampered")
    os.chmod(src.path(digest), 0o444)  # shareable again: it gets linked, then checked
    with pytest.raises(PkglayerError) as e:
        dst.import_blob(src, digest)
    assert str(e.value) == (f"blob {digest} in {src.root} is corrupt: its content has digest "
                            f"{sha256_digest(b'tampered')}")
    assert blob_names(dst) == [] and tmp_names(dst) == []


@pytest.mark.parametrize("race", ["replaced", "removed"])
def test_a_source_swapped_or_removed_before_the_link_is_copied_from_what_was_opened(
    tmp_path, monkeypatch, race: str
) -> None:
    """Someone changes the source directory between our open and our link: the link must
    not publish the other file, and the blob comes from the file that was opened and checked."""
    src = BlobDir(tmp_path / "in", create=True)
    dst = BlobDir(tmp_path / "out", create=True)
    digest, size = src.add_bytes(b"layer data")
    opened = os.stat(src.path(digest)).st_ino
    real_link = os.link

    def racing_link(source, target, **kwargs):
        os.unlink(source)
        if race == "replaced":
            Path(source).write_bytes(b"layer data")  # the same bytes, another file
            os.chmod(source, 0o444)
        return real_link(source, target, **kwargs)

    monkeypatch.setattr(blobstore.os, "link", racing_link)
    dst.import_blob(src, digest, size)
    assert dst.verify(digest, size)
    published = os.stat(dst.path(digest)).st_ino
    assert published != opened and (race == "removed" or published != os.stat(src.path(digest)).st_ino)
    assert stat.S_IMODE(os.stat(dst.path(digest)).st_mode) == 0o444 and tmp_names(dst) == []


def test_a_link_refused_for_another_reason_is_a_clear_error(tmp_path) -> None:
    with tmpfs(tmp_path / "ro", size="1M") as mnt:
        src = BlobDir(mnt / "in", create=True)
        dst = BlobDir(mnt / "out", create=True)
        digest, _ = src.add_bytes(b"layer")
        run(["mount", "-o", "remount,ro", mnt])
        with pytest.raises(PkglayerError) as e:
            dst.import_blob(src, digest)
        assert str(e.value) == f"cannot link blob {digest} from {src.root}: Read-only file system"


def test_temp_files_are_private_and_not_inherited(tmp_path) -> None:
    """A blob being written is readable by its writer only, and a process started meanwhile
    (skopeo, say) does not inherit it: it would hold the writer's lock after the writer died."""
    bd = BlobDir(tmp_path, create=True)
    with bd.writer() as w:
        w.write(b"partial")
        assert stat.S_IMODE(os.stat(w.tmp_path).st_mode) == 0o600
        fds = subprocess.run(["find", "/proc/self/fd", "-lname", "*.tmp"], capture_output=True, text=True,
                             close_fds=False, check=True).stdout
        assert fds == ""
        w.commit()


def test_a_temp_file_removed_before_it_was_locked_is_not_used(tmp_path, monkeypatch) -> None:
    """A cleaner that takes the lock of a temp file between its creation and the writer's
    flock removes it; the writer must then start over with a new file."""
    bd = BlobDir(tmp_path, create=True)
    real_flock = blobstore.fcntl.flock
    removed: list[str] = []

    def cleaner_first(fd, op):
        if not removed:
            (name,) = tmp_names(bd)
            removed.append(name)
            os.unlink(os.path.join(bd.tmp, name))  # what remove_stale_temps does, holding the lock
        return real_flock(fd, op)

    monkeypatch.setattr(blobstore.fcntl, "flock", cleaner_first)
    with bd.writer() as w:
        assert removed and os.path.basename(w.tmp_path) != removed[0] and os.path.exists(w.tmp_path)
        w.write(b"data")
        digest, _ = w.commit()
    assert bd.verify(digest)


def test_a_temp_name_taken_by_a_planted_symlink_is_not_followed(tmp_path, monkeypatch) -> None:
    """Someone who can write to the temp directory and guessed the next temp name (128
    random bits) planted a symlink there: the writer stops, writing nothing through it."""
    bd = BlobDir(tmp_path / "d", create=True)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not to be touched")
    guessed = "0" * 32
    os.symlink(outside, os.path.join(bd.tmp, f"blob-{guessed}.tmp"))
    monkeypatch.setattr(blobstore.os, "urandom", bytes)  # n zero bytes: the name guessed
    with pytest.raises(PkglayerError) as e, bd.writer() as w:
        w.write(b"data")
        w.commit()
    assert str(e.value) == f"cannot create a temp file in {bd.tmp}: File exists"
    assert outside.read_bytes() == b"not to be touched" and blob_names(bd) == []


def test_no_free_inode_for_a_temp_file_is_a_space_error(tmp_path) -> None:
    with tmpfs(tmp_path / "full", size="1M,nr_inodes=8") as mnt:
        bd = BlobDir(mnt, create=True)
        i = 0
        with pytest.raises(OSError) as e:
            while True:
                (mnt / f"filler-{i}").touch()
                i += 1
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(PkglayerError) as e:
            bd.writer()
        assert str(e.value) == f"no space left on device while writing blob to {mnt}"
