#!/usr/bin/env python3
"""CPU time of each phase of one pkglayer run, in-process: the CLI's own main() with the
pipeline's functions wrapped to add up the thread CPU time spent in them (time.thread_time,
so worker threads count and waiting does not), nested calls subtracted. Other jobs on
the machine disturb it less than wall-time profiles, though not entirely: the same
rebuild measured 0.80 and 1.20 CPU-s an hour apart on a shared 2-core machine.

  bench/profile_phases.py build ROOT --output oci:DIR:TAG --no-hash-cache -q
  bench/profile_phases.py build ROOT --output oci:DIR:TAG -q      # again: the unchanged rebuild

Prints one line per phase on stderr, largest first. Functions are wrapped by name: a phase
whose function was renamed or moved is reported as missing.
"""

from __future__ import annotations

import collections
import functools
import importlib
import sys
import threading
import time

# (module, attribute path, phase). Inner functions are subtracted from outer ones, so the
# outer ones ("rest") hold only their own work.
PHASES = [
    ("pkglayer.keptscan", "scan_kept", "scan: walk, lstat, xattrs, homes (rest)"),
    ("pkglayer.keptscan", "DiskScans.take", "kept scan: read and decode"),
    ("pkglayer.keptscan", "DiskScans.keep", "kept scan: encode and write"),
    ("pkglayer.sources.dpkg", "DpkgSource.packages", "scan: dpkg database and changelogs"),
    ("pkglayer.ownership", "_owner_map", "scan: listed paths to real ones"),
    ("pkglayer.keptscan", "claim_homes", "ownership rules"),
    ("pkglayer.scan", "_hash_chunk", "scan: package digests (read + hash)"),
    ("pkglayer.hashcache", "HashCache._read", "digest cache: load"),
    ("pkglayer.hashcache", "HashCache.get", "digest cache: lookups"),
    ("pkglayer.hashcache", "HashCache.save", "digest cache: save"),
    ("pkglayer.build", "plan_components", "plan"),
    ("pkglayer.keptscan", "layer_members", "layer members"),
    ("pkglayer.keptscan", "content_key", "content keys (before writing)"),
    ("pkglayer.build", "content_key", "content keys (after writing)"),
    ("pkglayer.build", "write_layer", "write: tar framing, file reads, BLAKE3 (rest)"),
    ("pkglayer.compress", "Blocks._emit", "write: compress"),
    ("pkglayer.tarwriter", "_Compressor._push", "write: sha256 of the tar (rest)"),
    ("pkglayer.blobstore", "BlobWriter.write", "write: blob file write and sha256"),
    ("pkglayer.blobstore", "BlobWriter.commit", "write: fsync and rename"),
    ("pkglayer.blobstore", "fsync_dir", "write: fsync of the directory"),
    ("pkglayer.blobstore", "BlobDir.verify", "verify reused blobs (sha256)"),
    ("pkglayer.outputs", "write_layout", "OCI image (rest)"),
]

_cpu: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])  # phase -> [calls, exclusive s]
_lock = threading.Lock()
_local = threading.local()


def _wrap(module: str, path: str, phase: str) -> bool:
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p, None)
    fn = getattr(owner, name, None)
    if fn is None:
        return False

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        stack = _local.__dict__.setdefault("stack", [])
        start = time.thread_time()
        stack.append(0.0)
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time() - start
            inner = stack.pop()
            if stack:
                stack[-1] += spent
            with _lock:
                _cpu[phase][0] += 1
                _cpu[phase][1] += spent - inner

    setattr(owner, name, timed)
    return True


def main() -> int:
    from pkglayer import cli

    imports = time.process_time()
    missing = [phase for module, path, phase in PHASES if not _wrap(module, path, phase)]
    try:
        rc = cli.main(sys.argv[1:])
    except SystemExit as e:
        rc = e.code
    total = time.process_time()
    lines = [f"process CPU {total:.2f} s, of which start-up and imports {imports:.2f} s"]
    counted = imports
    for phase, (calls, spent) in sorted(_cpu.items(), key=lambda kv: -kv[1][1]):
        counted += spent
        lines.append(f"  {phase:<48} {spent:6.2f} s  {spent / total * 100:5.1f}%  ({calls} calls)")
    lines.append(f"  {'elsewhere (main-thread glue, GC, ...)':<48} {total - counted:6.2f} s")
    lines += [f"  not found, not measured: {phase}" for phase in missing]
    print("\n".join(lines), file=sys.stderr)
    return rc if isinstance(rc, int) else 1


if __name__ == "__main__":
    sys.exit(main())
