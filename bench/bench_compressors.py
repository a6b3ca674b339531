#!/usr/bin/env python3
"""Compare deflate implementations (and zstd) on one tar of a real tree, one thread each.

The tar holds the files of pkglayer's layers (the tree without its default excludes),
written by GNU tar as bench/bench.py's "same" baselines do, and is read into memory once.
Each codec compresses it `--runs` times on one thread; the table gives the median CPU
seconds of that thread (`time.thread_time`, steadier than wall time on a shared machine),
the median wall seconds, the output size, and the size relative to zlib at level 6,
pkglayer's compressor before libdeflate (zstd rows: against zlib too). Block rows cut the input into fixed blocks and
compress each as one gzip member, as pkglayer.compress does; "whole" is one member.

The same-bytes column checks the determinism contract of pkglayer.compress on this input:
identical output across runs and across write sizes of 64 KiB, 1 MiB and 4 MiB + 1 byte.

zlib-ng and ISA-L are optional (pip install zlib-ng isal); missing ones are skipped.

  bench/bench_compressors.py                       # the cached large Debian tree
  bench/bench_compressors.py --rootfs DIR --runs 3
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import blake3
import deflate
import zstandard

from pkglayer import compress

HERE = Path(__file__).resolve().parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench", HERE / "bench.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tar_of_layers(root: str, pkglayer: str) -> bytes:
    out = subprocess.run([pkglayer, "scan", root, "--json"], capture_output=True, text=True, check=True).stdout
    excl = "".join(f" --exclude={shlex.quote('./' + p)}" for p in json.loads(out)["excluded"])
    cmd = _bench_module().TAR.format(root=shlex.quote(root), excludes=" --anchored" + excl)
    return subprocess.run(cmd, shell=True, capture_output=True, check=True).stdout


def zlib_stream(module, level: int) -> Callable[[memoryview], bytes]:
    def run(data: memoryview) -> bytes:
        c = module.compressobj(level, module.DEFLATED, 31)
        parts = [c.compress(data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
        return b"".join([*parts, c.flush()])

    return run


def libdeflate_blocks(level: int, block: int | None) -> Callable[[memoryview], bytes]:
    def run(data: memoryview) -> bytes:
        size = block or len(data)
        return b"".join(deflate.gzip_compress(data[i : i + size], level) for i in range(0, len(data), size))

    return run


def pkglayer_compress(fmt: str, level: int, feed: int = 1 << 20) -> Callable[[memoryview], bytes]:
    def run(data: memoryview) -> bytes:
        out = io.BytesIO()
        c = compress.compressor(fmt, level, out)
        for i in range(0, len(data), feed):
            c.write(data[i : i + feed])
        c.finish()
        return out.getvalue()

    return run


def zstd_stream(level: int) -> Callable[[memoryview], bytes]:
    def run(data: memoryview) -> bytes:
        c = zstandard.ZstdCompressor(level=level, threads=0).compressobj()
        parts = [c.compress(data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
        return b"".join([*parts, c.flush()])

    return run


def zstd_one_shot(level: int) -> Callable[[memoryview], bytes]:
    def run(data: memoryview) -> bytes:
        return zstandard.ZstdCompressor(level=level, threads=0).compress(data)

    return run


def codecs() -> list[tuple[str, Callable[[memoryview], bytes]]]:
    mib = 1 << 20
    rows: list[tuple[str, Callable[[memoryview], bytes]]] = [("zlib 6 (before)", zlib_stream(zlib, 6))]
    try:
        from zlib_ng import zlib_ng

        rows += [(f"zlib-ng {lv}", zlib_stream(zlib_ng, lv)) for lv in (5, 6)]
    except ImportError:
        print("bench: zlib-ng not installed, skipped", file=sys.stderr)
    try:
        from isal import isal_zlib

        rows += [(f"ISA-L {lv}", zlib_stream(isal_zlib, lv)) for lv in (1, 2, 3)]
    except ImportError:
        print("bench: isal not installed, skipped", file=sys.stderr)
    for lv in (4, 5, 6, 7):
        blocks = (mib, 4 * mib, 16 * mib)
        rows += [(f"libdeflate {lv}, {b >> 20} MiB members", libdeflate_blocks(lv, b)) for b in blocks]
    rows += [
        ("libdeflate 6, one member", libdeflate_blocks(6, None)),
        ("pkglayer.compress gzip 6", pkglayer_compress("gzip", 6)),
        ("zstd 3, one streamed frame (before)", zstd_stream(3)),
        ("zstd 3, one-shot, one frame", zstd_one_shot(3)),
        ("pkglayer.compress zstd 3 (8 MiB frames)", pkglayer_compress("zstd", 3)),
        ("sha256 (for scale)", lambda d: hashlib.sha256(d).digest()),
        ("md5 (for scale)", lambda d: hashlib.md5(d).digest()),
        ("BLAKE3 (for scale)", lambda d: blake3.blake3(d).digest()),
    ]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rootfs", help="tree (default: large_deb_rootfs() of tests/rootfs_factory.py)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each codec; medians are reported (default 1)")
    args = ap.parse_args()
    bench = _bench_module()
    root = os.path.abspath(args.rootfs) if args.rootfs else str(bench.large_deb_rootfs())
    pkglayer = bench.find_pkglayer(None)
    print(f"bench: tar of {root} without pkglayer's excludes", file=sys.stderr)
    data = memoryview(tar_of_layers(root, pkglayer))
    load0 = bench.loadavg()

    lines = [
        f"Input: a {len(data) / 1e6:.1f} MB tar of `{root}` without pkglayer's excludes; "
        f"median of {args.runs} run(s), one thread.",
        "",
        "| codec | CPU s | wall s | MB/s (CPU) | output | vs zlib 6 |",
        "|---|---|---|---|---|---|",
    ]
    ref = None
    for name, fn in codecs():
        cpu, wall = [], []
        out = b""
        for _ in range(args.runs):
            t0, c0 = time.perf_counter(), time.thread_time()
            out = fn(data)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - t0)
        c, w = statistics.median(cpu), statistics.median(wall)
        hashing = "for scale" in name
        ref = ref or len(out)
        size = "-" if hashing else f"{len(out) / 1e6:.1f} MB"
        rel = "-" if hashing else f"{len(out) / ref:.3f}"
        lines.append(f"| {name} | {c:.2f} | {w:.2f} | {len(data) / 1e6 / c:.0f} | {size} | {rel} |")
        print(lines[-1], file=sys.stderr, flush=True)

    digests = {
        hashlib.sha256(pkglayer_compress("gzip", 6, feed)(data)).hexdigest()
        for feed in (64 << 10, 1 << 20, (4 << 20) + 1, 1 << 20)
    }
    lines += [
        "",
        f"pkglayer.compress gzip 6, same bytes across two runs and write sizes 64 KiB / 1 MiB / 4 MiB+1: "
        f"{'yes' if len(digests) == 1 else 'NO'}; load average before/after: "
        f"{' '.join(load0)} / {' '.join(bench.loadavg())}; {compress.implementation('gzip', 6)}.",
    ]
    print("\n".join(lines))
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
