#!/usr/bin/env python3
"""Benchmark pkglayer against single-layer tar baselines on one real rootfs.

On the same tree, in the same run, with a warm page cache, it times (median of --runs):

  tar+pigz    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C ROOT . | pigz -p N > out
  tar+zstd    the same | zstd -3 -T N > out
  umoci       umoci insert --image EMPTY:latest COPY /   (Go, one gzip layer; EMPTY made by
              umoci init + umoci new, untimed; COPY an untimed copy of ROOT, as umoci
              changes the ctime of every directory it reads)
  gzip full   pkglayer build ROOT --output oci:EMPTY/img:latest
  zstd full   the same with --compression zstd
  reuse       pkglayer build ROOT --layers L   (L already holds a full build and one untimed rebuild
              kept its memo: every run is answered from it)
  reuse, no memo   the same with --no-memo: the kept-scan rebuild (the first rebuild after a
              build that wrote layers, or any with a memo missing)

N is the number of CPUs (pkglayer's default worker count). "... same" rows run the
baseline over the files of pkglayer's layers only (its excludes left out; umoci reads a
copy of the tree without them, made untimed). --before PKGLAYER adds the full builds of
another pkglayer (e.g. an earlier commit's) to the same round-robin, for before/after
ratios from one run. pkglayer runs as the installed
CLI in a subprocess, so interpreter start-up is counted, as the shell baselines count
theirs. The baselines read the whole tree; pkglayer leaves out its default excludes
(apt caches and lists, tmp, ...): both sizes are printed.

Run as root (the tree has root-only files):
  bench/bench.py                       # the cached large Debian tree of tests/rootfs_factory.py
  bench/bench.py --rootfs /some/rootfs --runs 5 --json
  bench/bench.py --doc docs/benchmark.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ANALYSIS = "## Analysis"
# The steps and kinds of work of pkglayer's --json "timings" (pkglayer/timings.py).
_STEP_NAMES = ("database", "scan", "hash", "ownership", "plan", "keys", "reuse", "write")
_WORK_NAMES = ("hash", "compress", "read", "write")
REPO = Path(__file__).resolve().parent.parent
TAR = "tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner{excludes} -cf - -C {root} ."

# (name, numerator, denominator, target): PASS when numerator/denominator <= target.
# The first three are the project's targets (issue 12; baselines over the whole tree);
# the rest compare with baselines over the same files as the layers (pkglayer's excludes
# left out), or are for information.
TARGETS = [
    ("pkglayer-gzip / umoci", "gzip full", "umoci", 1.0),
    ("pkglayer-zstd / zstd", "zstd full", "tar+zstd", 1.3),
    ("reuse / pkglayer-gzip full", "reuse", "gzip full", 0.05),
    ("pkglayer-gzip / pigz", "gzip full", "tar+pigz", None),
    ("pkglayer-gzip / umoci same files", "gzip full", "umoci same", 1.0),
    ("pkglayer-gzip / pigz same files", "gzip full", "tar+pigz same", None),
    ("pkglayer-zstd / zstd same files", "zstd full", "tar+zstd same", 1.3),
    # the reuse rebuild without the memo (the kept scan, lstat walk, plan and blob checks)
    ("reuse without memo / pkglayer-gzip full", "reuse, no memo", "gzip full", None),
    # the reuse rebuild when every file must be read and hashed again
    ("reuse without hash cache / pkglayer-gzip full", "reuse, no cache", "gzip full", None),
]
# With --before: each full build against the other pkglayer's, and that one's ratios.
BEFORE_TARGETS = [
    ("pkglayer-gzip / before", "gzip full", "gzip full before", None),
    ("pkglayer-zstd / before", "zstd full", "zstd full before", None),
    ("before: pkglayer-gzip / umoci", "gzip full before", "umoci", None),
    ("before: pkglayer-zstd / zstd", "zstd full before", "tar+zstd", None),
]


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def large_deb_rootfs() -> Path:
    path = REPO / "tests" / "rootfs_factory.py"
    spec = importlib.util.spec_from_file_location("rootfs_factory", path)
    if spec is None or spec.loader is None or not path.exists():
        sys.exit(f"bench: no --rootfs given and {path} is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules["rootfs_factory"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.large_deb_rootfs()


def find_pkglayer(explicit: str | None) -> str:
    for candidate in (
        explicit,
        REPO / ".venv" / "bin" / "pkglayer",
        Path(sys.executable).parent / "pkglayer",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("pkglayer")
    if not found:
        sys.exit("bench: no pkglayer CLI found: run scripts/setup.sh or pass --pkglayer")
    return found


def tree_bytes(path: str) -> tuple[int, int]:
    """(apparent bytes of regular files, number of entries) under path, not following links."""
    total = count = 0
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        return (st.st_size if os.path.isfile(path) and not os.path.islink(path) else 0), 1
    for dirpath, dirnames, filenames in os.walk(path):
        count += len(dirnames) + len(filenames)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not os.path.islink(p):
                total += st.st_size
    return total, count + 1


def umoci_layer_bytes(layout: Path) -> int:
    """Compressed size of the layers of the image umoci wrote (tag latest)."""
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return sum(layer["size"] for layer in manifest["layers"])


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _shorten(cmd: list[str] | str, work: Path, root: str, pkglayer: str, excl: str, before: str | None) -> str:
    """A command as shown in reports: $WORK, ROOT, 'pkglayer' and EXCLUDES for the long parts."""
    text = cmd if isinstance(cmd, str) else shlex.join(cmd)
    text = text.replace("set -o pipefail; ", "")
    if before:
        text = text.replace(before, "pkglayer-before")
    if excl:
        text = text.replace(excl, " --exclude=./EXCLUDED...")
    return (
        text.replace(str(work), "$WORK")
        .replace(shlex.quote(root), "ROOT")
        .replace(root, "ROOT")
        .replace(pkglayer, "pkglayer")
    )


def run_timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, str, float]:
    """Run cmd; return (wall seconds, stdout, CPU seconds of it and all its descendants)."""
    cpu0 = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        shell=shell,
        executable="/bin/bash" if shell else None,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
        sys.exit(f"bench: {shown} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout, cpu


def _proc_field(path: str, prefix: str) -> str | None:
    """The value after ':' on the first line of a /proc file starting with prefix."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def machine() -> dict[str, str | int]:
    model = _proc_field("/proc/cpuinfo", "model name") or "unknown"
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    mem = f"{int(mem_kb.split()[0]) / 1024 / 1024:.1f} GiB" if mem_kb else "?"
    return {
        "nproc": os.cpu_count() or 1,
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "niceness": os.nice(0),
    }


def first_line(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "missing"
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0].strip("* ") if text else "?"


def tool_versions(pkglayer: str, before: str | None) -> dict[str, str]:
    versions = {
        "pkglayer": first_line([pkglayer, "--version"]),
        "tar": first_line(["tar", "--version"]),
        "pigz": first_line(["pigz", "--version"]),
        "zstd": first_line(["zstd", "--version"]),
        "umoci": first_line(["umoci", "--version"]),
    }
    if before:
        versions["pkglayer before"] = first_line([before, "--version"]) + " (before)"
    return versions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rootfs", help="tree to benchmark (default: large_deb_rootfs() of tests/rootfs_factory.py)")
    ap.add_argument(
        "--runs", type=int, default=3, help="timed runs of each command; the median is reported (default 3)"
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of a table")
    ap.add_argument("--pkglayer", help="pkglayer executable (default: REPO/.venv/bin/pkglayer, then PATH)")
    ap.add_argument(
        "--workdir", help="scratch directory for outputs (default: a new one in /var/tmp, removed afterwards)"
    )
    ap.add_argument("--doc", metavar="FILE", help="also write the results as Markdown to FILE (e.g. docs/benchmark.md)")
    ap.add_argument(
        "--before", metavar="PKGLAYER", help="another pkglayer executable whose full builds run in the same rounds"
    )
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    # Users run pkglayer with cached bytecode; without it every run compiles its modules
    # again (0.1-0.3 s here), which the baselines do not pay.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    root = os.path.abspath(args.rootfs) if args.rootfs else str(large_deb_rootfs())
    if not os.path.isdir(root):
        sys.exit(f"bench: {root} is not a directory")
    pkglayer = find_pkglayer(args.pkglayer)
    before = args.before
    if before and not os.access(before, os.X_OK):
        sys.exit(f"bench: --before {before} is not executable")
    # `pkglayer --version` names the directory the package was imported from (since
    # phase I): a wrapper running `python -m pkglayer` imports it from the current
    # directory first, whatever its PYTHONPATH, and would compare one code with itself.
    said = first_line([before, "--version"]) if before else ""
    if " from " in said and said == first_line([pkglayer, "--version"]):
        sys.exit(f"bench: --before {before} runs the same code as {pkglayer}: {said}")
    ncpu = os.cpu_count() or 1
    own_work = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pkglayer-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    q = shlex.quote
    tar = TAR.format(root=q(root), excludes="")
    excl = ""

    try:
        log(f"tree {root}: measuring size and pkglayer's excludes")
        size, entries = tree_bytes(root)
        _, scan_out, _ = run_timed([pkglayer, "scan", root, "--json"])
        scan = json.loads(scan_out)
        excluded_bytes = sum(tree_bytes(os.path.join(root, p))[0] for p in scan["excluded"])
        layered_bytes = sum(p["bytes"] for p in scan["packages"]) + sum(h["bytes"] for h in scan["homes"].values())

        log("warming the page cache (one untimed tar pass)")
        run_timed(f"set -o pipefail; {tar} | cat >/dev/null", shell=True)
        # The same tar without what pkglayer excludes: the same files as its layers.
        # (--exclude is positional in GNU tar: it must come before the operands)
        excl = "".join(f" --exclude={q('./' + p)}" for p in scan["excluded"])
        tar_same = TAR.format(root=q(root), excludes=" --anchored" + excl)

        # umoci has no excludes: it reads a copy of the tree without them. And it changes
        # the ctime of every directory it reads (it puts their times back), which a
        # rebuild must take as a change: it reads a copy of the whole tree too, so that
        # ROOT stays as pkglayer's last build saw it.
        log("copying the tree for umoci, whole and without pkglayer's excludes (untimed)")
        same_tree = work / "same-tree"
        whole_tree = work / "whole-tree"
        for copy, source in ((same_tree, tar_same), (whole_tree, tar)):
            copy.mkdir()
            run_timed(f"set -o pipefail; {source} | tar -xpf - --numeric-owner -C {q(str(copy))}", shell=True)
        run_timed(f"set -o pipefail; {TAR.format(root=q(str(whole_tree)), excludes='')} | cat >/dev/null", shell=True)

        log("untimed full --layers build, the base of the reuse runs")
        layers = work / "layers"
        _, out, _ = run_timed([pkglayer, "build", root, "--layers", str(layers), "--json", "-q"])
        first_layers = json.loads(out)
        log("untimed rebuild into the same --layers: it writes nothing and keeps the memo")
        run_timed([pkglayer, "build", root, "--layers", str(layers), "--json", "-q"])
        if before:
            log("untimed full build by --before (writes its bytecode)")
            warm = f"oci:{work / 'warm-before'}:latest"
            run_timed([before, "build", root, "--output", warm, "--no-hash-cache", "-q"])

        commands: dict[str, tuple[list[str] | str, bool]] = {}
        names = [
            "tar+pigz", "tar+zstd", "umoci", "tar+pigz same", "tar+zstd same", "umoci same",
            "gzip full", "zstd full", "reuse", "reuse, no memo", "reuse, no cache",
        ]
        if before:
            names += ["gzip full before", "zstd full before"]
        times: dict[str, list[float]] = {k: [] for k in names}
        cpus: dict[str, list[float]] = {k: [] for k in names}
        load_before = loadavg()
        load_samples: list[float] = []  # 1-minute load average before each timed command
        gzip_digests: list[str] = []
        reused_counts: list[int] = []  # of every reuse run: each must reuse every layer
        memo_answers: list[bool] = []  # of every "reuse" run: each must be answered from the memo
        results: dict[str, dict] = {}
        # Round-robin over the commands, so slow drift of the machine hits all of them alike.
        for i in range(args.runs):
            log(f"run {i + 1}/{args.runs}")
            out_dir = work / f"run{i}"
            out_dir.mkdir()
            umoci_dirs = {
                "umoci": (out_dir / "umoci", str(whole_tree)), "umoci same": (out_dir / "umoci-same", str(same_tree)),
            }
            commands = {
                "tar+pigz": (
                    f"set -o pipefail; {tar} | pigz -p {ncpu} > {q(str(out_dir / 'tree.tar.gz'))}",
                    True,
                ),
                "tar+zstd": (
                    f"set -o pipefail; {tar} | zstd -q -3 -T{ncpu} > {q(str(out_dir / 'tree.tar.zst'))}",
                    True,
                ),
                **{
                    name: (["umoci", "insert", "--image", f"{layout}:latest", tree, "/"], False)
                    for name, (layout, tree) in umoci_dirs.items()
                },
                "tar+pigz same": (
                    f"set -o pipefail; {tar_same} | pigz -p {ncpu} > {q(str(out_dir / 'same.tar.gz'))}",
                    True,
                ),
                "tar+zstd same": (
                    f"set -o pipefail; {tar_same} | zstd -q -3 -T{ncpu} > {q(str(out_dir / 'same.tar.zst'))}",
                    True,
                ),
                # Full builds run with a cold digest cache: every file is read and hashed.
                "gzip full": (
                    [
                        pkglayer, "build", root, "--output", f"oci:{out_dir / 'gzip'}:latest",
                        "--no-hash-cache", "--json", "-q",
                    ],
                    False,
                ),
                "zstd full": (
                    [
                        pkglayer,
                        "build",
                        root,
                        "--output",
                        f"oci:{out_dir / 'zstd'}:latest",
                        "--compression",
                        "zstd",
                        "--no-hash-cache",
                        "--json",
                        "-q",
                    ],
                    False,
                ),
                "reuse": ([pkglayer, "build", root, "--layers", str(layers), "--json", "-q"], False),
                "reuse, no memo": (
                    [pkglayer, "build", root, "--layers", str(layers), "--no-memo", "--json", "-q"], False
                ),
                "reuse, no cache": (
                    [pkglayer, "build", root, "--layers", str(layers), "--no-hash-cache", "--json", "-q"],
                    False,
                ),
            }
            if before:
                for fmt in ("gzip", "zstd"):
                    cmd = [before, *commands[f"{fmt} full"][0][1:]]
                    cmd[cmd.index("--output") + 1] = f"oci:{out_dir / (fmt + '-before')}:latest"
                    commands[f"{fmt} full before"] = (cmd, False)
            for layout, _ in umoci_dirs.values():  # an empty image to insert into (untimed)
                run_timed(["umoci", "init", "--layout", str(layout)])
                run_timed(["umoci", "new", "--image", f"{layout}:latest"])
            for name, (cmd, shell) in commands.items():
                # Flush what the previous command left dirty (untimed): otherwise it is
                # written back during the next command, and pkglayer's fsyncs wait for it.
                os.sync()
                load_samples.append(float(loadavg()[0]))
                seconds, out, cpu = run_timed(cmd, shell=shell)
                times[name].append(seconds)
                cpus[name].append(cpu)
                if not shell and not name.startswith("umoci"):
                    results[name] = json.loads(out)
                    if name == "gzip full":
                        gzip_digests.append(results[name]["manifestDigest"])
                    if name.startswith("reuse"):
                        reused_counts.append(results[name]["reused"])
                    if name == "reuse":
                        memo_answers.append(results[name]["unchanged"])
            sizes = {
                "tar+pigz": (out_dir / "tree.tar.gz").stat().st_size,
                "tar+zstd": (out_dir / "tree.tar.zst").stat().st_size,
                "tar+pigz same": (out_dir / "same.tar.gz").stat().st_size,
                "tar+zstd same": (out_dir / "same.tar.zst").stat().st_size,
                **{name: umoci_layer_bytes(layout) for name, (layout, _) in umoci_dirs.items()},
                **{
                    name: sum(layer["size"] for layer in results[name]["layers"])
                    for name in names
                    if name in results and "full" in name
                },
            }
            shutil.rmtree(out_dir)
        load_after = loadavg()
        if len(gzip_digests) < 2:
            log("one more gzip build for the determinism check")
            out_dir = work / "extra"
            _, out, _ = run_timed([pkglayer, "build", root, "--output", f"oci:{out_dir}:latest", "--json", "-q"])
            gzip_digests.append(json.loads(out)["manifestDigest"])
            shutil.rmtree(out_dir)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)

    median = {k: statistics.median(v) for k, v in times.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    ratios = []
    for label, num, den, target in TARGETS + (BEFORE_TARGETS if before else []):
        value = median[num] / median[den]
        ratios.append(
            {
                "ratio": label,
                "value": round(value, 3),
                "cpu_value": round(median_cpu[num] / median_cpu[den], 3) if median_cpu[den] else None,
                "target": target,
                "pass": None if target is None else value <= target,
            }
        )
    reuse = results["reuse"]
    n_layers = len(reuse["layers"])
    checks = {
        "layers": n_layers,
        "layers_first_build_written": first_layers["written"],
        "reused_on_rebuild": min(reused_counts),
        "all_reused": min(reused_counts) == n_layers and reuse["written"] == 0,
        "memo_answered": f"{sum(memo_answers)}/{len(memo_answers)}",
        "gzip_manifest_digests": gzip_digests,
        "deterministic": len(set(gzip_digests)) == 1,
    }
    report = {
        "invocation": shlex.join(["bench/bench.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "tools": tool_versions(pkglayer, before),
        "rootfs": root,
        "tree": {
            "bytes": size,
            "entries": entries,
            "excluded_bytes": excluded_bytes,
            "excluded_paths": len(scan["excluded"]),
            "layered_bytes": layered_bytes,
            "packages": scan["counts"]["packages"],
        },
        "runs": args.runs,
        "commands": {k: _shorten(v[0], work, root, pkglayer, excl, before) for k, v in commands.items()},
        "before": before,
        "excluded_paths": scan["excluded"],
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "median_cpu_seconds": {k: round(v, 3) for k, v in median_cpu.items()},
        "loadavg_before_after": [load_before, load_after],
        "loadavg_during": [min(load_samples), statistics.median(load_samples), max(load_samples)],
        "output_bytes": sizes,
        "ratios": ratios,
        "checks": checks,
        # Where the time of pkglayer's builds went (their --json, last round).
        "timings": {k: v["timings"] for k, v in results.items() if "timings" in v},
    }

    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_text(report))
    if args.doc:
        doc = Path(args.doc)
        text = render_markdown(report)
        # A hand-written "## Analysis" section (profiles, conclusions) survives reruns.
        old = doc.read_text() if doc.exists() else ""
        if ANALYSIS in old:
            text += "\n" + old[old.index(ANALYSIS) :]
        doc.write_text(text)
        log(f"wrote {args.doc}")
    return 0 if checks["all_reused"] and checks["deterministic"] and all(memo_answers) else 1


def _verdict(x: dict, prefix: str, sep: str = " ") -> str:
    if x["target"] is None:
        return f"(no target){sep}"
    return f"{prefix}{x['target']}{sep}{'PASS' if x['pass'] else 'MISS'}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def render_text(r: dict) -> str:
    t = r["tree"]
    lines = [
        f"machine: {r['machine']['nproc']} x {r['machine']['cpu']}, {r['machine']['memory']}",
        (
            f"tree: {r['rootfs']}: {_mb(t['bytes'])} in {t['entries']} entries, {t['packages']} packages; "
            f"pkglayer excludes {_mb(t['excluded_bytes'])} ({t['excluded_paths']} paths), "
            f"layers {_mb(t['layered_bytes'])}"
        ),
        (
            f"median of {r['runs']} run(s), warm cache; load average before/after: "
            f"{' '.join(r['loadavg_before_after'][0])} / {' '.join(r['loadavg_before_after'][1])}; "
            "1-min load before each command min/median/max: "
            + " / ".join(f"{x:.2f}" for x in r["loadavg_during"])
        ),
        f"  {'command':<14} {'median s':>9} {'CPU s':>7} {'output':>10}   runs (s)",
    ]
    for name, sec in r["median_seconds"].items():
        out = r["output_bytes"].get(name)
        lines.append(
            f"  {name:<16} {sec:>9.2f} {r['median_cpu_seconds'][name]:>7.2f} {(_mb(out) if out else '-'):>10}   "
            + " ".join(f"{s:.2f}" for s in r["seconds"][name])
        )
    lines.append("ratios:")
    for x in r["ratios"]:
        lines.append(
            f"  {x['ratio']:<46} {x['value']:>6.3f}  {_verdict(x, 'target <= ')}"
            f"   (CPU-time ratio {x['cpu_value']:.3f})"
        )
    c = r["checks"]
    lines.append(
        f"layers: {c['layers']}; reused on rebuild: {c['reused_on_rebuild']} "
        f"({'all' if c['all_reused'] else 'NOT all'}); reuse runs answered from the memo: "
        f"{c.get('memo_answered', 'n/a')}"
    )
    lines.append(
        f"gzip manifest digests: {', '.join(c['gzip_manifest_digests'])} "
        f"({'identical: deterministic' if c['deterministic'] else 'DIFFER: not deterministic'})"
    )
    return "\n".join(lines)


def render_markdown(r: dict) -> str:
    t, m, c = r["tree"], r["machine"], r["checks"]
    rows = "\n".join(
        f"| {name} | `{r['commands'][name]}` | {sec:.2f} | {r['median_cpu_seconds'][name]:.2f} "
        f"| {' / '.join(f'{s:.2f}' for s in r['seconds'][name])} "
        f"| {_mb(r['output_bytes'][name]) if name in r['output_bytes'] else '-'} |"
        for name, sec in r["median_seconds"].items()
    )
    ratio_rows = "\n".join(
        f"| {x['ratio']} | {x['value']:.3f} | {_verdict(x, '≤ ', ' | ')} "
        f"| {x['cpu_value']:.3f} |"
        for x in r["ratios"]
    )
    timing_rows = "\n".join(
        "| " + " | ".join([name, *(f"{t['steps'].get(k, 0):.2f}" for k in _STEP_NAMES),
                           *(f"{t['cpu'].get(k, 0):.2f}" for k in _WORK_NAMES)]) + " |"
        for name, t in r.get("timings", {}).items()
    )
    tools = ", ".join(f"{v}" for v in r["tools"].values())
    all_reused = "all" if c["all_reused"] else "NOT all"
    before_note = (
        f" Rows ending in “before” are full builds by another pkglayer, `{r['before']}`, in the same rounds."
        if r["before"]
        else ""
    )
    return f"""# Benchmark

Produced by `{r["invocation"]}` on {r["date"]}
(niceness {m["niceness"]}).

## Method

One tree, one run of the script, warm page cache (one untimed `tar` pass first). Each command
runs {r["runs"]} time(s), round-robin, and the median wall time is reported. pkglayer runs as the
installed CLI in a subprocess, so Python start-up is counted, as the shell baselines count
theirs. CPU s is user+system time of the command and all its children (from
`getrusage(RUSAGE_CHILDREN)`), which other load on the machine disturbs less than wall time.
"… same" rows run the baseline over the same files as the layers (`--anchored --exclude` of
every path pkglayer excluded; "umoci same" inserts a copy of the tree without them, made
untimed with that tar). `umoci` inserts a copy of the whole tree (made untimed, and read
once untimed: umoci changes the ctime of every directory it reads, which pkglayer's next
rebuild would rightly take as a change) into an empty image made untimed by
`umoci init` and `umoci new`: one gzip layer written by Go, as a user without pkglayer
would. Outputs go to an empty directory on the same filesystem (`/var/tmp`). The baselines
write one compressed tar of the *whole* tree; pkglayer leaves out its default excludes (apt
caches and lists, `tmp`, ...), listed below. pkglayer fsyncs every blob it commits; the
baselines do not sync.{before_note} Full builds run with `--no-hash-cache`, so every file is read and
hashed. The reuse run is `pkglayer build --layers L` after an untimed full build into `L`
and one untimed rebuild, which wrote nothing and kept the build memo: each timed run finds
the tree, the databases' files, `L` and the command as that rebuild left them (one lstat per
object) and answers from the memo (docs/architecture.md, "An unchanged rebuild"). "reuse,
no memo" is the same rebuild with `--no-memo`, the path of a first rebuild after a build
that wrote layers: the kept scan and the digest cache, an lstat walk, plan, keys and blob
checks, every layer reused (a reused blob is checked against its digest, read again only if
its file changed since it was last checked); "reuse, no cache" is the same rebuild with
`--no-hash-cache` (no digest cache, no kept scan, no memo: every file read and hashed).
An untimed `sync` runs before every timed command, so no command pays for writing back
what the one before it left in the page cache.

## Machine

- CPUs: {m["nproc"]} x {m["cpu"]}; memory {m["memory"]}; kernel {m["kernel"]}
- Load average (1/5/15 min) before and after the timed runs: {" ".join(r["loadavg_before_after"][0])} /
  {" ".join(r["loadavg_before_after"][1])}; 1-minute load average before each timed command, min / median / max:
  {" / ".join(f"{x:.2f}" for x in r["loadavg_during"])} (other work on the machine slows everything down)
- Tools: {tools}
- Tree: `{r["rootfs"]}` — {_mb(t["bytes"])} of regular files in {t["entries"]} entries,
  {t["packages"]} packages; pkglayer excludes {_mb(t["excluded_bytes"])} ({t["excluded_paths"]} paths),
  and its layers hold {_mb(t["layered_bytes"])}.

## Results

| what | command | median wall s | median CPU s | runs (wall s) | output |
|---|---|---|---|---|---|
{rows}

| ratio (wall) | value | target | | CPU-time ratio |
|---|---|---|---|---|
{ratio_rows}

Where pkglayer's time went (`--json` "timings" of the last round: wall s of each step, then CPU s
of the worker threads' hashing, compressing, reading and writing):

| build | {" | ".join(_STEP_NAMES)} | CPU: {" | ".join(_WORK_NAMES)} |
|---|{"---|" * (len(_STEP_NAMES) + len(_WORK_NAMES))}
{timing_rows}

- Layers: {c["layers"]}; reused on rebuild: {c["reused_on_rebuild"]} ({all_reused}); reuse runs answered from \
the memo: {c.get("memo_answered", "n/a")}.
- Manifest digests of the gzip builds: {", ".join(f"`{d}`" for d in c["gzip_manifest_digests"])}
  ({"identical" if c["deterministic"] else "DIFFERENT"}).

`ROOT` is the tree, `$WORK` the scratch directory; `EXCLUDED...` stands for one
`--exclude=./PATH` per path pkglayer excluded: {", ".join(f"`{p}`" for p in r["excluded_paths"])}.
"""


if __name__ == "__main__":
    sys.exit(main())
