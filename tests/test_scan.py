"""The walk (pkglayer.scan.walk): every object once with what a layer needs, the digests
the caller asks for, and files that change while being read."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pkglayer import hashcache, scan
from pkglayer.digests import CONTENT_HASH, new_hasher
from pkglayer.errors import RootfsError
from pkglayer.hashcache import HashCache
from pkglayer.rootfs import Rootfs
from tests.helpers import require_root, tmpfs


def walk(root: Path, algos=lambda path, st: (), excludes=(), drop_xattrs=(), **kwargs) -> scan.Scan:
    with Rootfs(root) as rootfs:
        return scan.walk(rootfs, algos, excludes, drop_xattrs, **kwargs)


def test_every_object_once_with_its_stat_link_target_and_xattrs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "b/c").mkdir(parents=True)
    (root / "a").write_bytes(b"a")
    (root / "b/c/deep").write_bytes(b"deep")
    (root / "b/link").symlink_to("../a")
    (root / "d").symlink_to("b")  # a link to a directory is an object, never a way in
    os.mkfifo(root / "fifo")
    os.setxattr(root / "a", "user.keep", b"1")
    os.setxattr(root / "a", "user.drop", b"2")
    os.setxattr(root / "a", "user.also.kept", b"3")
    os.setxattr(root / "b", "user.drop", b"dir")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "b/sock"))
        found = walk(root, drop_xattrs=("user.drop",))
    assert set(found.objects) == {"a", "b", "b/c", "b/c/deep", "b/link", "d", "fifo"}
    assert_parents_first(list(found.objects))
    for path, obj in found.objects.items():
        assert obj.path == path and obj.home == "unowned"
        assert obj.st.st_ino == os.lstat(root / path).st_ino
    assert found.objects["b/link"].linkname == "../a" and found.objects["d"].linkname == "b"
    assert found.objects["a"].linkname is None
    assert found.objects["a"].xattrs == (("user.also.kept", b"3"), ("user.keep", b"1"))
    assert found.objects["b"].xattrs == () and found.objects["b/c"].xattrs == ()
    assert found.skipped == [("b/sock", "socket (tar cannot store sockets)")]
    assert found.digests == {} and found.excluded == []
    assert all(obj.content_hash is None for obj in found.objects.values())


def assert_parents_first(paths: list[str]) -> None:
    for i, path in enumerate(paths):
        parent = path.rpartition("/")[0]
        assert not parent or parent in paths[:i], f"{path} before its parent"


def test_excluded_paths_are_left_out_with_what_is_below_them(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for path in ("proc/1/status", "tmp/x", "keep/tmp/y", "keep/z.pyc", "z.pyc"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
    found = walk(root, excludes=("proc", "tmp/*", "**/*.pyc"))
    assert found.excluded == ["keep/z.pyc", "proc", "tmp/x", "z.pyc"]
    assert set(found.objects) == {"keep", "keep/tmp", "keep/tmp/y", "tmp"}


def test_files_are_hashed_with_the_algorithms_asked_for(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = {f"d{i % 3}/f{i}": os.urandom(i * 1000) for i in range(300)}  # several hashing runs
    files["big"] = os.urandom(3 * 1024 * 1024 + 5)  # several reads
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / "link").symlink_to("big")

    def algos(path: str, st: os.stat_result | None = None) -> tuple[str, ...]:
        return (CONTENT_HASH, "md5") if path.endswith("0") else (CONTENT_HASH,) if path != "big" else ("sha256",)

    progress: list[tuple[str, int, int]] = []
    found = walk(root, algos, jobs=2, progress=lambda *a: progress.append(a))
    assert set(found.digests) == set(files)
    for path, data in files.items():
        want = {a: _digest(a, data) for a in algos(path)}
        assert found.digests[path] == want, path
        assert found.objects[path].content_hash == want.get(CONTENT_HASH), path
    assert found.objects["link"].content_hash is None
    totals = {total for _, _, total in progress}
    assert totals == {len(files)} and progress[-1] == ("hashing", len(files), len(files))
    assert [done for _, done, _ in progress] == sorted(done for _, done, _ in progress)
    assert found.hashed_at > 0


def _digest(algo: str, data: bytes) -> str:
    h = new_hasher(algo) if algo == CONTENT_HASH else hashlib.new(algo)
    h.update(data)
    return h.hexdigest()


def test_digests_are_cached_and_cached_ones_spare_the_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashcache, "_RACY_SECONDS", 0)  # files changed before the walk are old enough
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"data")
    (root / "g").write_bytes(b"other")
    path = str(tmp_path / "cache.sqlite")

    def cache() -> HashCache:
        c = HashCache(path)
        c.load("tree")
        return c

    first = cache()
    walk(root, lambda path, st: ("md5",), cache=first)
    first.save()  # what the walk hashed is now in the cache
    assert cache().get(os.stat(root / "g"), ["md5"]) == {"md5": hashlib.md5(b"other").hexdigest()}
    planted = cache()
    planted.put(os.stat(root / "f"), {"md5": "cached"}, hashed_at=time.time())
    planted.save()
    hashed: list[str] = []
    real = scan._hash_chunk
    monkeypatch.setattr(scan, "_hash_chunk", lambda rootfs, chunk: hashed.extend(o.path for o, _ in chunk)
                        or real(rootfs, chunk))
    found = walk(root, lambda path, st: ("md5",), cache=cache())
    assert found.digests == {"f": {"md5": "cached"}, "g": {"md5": hashlib.md5(b"other").hexdigest()}}
    assert hashed == []
    found = walk(root, lambda path, st: ("md5", "sha256"), cache=cache())  # one algorithm missing: read
    assert hashed == ["f", "g"] and found.digests["f"]["sha256"] == hashlib.sha256(b"data").hexdigest()


@pytest.mark.parametrize("change, message", [
    ("replaced", "changed while being read"),
    ("grown", "changed while being read"),
    ("removed", "disappeared while being read"),
])
def test_a_file_changed_between_walk_and_read_stops_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, message: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"1234")
    real = scan._hash_chunk

    def racing(rootfs, chunk):
        if change == "replaced":
            (root / "g").write_bytes(b"abcd")
            os.replace(root / "g", root / "f")
        elif change == "grown":
            (root / "f").write_bytes(b"12345")
        else:
            (root / "f").unlink()
        return real(rootfs, chunk)

    monkeypatch.setattr(scan, "_hash_chunk", racing)
    with pytest.raises(RootfsError, match=f"^/f {message}$"):
        walk(root, lambda path, st: ("md5",))


def test_a_file_that_shrinks_while_read_stops_the_scan(tmp_path: Path) -> None:
    """The size is checked on the open file, then it is cut short while being read."""
    root = tmp_path / "root"
    root.mkdir()
    data = os.urandom(3 * scan._READ_CHUNK)
    (root / "f").write_bytes(data)
    real_readv = os.readv

    def shrinking(fd, buffers):
        n = real_readv(fd, buffers)
        os.truncate(root / "f", scan._READ_CHUNK)
        return n

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scan.os, "readv", shrinking)
        with pytest.raises(RootfsError, match="^/f shrank while being read$"):
            walk(root, lambda path, st: ("md5",))


def test_a_failing_walk_leaves_no_hashing_threads_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon scans again and again: a scan that fails must not leave its workers."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    for i in range(400):  # several runs of 128 for two workers
        (root / f"d/f{i}").write_bytes(b"x")
    (root / "y/z").mkdir(parents=True)  # walked after d's files
    calls: list[str] = []
    real = Rootfs.getxattrs

    def failing(self, relpath):
        calls.append(relpath)
        if relpath == "y/z":
            raise OSError("xattrs unreadable")
        return real(self, relpath)

    monkeypatch.setattr(Rootfs, "getxattrs", failing)
    real_chunk = scan._hash_chunk
    started: list[int] = []

    def slow_chunk(rootfs, chunk):
        started.append(len(chunk))
        return real_chunk(rootfs, chunk)

    monkeypatch.setattr(scan, "_hash_chunk", slow_chunk)
    before = threading.active_count()
    with pytest.raises(OSError, match="xattrs unreadable"):
        walk(root, lambda path, st: ("md5",), jobs=2)
    assert calls[-1] == "y/z" and len(calls) == 403  # after the files were found
    assert threading.active_count() == before
    assert started == []  # files are hashed after the walk: nothing read for a failed one


def test_mount_points_are_listed_but_not_entered(tmp_path: Path) -> None:
    require_root("mounting a tmpfs")
    root = tmp_path / "root"
    (root / "mnt").mkdir(parents=True)
    with tmpfs(root / "mnt"):
        (root / "mnt/inside").write_bytes(b"on another filesystem")
        found = walk(root)
        whole = walk(root, one_file_system=False)
    assert "mnt" in found.objects and "mnt/inside" not in found.objects
    assert found.skipped == [("mnt", "mount point: contents on another filesystem not included")]
    assert "mnt/inside" in whole.objects and whole.skipped == []


def test_a_failed_hashing_run_drops_the_runs_still_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that fails while hashed stops the scan; runs of files not started yet are
    dropped, not hashed for nothing."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    for i in range(4 * 128):
        (root / f"d/f{i:03d}").write_bytes(b"x")
    real_chunk = scan._hash_chunk
    started: list[str] = []

    def chunk_then_fail(rootfs, chunk):
        started.append(chunk[0][0].path)
        time.sleep(0.3)  # the walk has queued every run by now
        if len(started) == 1:
            raise RootfsError("the first run fails")
        return real_chunk(rootfs, chunk)

    monkeypatch.setattr(scan, "_hash_chunk", chunk_then_fail)
    with pytest.raises(RootfsError, match="^the first run fails$"):
        walk(root, lambda path, st: ("md5",), jobs=1)
    # the one worker may have taken the second run before the failure was seen, no more
    assert started[0] == "d/f000" and len(started) in (1, 2), started
