#!/usr/bin/env python3
"""Daemon benchmark, all figures from one run on private copies of real trees:

1. install latency: from the end of `dpkg --root -i` of two small real .debs to the
   root being "ready" again (rescanned, new layers prebuilt), polled over the API;
2. a build request on the warm daemon, as a ratio to a cold `pkglayer build` of the same
   root (target <= 0.1);
3. the daemon's peak RSS (VmHWM) while watching three roots (target <= 150 MB).

Usage: bench/bench_daemon.py [--tree DIR] [--work DIR] [--doc docs/daemon-benchmark.md]
Needs root and the cached test trees (tests/rootfs_factory.py builds them).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import rootfs_factory as factory  # noqa: E402
from tests.daemon_harness import DaemonProcess, wait_until  # noqa: E402

DEBOUNCE = 1.0


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, help="root for the build ratio (default: the cached large tree)")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temp dir in /var/tmp)")
    ap.add_argument("--doc", type=Path, help="also write the results as Markdown to this file")
    args = ap.parse_args()

    big = args.tree or factory.large_deb_rootfs()
    small = factory.deb_base()
    archives = factory.deb_rootfs() / "var/cache/apt/archives"
    debs = [next(archives.glob("libcap2-bin_*.deb")), next(archives.glob("iputils-ping_*.deb"))]
    work = Path(tempfile.mkdtemp(prefix="pkglayer-bench-daemon-", dir=args.work or "/var/tmp"))
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    try:
        roots = {"big": work / "roots/big", "small1": work / "roots/small1", "small2": work / "roots/small2"}
        (work / "roots").mkdir()
        for name, path in roots.items():
            factory.copy_tree(big if name == "big" else small, path)
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "xdg")}

        # Cold build first, on a quiet machine: no digest cache, nothing to reuse.
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "pkglayer", "build", str(roots["big"]), "--output",
                        f"oci:{work}/cold:latest", "--no-hash-cache", "-q"], check=True, env=env, cwd=REPO)
        cold = time.monotonic() - t0

        d = DaemonProcess(
            work / "daemon",
            [{"name": n, "path": str(p), "debounce": DEBOUNCE, "output": f"oci:{work}/out-{n}:latest"}
             for n, p in roots.items()],
            daemon={"log-level": "info"},
        )
        t0 = time.monotonic()
        d.start()
        for n in roots:
            d.wait_settled(n, rescans=0, timeout=600)
        initial = time.monotonic() - t0
        pid = d.proc.pid

        # 1. install -> layers ready
        factory.run(["dpkg", f"--root={roots['big']}", "--force-unsafe-io", "-i", *map(str, debs)])
        t_end = time.monotonic()
        def settled() -> dict | None:
            r = d.root("big")
            return r if r["rescans"] >= 1 and r["state"] == "ready" and not r["pending"] else None

        after = wait_until(settled, 300, "layers ready", 0.02)
        latency = time.monotonic() - t_end
        pre = after["lastPrebuild"]

        # 2. warm build request
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        status, body = d.api("POST", "/v1/roots/big/build", {"wait": True})
        warm = time.monotonic() - t0
        assert status == 200 and body["build"]["state"] == "succeeded", body
        res = body["build"]["result"]
        t0 = time.monotonic()
        d.api("POST", "/v1/roots/big/build", {"wait": True})
        warm2 = time.monotonic() - t0

        # 3. memory
        hwm, rss = vm(pid, "VmHWM"), vm(pid, "VmRSS")
        status, cache = d.api("GET", "/v1/cache")
        assert d.stop() == 0

        ratio = warm / cold
        say(f"# pkglayer daemon benchmark ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)")
        say()
        say(f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, load average before/after: "
            f"{open('/proc/loadavg').read().split()[:3]}")
        say(f"- big root: copy of `{big}` ({after['packages']} packages after the install, "
            f"{len(res['layers'])} layers, gzip-6); two more roots: copies of `{small}`")
        say(f"- daemon start to all three roots prebuilt: {initial:.1f} s; cache {cache['entries']} layers, "
            f"{cache['bytes'] / 1e6:.1f} MB")
        say()
        say("| figure | value | target | |")
        say("|---|---|---|---|")
        say(f"| end of `dpkg --root -i` (libcap2-bin, iputils-ping) to layers ready | {latency:.2f} s "
            f"(debounce {DEBOUNCE:.1f} s included; prebuild wrote {pre['written']} of {len(pre['layers'])} layers "
            f"in {pre['seconds']:.2f} s) | - | |")
        say(f"| cold `pkglayer build --no-hash-cache` of the big root | {cold:.2f} s | - | |")
        say(f"| build request on the warm daemon (wrote {res['written']}, {res['fromCache']} from the cache) "
            f"| {warm:.2f} s (the build itself {res['seconds']:.2f} s) | - | |")
        say(f"| warm / cold | {ratio:.3f} | <= 0.1 | {'PASS' if ratio <= 0.1 else 'MISS'} |")
        say(f"| second warm build request (nothing changed) / cold | {warm2 / cold:.3f} ({warm2:.2f} s) | - | |")
        say(f"| daemon peak RSS (VmHWM), 3 roots watched | {hwm / 1e6:.1f} MB (RSS now {rss / 1e6:.1f} MB) "
            f"| <= 150 MB | {'PASS' if hwm <= 150e6 else 'MISS'} |")
        if args.doc:
            args.doc.write_text("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
