"""The `pkglayer` command: a thin face over the pipeline in `pkglayer.build`."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import sys
from dataclasses import replace
from typing import Any

from . import __version__
from .config import COMPRESSIONS, BuildSettings, load_settings
from .errors import PkglayerError
from .sources import source_formats

log = logging.getLogger("pkglayer")

_DESCRIPTION = """\
Turn a distribution root filesystem (rpm or dpkg), or an existing image, into an OCI
image whose layers follow its packages: byte-deterministic layers of packages grouped by
source and, within the layer budget, by how often they change, plus top layers for
modified files, files owned by no package, and the package database. Layers keep their
packages from one build to the next, and unchanged ones are reused, not written again.
"""

_PLAN_EPILOG = """\
Each layer shows its size (file data), the chance that some member changes in a week
(from changelogs, and from changes seen in earlier builds), and the bytes a client is
expected to re-download per update (size x chance). Packages built from one source
always share a layer.

examples:
  pkglayer plan ./rootfs --max-layers 32
  pkglayer plan ./rootfs --prior /layers/history.json --json
"""

_BUILD_EPILOG = """\
examples:
  pkglayer build ./rootfs --output oci:./image:latest
  pkglayer build ./rootfs --layers /layers            # the /layers protocol (history.json)
  pkglayer build ./rootfs --layers /layers --output oci:./image:v2 --compression zstd
"""


def _settings_from_args(args: argparse.Namespace) -> BuildSettings:
    settings = load_settings(args.config)
    changes: dict[str, Any] = {}
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if args.source_date_epoch is not None:
        changes["source_date_epoch"] = args.source_date_epoch
    elif epoch:
        try:
            changes["source_date_epoch"] = int(epoch)
        except ValueError:
            raise PkglayerError(f"SOURCE_DATE_EPOCH must be an integer, not {epoch!r}") from None
    if args.exclude:
        changes["extra_excludes"] = settings.extra_excludes + tuple(args.exclude)
    if args.jobs is not None:
        changes["jobs"] = args.jobs
    if args.format is not None:
        changes["package_format"] = args.format
    if args.no_hash_cache:
        changes["hash_cache"] = ""
    if getattr(args, "verify_reused", False):
        changes["verify_reused"] = True
    for name in ("compression", "max_layers"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    level = getattr(args, "level", None)
    if level is not None:
        comp = changes.get("compression", settings.compression)
        changes["gzip_level" if comp == "gzip" else "zstd_level"] = level
    return replace(settings, **changes).validated()


def _key_value(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise PkglayerError(f"{what} must look like KEY=VALUE, not {text!r}")
    return key, value


def _command_words(text: str | None, what: str) -> list[str] | None:
    """A JSON array (exec form, as in a Containerfile) or a shell-quoted string."""
    if text is None:
        return None
    if text.lstrip().startswith("["):
        try:
            words = json.loads(text)
        except json.JSONDecodeError as e:
            raise PkglayerError(f"{what}: not a JSON array of strings: {e}") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise PkglayerError(f"{what}: not a JSON array of strings")
        return words
    return shlex.split(text)


class _ProgressReporter:
    """A bar per phase on a terminal; a log line per tenth otherwise (journal, CI logs)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.phase = ""
        self.last_logged = -1

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if phase != self.phase:
            self.close()
            self.phase, self.last_logged = phase, -1
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                unit = "layer" if phase == "layers" else "file"
                self.bar = tqdm(total=total, desc=phase, unit=unit, leave=False, file=sys.stderr)
            self.bar.update(done - self.bar.n)
        else:
            tenth = done * 10 // max(total, 1)
            if tenth != self.last_logged:
                self.last_logged = tenth
                log.info("%s: %d/%d", phase, done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _scan_summary(own) -> dict[str, Any]:
    from .ownership import SPECIAL_HOMES

    packages = []
    for key, pkg in sorted(own.packages.items()):
        objs = own.homes.get(key, [])
        packages.append(
            {
                "key": key,
                "name": pkg.name,
                "version": pkg.version,
                "release": pkg.release,
                "epoch": pkg.epoch,
                "arch": pkg.arch,
                "source": pkg.source,
                "files": len(objs),
                "bytes": own.home_bytes(key),
                "missing": len(own.missing.get(key, [])),
            }
        )
    return {
        "format": own.source_format,
        "architecture": own.architecture,
        "packages": packages,
        "homes": {
            h: {"files": len(own.homes.get(h, [])), "bytes": own.home_bytes(h)} for h in SPECIAL_HOMES
        },
        "modified": own.modified,
        "unowned": own.unowned,
        "excluded": own.excluded,
        "skipped": [{"path": p, "reason": r} for p, r in own.skipped],
        "shared": own.shared,
        "counts": {
            "packages": len(own.packages),
            "objects": len(own.objects),
            "modified": len(own.modified),
            "unowned": len(own.unowned),
            "excluded": len(own.excluded),
            "skipped": len(own.skipped),
            "missing": sum(len(v) for v in own.missing.values()),
        },
    }


def cmd_scan(args: argparse.Namespace) -> int:
    from .build import scan_rootfs
    from .hashcache import HashCache
    from .rootfs import Rootfs

    settings = _settings_from_args(args)
    with Rootfs(args.rootfs) as rootfs:
        cache = HashCache(settings.hash_cache_path)
        cache.load(rootfs.path)
        reporter = _ProgressReporter(enabled=not (args.quiet or args.json))
        try:
            summary = _scan_summary(scan_rootfs(rootfs, settings, cache=cache, progress=reporter))
        finally:
            reporter.close()
        cache.save()
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    c = summary["counts"]
    print(f"format: {summary['format'] or 'none (no package database)'}, architecture: {summary['architecture']}")
    print(f"{'package':<50} {'files':>7} {'bytes':>10}")
    for p in summary["packages"]:
        print(f"{p['key']:<50} {p['files']:>7} {_human(p['bytes']):>10}")
    for home, v in summary["homes"].items():
        print(f"[{home}]{'':<{49 - len(home)}}{v['files']:>7} {_human(v['bytes']):>10}")
    print(
        f"{c['packages']} packages, {c['objects']} objects; {c['modified']} modified, "
        f"{c['unowned']} unowned, {c['excluded']} excluded, {c['missing']} listed but absent"
    )
    for path in summary["modified"]:
        print(f"modified: /{path}")
    for path in summary["excluded"]:
        print(f"excluded: /{path}")
    for item in summary["skipped"]:
        print(f"skipped: /{item['path']}: {item['reason']}")
    return 0


def _explicit_prior(spec: str | None, opts, limits):
    """--prior SOURCE: a history.json, a /layers directory, or an image built by pkglayer."""
    from .prior import image_prior, load_plan
    from .registry import is_docker_ref

    if spec is None:
        return None
    if spec.startswith("oci:") or is_docker_ref(spec):
        return image_prior(spec, opts, limits)
    return load_plan(spec)


def _resolve_prior(args: argparse.Namespace, outputs, opts, limits):
    from .prior import ImagePrior, remote_blobs, resolve_prior

    explicit = _explicit_prior(args.prior, opts, limits)
    remote: frozenset[str] = frozenset()
    if isinstance(explicit, ImagePrior) and explicit.blobs is None and outputs.push_to:
        if outputs.staged:
            remote = remote_blobs(explicit.ref, outputs.push_to, explicit.plan, opts)
        else:
            log.info("--output oci:%s is written complete: unchanged layers are rewritten locally "
                     "(same digests; the push skips them)", outputs.layout[0])
    return resolve_prior(
        explicit=explicit, explicit_from=f"--prior {args.prior}", layers_dir=outputs.layers_dir,
        layout=outputs.layout, remote_blobs=remote,
    )


def cmd_build(args: argparse.Namespace) -> int:
    from .build import build
    from .fsutil import Workspace
    from .imageconfig import merge_config
    from .inputs import open_inputs
    from .layout import ImageOptions
    from .outputs import parse_outputs, write_outputs

    settings = _settings_from_args(args)
    cli_options = ImageOptions(
        env=list(args.env or []),
        labels=dict(_key_value(v, "--label") for v in args.label or []),
        cmd=_command_words(args.cmd, "--cmd"),
        entrypoint=_command_words(args.entrypoint, "--entrypoint"),
        workdir=args.workdir,
        user=args.user,
    )
    for e in cli_options.env:
        _key_value(e, "--env")
    reporter = _ProgressReporter(enabled=not (args.quiet or args.json))
    opts = _registry_options(args)
    limits = _limits(args)
    try:
        with Workspace(args.tmpdir) as work:
            outputs = parse_outputs(args.output, args.layers, work)
            prior = _resolve_prior(args, outputs, opts, limits)  # a bad prior fails before a long unpack
            inputs = open_inputs(args.rootfs, args.source, work, limits, reporter, opts)
            if inputs.unpacked:  # a fresh temporary tree never hits the digest cache
                settings = replace(settings, hash_cache="")
            result = build(inputs.rootfs, settings, prior, outputs.new_blobs(), platform=inputs.platform,
                           progress=reporter, replan=args.replan)
            report = write_outputs(result, outputs, merge_config(inputs.image, cli_options), prior,
                                   settings.source_date_epoch, opts, limits)
    finally:
        reporter.close()
    if args.json:
        out = {**result.as_json(), **report.as_json(), "source": inputs.source.as_json() if inputs.source else None}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not args.quiet:
        for o in result.layers:
            state = "reused " if o.reused else "written"
            print(f"{state} {o.record.digest[7:19]} {_human(o.record.size):>10}  {o.record.name}")
    total = sum(o.record.size for o in result.layers)
    print(
        f"{len(result.layers)} layers ({result.written} written, {result.reused} reused), "
        f"{_human(total)} compressed, {result.seconds:.1f} s"
    )
    if inputs.source:
        print(f"from {inputs.source.ref} ({inputs.source.layers} layers, {inputs.source.entries} entries)")
    if report.image and not outputs.staged:
        print(f"image {report.image_ref} manifest {report.image.manifest_digest}")
    if report.push:
        _print_push(report.push)
    if report.history_path:
        print(f"history {report.history_path}")
    return 0


def _plan_options(group) -> None:
    group.add_argument(
        "--max-layers", type=int, metavar="N", help="layer budget, top layers included (default 64)"
    )
    group.add_argument(
        "--prior",
        metavar="SOURCE",
        help="earlier build whose layer plan to keep stable: a history.json, a /layers directory, or "
        "an image built by pkglayer (docker://REF, oci:DIR:TAG) whose config carries the plan; with "
        "--output docker:// to the same repository its unchanged layers are neither written nor uploaded "
        "(default: the --layers history, else the earlier image of the --output tag)",
    )
    group.add_argument(
        "--replan", action="store_true", help="plan afresh, ignoring where the prior plan put each package"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from .build import plan_rootfs
    from .prior import resolve_prior

    settings = _settings_from_args(args)
    reporter = _ProgressReporter(enabled=not (args.quiet or args.json))
    explicit = _explicit_prior(args.prior, _registry_options(args), _limits(args))
    prior = resolve_prior(explicit=explicit, explicit_from=f"--prior {args.prior}")
    try:
        _, components, plan = plan_rootfs(args.rootfs, settings, prior, replan=args.replan, progress=reporter)
    finally:
        reporter.close()
    rates = {c.name: c.rate for c in components}
    layers = [
        {
            "name": layer.name,
            "components": [
                {"name": c, "weekly": round(rates[c].weekly, 4), "evidence": rates[c].explain()}
                for c in (layer.components or (layer.name,))
            ],
            "packages": list(layer.packages),
            "size": layer.size,
            "weekly": round(layer.weekly, 4),
            "expectedBytes": round(layer.expected_bytes),
            "moved": [{"component": c, "why": why} for c, why in layer.moved],
        }
        for layer in plan.layers
    ]
    summary = {
        "budget": plan.budget,
        "layers": layers,
        "decision": plan.decision,
        "removed": list(plan.removed),
        "expectedBytes": round(plan.expected_bytes),
        "lowerBound": round(plan.lower_bound + sum(x.expected_bytes for x in plan.layers if not x.components)),
        "singleLayer": round(plan.single_layer + sum(x.expected_bytes for x in plan.layers if not x.components)),
        "freshSaving": round(plan.fresh_saving),
    }
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'#':>3} {'layer':<44} {'size':>9} {'p/week':>7} {'bytes/update':>12}  members")
    for i, layer in enumerate(layers, 1):
        names = [c["name"] for c in layer["components"]]
        shown = ", ".join(names[:4]) + (f" +{len(names) - 4}" if len(names) > 4 else "")
        print(
            f"{i:>3} {layer['name'][:44]:<44} {_human(layer['size']):>9} {layer['weekly']:>7.3f} "
            f"{_human(layer['expectedBytes']):>12}  {shown}"
        )
        if not args.quiet:
            for move in layer["moved"]:
                print(f"{'':>4}{move['component']}: {move['why']}")
    for name in summary["removed"]:
        print(f"removed: {name} (no longer installed)")
    lower, single = summary["lowerBound"], summary["singleLayer"]
    print(
        f"{len(layers)} of {plan.budget} layers; expected download per update "
        f"{_human(summary['expectedBytes'])}: {summary['expectedBytes'] / max(lower, 1):.2f}x one layer per "
        f"component ({_human(lower)}), {summary['expectedBytes'] / max(single, 1):.2f}x one layer for "
        f"everything ({_human(single)})"
    )
    print(plan.decision)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff_layers, load_layers

    result = diff_layers(load_layers(args.old), load_layers(args.new))
    if args.json:
        out = {
            "layers": [
                {
                    "name": c.name,
                    "status": c.status,
                    "size": c.size,
                    "download": c.download,
                    "was": c.was,
                    "added": list(c.added),
                    "removed": list(c.removed),
                }
                for c in result.layers
            ],
            "download": result.download,
            "total": result.total,
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'status':<10} {'download':>10}  layer")
    for c in result.layers:
        if c.status == "unchanged":
            continue
        print(f"{c.status:<10} {_human(c.download):>10}  {c.name}")
        for key in c.removed:
            print(f"{'':>23}- {key}")
        for key in c.added:
            print(f"{'':>23}+ {key}")
    unchanged = sum(1 for c in result.layers if c.status == "unchanged")
    share = result.download / result.total if result.total else 0.0
    print(
        f"{unchanged} layers unchanged; a client with the old image downloads {_human(result.download)} "
        f"of {_human(result.total)} ({share:.1%})"
    )
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from .daemon.service import run_daemon

    return run_daemon(args.config)


def cmd_ctl(args: argparse.Namespace) -> int:
    from .daemon.client import run_ctl

    if args.action in ("build", "wait") and not args.name:
        raise PkglayerError(f"ctl {args.action} needs a {'root name' if args.action == 'build' else 'build id'}")
    return run_ctl(args)


def _registry_options(args: argparse.Namespace):
    from .registry import RegistryOptions

    return RegistryOptions(authfile=getattr(args, "authfile", None), tls_verify=getattr(args, "tls_verify", None))


def _limits(args: argparse.Namespace):
    from .layout import Limits

    size = getattr(args, "max_image_size", None)
    return Limits(image_bytes=size) if size else Limits()


def _size(text: str) -> int:
    from .config import parse_size

    try:
        return parse_size(text, "size")
    except PkglayerError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("size: ")) from None


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _registry_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry (skopeo and the containers auth configuration)")
    g.add_argument("--authfile", metavar="FILE", help="auth.json with registry credentials "
                   "(default: $REGISTRY_AUTH_FILE or the containers default, as skopeo)")
    g.add_argument("--tls-verify", type=_bool, metavar="BOOL",
                   help="require HTTPS and verify certificates (default true; false also allows plain HTTP)")


def _print_push(report) -> None:
    if report.uploaded_blobs is None:
        print(f"pushed {report.destination} manifest {report.manifest_digest} "
              "(could not ask the registry which blobs it already had)")
        return
    print(f"pushed {report.destination} manifest {report.manifest_digest}: "
          f"{report.uploaded_blobs} blobs uploaded ({_human(report.uploaded_bytes)}), "
          f"{report.skipped_blobs} already there ({_human(report.skipped_bytes)})")


def cmd_push(args: argparse.Namespace) -> int:
    from .layout import parse_layout_ref
    from .outputs import push_layout
    from .registry import is_docker_ref

    if not is_docker_ref(args.destination):
        raise PkglayerError(f"destination {args.destination!r} is not docker://REF")
    layout, tag = parse_layout_ref(args.source)
    report = push_layout(layout, tag, args.destination, _registry_options(args), _limits(args))
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_push(report)
    return 0


def _common(p: argparse.ArgumentParser, rootfs_optional: bool = False) -> None:
    if rootfs_optional:
        p.add_argument("rootfs", nargs="?", help="root filesystem directory to read (never modified); "
                       "or give --from IMAGE")
    else:
        p.add_argument("rootfs", help="root filesystem directory to read (never modified)")
    p.add_argument(
        "--config", metavar="FILE", help="TOML settings (default: /etc/pkglayer/pkglayer.toml if present)"
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="also leave out paths matching GLOB (rootfs-relative, ** allowed); repeatable",
    )
    p.add_argument(
        "--format",
        choices=[*source_formats(), "none"],
        help="package database to read when the rootfs has several "
        "(default: detect; none: treat every file as unowned)",
    )
    p.add_argument(
        "--no-hash-cache",
        action="store_true",
        help="hash every file anew instead of trusting the digest cache (inode, size, mtime, ctime)",
    )
    p.add_argument("--jobs", "-j", type=int, metavar="N", help="worker threads (default: number of CPUs)")
    p.add_argument(
        "--source-date-epoch",
        type=int,
        metavar="SECONDS",
        help="timestamp for directories and image metadata (default: $SOURCE_DATE_EPOCH or 0)",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or per-layer lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is happening")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pkglayer",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pkglayer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser(
        "build",
        help="write an OCI image and/or /layers blobs from a rootfs",
        description="Write one layer per package (within --max-layers), reusing unchanged layers.",
        epilog=_BUILD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(b, rootfs_optional=True)
    b.add_argument("--from", dest="source", metavar="IMAGE",
                   help="rechunk an image instead of a directory: oci:DIR[:TAG] or docker://REF; its "
                   "configuration is kept unless overridden")
    b.add_argument("--tmpdir", metavar="DIR", help=f"where to unpack --from images and stage registry "
                   f"output (default $TMPDIR or {'/var/tmp'}); removed afterwards")
    b.add_argument("--max-image-size", type=_size, metavar="SIZE",
                   help="refuse source images larger than this uncompressed (default 64Gi; "
                   "k/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024)")
    out = b.add_argument_group("output (at least one)")
    out.add_argument(
        "--output", "-o", action="append", metavar="oci:DIR[:TAG]|docker://REF",
        help="write an OCI image layout (tag defaults to latest) and/or push to a registry; "
        "at most one of each",
    )
    out.add_argument(
        "--layers",
        metavar="DIR",
        help="/layers protocol: read DIR/history.json and DIR/input/blobs, write new blobs "
        "to DIR/output/blobs and a new DIR/history.json",
    )
    lay = b.add_argument_group("layers")
    lay.add_argument(
        "--compression", choices=COMPRESSIONS, help="layer compression (default gzip, the most compatible)"
    )
    lay.add_argument("--level", type=int, metavar="N", help="compression level (default gzip 6, zstd 3)")
    lay.add_argument("--verify-reused", action="store_true",
                     help="read each reused blob through once and reuse it only if it holds the layer its "
                     "history says (for input/ or layouts from elsewhere; see docs/security.md)")
    _plan_options(lay)
    img = b.add_argument_group("image config")
    img.add_argument("--label", action="append", metavar="KEY=VALUE", help="image label; repeatable")
    img.add_argument(
        "--env", action="append", metavar="KEY=VALUE", help="environment variable; repeatable (default PATH only)"
    )
    img.add_argument(
        "--cmd", metavar="CMD", help='default command: JSON array (\'["/bin/sh"]\') or a shell-quoted string'
    )
    img.add_argument("--entrypoint", metavar="CMD", help="entrypoint, same forms as --cmd")
    img.add_argument("--workdir", metavar="DIR", help="working directory")
    img.add_argument("--user", metavar="USER", help="user[:group] to run as")
    _registry_flags(b)
    b.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "push",
        help="push an OCI layout to a registry, reporting what was uploaded",
        description="Copy oci:DIR[:TAG] to docker://REF with skopeo (digests preserved); blobs the "
        "registry already has are not uploaded.",
    )
    p.add_argument("source", metavar="oci:DIR[:TAG]")
    p.add_argument("destination", metavar="docker://REF")
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is happening")
    p.add_argument("--max-image-size", type=_size, metavar="SIZE", help=argparse.SUPPRESS)
    _registry_flags(p)
    p.set_defaults(func=cmd_push)

    s = sub.add_parser(
        "scan",
        help="report packages, bytes per package, modified/unowned/excluded paths",
        description="Read the package database and walk the rootfs; write nothing.",
    )
    _common(s)
    s.set_defaults(func=cmd_scan)

    pl = sub.add_parser(
        "plan",
        help="show which packages would share which layer, and why",
        description="Group packages by source into at most --max-layers layers, minimising the bytes a "
        "client re-downloads per update; with --prior, keep the earlier plan stable. Writes nothing.",
        epilog=_PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(pl)
    _plan_options(pl.add_argument_group("plan"))
    pl.set_defaults(func=cmd_plan)

    df = sub.add_parser(
        "diff",
        help="which layers changed between two builds, why, and the bytes a client downloads",
        description="Compare two builds: each a history.json, a /layers directory or oci:DIR[:TAG].",
    )
    df.add_argument("old", help="the earlier build")
    df.add_argument("new", help="the later build")
    df.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    df.set_defaults(func=cmd_diff)

    d = sub.add_parser(
        "daemon",
        help="watch roots and keep their layers ready (systemd service)",
        description="Watch the package databases of the configured roots, prebuild their layers into a "
        "shared cache, and serve the control API on a Unix socket (see `pkglayer ctl`).",
    )
    d.add_argument("--config", metavar="FILE", default="/etc/pkglayer/pkglayer.toml",
                   help="TOML configuration with [daemon] and [[root]] (default: %(default)s)")
    d.set_defaults(func=cmd_daemon, verbose=False)

    c = sub.add_parser(
        "ctl",
        help="talk to the daemon: health, status, roots, build",
        description="Client of the daemon's control API.",
        epilog="examples:\n  pkglayer ctl status\n  pkglayer ctl build fedora --wait\n  pkglayer ctl --json roots",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--socket", metavar="PATH",
                   help="control socket (default: $PKGLAYER_SOCKET, the --config file's, "
                   "or /run/pkglayer/pkglayer.sock)")
    c.add_argument("--config", metavar="FILE", help="read the socket path from this daemon configuration")
    c.add_argument("--json", action="store_true", help="print the API's JSON answer")
    c.add_argument("action", choices=["health", "status", "roots", "build", "wait", "cache"],
                   help="health; status [ROOT]; roots; build ROOT [--wait]; wait BUILD-ID; cache")
    c.add_argument("name", nargs="?", help="root name (status, build) or build id (wait)")
    c.add_argument("--wait", action="store_true", help="build: wait until the build ends; exit 1 if it failed")
    c.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                   help="longest wait in seconds (default %(default)s)")
    c.set_defaults(func=cmd_ctl, verbose=False)
    return parser


class _Stdout:
    """stdout for a reader that may leave early (`pkglayer ctl build --wait | head -1`):
    a closed pipe is not an error. The rest of the output is dropped quietly, as
    coreutils do, and the command's exit status is its own."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def _gone(self) -> None:
        # What is still buffered, and later writes, go to /dev/null from now on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    stdout, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def _main(argv: list[str] | None) -> int:
    # A build allocates one small object per file and entry and frees them all at the
    # end: cyclic garbage collection passes over them cost ~5% and find nothing.
    gc.disable()
    parser = make_parser()
    args = parser.parse_args(argv)
    # Plain "pkglayer: message" lines: readable on a terminal and in the journal,
    # which adds its own timestamps.
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="pkglayer: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except PkglayerError as e:
        print(f"pkglayer: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"pkglayer: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pkglayer: interrupted; no partial blob was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
