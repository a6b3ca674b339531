"""Deterministic layer compressors, chosen by format name and level.

Contract: for one format and level, with the library versions pinned in pyproject.toml,
the compressed bytes are a pure function of the uncompressed bytes. They do not depend on
how the input is split into `write()` calls or on how many layers are compressed at once,
and should not depend on the machine (neither library documents CPU-dependent output;
checked on x86-64 only). Each compressor is a stream: `write(data)` any number of times,
then `finish()` once; memory stays bounded whatever the input size.

- gzip: libdeflate 1.25 (PyPI `deflate` 0.9.0). libdeflate has no streaming API and its
  output is fixed only per version (it promises no more), so the tar is cut into blocks of
  GZIP_BLOCK uncompressed bytes, at fixed offsets, and each block becomes one complete gzip
  member; the blob is the concatenation. RFC 1952 allows several members in one file, and
  every layer reader we checked decompresses them as one stream (umoci, podman's
  containers-storage, skopeo, Python's gzip module; see tests/test_image_clients.py), as
  they must for eStargz layers, which are multi-member too. Readers that stop after the
  first member (zlib.decompress, tarfile's stream mode "r|gz", Rust flate2's GzDecoder)
  see a truncated tar.
  libdeflate writes a fixed header: mtime 0, no name, OS 255. Level N is libdeflate's
  level N: on the benchmark tree, level 6 is 1.2% smaller than zlib's level 6 at about a
  third of its CPU time, level 5 (the default) 0.6% smaller with a fifth less CPU than
  libdeflate's 6, and cutting at 4 MiB costs 0.04% against one member
  (bench/bench_compressors.py, docs/benchmark.md).
- zstd: libzstd 1.5.7 (PyPI `zstandard` 0.25.0), in-process (threads=0: libzstd's worker
  mode writes different bytes), one frame per zstd_block(level) bytes of tar, each made by the
  one-shot call: faster and smaller than one streamed frame, which pkglayer wrote before.
  Decoders read the frames as one stream (zstd:chunked layers are multi-frame too).
- none: the tar itself.

Blob bytes depend on the library versions and the level, so reuse of prior blobs is
decided by the content key (the uncompressed tar) and the format (`spec_format`), never
by compressed bytes; implementation() names what made a blob, for the history.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import deflate

from .timings import charge

FORMATS = ("gzip", "zstd", "none")

# Uncompressed bytes per gzip member. Larger blocks compress a little better (1 MiB:
# +0.2% against one member, 4 MiB: +0.04%) but hold more memory per compressing thread.
GZIP_BLOCK = 4 << 20


# The same for zstd frames: at least 8 MiB and 4 windows of the level (window 2 MiB at
# level 3, 8 MiB at 17-19), at most 32 MiB. libzstd compresses a block in one call with
# 10-35% less CPU than its streaming mode (16% less for a whole build), and at level 3
# the 8 MiB frames come out 0.3% smaller than one streamed frame.
def zstd_block(level: int) -> int:
    import zstandard  # here and below: it loads platform too, ~5 ms of every start, for zstd only

    window = 1 << zstandard.ZstdCompressionParameters.from_level(level).window_log
    return min(32 << 20, max(8 << 20, 4 * window))


def spec_format(spec: str) -> str:
    """The format of a compression spec as history records it: "gzip-5" and a bare
    "gzip" (another tool's blob) are "gzip"; "zstd:chunked-3" is "zstd:chunked"."""
    head, dash, level = spec.rpartition("-")
    return head if dash and level.isdigit() else spec


def implementation(fmt: str, level: int) -> str:
    """What writes `fmt` at `level`, for the history: the libraries the bytes depend on
    as PACKAGE-VERSION tokens (deflate 0.9.0 bundles libdeflate 1.25; zstandard names the
    libzstd it runs) and the block size. pkglayer's blobs from before this module have
    none: zlib for gzip, one member; one streamed zstd frame."""
    if fmt == "gzip":
        return f"deflate-{deflate.__version__}/members-{GZIP_BLOCK >> 20}MiB"
    import zstandard

    libzstd = ".".join(map(str, zstandard.ZSTD_VERSION))
    if fmt == "zstd":
        return f"zstandard-{zstandard.__version__}/libzstd-{libzstd}/frames-{zstd_block(level) >> 20}MiB"
    if fmt == "zstd:chunked":  # zstd_chunked.py: a frame per file, its own TOC
        return f"zstandard-{zstandard.__version__}/libzstd-{libzstd}/chunked"
    return ""


LEVELS = {"gzip": range(1, 10), "zstd": range(1, 23)}


class Writer(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


class _BufferPool:
    """Block buffers, kept across streams: allocating (and zeroing) a fresh one per layer
    cost more than 1% of a build, most layers being far smaller than a block."""

    def __init__(self) -> None:
        self._free: dict[int, list[memoryview]] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return memoryview(bytearray(size))

    def give(self, buf: memoryview) -> None:
        with self._lock:
            self._free.setdefault(len(buf), []).append(buf)


_POOL = _BufferPool()


class Blocks:
    """Cuts the input at fixed offsets, every `block` bytes, and writes each block as
    one self-contained unit (gzip member, zstd frame) made by `unit(block_bytes)`;
    `observe(block_bytes)`, when given, sees each block first (the tar writer hashes
    the uncompressed stream there, one call a block).

    Input comes by `write(data)`, or in place: `space()` is the free rest of the
    current block, and `filled(n)` says its first n bytes were written. The tar writer
    reads files straight into it, so file data is never copied in Python."""

    def __init__(
        self,
        unit: Callable[[memoryview], bytes | bytearray | memoryview],
        block: int,
        out: Writer,
        observe: Callable[[memoryview], object] | None = None,
    ):
        self.unit = unit
        self.out = out
        self.block = block
        self.observe = observe
        self.units = 0
        self._emitted = 0  # input bytes in the units written
        self._buf: memoryview | None = None  # from _POOL while data is buffered
        self._fill = 0

    @property
    def size(self) -> int:
        """Input bytes so far."""
        return self._emitted + self._fill

    def space(self) -> memoryview:
        if self._buf is None:
            self._buf = _POOL.take(self.block)
        return self._buf[self._fill :]

    def filled(self, n: int) -> None:
        self._fill += n
        if self._fill == self.block:
            self._emit(self._buf)
            self._fill = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        fill = self._fill
        end = fill + len(data)
        if end < self.block and self._buf is not None and not isinstance(data, memoryview):
            # Most writes (tar headers, padding): into the open block, which they leave open.
            self._buf[fill:end] = data
            self._fill = end
            return
        view = memoryview(data).cast("B")
        block = self.block
        while view:
            if not self._fill and len(view) >= block:
                # A whole block straight from the caller's buffer: no copy.
                self._emit(view[:block])
                view = view[block:]
                continue
            if self._buf is None:
                self._buf = _POOL.take(block)
            n = min(block - self._fill, len(view))
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == block:
                self._emit(self._buf)
                self._fill = 0

    def _emit(self, data: memoryview) -> None:
        if self.observe is not None:
            self.observe(data)
        with charge("compress"):
            unit = self.unit(data)
        self.out.write(unit)
        self.units += 1
        self._emitted += len(data)

    def finish(self) -> None:
        # An empty input still gets one (empty) unit: a blob is never zero bytes.
        if self._fill or not self.units:
            self._emit(self._buf[: self._fill] if self._buf is not None else memoryview(b""))
        self._fill = 0
        if self._buf is not None:
            _POOL.give(self._buf)
            self._buf = None


def gzip_members(level: int, out: Writer, observe: Callable[[memoryview], object] | None = None) -> Blocks:
    return Blocks(lambda data: deflate.gzip_compress(data, level), GZIP_BLOCK, out, observe)


def zstd_frames(level: int, out: Writer, observe: Callable[[memoryview], object] | None = None) -> Blocks:
    # compress() is libzstd's one-shot call: each frame independent of the ones before.
    return Blocks(_zstd_compressor(level).compress, zstd_block(level), out, observe)


_ZSTD = threading.local()


def _zstd_compressor(level: int):
    """This thread's compressor for `level`: a new one allocated (and the kernel zeroed)
    its few MB of tables for every layer. Frames do not depend on what the compressor
    made before."""
    import zstandard

    made = getattr(_ZSTD, "by_level", None)
    if made is None:
        made = _ZSTD.by_level = {}
    c = made.get(level)
    if c is None:
        c = made[level] = zstandard.ZstdCompressor(level=level, threads=0)
    return c


# "none" goes through Blocks too, for its in-place input: the blocks are written as they are.
PLAIN_BLOCK = 1 << 20


def plain(out: Writer, observe: Callable[[memoryview], object] | None = None) -> Blocks:
    return Blocks(lambda data: data, PLAIN_BLOCK, out, observe)


def compressor(
    fmt: str, level: int, out: Writer, observe: Callable[[memoryview], object] | None = None
) -> Blocks:
    """A compressor of format `fmt` ("gzip", "zstd" or "none") at `level` (ignored for
    "none"), writing to `out`; `observe` sees the uncompressed input block by block."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown compression {fmt!r} (choose {', '.join(FORMATS)})")
    if fmt in LEVELS and level not in LEVELS[fmt]:
        raise ValueError(f"{fmt} level must be {LEVELS[fmt].start}..{LEVELS[fmt].stop - 1}, not {level}")
    if fmt == "gzip":
        return gzip_members(level, out, observe)
    if fmt == "zstd":
        return zstd_frames(level, out, observe)
    return plain(out, observe)
