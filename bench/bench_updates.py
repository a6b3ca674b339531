#!/usr/bin/env python3
"""Update economy: how many bytes a client downloads per image update, by layering strategy.

Two measurements on one real Debian tree (by default the benchmark tree of
tests/rootfs_factory.py, debootstrap minbase + gcc, python3, perl, and the same tree
after `apt-get upgrade` from bookworm-security):

1. A year of weekly builds, replayed. Each component (source package) "changes" in the
   weeks where its changelog has an entry; the replay covers the 52 weeks up to the
   newest entry in the tree. The planner only sees changelog entries from before each
   week (no peeking), and keeps last week's plan as its prior. To exercise placement,
   three components are held back and added in weeks 13, 26 and 39, and one is removed
   in week 30. An update is a week in which anything changed; every update also ships
   the top layers (package database, unowned files), which change with any transaction.
   Bytes are gzip-compressed layer sizes, measured per component.

   Strategies, for budgets 32 / 64 / 100 (top layers included):
     pkglayer      the planner, with last week's plan as prior
     single        one layer for everything
     unbounded     one layer per component, no budget: the lower bound
     hash-buckets  components hashed into budget-minus-top-layers fixed buckets

2. The real upgrade: `pkglayer build --layers L` of the old tree, then of the upgraded
   tree reusing L. Downloaded = the compressed size of every layer the second build
   did not reuse; compared with the compressed size of the upgraded packages alone plus
   the top layers, and with what the other strategies would ship for the same change.

3. An application image (tests/rootfs_factory.py app_rootfs: Debian minbase, a venv of
   13 pip-installed requirements with numpy, a Flask application in /opt/app declared
   as a [[component]], an 8 MiB model file) and `pip install --upgrade` of one package
   (urllib3). Measured as in 2, against the upgraded package's files alone, compressed,
   plus the top layers; and against what the image would ship if everything beyond the
   Debian packages sat in the `unowned` layer (pkglayer before it read pip's records).

Run as root:  bench/bench_updates.py [--doc docs/update-economy.md] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pkglayer.build import scan_rootfs  # noqa: E402
from pkglayer.components import WEEK, Component, find_components, weekly_change_rate  # noqa: E402
from pkglayer.config import BuildSettings  # noqa: E402
from pkglayer.outputs import build_to  # noqa: E402
from pkglayer.ownership import SPECIAL_HOMES, Ownership  # noqa: E402
from pkglayer.plan import plan_layers  # noqa: E402
from pkglayer.rootfs import Rootfs  # noqa: E402
from pkglayer.tarwriter import layer_members, write_layer  # noqa: E402
from pkglayer.usercomponents import ComponentSpec  # noqa: E402

BUDGETS = (32, 64, 100)
WEEKS = 52
ADD_WEEKS = (13, 26, 39)
REMOVE_WEEK = 30
TARGET_VS_LOWER = 1.3
TARGET_VS_SINGLE = 0.25
TARGET_UPGRADE = 1.5
TARGET_APP_UPGRADE = 1.2


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def factory():
    if "rootfs_factory" not in sys.modules:
        path = REPO / "tests" / "rootfs_factory.py"
        spec = importlib.util.spec_from_file_location("rootfs_factory", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["rootfs_factory"] = module
        spec.loader.exec_module(module)
    return sys.modules["rootfs_factory"]


def upgrade_pair():
    return factory().large_deb_upgrade_pair()


class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)


def compressed_sizes(rootfs: Rootfs, own: Ownership, groups: dict[str, list[str]]) -> dict[str, int]:
    """gzip-6 size of a layer made of each group's homes, measured in parallel."""

    def measure(homes: list[str]) -> int:
        out = _Counter()
        members = layer_members((o for h in homes for o in own.homes.get(h, [])), own.objects, 0)
        write_layer(rootfs, members, "gzip", 6, out)
        return out.n

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        sizes = dict(zip(groups, pool.map(measure, groups.values())))
    return sizes


def hash_bucket(name: str, buckets: int) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % buckets


def percentile90(xs: list[int]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else float(xs[0])


def replay(
    comps: list[Component], times: dict[str, list[int]], gz: dict[str, int], top: int, budget: int
) -> dict:
    """A year of weekly builds; returns bytes per update for each strategy."""
    by_size = sorted(comps, key=lambda c: (c.size, c.name))
    held = [by_size[len(by_size) * q // 4] for q in (1, 2, 3)]
    removed = by_size[len(by_size) * 9 // 10]
    added_at = {c.name: w for c, w in zip(held, ADD_WEEKS)}
    reference = max(t for ts in times.values() for t in ts)
    start = reference - WEEKS * WEEK + 1
    n_specials = 2
    buckets = budget - n_specials

    downloads: dict[str, list[int]] = {"pkglayer": [], "single": [], "unbounded": [], "hash-buckets": []}
    moves_quiet = moves_event = 0
    prior: list[list[str]] | None = None
    prior_sets: dict[str, frozenset[str]] = {}
    for week in range(WEEKS):
        w0 = start + week * WEEK
        present = [
            c for c in comps
            if added_at.get(c.name, 0) <= week and not (c.name == removed.name and week >= REMOVE_WEEK)
        ]
        arrived = {c.name for c in present if added_at.get(c.name) == week and week > 0}
        gone = {removed.name} if week == REMOVE_WEEK else set()
        estimated = [
            Component(c.name, c.packages, c.size, weekly_change_rate([t for t in times[c.name] if t < w0], w0))
            for c in present
        ]
        plan = plan_layers(estimated, budget - n_specials, prior_groups=prior)
        groups = [frozenset(layer.components) for layer in plan.layers]
        moved = {n for n in plan.moved if n not in arrived}
        if prior is not None:
            if arrived or gone:
                moves_event += len(moved)
            else:
                moves_quiet += len(moved)
        changed = {c.name for c in present if any(w0 <= t < w0 + WEEK for t in times[c.name])} | arrived
        if not (changed or gone):
            prior = [list(g) for g in groups]
            prior_sets = {n: g for g in groups for n in g}
            continue
        # pkglayer: a layer is downloaded when a member changed or its membership did
        layer_bytes = 0
        for g in groups:
            members_changed = any(n in changed for n in g)
            membership_changed = prior is not None and any(prior_sets.get(n) != g for n in g)
            if members_changed or membership_changed:
                layer_bytes += sum(gz[n] for n in g)
        downloads["pkglayer"].append(layer_bytes + top)
        downloads["single"].append(sum(gz[c.name] for c in present) + top)
        downloads["unbounded"].append(sum(gz[n] for n in changed) + top)
        hit = {hash_bucket(n, buckets) for n in changed | gone}
        downloads["hash-buckets"].append(
            sum(gz[c.name] for c in present if hash_bucket(c.name, buckets) in hit) + top
        )
        prior = [list(g) for g in groups]
        prior_sets = {n: g for g in groups for n in g}
    return {
        "budget": budget,
        "updates": len(downloads["pkglayer"]),
        "strategies": {
            k: {"mean": statistics.mean(v), "p90": percentile90(v)} for k, v in downloads.items()
        },
        "moves_in_quiet_weeks": moves_quiet,
        "moves_in_add_remove_weeks": moves_event,
        "held_back": {c.name: added_at[c.name] for c in held},
        "removed": {removed.name: REMOVE_WEEK},
    }


def real_upgrade(pair, comps: list[Component], gz: dict[str, int], gz_pkgs: dict[str, int], top: int) -> dict:
    settings = BuildSettings(hash_cache="")
    with tempfile.TemporaryDirectory(prefix="pkglayer-bench-") as work:
        layers = os.path.join(work, "layers")
        log("building the old tree")
        build_to(str(pair.old), settings, layers_dir=layers)
        shutil.rmtree(os.path.join(layers, "input"), ignore_errors=True)
        os.rename(os.path.join(layers, "output"), os.path.join(layers, "input"))
        log("building the upgraded tree, reusing the old layers")
        t = time.monotonic()
        result, _ = build_to(str(pair.new), settings, layers_dir=layers)
        seconds = time.monotonic() - t
    written = [o.record for o in result.layers if not o.reused]
    downloaded = sum(r.size for r in written)
    upgraded_keys = [k for k, p in result.ownership.packages.items() if p.name in pair.upgraded]
    changed = {c.name for c in comps if set(c.packages) & set(upgraded_keys)}
    packages_only = sum(gz_pkgs[k] for k in upgraded_keys)
    buckets = 64 - 2
    hit = {hash_bucket(n, buckets) for n in changed}
    return {
        "upgraded_packages": len(upgraded_keys),
        "upgraded_components": sorted(changed),
        "pkglayer": downloaded,
        "pkglayer_layers_written": [r.name for r in written],
        "upgraded_packages_plus_top": packages_only + top,
        "single": sum(gz.values()) + top,
        "unbounded": sum(gz[n] for n in changed) + top,
        "hash-buckets": sum(gz[c.name] for c in comps if hash_bucket(c.name, buckets) in hit) + top,
        "rebuild_seconds": round(seconds, 1),
    }


def _rebuilt(pair, settings: BuildSettings):
    """Build the old tree into /layers, then the new one reusing it: (result, seconds)."""
    with tempfile.TemporaryDirectory(prefix="pkglayer-bench-") as work:
        layers = os.path.join(work, "layers")
        build_to(str(pair.old), settings, layers_dir=layers)
        os.rename(os.path.join(layers, "output"), os.path.join(layers, "input"))
        t = time.monotonic()
        result, _ = build_to(str(pair.new), settings, layers_dir=layers)
        return result, time.monotonic() - t


def app_upgrade() -> dict:
    f = factory()
    pair = f.app_upgrade_pair()
    log(f"application image: {pair.old}; upgraded {pair.upgraded}")
    settings = BuildSettings(hash_cache="", components=(ComponentSpec("app", (f.APP_DIR,), None, "bench"),))
    result, seconds = _rebuilt(pair, settings)
    own = result.ownership
    written = [o.record for o in result.layers if not o.reused]
    upgraded = [k for k, p in own.packages.items() if own.origin(k) == "pip"
                and p.name.removeprefix("pip-") in pair.upgraded]
    beyond = [h for h in own.homes if h not in SPECIAL_HOMES and own.origin(h) != own.source_format]
    with Rootfs(str(pair.new)) as rootfs:
        sizes = compressed_sizes(rootfs, own, {
            "package": upgraded,
            **{h: [h] for h in SPECIAL_HOMES if own.homes.get(h)},
            "unowned-before": [*beyond, "unowned"],
        })
    top = sum(sizes[h] for h in SPECIAL_HOMES if h in sizes)
    origins: dict[str, int] = {}
    for c in result.components:
        if not c.special:
            origins[c.origin] = origins.get(c.origin, 0) + 1
    return {
        "upgraded": {k: list(v) for k, v in pair.upgraded.items()},
        "upgraded_keys": upgraded,
        "components_by_origin": origins,
        "layers": len(result.layers),
        "image": sum(o.record.size for o in result.layers),
        "pkglayer": sum(r.size for r in written),
        "pkglayer_layers_written": [r.name for r in written],
        "package_plus_top": sizes["package"] + top,
        "package": sizes["package"],
        "top_layers": top,
        "all_beyond_dpkg_in_unowned": sizes["unowned-before"] + top - sizes.get("unowned", 0),
        "rebuild_seconds": round(seconds, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", help="also write the results as Markdown to this file")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--app-only", action="store_true", help="measure the application image only (3.)")
    args = ap.parse_args()
    if args.app_only:
        results = {"app": app_upgrade()}
        print(json.dumps(results, indent=2) if args.json else "\n".join(render_app(results["app"])))
        return 0

    pair = upgrade_pair()
    log(f"old {pair.old}\nbench: new {pair.new}\nbench: {len(pair.upgraded)} packages upgraded")
    settings = BuildSettings(hash_cache="")
    with Rootfs(str(pair.new)) as rootfs:
        own = scan_rootfs(rootfs, settings)
        comps = [c for c in find_components(own) if not c.special]
        times = {c.name: sorted({t for k in c.packages for t in own.packages[k].changelog}) for c in comps}
        log(f"{len(own.packages)} packages in {len(comps)} components; measuring compressed sizes")
        groups = {c.name: list(c.packages) for c in comps}
        groups.update({h: [h] for h in SPECIAL_HOMES if own.homes.get(h)})
        upgraded_keys = [k for k, p in own.packages.items() if p.name in pair.upgraded]
        groups.update({f"pkg:{k}": [k] for k in upgraded_keys})
        sizes = compressed_sizes(rootfs, own, groups)
    gz = {c.name: sizes[c.name] for c in comps}
    gz_pkgs = {k: sizes[f"pkg:{k}"] for k in upgraded_keys}
    top = sum(sizes[h] for h in SPECIAL_HOMES if h in sizes)

    results = {
        "tree": {"packages": len(own.packages), "components": len(comps), "compressed": sum(gz.values()) + top,
                 "top_layers": top},
        "replay": [replay(comps, times, gz, top, b) for b in BUDGETS],
        "upgrade": real_upgrade(pair, comps, gz, gz_pkgs, top),
        "app": app_upgrade(),
    }
    text = render(results)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print(text)
    if args.doc:
        Path(args.doc).write_text(
            "# Update economy\n\nOutput of `bench/bench_updates.py` (see its docstring for the method).\n\n"
            "```\n" + text + "\n```\n"
        )
    return 0


def _mb(n: float) -> str:
    return f"{n / 1e6:8.2f} MB"


def render(r: dict) -> str:
    t = r["tree"]
    lines = [
        f"tree: {t['packages']} packages in {t['components']} components, {_mb(t['compressed']).strip()} "
        f"compressed (top layers {_mb(t['top_layers']).strip()})",
        "",
        "A year of weekly builds (bytes downloaded per update):",
    ]
    for rep in r["replay"]:
        s = rep["strategies"]
        lower, single = s["unbounded"]["mean"], s["single"]["mean"]
        lines.append(f"  budget {rep['budget']} ({rep['updates']} updates in 52 weeks)")
        for name in ("pkglayer", "single", "unbounded", "hash-buckets"):
            lines.append(
                f"    {name:<13} mean {_mb(s[name]['mean'])}  p90 {_mb(s[name]['p90'])}  "
                f"{s[name]['mean'] / lower:5.2f}x lower bound"
            )
        lines.append(
            f"    components moved by re-planning: {rep['moves_in_quiet_weeks']} in weeks without additions "
            f"or removals, {rep['moves_in_add_remove_weeks']} in weeks with them"
        )
        if rep["budget"] == 64:
            a = s["pkglayer"]["mean"] / lower
            b = s["pkglayer"]["mean"] / single
            lines.append(f"    target: mean <= {TARGET_VS_LOWER}x lower bound: {a:.2f} {_ok(a <= TARGET_VS_LOWER)}")
            lines.append(f"    target: mean <= {TARGET_VS_SINGLE}x single layer: {b:.3f} {_ok(b <= TARGET_VS_SINGLE)}")
            lines.append(f"    target: no moves in quiet weeks: {_ok(rep['moves_in_quiet_weeks'] == 0)}")
    u = r["upgrade"]
    ratio = u["pkglayer"] / u["upgraded_packages_plus_top"]
    lines += [
        "",
        f"Real bookworm -> bookworm-security upgrade ({u['upgraded_packages']} packages in "
        f"{len(u['upgraded_components'])} components), budget 64:",
        f"    pkglayer (measured)         {_mb(u['pkglayer'])}  ({len(u['pkglayer_layers_written'])} layers written,"
        f" rebuild {u['rebuild_seconds']} s)",
        f"    upgraded packages + top     {_mb(u['upgraded_packages_plus_top'])}",
        f"    unbounded (per component)   {_mb(u['unbounded'])}",
        f"    hash-buckets                {_mb(u['hash-buckets'])}",
        f"    single layer                {_mb(u['single'])}",
        f"    target: pkglayer <= {TARGET_UPGRADE}x upgraded packages + top: "
        f"{ratio:.2f} {_ok(ratio <= TARGET_UPGRADE)}",
    ]
    lines += ["", *render_app(r["app"])]
    return "\n".join(lines)


def render_app(a: dict) -> list[str]:
    ratio = a["pkglayer"] / a["package_plus_top"]
    (name, (old, new)), = a["upgraded"].items()
    kinds = ", ".join(f"{n} {o}" for o, n in sorted(a["components_by_origin"].items(), key=lambda t: -t[1]))
    return [
        f"Application image ({kinds} components; {a['layers']} layers, {_mb(a['image']).strip()} compressed), "
        f"pip upgrade {name} {old} -> {new}, budget 64:",
        f"    pkglayer (measured)         {_mb(a['pkglayer'])}  ({len(a['pkglayer_layers_written'])} layers written:"
        f" {', '.join(a['pkglayer_layers_written'])}; rebuild {a['rebuild_seconds']} s)",
        f"    {name} files + top layers   {_mb(a['package_plus_top'])}  ({_mb(a['package']).strip()} + "
        f"{_mb(a['top_layers']).strip()})",
        f"    everything beyond the Debian packages in `unowned` {_mb(a['all_beyond_dpkg_in_unowned']).strip()}",
        f"    single layer                {_mb(a['image'])}",
        f"    target: pkglayer <= {TARGET_APP_UPGRADE}x the package's files + top: "
        f"{ratio:.2f} {_ok(ratio <= TARGET_APP_UPGRADE)}",
    ]


def _ok(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


if __name__ == "__main__":
    sys.exit(main())
