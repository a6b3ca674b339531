"""Daemon parts in isolation, on real files: configuration, layer cache, sd_notify,
socket binding."""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
from pathlib import Path

import pytest

from pkglayer.blobstore import BlobDir
from pkglayer.config import parse_size
from pkglayer.daemon.api import bind_unix_socket
from pkglayer.daemon.cache import LayerCache
from pkglayer.daemon.config import load_daemon_config
from pkglayer.daemon.notify import Notifier, watchdog_interval
from pkglayer.errors import ConfigError, PkglayerError
from pkglayer.history import LayerRecord

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------- config


def test_shipped_config_is_a_valid_daemon_config_with_a_working_example_root(tmp_path: Path) -> None:
    text = (REPO / "conf/pkglayer.toml").read_text()
    config = load_daemon_config(str(REPO / "conf/pkglayer.toml"))
    assert config.socket == "/run/pkglayer/pkglayer.sock" and config.state_dir == "/var/lib/pkglayer"
    assert config.roots == ()
    # Uncomment the example root: it must parse as documented.
    start = text.index("# [[root]]")
    example = re.sub(r"(?m)^# ", "", text[start:])
    conf = tmp_path / "c.toml"
    conf.write_text(text[:start] + example)
    config = load_daemon_config(str(conf))
    (root,) = config.roots
    assert root.name == "fedora-40" and root.output == "oci:/srv/images/fedora-40:latest"
    assert root.settings.compression == "zstd" and root.debounce == 2.0 and root.auto_build
    assert root.settings.all_excludes[-1] == "var/log/**"
    assert root.settings.hash_cache == "/var/lib/pkglayer/file-digests.sqlite"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[daemon]\nsocket = 'run/x.sock'\n", "daemon.socket: must be an absolute path"),
        ("[daemon]\nsokcet = '/x'\n", "daemon.sokcet: unknown setting"),
        ("[daemon]\nsocket-group = 'no-such-group-xyz'\n", "daemon.socket-group: no group named"),
        ("[daemon]\nlog-level = 'loud'\n", "daemon.log-level: must be one of"),
        ("[daemon]\njobs = 0\n", "daemon.jobs: must be a positive integer"),
        ("[daemon]\njobs = true\n", "daemon.jobs: must be a positive integer"),
        ("[daemon]\ncache-max-size = '12 parsecs'\n", "daemon.cache-max-size: must be a positive size"),
        ("[[root]]\npath = '/srv/r'\n", r"root\[0\].name: missing"),
        ("[[root]]\nname = 'a'\n", r"root\[0\].path: missing"),
        ("[[root]]\nname = 'a b'\npath = '/r'\n", r"root\[0\].name: 'a b' must be"),
        ("[[root]]\nname = 'a'\npath = '/'\n", r"root\[0\].path: must be an absolute path other than /"),
        ("[[root]]\nname = 'a'\npath = '/r'\n[[root]]\nname = 'b'\npath = '/s'\ndebounce = 0\n",
         r"root\[1\].debounce: must be a positive number"),
        ("[[root]]\nname = 'a'\npath = '/r'\ndebounce = 'soon'\n", r"root\[0\].debounce: must be a positive number"),
        ("[[root]]\nname = 'a'\npath = '/r'\n[[root]]\nname = 'a'\npath = '/s'\n",
         r"root\[1\].name: 'a' is already the name"),
        ("[[root]]\nname = 'a'\npath = '/r'\n[[root]]\nname = 'b'\npath = '/r/'\n",
         r"root\[1\].path: /r is already watched"),
        ("[[root]]\nname = 'a'\npath = '/r'\noutput = 'containers-storage:'\n", r"root\[0\].output: .*no image name"),
        ("[[root]]\nname = 'a'\npath = '/r'\noutput = 'containers-storage:[vfs@s+/r]x'\n",
         r"root\[0\].output: the store must be an absolute path"),
        ("[[root]]\nname = 'a'\npath = '/r'\noutput = 'docker-archive:a.tar'\n",
         r"root\[0\].output: the archive must be an absolute path"),
        ("[[root]]\nname = 'a'\npath = '/r'\noutput = 'oci:rel:tag'\n", r"root\[0\].output: the layout directory"),
        ("[[root]]\nname = 'a'\npath = '/r'\ncompression = 'lz4'\n", r"root\[0\].compression: must be one of"),
        ("[[root]]\nname = 'a'\npath = '/r'\nmax-layers = 500\n", r"root\[0\].max-layers:"),
        ("[[root]]\nname = 'a'\npath = '/r'\nlevel = 42\n", r"root\[0\].level:"),
        ("[[root]]\nname = 'a'\npath = '/r'\nexcludes = 'tmp'\n", r"root\[0\].excludes: must be a list of strings"),
        ("[[root]]\nname = 'a'\npath = '/r'\nauto-build = 'yes'\n", r"root\[0\].auto-build: must be true or false"),
        ("[[root]]\nname = 'a'\npath = '/r'\ncolour = 1\n", r"root\[0\].colour: unknown setting"),
        ("[deamon]\n", "deamon: unknown table"),
        ("root = 3\n", "root: must be an array of tables"),
        ("[build]\nmax-layers = 'x'\n", "build.max-layers must be a int"),
        ("[daemon\n", "c.toml"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_daemon_config(str(conf))


@pytest.mark.parametrize("output", [
    "oci:/srv/images/a:v1", "oci-archive:/srv/a.tar:v1", "docker-archive:/srv/a.tar:localhost/a:v1",
    "containers-storage:localhost/a:v1", "containers-storage:[vfs@/srv/store+/run/store]localhost/a",
    "docker://registry.example/a:1",
])
def test_root_output_takes_what_build_output_takes(tmp_path: Path, output: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f"[[root]]\nname = 'a'\npath = '/r'\noutput = '{output}'\n")
    assert load_daemon_config(str(conf)).roots[0].output == output


@pytest.mark.parametrize("output, message", [
    ("oci-archive:-", "standard output (oci-archive:-) is for the command line"),
    ("podman:a", "reference 'podman:a': unknown transport; expected one of oci:DIR[:TAG], docker://REF"),
])
def test_root_output_refuses_standard_output_and_unknown_transports_in_one_line(
    tmp_path: Path, output: str, message: str
) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f"[[root]]\nname = 'a'\npath = '/r'\noutput = '{output}'\n")
    with pytest.raises(ConfigError) as e:
        load_daemon_config(str(conf))
    assert str(e.value).startswith(f"{conf}: root[0].output: {message}") and "\n" not in str(e.value)


def test_root_settings_inherit_build_and_override(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        "[build]\ncompression = 'zstd'\nextra-excludes = ['srv/**']\n"
        "[daemon]\njobs = 3\n"
        "[[root]]\nname = 'a'\npath = '/r/a'\n"
        "[[root]]\nname = 'b'\npath = '/r/b'\ncompression = 'gzip'\nlevel = 9\nexcludes = ['opt/**']\n"
        "debounce = 0.5\nauto-build = false\nlayers = '/l/b'\n"
    )
    a, b = load_daemon_config(str(conf)).roots
    assert a.settings.compression_spec == "zstd-3" and a.settings.jobs == 3 and a.debounce == 2.0
    assert b.settings.compression_spec == "gzip-9" and b.settings.extra_excludes == ("srv/**", "opt/**")
    assert (b.debounce, b.auto_build, b.layers) == (0.5, False, "/l/b")


def test_sizes() -> None:
    assert parse_size("20G", "k") == 20 * 10**9
    assert parse_size("512MiB", "k") == 512 * 2**20
    assert parse_size(1000, "k") == 1000
    with pytest.raises(ConfigError, match="k: must be a positive size"):
        parse_size(0, "k")


# -------------------------------------------------------------------- cache


def _put(cache: LayerCache, key: int, data: bytes, spec: str = "gzip-6") -> LayerRecord:
    """Write a blob the way build() does (into the cache's own BlobDir) and index it."""
    with cache.blobs.writer() as w:
        w.write(data)
        digest, size = w.commit()
    rec = LayerRecord(name="x", packages=(), content_key=f"sha256:{key:064x}", digest=digest,
                      diff_id=digest, size=size, media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                      compression=spec)
    cache.add(rec, cache.blobs)
    return rec


def test_cache_lookup_is_keyed_by_content_key_and_compression(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "cache"), 10**9)
    rec = _put(cache, 1, b"a" * 100)
    hit = cache.lookup(rec.content_key, "gzip-6")
    assert hit is not None and (hit.digest, hit.size) == (rec.digest, 100)
    assert cache.lookup(rec.content_key, "gzip-9") is None
    assert cache.lookup(f"sha256:{2:064x}", "gzip-6") is None
    # From another directory (an output), by hard link.
    other = BlobDir(tmp_path / "out", create=True)
    digest, _ = other.add_bytes(b"b" * 50)
    rec2 = LayerRecord("y", (), f"sha256:{3:064x}", digest, digest, 50,
                       "application/vnd.oci.image.layer.v1.tar+gzip", "gzip-6")
    cache.add(rec2, other)
    assert cache.blobs.verify(digest)
    assert os.stat(cache.blobs.path(digest)).st_ino == os.stat(other.path(digest)).st_ino
    s = cache.stats()
    assert (s.entries, s.bytes, s.hits, s.misses) == (2, 150, 1, 2)


def test_a_cached_layer_that_must_be_copied_is_left_to_a_worker_and_counted_once(tmp_path: Path) -> None:
    """build() asks for every layer first without reading or copying a blob (read=False);
    a cached blob the output lacks raises MustRead, and the worker's call that copies it
    uses the same lookup: one hit, as before."""
    from pkglayer.ownership import Ownership
    from pkglayer.plan import PlannedLayer
    from pkglayer.prior import Prior
    from pkglayer.reuse import MustRead, ReuseIndex

    cache = LayerCache(str(tmp_path / "cache"), 10**9)
    rec = _put(cache, 1, b"a" * 100)
    out = BlobDir(tmp_path / "out", create=True)
    index = ReuseIndex(Prior(cache=cache), "gzip-6", rec.media_type, out, Ownership(None, None, {}, {}, {}), 0)
    layer = PlannedLayer("pkg", ("pkg",), ("pkg",), ("pkg",), 100, 0.1)
    with pytest.raises(MustRead):
        index.find(layer, rec.content_key, read=False)
    assert not out.has(rec.digest)
    found, why_not = index.find(layer, rec.content_key)
    assert found is not None and found.cached and why_not is None and out.verify(rec.digest, 100)
    assert cache.stats().hits == 1
    # Now in the output: answered without a worker.
    found, _ = index.find(layer, rec.content_key, read=False)
    assert found is not None and found.record.digest == rec.digest and cache.stats().hits == 2
    cache.close()


def test_cache_evicts_least_recently_used_to_its_bound(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "cache"), 250)
    recs = [_put(cache, i, bytes([i]) * 100) for i in range(3)]
    cache.lookup(recs[0].content_key, "gzip-6")  # 0 is now more recent than 1
    assert cache.evict() == 1
    assert cache.lookup(recs[1].content_key, "gzip-6") is None
    assert not cache.blobs.has(recs[1].digest)
    assert cache.lookup(recs[0].content_key, "gzip-6") and cache.lookup(recs[2].content_key, "gzip-6")
    assert cache.stats().bytes == 200
    # Not while a build holds a session: it may be about to link a blob it looked up.
    _put(cache, 9, b"z" * 100)
    with cache.session():
        assert cache.evict() == 0
    assert cache.evict() == 1


def test_cache_claim_makes_concurrent_writers_of_one_key_write_once(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "cache"), 10**9)
    key = f"sha256:{7:064x}"
    writes = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        with cache.claim(key, "gzip-6"):
            if cache.lookup(key, "gzip-6") is None:
                writes.append(1)
                _put(cache, 7, b"q" * 1000)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 1


def test_cache_check_repairs_what_a_crash_or_a_hand_can_leave(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "cache"), 10**9)
    keep = _put(cache, 1, b"k" * 10)
    lost = _put(cache, 2, b"l" * 10)
    os.chmod(cache.blobs.path(lost.digest), 0o644)
    os.unlink(cache.blobs.path(lost.digest))  # index row without blob
    orphan, _ = cache.blobs.add_bytes(b"orphan")  # blob without index row (crash before insert)
    dead = cache.blobs.writer()  # a writer that died: its temp file's lock is released below
    dead.write(b"partial")
    dead._file.close()  # closes the fd and with it the flock, as process death does
    assert os.path.exists(dead.tmp_path)
    cache.close()

    cache = LayerCache(str(tmp_path / "cache"), 10**9)
    found = cache.check()
    assert found == {"entries": 1, "dropped": 1, "orphans": 1, "temps": 1}
    assert cache.lookup(keep.content_key, "gzip-6") is not None
    assert cache.lookup(lost.content_key, "gzip-6") is None
    assert not cache.blobs.has(orphan) and not os.path.exists(dead.tmp_path)


# ------------------------------------------------------------------- notify


def test_sd_notify_datagrams_path_and_abstract(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        n = Notifier(str(path))
        assert n.notify(READY=1, STATUS="ok")
        assert s.recv(100) == b"READY=1\nSTATUS=ok"
    name = f"pkglayer-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert Notifier("@" + name).notify(WATCHDOG=1)
        assert s.recv(100) == b"WATCHDOG=1"
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled and not Notifier().notify(READY=1)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None


def test_bind_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    path.write_text("precious")
    with pytest.raises(PkglayerError, match="not a socket"):
        bind_unix_socket(str(path), None)
    assert path.read_text() == "precious"
    sock = bind_unix_socket(str(tmp_path / "y.sock"), None)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "y.sock").st_mode) == 0o600
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    finally:
        sock.close()


def test_the_cyclic_gc_pauses_until_the_last_of_overlapping_builds_ends() -> None:
    """Builds of two roots may overlap: collections stay off until the last one ends,
    and come back on even when a build fails."""
    import gc

    from pkglayer.daemon.service import CollectionsPaused

    paused = CollectionsPaused()
    was = gc.isenabled()  # cli.main() in this process turns it off
    gc.enable()
    try:
        with paused:
            assert not gc.isenabled()
            with pytest.raises(PkglayerError), paused:
                raise PkglayerError("the second build failed")
            assert not gc.isenabled()  # the first still runs
        assert gc.isenabled()
    finally:
        if not was:
            gc.disable()


def test_memory_release_collects_what_builds_made_each_time_and_all_of_it_every_nth() -> None:
    """A cycle made since the last release goes at the next one; one among what an
    earlier release froze goes only at the every-nth full collection."""
    import gc
    import weakref

    from pkglayer.daemon.service import MemoryRelease

    class Node:
        pass

    def cycle() -> weakref.ref:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    release = MemoryRelease(full_every=3)
    was = gc.isenabled()
    gc.disable()  # no collection but the release's own
    gc.unfreeze()
    try:
        young = cycle()
        release()  # 1
        assert young() is None
        old = Node()
        old.self = old
        frozen = weakref.ref(old)
        release()  # 2: `old` survives, frozen
        del old
        release()  # 3: a full one
        assert frozen() is None
        old = Node()
        old.self = old
        frozen = weakref.ref(old)
        release()  # 4
        del old
        release()  # 5: frozen garbage stays until the next full one
        assert frozen() is not None
        release()  # 6
        assert frozen() is None
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
