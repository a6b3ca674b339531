#!/usr/bin/env python3
"""The Containerfile flow of examples/package-layers (one `buildah build` whose pkglayer
stage layers the image by package) against the same Containerfile without the pkglayer
stage (`--target builder`: plain buildah, one layer per RUN).

For each flow: build, push to a local registry, pull into a client's store; add one
package upgrade to the builder stage; build again, push, pull. Reported per flow: the
wall time of both builds, and the bytes the client's second pull downloaded (summed
from the registry's log), besides the sum of the new layers' sizes in the manifests.

Scenarios (the builder installs local .debs over a one-layer minbase image):
  small  iputils-ping and libcap2-bin (2 packages)
  large  gcc, python3, perl and their dependencies (about 50 packages, the benchmark
         tree's extra .debs)
The upgrade is the bookworm-security update of tests/rootfs_factory.deb_upgrade_pair.

Needs root, buildah, podman, skopeo, docker-registry, network access to Debian's
mirror (the tool image's apt step) and pip's index on the host (its wheelhouse).

  bench/bench_containerfile.py [--scenario small|large|both] [--driver overlay|vfs] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import rootfs_factory as factory  # noqa: E402
from tests.clients import run  # noqa: E402
from tests.containers import Store, build_tool_image, make_wheelhouse, new_store, one_layer_image  # noqa: E402

EXAMPLE = REPO / "examples/package-layers/Containerfile"
BLOB_GET = re.compile(r'http\.request\.method=GET .*http\.request\.uri="/v2/[^"]+/blobs/(sha256:[0-9a-f]{64})"'
                      r'.*http\.response\.written=(\d+)')


def new_debs(tree: Path, base: Path) -> list[Path]:
    have = {p.name for p in (base / "var/cache/apt/archives").glob("*.deb")}
    return sorted(p for p in (tree / "var/cache/apt/archives").glob("*.deb") if p.name not in have)


@contextlib.contextmanager
def registry(work: Path) -> Iterator[tuple[str, Path]]:
    """Debian's docker-registry on a free loopback port, logging every request with the
    bytes it wrote. Yields (address, log file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    config = {"version": 0.1, "log": {"level": "info"},
              "storage": {"filesystem": {"rootdirectory": str(work / "data")}},
              "http": {"addr": address}}
    (work / "config.yml").write_text(json.dumps(config))
    log = work / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(work / "config.yml")],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=2):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield address, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def pulled_bytes(log: Path, start: int) -> tuple[int, int]:
    """(blobs, bytes) the registry sent for blob GETs logged after byte offset `start`."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    sent = [int(m.group(2)) for m in BLOB_GET.finditer(text)]
    return len(sent), sum(sent)


def registry_manifest(address: str, repo: str, tag: str) -> dict:
    return json.loads(run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{address}/{repo}:{tag}"]))


def flow(name: str, store: Store, client: Store, address: str, log: Path, work: Path, base: str,
         tool: str, install: list[Path], upgrade: list[Path], driver: str) -> dict:
    """Build, push, pull; upgrade; build, push, pull. `name` is "plain" or "pkglayer"."""
    ctx, layers = work / name / "ctx", work / name / "layers"
    (ctx / "debs").mkdir(parents=True)
    layers.mkdir()
    shutil.copy2(EXAMPLE, ctx / "Containerfile")
    for deb in install:
        shutil.copy2(deb, ctx / "debs" / deb.name)
    args = ["--build-arg", f"BASE={base}"]
    if name == "plain":
        args += ["--target", "builder"]
    else:
        args += ["--skip-unused-stages=false", "-v", f"{layers}:/layers",
                 "--build-arg", f"PKGLAYER={tool}", "--build-arg", f"LAYERS={layers}"]
    result: dict = {"flow": name, "driver": driver}
    for n in (1, 2):
        if n == 2:
            # The build system's half of /layers: output becomes the next input.
            out = layers / "output/blobs/sha256"
            if out.is_dir():
                dst = layers / "input/blobs/sha256"
                dst.mkdir(parents=True, exist_ok=True)
                for blob in out.iterdir():
                    blob.rename(dst / blob.name)
            for deb in upgrade:
                shutil.copy2(deb, ctx / "debs" / deb.name)
        image = f"localhost/{name}:{n}"
        started = time.monotonic()
        store.build("buildah", ctx, *args, "-t", image)
        result[f"build{n}Seconds"] = round(time.monotonic() - started, 1)
        if name == "pkglayer":
            written = {f"sha256:{p.name}" for p in (layers / "output/blobs/sha256").iterdir()}
            history = json.loads((layers / "history.json").read_text())
            result[f"build{n}WrittenBlobs"] = len(written)
            if n == 2:
                result["build2Written"] = {layer["name"]: layer["size"] for layer in history["layers"]
                                           if layer["digest"] in written}
        store.podman("push", "--tls-verify=false", image, f"docker://{address}/{name}:{n}")
        mark = log.stat().st_size
        client.podman("pull", "--tls-verify=false", f"{address}/{name}:{n}")
        time.sleep(1)  # the registry logs a request after answering it
        blobs, sent = pulled_bytes(log, mark)
        result[f"pull{n}Blobs"], result[f"pull{n}Bytes"] = blobs, sent
        manifest = registry_manifest(address, name, str(n))
        result[f"layers{n}"] = len(manifest["layers"])
        result[f"image{n}Bytes"] = sum(layer["size"] for layer in manifest["layers"])
    first = {layer["digest"] for layer in registry_manifest(address, name, "1")["layers"]}
    result["newLayerBytes"] = sum(layer["size"] for layer in registry_manifest(address, name, "2")["layers"]
                                  if layer["digest"] not in first)
    return result


def scenario_debs(scenario: str, base: Path) -> list[Path]:
    if scenario == "small":
        return new_debs(factory.deb_rootfs(), base)
    return new_debs(factory.large_deb_rootfs(), base)


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("small", "large", "both"), default="both")
    parser.add_argument("--driver", choices=("overlay", "vfs"), default="overlay",
                        help="storage driver of the build and client stores (default overlay, podman's own default)")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_containerfile.py: run as root")

    pair = factory.deb_upgrade_pair()
    upgrade = new_debs(pair.new, pair.old)
    scenarios = ("small", "large") if opts.scenario == "both" else (opts.scenario,)
    results = []
    with tempfile.TemporaryDirectory(prefix="pkglayer-bench-cf-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        base = one_layer_image(pair.old, work / "base")
        wheels = make_wheelhouse(work / "wheelhouse")
        (work / "registry").mkdir()
        with registry(work / "registry") as (address, log):
            for scenario in scenarios:
                install = scenario_debs(scenario, pair.old)
                stores = work / f"stores-{scenario}"
                with contextlib.ExitStack() as stack:
                    store = stack.enter_context(contextlib.contextmanager(new_store)(stores / "build", opts.driver))
                    client = stack.enter_context(contextlib.contextmanager(new_store)(stores / "client", opts.driver))
                    started = time.monotonic()
                    tool = build_tool_image(store, base, wheels)
                    print(f"[{scenario}] tool image in {time.monotonic() - started:.0f} s", file=sys.stderr)
                    for name in ("plain", "pkglayer"):
                        r = flow(name, store, client, address, log, work / scenario, base, tool, install,
                                 upgrade, opts.driver)
                        r.update(scenario=scenario, packagesInstalled=len(install),
                                 upgraded=sorted(pair.upgraded))
                        print(f"[{scenario}] {json.dumps(r)}", file=sys.stderr)
                        results.append(r)
    if opts.json:
        print(json.dumps(results, indent=2))
        return
    print(f"driver {opts.driver}; upgrade {', '.join(sorted(pair.upgraded))}")
    print(f"{'scenario':8} {'flow':9} {'build 1':>8} {'build 2':>8} {'layers':>6} {'image':>10} "
          f"{'2nd pull':>10} {'blobs':>5}")
    for r in results:
        print(f"{r['scenario']:8} {r['flow']:9} {r['build1Seconds']:7.1f}s {r['build2Seconds']:7.1f}s "
              f"{r['layers2']:6d} {mb(r['image2Bytes']):>10} {mb(r['pull2Bytes']):>10} {r['pull2Blobs']:5d}")


if __name__ == "__main__":
    main()
