#!/usr/bin/env python3
"""zstd:chunked: what a client with partial pulls downloads for a real upgrade.

On the benchmark tree of tests/rootfs_factory.py (debootstrap minbase + gcc, python3,
perl) and the same tree after `apt-get upgrade` from bookworm-security:

1. v1 and v2 are built by pkglayer with gzip, zstd and zstd:chunked, v2 reusing v1's
   layers by content key (the /layers protocol), as an update would be built.
2. Bytes for the update, v2 given v1:
     plain layers     compressed size of every v2 layer that is not a v1 layer
     partial pull     for each such zstd:chunked layer, its TOC (and tar-split, which
                      containers-storage >= 1.54 also fetches) plus the frames of the files
                      whose content is in no v1 layer: what containers-storage asks for
     file floor       those files (distinct contents of v2 not in v1), each compressed
                      on its own with gzip -6 and with zstd -3
   and, with --podman (default), measured: the images pushed to Debian's docker-registry
   (log level info), pulled by podman (overlay, partial pulls on) v1 then v2; the bytes
   the registry sent while v2 was pulled (blobs, manifest and config).
3. TOC overhead per layer (TOC, tar-split, footer), chunked vs plain zstd sizes, and the
   build time of v1 with zstd:chunked against zstd: wall and CPU seconds (all threads),
   best of --repeat alternating runs; on a shared machine the CPU ratio is the figure.

With --skopeo, also what podman fetches when the gzip images are converted by this
machine's skopeo (`--dest-compress-format zstd:chunked`, files cut into rolling-checksum
chunks): slow, several minutes per image.

Run as root:  bench/bench_chunked.py [--json] [--doc FILE] [--no-podman] [--skopeo]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pkglayer.config import BuildSettings  # noqa: E402
from pkglayer.outputs import build_to  # noqa: E402
from tests.clients import serve_registry  # noqa: E402

POSITION = "io.containers.zstd-chunked.manifest-position"
SPLIT_POSITION = "io.github.containers.zstd-chunked.tarsplit-position"
TARGET = 1.3


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def upgrade_pair():
    path = REPO / "tests" / "rootfs_factory.py"
    spec = importlib.util.spec_from_file_location("rootfs_factory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rootfs_factory"] = module
    spec.loader.exec_module(module)
    return module.large_deb_upgrade_pair()


# ------------------------------------------------------------------ layouts


class Layout:
    def __init__(self, path: Path) -> None:
        self.path = path

    def blob(self, digest: str) -> bytes:
        return (self.path / "blobs/sha256" / digest.split(":")[1]).read_bytes()

    def manifest(self, tag: str) -> dict:
        index = json.loads((self.path / "index.json").read_text())
        entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        return json.loads(self.blob(entry["digest"]))

    def manifest_and_config_bytes(self, tag: str) -> int:
        index = json.loads((self.path / "index.json").read_text())
        entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        return entry["size"] + self.manifest(tag)["config"]["size"]

    def new_layers(self) -> list[dict]:
        old = {d["digest"] for d in self.manifest("v1")["layers"]}
        return [d for d in self.manifest("v2")["layers"] if d["digest"] not in old]


def toc(blob: bytes, notes: dict[str, str]) -> tuple[list[dict], int, int]:
    """(entries, compressed TOC bytes, compressed tar-split bytes)."""
    offset, length, size, _ = map(int, notes[POSITION].split(":"))
    entries = json.loads(zstandard.ZstdDecompressor().decompress(blob[offset:offset + length], max_output_size=size))
    split_length = int(notes[SPLIT_POSITION].split(":")[1])
    return entries["entries"], length, split_length


def build_pair(pair, compression: str, work: Path) -> tuple[Layout, float, float]:
    """v1, then v2 reusing v1's layers; both tags in one layout. Returns the seconds of each."""
    settings = BuildSettings(compression=compression, hash_cache="")
    name = compression.replace(":", "-")  # a ":" would end the layout path in an oci: reference
    layout, layers = work / f"oci-{name}", work / f"layers-{name}"
    t = time.monotonic()
    build_to(str(pair.old), settings, layout=(str(layout), "v1"), layers_dir=str(layers))
    first = time.monotonic() - t
    shutil.rmtree(layers / "input", ignore_errors=True)
    os.rename(layers / "output", layers / "input")
    t = time.monotonic()
    build_to(str(pair.new), settings, layout=(str(layout), "v2"), layers_dir=str(layers))
    return Layout(layout), first, time.monotonic() - t


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def time_builds(pair, work: Path, repeat: int) -> dict[str, dict[str, float]]:
    """Best wall and CPU time of a fresh v1 build per compression, runs alternating."""
    best: dict[str, dict[str, float]] = {}
    for i in range(repeat):
        for compression in ("zstd", "zstd:chunked"):
            out = work / f"time-{i}-{compression.replace(':', '-')}"
            settings = BuildSettings(compression=compression, hash_cache="")
            t, cpu = time.monotonic(), _cpu()
            build_to(str(pair.old), settings, layout=(str(out), "t"))
            b = best.setdefault(compression, {"wall": float("inf"), "cpu": float("inf")})
            b["wall"] = min(b["wall"], time.monotonic() - t)
            b["cpu"] = min(b["cpu"], _cpu() - cpu)
            shutil.rmtree(out)
    return best


# ------------------------------------------------------------------ the file-level floor


def _files(root: Path) -> dict[str, str]:
    """sha256 -> one path, for every regular file of the tree."""
    out: dict[str, str] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                out.setdefault(h.hexdigest(), path)
    return out


def file_floor(pair, v1_digests: set[str], v2_digests: set[str]) -> dict:
    """The contents a v2 client lacks (in v2's layers, in none of v1's), each compressed
    on its own."""
    paths = _files(pair.new)
    missing = sorted(d for d in v2_digests - v1_digests if d in paths)
    raw = gz = zs = 0
    zc = zstandard.ZstdCompressor(level=3)
    for digest in missing:
        data = Path(paths[digest]).read_bytes()
        raw += len(data)
        c = zlib.compressobj(6, zlib.DEFLATED, 31)
        gz += len(c.compress(data) + c.flush())
        zs += len(zc.compress(data))
    return {"files": len(missing), "raw": raw, "gzip": gz, "zstd": zs}


# ------------------------------------------------------------------ partial pulls


def partial_bytes(layout: Layout) -> dict:
    """What containers-storage fetches for v2's new layers, from the TOCs."""
    v1_digests = set()
    for d in layout.manifest("v1")["layers"]:
        entries, _, _ = toc(layout.blob(d["digest"]), d["annotations"])
        v1_digests |= {e["digest"][7:] for e in entries if e.get("digest")}
    per_layer = []
    v2_digests = set()
    for d in layout.manifest("v2")["layers"]:
        entries, _, _ = toc(layout.blob(d["digest"]), d["annotations"])
        v2_digests |= {e["digest"][7:] for e in entries if e.get("digest")}
    for d in layout.new_layers():
        blob = layout.blob(d["digest"])
        entries, toc_len, split_len = toc(blob, d["annotations"])
        missing = [e for e in entries if e.get("digest") and e["digest"][7:] not in v1_digests]
        per_layer.append({
            "name": d["annotations"]["org.pkglayer.layer.name"],
            "size": d["size"],
            "toc": toc_len,
            "tarsplit": split_len,
            "files": sum(1 for e in entries if e.get("digest")),
            "missing_files": len(missing),
            "missing_bytes": sum(e["endOffset"] - e["offset"] for e in missing),
        })
    return {"layers": per_layer, "v1_digests": v1_digests, "v2_digests": v2_digests}


def overhead(layout: Layout, plain: Layout) -> dict:
    """Per v2 layer: bytes of TOC, tar-split and footer; and chunked vs plain zstd size."""
    tocs, splits, frames, sizes, plain_sizes = [], [], [], [], []
    plain_by_name = {d["annotations"]["org.pkglayer.layer.name"]: d["size"] for d in plain.manifest("v2")["layers"]}
    for d in layout.manifest("v2")["layers"]:
        blob = layout.blob(d["digest"])
        entries, toc_len, split_len = toc(blob, d["annotations"])
        tocs.append(toc_len)
        splits.append(split_len)
        frames.append(toc_len + split_len + 3 * 8 + 64)
        sizes.append(d["size"])
        plain_sizes.append(plain_by_name[d["annotations"]["org.pkglayer.layer.name"]])
    n = len(sizes)
    return {
        "layers": n,
        "toc_mean": sum(tocs) / n, "toc_max": max(tocs),
        "tarsplit_mean": sum(splits) / n, "tarsplit_max": max(splits),
        "metadata_mean": sum(frames) / n,
        "chunked_total": sum(sizes), "zstd_total": sum(plain_sizes),
        "manifest_config_chunked": layout.manifest_and_config_bytes("v2"),
        "manifest_config_zstd": plain.manifest_and_config_bytes("v2"),
    }


# ------------------------------------------------------------------ podman


@contextmanager
def partial_podman(work: Path):
    root = work / "podman"
    runroot = Path(tempfile.mkdtemp(prefix="pkgl-bench-"))
    (root / "tmp").mkdir(parents=True)
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "root"}"\nrunroot = "{runroot}"\n'
                    '[storage.options.pull_options]\nenable_partial_images = "true"\n')
    argv = ["podman", "--root", str(root / "root"), "--runroot", str(runroot), "--tmpdir", str(root / "tmp"),
            "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
            "--runtime", "runc"]
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}

    def podman(*args: str) -> str:
        proc = subprocess.run([*argv, *args], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"podman {' '.join(args)}: {proc.stderr[-3000:]}")
        return proc.stderr

    try:
        yield podman
    finally:
        subprocess.run([*argv, "system", "reset", "--force"], capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)


def served_since(logfile: Path, offset: int) -> int:
    with open(logfile, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return sum(int(m) for m in re.findall(r'msg="response completed".*http\.response\.written=(\d+)', text))


def measure_pull(layouts: dict[str, Path], work: Path) -> dict[str, dict]:
    """Push each OCI layout's v1 and v2; pull v1 then v2 with partial pulls on; bytes sent for v2."""
    out = {}
    (work / "registry-work").mkdir()
    with serve_registry(work / "registry-work", log_level="info") as registry:
        address = registry.address
        for name, layout in layouts.items():
            for tag in ("v1", "v2"):
                subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                                f"docker://{address}/{name}:{tag}"], check=True, capture_output=True)
            with partial_podman(work / f"pull-{name}") as podman:
                podman("pull", "--tls-verify=false", f"{address}/{name}:v1")
                mark = (work / "registry-work/registry.log").stat().st_size
                t = time.monotonic()
                debug = podman("--log-level", "debug", "pull", "--tls-verify=false", f"{address}/{name}:v2")
                seconds = time.monotonic() - t
            out[name] = {
                "served": served_since(work / "registry-work/registry.log", mark),
                "partial_blobs": len(re.findall(r"Retrieved partial blob", debug)),
                "failed_partial": len(re.findall(r"Failed to retrieve partial blob", debug)),
                "seconds": round(seconds, 1),
            }
            log(f"podman pulled {name}:v2 after v1: {out[name]}")
    return out


def skopeo_convert(gzip_layout: Path, work: Path) -> Path:
    dest = work / "oci-skopeo"
    for tag in ("v1", "v2"):
        t = time.monotonic()
        subprocess.run(["skopeo", "copy", "--dest-compress-format", "zstd:chunked", f"oci:{gzip_layout}:{tag}",
                        f"oci:{dest}:{tag}"], check=True, capture_output=True)
        log(f"skopeo converted {tag} in {time.monotonic() - t:.0f} s")
    return dest


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--doc", help="also write the results as Markdown to this file")
    ap.add_argument("--no-podman", action="store_true", help="skip the registry and podman measurement")
    ap.add_argument("--skopeo", action="store_true", help="also measure skopeo-converted images")
    ap.add_argument("--repeat", type=int, default=3, help="timed builds per compression (default 3)")
    args = ap.parse_args()

    pair = upgrade_pair()
    log(f"old {pair.old}\nbench: new {pair.new}\nbench: {len(pair.upgraded)} packages upgraded")
    with tempfile.TemporaryDirectory(prefix="pkglayer-bench-chunked-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        layouts, seconds = {}, {}
        for compression in ("zstd:chunked", "zstd", "gzip"):
            log(f"building v1 and v2 with {compression}")
            layout, first, second = build_pair(pair, compression, work)
            layouts[compression], seconds[compression] = layout, (round(first, 1), round(second, 1))
        log("timing fresh v1 builds")
        timing = time_builds(pair, work, args.repeat)
        chunked = layouts["zstd:chunked"]
        partial = partial_bytes(chunked)
        floor = file_floor(pair, partial.pop("v1_digests"), partial.pop("v2_digests"))
        results = {
            "tree": {"upgraded_packages": len(pair.upgraded)},
            "plain": {c: sum(d["size"] for d in layouts[c].new_layers()) for c in layouts},
            "partial": partial,
            "floor": floor,
            "overhead": overhead(chunked, layouts["zstd"]),
            "build_seconds": {c: {"v1": s[0], "v2": s[1]} for c, s in seconds.items()},
            "timed_v1_build": {c: {k: round(v, 2) for k, v in t.items()} for c, t in timing.items()},
        }
        if not args.no_podman:
            pulls = {"pkglayer": chunked.path}
            if args.skopeo:
                pulls["skopeo"] = skopeo_convert(layouts["gzip"].path, work)
            results["podman"] = measure_pull(pulls, work)
    text = render(results)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print(text)
    if args.doc:
        Path(args.doc).write_text(
            "# zstd:chunked update economy\n\nOutput of `bench/bench_chunked.py` (see its docstring for the "
            "method).\n\n```\n" + text + "\n```\n"
        )
    return 0


def _mb(n: float) -> str:
    return f"{n / 1e6:8.2f} MB"


def render(r: dict) -> str:
    p, f, o, t = r["partial"], r["floor"], r["overhead"], r["timed_v1_build"]
    layers = p["layers"]
    toc_only = sum(x["toc"] + x["missing_bytes"] for x in layers)
    with_split = toc_only + sum(x["tarsplit"] for x in layers)
    lines = [
        f"Real bookworm -> bookworm-security upgrade ({r['tree']['upgraded_packages']} packages), "
        f"{len(layers)} of {o['layers']} layers changed",
        "Bytes a client downloads for v2, given v1 (layer blobs):",
        f"    gzip layers                  {_mb(r['plain']['gzip'])}",
        f"    zstd layers                  {_mb(r['plain']['zstd'])}",
        f"    zstd:chunked, whole layers   {_mb(r['plain']['zstd:chunked'])}  (clients without partial pulls)",
        f"    zstd:chunked, partial pull   {_mb(toc_only)}  (TOCs + missing files' frames; podman 4.3.1)",
        f"      with tar-splits            {_mb(with_split)}  (containers-storage >= 1.54)",
        f"    file floor, gzip -6 each     {_mb(f['gzip'])}  ({f['files']} files, {_mb(f['raw']).strip()} raw)",
        f"    file floor, zstd -3 each     {_mb(f['zstd'])}",
        f"    target: partial <= {TARGET}x gzip file floor: {toc_only / f['gzip']:.2f} "
        f"{'PASS' if toc_only <= TARGET * f['gzip'] else 'FAIL'}",
        "  per changed layer (size, TOC, tar-split, missing files / files, their frames):",
    ]
    for x in layers:
        lines.append(f"    {x['name'][:44]:44} {_mb(x['size'])} {x['toc']:8d} {x['tarsplit']:8d} "
                     f"{x['missing_files']:5d}/{x['files']:<5d} {_mb(x['missing_bytes'])}")
    if "podman" in r:
        for name, m in r["podman"].items():
            lines.append(f"  measured, podman 4.3.1 pulling {name} v2 after v1: registry sent {_mb(m['served'])} "
                         f"(blobs, manifest, config); {m['partial_blobs']} partial blobs, "
                         f"{m['failed_partial']} fell back; {m['seconds']} s")
    lines += [
        f"TOC overhead per layer ({o['layers']} layers of v2): TOC mean {o['toc_mean']:.0f} B (max {o['toc_max']}), "
        f"tar-split mean {o['tarsplit_mean']:.0f} B (max {o['tarsplit_max']}), "
        f"with footer and frame headers {o['metadata_mean']:.0f} B",
        f"  whole image: zstd:chunked {_mb(o['chunked_total'])} vs zstd {_mb(o['zstd_total'])} "
        f"(+{(o['chunked_total'] / o['zstd_total'] - 1) * 100:.1f} %); manifest + config "
        f"{o['manifest_config_chunked']} B vs {o['manifest_config_zstd']} B",
        "Build time, fresh v1, best of runs: " + "; ".join(
            f"{what} zstd {t['zstd'][what]:.1f} s, zstd:chunked {t['zstd:chunked'][what]:.1f} s "
            f"({t['zstd:chunked'][what] / t['zstd'][what]:.2f}x)" for what in ("wall", "cpu")),
        "  v1 / v2 (reusing v1) builds: " + ", ".join(
            f"{c} {s['v1']} s / {s['v2']} s" for c, s in r["build_seconds"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
