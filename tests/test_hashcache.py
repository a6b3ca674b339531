"""The file-digest cache: used only while a file is provably unchanged."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pkglayer import hashcache, scan
from pkglayer.config import BuildSettings
from pkglayer.hashcache import HashCache
from tests.helpers import build_into_layers


def test_entry_survives_a_reload_and_dies_with_an_in_place_edit(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    st = f.stat()
    cache = HashCache(str(tmp_path / "c.sqlite"))
    cache.load("tree")
    cache.put(st, {"blake3": "aa", "md5": "bb"}, hashed_at=time.time() + 10)
    cache.save()

    again = HashCache(str(tmp_path / "c.sqlite"))
    again.load("tree")
    assert again.get(f.stat(), ["blake3", "md5"]) == {"blake3": "aa", "md5": "bb"}
    assert again.get(f.stat(), ["sha256"]) is None  # never stored
    other_tree = HashCache(str(tmp_path / "c.sqlite"))
    other_tree.load("another tree")
    assert other_tree.get(f.stat(), ["blake3"]) is None

    f.write_bytes(b"HELLO")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only ctime tells
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert again.get(f.stat(), ["blake3"]) is None


def test_recently_changed_files_are_not_cached(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    cache = HashCache(str(tmp_path / "c.sqlite"))
    cache.load("tree")
    cache.put(f.stat(), {"blake3": "aa"}, hashed_at=time.time())  # ctime within the racy window
    cache.save()
    again = HashCache(str(tmp_path / "c.sqlite"))
    again.load("tree")
    assert again.get(f.stat(), ["blake3"]) is None


def test_unreadable_cache_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"not a database" * 100)
    cache = HashCache(str(path))
    cache.load("tree")  # no exception: the cache only ever saves work
    f = tmp_path / "f"
    f.write_bytes(b"x")
    assert cache.get(f.stat(), ["blake3"]) is None


@pytest.fixture
def old_tree(tmp_path: Path, monkeypatch) -> Path:
    """A tree whose files the first build may cache. ctime cannot be set back, so instead
    of waiting out the racy window (test_recently_changed_files_are_not_cached checks
    it), the window is closed: files changed before the hashing are old enough."""
    monkeypatch.setattr(hashcache, "_RACY_SECONDS", 0)
    root = tmp_path / "root"
    for i in range(20):
        d = root / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(3000 + i))
    return root


def test_rebuild_reads_no_file_and_an_in_place_edit_is_still_seen(
    old_tree: Path, tmp_path: Path, monkeypatch
) -> None:
    hashed: list[str] = []
    real = scan._hash_chunk

    def counting(rootfs, chunk):
        hashed.extend(obj.path for obj, _ in chunk)
        return real(rootfs, chunk)

    monkeypatch.setattr(scan, "_hash_chunk", counting)
    settings = BuildSettings(hash_cache=str(tmp_path / "cache.sqlite"))
    layers = str(tmp_path / "layers")
    first = build_into_layers(old_tree, settings, layers)
    assert first.written == 1

    hashed.clear()
    second = build_into_layers(old_tree, settings, layers)
    assert second.reused == 1 and hashed == []  # every digest came from the cache

    target = old_tree / "d1/f5"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    third = build_into_layers(old_tree, settings, layers)
    assert hashed == ["d1/f5"]
    assert third.written == 1
    assert third.layers[0].record.content_key != first.layers[0].record.content_key
