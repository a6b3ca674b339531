"""The `pkglayer` command: a thin face over the pipeline in `pkglayer.build`."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import sys
import threading

from . import __version__
from .config import COMPRESSIONS, BuildSettings, load_settings
from .errors import PkglayerError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing takes ~3 ms to load: annotations only
    from typing import Any, NoReturn

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
  pkglayer build --from containers-storage:localhost/app \\
      --output containers-storage:localhost/app:layered --compression none
  pkglayer build ./rootfs --output oci-archive:- | podman load
"""


class _SourceFormats:
    """--format's choices, from the package sources when argparse first needs them (to
    check a value, or for help; they take ~15 ms to load): a build answered from its
    memo loads no source, even with --format none."""

    def _names(self) -> list[str]:
        from .sources import source_formats

        return [*source_formats(), "none"]

    def __contains__(self, name: object) -> bool:
        return name == "none" or name in self._names()

    def __iter__(self):  # noqa: ANN204
        return iter(self._names())


def _settings_from_args(args: argparse.Namespace) -> BuildSettings:
    settings = load_settings(args.config)
    changes: dict[str, Any] = {}
    if args.source_date_epoch is not None:
        changes["source_date_epoch"] = args.source_date_epoch
    elif os.environ.get("SOURCE_DATE_EPOCH"):
        changes["source_date_epoch"] = _epoch_from_env()
    if args.exclude:
        changes["extra_excludes"] = settings.extra_excludes + tuple(args.exclude)
    if args.jobs is not None:
        changes["jobs"] = args.jobs
    if args.format is not None:
        changes["package_format"] = args.format
    if args.no_hash_cache:
        changes["hash_cache"] = ""
    if args.component:
        from .usercomponents import spec_from_argument

        changes["components"] = settings.components + tuple(spec_from_argument(c) for c in args.component)
    if args.big_file_size is not None:
        changes["big_file_size"] = args.big_file_size
    if getattr(args, "verify_reused", False):
        changes["verify_reused"] = True
    if args.hash_package_files:
        changes["hash_package_files"] = True
    for name in ("compression", "max_layers"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    level = getattr(args, "level", None)
    if level is not None:
        comp = changes.get("compression", settings.compression)
        if comp == "none":
            raise PkglayerError("--level does not apply to --compression none")
        changes["gzip_level" if comp == "gzip" else "zstd_level"] = level
    return settings._replace(**changes).validated()


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


def _component_json(c) -> dict[str, Any]:
    return {
        "name": c.name,
        "origin": c.origin or None,
        "packages": list(c.packages),
        "size": c.size,
        "weekly": round(c.rate.weekly, 4),
        "evidence": c.rate.explain(),
    }


def _scan_summary(own) -> dict[str, Any]:
    from .components import find_components
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
                "origin": own.origin(key),
                "files": len(objs),
                "bytes": own.home_bytes(key),
                "missing": len(own.missing.get(key, [])),
            }
        )
    components = [c for c in find_components(own) if not c.special]
    return {
        "format": own.source_format,
        "architecture": own.architecture,
        "packages": packages,
        "components": [_component_json(c) for c in components],
        "homes": {
            h: {"files": len(own.homes.get(h, [])), "bytes": own.home_bytes(h)} for h in SPECIAL_HOMES
        },
        "modified": own.modified,
        "unowned": own.unowned,
        "excluded": own.excluded,
        "skipped": [{"path": p, "reason": r} for p, r in own.skipped],
        "shared": own.shared,
        "dropped": [{"package": k, "reason": why} for k, why in own.dropped],
        "warnings": list(own.warnings),
        "counts": {
            "packages": len(own.packages),
            "components": len(components),
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
    print(f"{'package':<50} {'origin':<8} {'files':>7} {'bytes':>10}")
    for p in summary["packages"]:
        print(f"{p['key']:<50} {p['origin']:<8} {p['files']:>7} {_human(p['bytes']):>10}")
    for home, v in summary["homes"].items():
        print(f"[{home}]{'':<{58 - len(home)}}{v['files']:>7} {_human(v['bytes']):>10}")
    print()
    _print_components(summary["components"])
    print(
        f"{c['packages']} packages in {c['components']} components, {c['objects']} objects; "
        f"{c['modified']} modified, {c['unowned']} unowned, {c['excluded']} excluded, "
        f"{c['missing']} listed but absent"
    )
    for item in summary["dropped"]:
        print(f"left to the distro: {item['package']}: {item['reason']}")
    for path in summary["modified"]:
        print(f"modified: /{path}")
    for path in summary["excluded"]:
        print(f"excluded: /{path}")
    for item in summary["skipped"]:
        print(f"skipped: /{item['path']}: {item['reason']}")
    return 0


def _print_components(components: list[dict[str, Any]]) -> None:
    print(f"{'component':<40} {'origin':<8} {'size':>9} {'p/week':>7}  evidence")
    for comp in components:
        print(
            f"{comp['name'][:40]:<40} {comp['origin'] or '':<8} {_human(comp['size']):>9} "
            f"{comp['weekly']:>7.3f}  {comp['evidence']}"
        )


def _labels(values: list[str] | None) -> tuple[dict[str, str], list[str]]:
    """--label KEY=VALUE sets a label, --label KEY- removes one."""
    labels: dict[str, str] = {}
    removed: list[str] = []
    for v in values or []:
        if "=" not in v and v.endswith("-") and len(v) > 1:
            removed.append(v[:-1])
        else:
            key, value = _key_value(v, "--label")
            labels[key] = value
    return labels, removed


def _image_options(args: argparse.Namespace, source_runtime, bootc: bool, work, opts, limits):
    """The output image's config: --config-from (else the --from image's), the command
    line's settings on top, the labels it removes; for a bootc image, the ostree labels
    (they describe the repository left out)."""
    from .imageconfig import config_from, merge_config, ostree_labels
    from .layout import ImageOptions
    from .transports import inspect, parse_image_ref

    labels, removed = _labels(args.label)
    cli = ImageOptions(
        env=list(args.env or []),
        labels=labels,
        cmd=_command_words(args.cmd, "--cmd"),
        entrypoint=_command_words(args.entrypoint, "--entrypoint"),
        workdir=args.workdir,
        user=args.user,
    )
    for e in cli.env:
        _key_value(e, "--env")
    if args.config_from:
        runtime = config_from(
            args.config_from, lambda ref: inspect(parse_image_ref(ref, "--config-from"), work, opts, limits)
        )
    else:
        runtime = source_runtime
    if bootc:
        stale = [k for k in ostree_labels(runtime) if k not in labels]
        if stale:
            log.warning("bootc image: dropping the labels of the ostree repository left out: %s", ", ".join(stale))
        removed += stale
    return merge_config(runtime, cli, removed)


def cmd_build(args: argparse.Namespace) -> int:
    from .memo import BuildMemo

    settings = _settings_from_args(args)
    memo = BuildMemo.for_build(args, settings)
    if memo is not None:
        answer = memo.answer()
        if answer is not None:
            # Nothing the last build read has changed: its answer holds (memo.py).
            log.info("nothing changed since the last build of this command: answering from its memo %s", memo.path)
            for warning in answer["warnings"]:
                log.warning("%s", warning)
            return _print_build(args, answer)
        memo.forget()
    return _build(args, settings, memo)


def _build(args: argparse.Namespace, settings: BuildSettings, memo) -> int:
    from .build import build
    from .fsutil import Workspace
    from .inputs import is_ostree_tree, open_inputs
    from .keptscan import DiskScans, LastKept
    from .memo import location_stamps
    from .outputs import ImageContent, parse_outputs, write_outputs
    from .prior import resolve_prior

    reporter = _ProgressReporter(enabled=not (args.quiet or args.json))
    opts = _registry_options(args)
    limits = _limits(args)
    scans = LastKept(DiskScans.for_settings(settings))
    try:
        with Workspace(args.tmpdir) as work:
            outputs = parse_outputs(args.output, args.layers, work)
            if args.json and any(d.is_stdout for d in outputs.destinations):
                raise PkglayerError("--json and --output oci-archive:- both want standard output")
            # The outputs' directories hold the prior: a memo needs them as this build found them.
            locations = [os.path.abspath(d) for d in (outputs.layers_dir, outputs.layout and outputs.layout[0]) if d]
            if outputs.destinations or outputs.staged:
                memo = None
            before = location_stamps(locations) if memo is not None else {}
            # A bad prior fails before a long unpack.
            prior = resolve_prior(outputs.prior_request(args.prior), work, opts, limits)
            inputs = open_inputs(args.rootfs, args.source, work, limits, reporter, opts)
            if inputs.unpacked:  # a fresh temporary tree never hits the digest cache
                settings = settings._replace(hash_cache="")
            bootc = args.bootc or is_ostree_tree(inputs.rootfs)
            if bootc:
                # The ostree repository (and the deployments in sysroot) describe the
                # image as it was; the container image is the tree itself.
                # An ostree checkout sets every mtime to 0: content tells edits apart.
                log.warning("bootc/ostree image: leaving out the contents of /sysroot")
                settings = settings._replace(extra_excludes=(*settings.extra_excludes, "sysroot/**"),
                                             compare_mtimes=False)
                memo = None
            options = _image_options(args, inputs.image.runtime if inputs.image else None, bootc, work, opts, limits)
            result = build(inputs.rootfs, settings, prior, outputs.new_blobs(), platform=inputs.platform,
                           progress=reporter, replan=args.replan, scans=scans)
            if _UntilExit.held is not None:
                _UntilExit.held.extend((result, scans))
            report = write_outputs(ImageContent.of_build(result, prior), outputs, options,
                                   settings.source_date_epoch, opts, limits)
    finally:
        reporter.close()
    answer = {
        **result.as_json(), **report.as_json(), "source": inputs.source.as_json() if inputs.source else None,
        "unchanged": False,
    }
    if memo is not None:
        memo.record(answer, scans.last, locations, before)
    # With the image on standard output, the summary goes to standard error.
    say = sys.stderr if any(d.is_stdout for d in outputs.destinations) else sys.stdout
    return _print_build(args, answer, say, outputs.staged, report.push)


def _print_build(args: argparse.Namespace, answer: dict[str, Any], say=None, staged: bool = False,
                 push=None) -> int:
    """A build's answer: its JSON (--json), else a line per layer and a summary."""
    from .timings import summary

    if args.json:
        # One write: json.dump would write each of thousands of pieces on its own.
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
        return 0
    say = say or sys.stdout
    layers = answer["layers"]
    if not args.quiet:
        for layer in layers:
            state = "reused " if layer["reused"] else "written"
            print(f"{state} {layer['digest'][7:19]} {_human(layer['size']):>10}  {layer['name']}", file=say)
    unchanged = " (nothing changed since the last build)" if answer["unchanged"] else ""
    print(
        f"{len(layers)} layers ({answer['written']} written, {answer['reused']} reused), "
        f"{_human(sum(layer['size'] for layer in layers))} compressed, {answer['seconds']:.1f} s{unchanged}",
        file=say,
    )
    if not args.quiet:
        print(summary(answer["timings"], answer["outputSeconds"]), file=say)
    source = answer["source"]
    if source:
        print(f"from {source['ref']} ({source['layers']} layers, {source['entries']} entries)", file=say)
    _print_outputs(answer, staged, push, say)
    return 0


def _print_outputs(report: dict[str, Any], staged: bool, push, say) -> None:
    """Where the image went (`report`: an OutputReport's JSON): the layout (unless a staged
    one), every other destination (but standard output), the push figures, the /layers
    history."""
    if report["manifestDigest"] and not staged:
        print(f"image {report['image']} manifest {report['manifestDigest']}", file=say)
    for dest in report["published"]:
        if dest != "oci-archive:-":
            print(f"wrote {dest}", file=say)
    if push:
        _print_push(push, say)
    if report["history"]:
        print(f"history {report['history']}", file=say)


def _plan_options(group) -> None:
    group.add_argument(
        "--max-layers", type=int, metavar="N", help="layer budget, top layers included (default 64)"
    )
    group.add_argument(
        "--prior",
        metavar="SOURCE",
        help="earlier build whose layer plan to keep stable: a history.json, a /layers directory, or "
        "an image built by pkglayer (any transport) whose config carries the plan; when the one output is "
        "the registry repository or local store the prior image is in, its unchanged layers are neither "
        "written nor uploaded (default: the --layers history, else the earlier image of the output)",
    )
    group.add_argument(
        "--replan", action="store_true", help="plan afresh, ignoring where the prior plan put each package"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from .build import plan_rootfs
    from .fsutil import Workspace
    from .prior import PriorRequest, resolve_prior

    settings = _settings_from_args(args)
    reporter = _ProgressReporter(enabled=not (args.quiet or args.json))
    with Workspace() as work:
        prior = resolve_prior(PriorRequest(explicit=args.prior), work, _registry_options(args), _limits(args))
    try:
        ownership, components, plan = plan_rootfs(args.rootfs, settings, prior, replan=args.replan, progress=reporter)
    finally:
        reporter.close()
    by_name = {c.name: c for c in components}
    layers = [
        {
            "name": layer.name,
            "components": [_component_json(by_name[c]) for c in (layer.components or (layer.name,))],
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
    others = [c for layer in layers for c in layer["components"]
              if c["origin"] and c["origin"] != ownership.source_format]
    if others:
        print("\ncomponents beyond the package database:")
        _print_components(others)
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


def _print_push(report, out=None) -> None:
    out = out or sys.stdout
    if report.uploaded_blobs is None:
        print(f"pushed {report.destination} manifest {report.manifest_digest} "
              "(could not ask the registry which blobs it already had)", file=out)
        return
    print(f"pushed {report.destination} manifest {report.manifest_digest}: "
          f"{report.uploaded_blobs} blobs uploaded ({_human(report.uploaded_bytes)}), "
          f"{report.skipped_blobs} already there ({_human(report.skipped_bytes)})", file=out)


def cmd_push(args: argparse.Namespace) -> int:
    from .fsutil import Workspace
    from .transports import fetch, parse_image_ref, publish

    source = parse_image_ref(args.source, "source")
    dest = parse_image_ref(args.destination, "destination")
    if dest.is_layout:
        raise PkglayerError(f"destination {dest}: copy into an oci: layout with skopeo copy; push writes elsewhere")
    with Workspace() as work:
        layout, tag = fetch(source, work, "source", _registry_options(args))
        if tag is None:
            from .layout import open_layout, tag_of

            tag = tag_of(layout, open_layout(layout, None, _limits(args)).manifest_digest)
        report = publish(layout, tag, dest, _registry_options(args), _limits(args))
    if args.json:
        json.dump(report.as_json() if report else {"destination": dest.text}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif report:
        _print_push(report)
    elif not dest.is_stdout:
        print(f"wrote {dest}")
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from . import layersdir
    from .fsutil import Workspace
    from .outputs import ImageContent, parse_outputs, write_outputs
    from .transports import parse_image_ref

    opts, limits = _registry_options(args), _limits(args)
    with Workspace(args.tmpdir) as work:
        if args.layers_command == "init":
            init = layersdir.init(args.dir, parse_image_ref(args.source, "--from"), work, opts, limits)
            if args.json:
                json.dump(init.as_json(), sys.stdout, indent=2)
                sys.stdout.write("\n")
            elif init.image is None:
                print(f"{args.source}: no such image yet; {args.dir}/input is empty (a first build)")
            else:
                origin = "its plan label" if init.from_plan_label else "its config history"
                print(f"{args.dir}: the blobs of {init.blobs} of the {init.layers} layers of {init.image} in "
                      f"input/, history.json from {origin}")
            return 0
        outputs = parse_outputs(args.output, None, work)
        if args.json and any(d.is_stdout for d in outputs.destinations):
            raise PkglayerError("--json and --output oci-archive:- both want standard output")
        assembled = layersdir.assemble(args.dir, limits)
        options = _image_options(args, None, False, work, opts, limits)
        content = ImageContent(
            history=assembled.history, platform=assembled.platform, blob_sources=assembled.blob_sources,
            fresh=frozenset(rec.digest for rec in assembled.history.layers),  # every blob was just checked
        )
        epoch = args.source_date_epoch if args.source_date_epoch is not None else _epoch_from_env()
        report = write_outputs(content, outputs, options, epoch, opts, limits)
    if args.json:
        json.dump({"layers": len(assembled.history.layers), **report.as_json()}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    say = sys.stderr if any(d.is_stdout for d in outputs.destinations) else sys.stdout
    print(f"{len(assembled.history.layers)} layers checked (digest, size, diff_id)", file=say)
    _print_outputs(report.as_json(), outputs.staged, report.push, say)
    return 0


def _epoch_from_env() -> int:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return 0
    try:
        return int(epoch)
    except ValueError:
        raise PkglayerError(f"SOURCE_DATE_EPOCH must be an integer, not {epoch!r}") from None


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
        choices=_SourceFormats(),
        metavar="FORMAT",  # not the choices: argparse would list them while building the parser
        help="package database to read (%(choices)s) when the rootfs has several "
        "(default: detect; none: read no distro database; pip's records are read beside any)",
    )
    p.add_argument(
        "--no-hash-cache",
        action="store_true",
        help="hash every file anew instead of trusting the digest cache (inode, size, mtime, ctime)",
    )
    p.add_argument(
        "--hash-package-files",
        action="store_true",
        help="tell edited package files by their content alone: hash even those dpkg's file list is newer "
        "than (by ctime and mtime), which are otherwise taken as installed",
    )
    p.add_argument(
        "--component",
        action="append",
        metavar="NAME=GLOB",
        help="unowned paths matching GLOB (a matching directory with what is below it) form component NAME, "
        "as a [[component]] table does; repeatable",
    )
    p.add_argument(
        "--big-file-size",
        type=_size,
        metavar="SIZE",
        help="unowned files of at least SIZE get a component (and layer) of their own (default 1Mi)",
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


def _output_option(group) -> None:
    group.add_argument(
        "--output", "-o", action="append", metavar="IMAGE",
        help="where the image goes; repeatable: at most one oci:DIR[:TAG] layout (tag defaults to latest; "
        "written first, the others are copied from it), and any of docker://REF, "
        "containers-storage:[DRIVER@ROOT+RUNROOT]NAME[:TAG], oci-archive:PATH[:TAG] (- is standard output, "
        "for | podman load), docker-archive:PATH[:NAME:TAG]",
    )


def _image_config_options(img) -> None:
    img.add_argument("--config-from", metavar="IMAGE|FILE|-",
                     help="take Env, Cmd, Entrypoint, Labels, WorkingDir, User, ExposedPorts, Volumes and "
                     "StopSignal from another image (any transport) or JSON in a file or on standard input (an "
                     "image config, or podman/docker inspect output) instead of the --from image; the options "
                     "below go on top")
    img.add_argument("--label", action="append", metavar="KEY=VALUE|KEY-",
                     help="set an image label, or remove one (KEY-); repeatable")
    img.add_argument(
        "--env", action="append", metavar="KEY=VALUE", help="environment variable; repeatable (default PATH only)"
    )
    img.add_argument(
        "--cmd", metavar="CMD", help='default command: JSON array (\'["/bin/sh"]\') or a shell-quoted string'
    )
    img.add_argument("--entrypoint", metavar="CMD", help="entrypoint, same forms as --cmd")
    img.add_argument("--workdir", metavar="DIR", help="working directory")
    img.add_argument("--user", metavar="USER", help="user[:group] to run as")


def _build_command(sub, summary: str) -> None:
    b = sub.add_parser(
        "build",
        help=summary,
        description="Write one layer per package (within --max-layers), reusing unchanged layers.\n"
        "A build that finds its tree, settings and outputs as the last build of the same command\n"
        "left them, having written nothing, answers from that build's memo (--no-memo: build anyway).",
        epilog=_BUILD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(b, rootfs_optional=True)
    b.add_argument("--from", dest="source", metavar="IMAGE",
                   help="rechunk an image instead of a directory, from any transport (oci:, docker://, "
                   "containers-storage:, oci-archive:, docker-archive:); its configuration is kept unless "
                   "overridden")
    b.add_argument("--bootc", action="store_true",
                   help="a bootc/ostree image: leave out /sysroot's contents (the ostree repository) and its "
                   "stale ostree.* labels (automatic when the tree has sysroot/ostree/repo)")
    b.add_argument("--tmpdir", metavar="DIR", help=f"where to unpack --from images and stage other "
                   f"outputs (default $TMPDIR or {'/var/tmp'}); removed afterwards")
    b.add_argument("--no-memo", action="store_true",
                   help="build even when nothing it reads changed since the last build of the same command "
                   "(by default such a build is answered from that one, with no layer read or written)")
    b.add_argument("--max-image-size", type=_size, metavar="SIZE",
                   help="refuse source images larger than this uncompressed (default 64Gi; "
                   "k/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024)")
    out = b.add_argument_group("output (at least one)")
    _output_option(out)
    out.add_argument(
        "--layers",
        metavar="DIR",
        help="/layers protocol: read DIR/history.json and DIR/input/blobs, write new blobs "
        "to DIR/output/blobs and a new DIR/history.json",
    )
    lay = b.add_argument_group("layers")
    lay.add_argument(
        "--compression", choices=COMPRESSIONS,
        help="layer compression (default gzip, the most compatible; none for outputs that go straight "
        "into local storage, which keeps layers uncompressed)"
    )
    lay.add_argument(
        "--level", type=int, metavar="N",
        help=f"compression level of the layers written (default gzip {BuildSettings().gzip_level}, zstd "
        f"{BuildSettings().zstd_level}); reused layers keep the level they were made with",
    )
    lay.add_argument("--verify-reused", action="store_true",
                     help="read each reused blob through once and reuse it only if it holds the layer its "
                     "history says (for input/ or layouts from elsewhere; see docs/security.md)")
    _plan_options(lay)
    _image_config_options(b.add_argument_group("image config"))
    _registry_flags(b)
    b.set_defaults(func=cmd_build)



def _push_command(sub, summary: str) -> None:
    p = sub.add_parser(
        "push",
        help=summary,
        description="Copy an image from any transport to another with skopeo (to a registry: digests "
        "preserved, blobs the registry already has are not uploaded, and the report says what was).",
    )
    p.add_argument("source", metavar="IMAGE", help="oci:, docker://, containers-storage:, oci-archive:, "
                   "docker-archive:")
    p.add_argument("destination", metavar="IMAGE", help="docker://, containers-storage:, oci-archive: "
                   "(- for standard output), docker-archive:")
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is happening")
    p.add_argument("--max-image-size", type=_size, metavar="SIZE", help=argparse.SUPPRESS)
    _registry_flags(p)
    p.set_defaults(func=cmd_push)



def _layers_command(sub, summary: str) -> None:
    ly = sub.add_parser(
        "layers",
        help=summary,
        description="init fills DIR/input and DIR/history.json from the previous image of a tag; the "
        "producer inside the build (pkglayer build --layers DIR, or any other) writes DIR/output and a "
        "new DIR/history.json; assemble makes the image from them, checking every blob. The contract "
        "for producers is in docs/history-json.md.",
        epilog="examples:\n  pkglayer layers init /layers --from containers-storage:localhost/app:latest\n"
        "  buildah build -v /layers:/layers ...   # runs pkglayer build /rootfs --layers /layers\n"
        "  pkglayer layers assemble /layers --output containers-storage:localhost/app:latest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lsub = ly.add_subparsers(dest="layers_command", required=True, metavar="ACTION")
    li = lsub.add_parser("init", help="fill DIR/input and DIR/history.json from an image",
                         description="A missing image is a first build: input/ stays empty and no history "
                         "is written. Blobs are hard-linked only from a private copy, never from a "
                         "published layout.")
    li.add_argument("dir", metavar="DIR")
    li.add_argument("--from", dest="source", metavar="IMAGE", required=True,
                    help="the previous image of the tag, any transport")
    la = lsub.add_parser("assemble", help="make an image from DIR/history.json and its blobs",
                         description="Every blob history.json names is taken from DIR/output or DIR/input and "
                         "checked against its digest, size and diff_id; a missing or wrong blob is a one-line "
                         "error naming the layer, and nothing is written.")
    la.add_argument("dir", metavar="DIR")
    _output_option(la)
    la.add_argument("--source-date-epoch", type=int, metavar="SECONDS",
                    help="image timestamps (default: $SOURCE_DATE_EPOCH or 0)")
    _image_config_options(la.add_argument_group("image config"))
    for x in (li, la):
        x.add_argument("--tmpdir", metavar="DIR", help="where to copy images (default $TMPDIR or /var/tmp)")
        x.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
        x.add_argument("-v", "--verbose", action="store_true", help="log what is happening")
        x.add_argument("--max-image-size", type=_size, metavar="SIZE", help=argparse.SUPPRESS)
        _registry_flags(x)
    ly.set_defaults(func=cmd_layers)



def _scan_command(sub, summary: str) -> None:
    s = sub.add_parser(
        "scan",
        help=summary,
        description="Read the package database and walk the rootfs; write nothing.",
    )
    _common(s)
    s.set_defaults(func=cmd_scan)



def _plan_command(sub, summary: str) -> None:
    pl = sub.add_parser(
        "plan",
        help=summary,
        description="Group packages by source into at most --max-layers layers, minimising the bytes a "
        "client re-downloads per update; with --prior, keep the earlier plan stable. Writes nothing.",
        epilog=_PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(pl)
    _plan_options(pl.add_argument_group("plan"))
    pl.set_defaults(func=cmd_plan)



def _diff_command(sub, summary: str) -> None:
    df = sub.add_parser(
        "diff",
        help=summary,
        description="Compare two builds: each a history.json, a /layers directory or oci:DIR[:TAG].",
    )
    df.add_argument("old", help="the earlier build")
    df.add_argument("new", help="the later build")
    df.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    df.set_defaults(func=cmd_diff)



def _daemon_command(sub, summary: str) -> None:
    d = sub.add_parser(
        "daemon",
        help=summary,
        description="Watch the package databases of the configured roots, prebuild their layers into a "
        "shared cache, and serve the control API on a Unix socket (see `pkglayer ctl`).",
    )
    d.add_argument("--config", metavar="FILE", default="/etc/pkglayer/pkglayer.toml",
                   help="TOML configuration with [daemon] and [[root]] (default: %(default)s)")
    d.set_defaults(func=cmd_daemon, verbose=False)



def _ctl_command(sub, summary: str) -> None:
    c = sub.add_parser(
        "ctl",
        help=summary,
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


# Each command's one-line summary (the top-level help lists them) and what fills in its parser.
_COMMANDS = {
    "build": ("write an OCI image and/or /layers blobs from a rootfs", _build_command),
    "push": ("copy an image to a registry, local storage or an archive, reporting what was uploaded", _push_command),
    "layers": ("the build system's half of the /layers protocol: init before a build, assemble after", _layers_command),
    "scan": ("report packages, bytes per package, modified/unowned/excluded paths", _scan_command),
    "plan": ("show which packages would share which layer, and why", _plan_command),
    "diff": ("which layers changed between two builds, why, and the bytes a client downloads", _diff_command),
    "daemon": ("watch roots and keep their layers ready (systemd service)", _daemon_command),
    "ctl": ("talk to the daemon: health, status, roots, build", _ctl_command),
}


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command's parser. Given the command a command line names, the others are left
    out (nothing but their own parsers would use them): building all of them took 4-11 ms
    of every command's start."""
    parser = argparse.ArgumentParser(
        prog="pkglayer",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Where the package was imported from, as pip does: which of several installs (or a
    # checkout on sys.path) answers is otherwise hard to tell.
    here = os.path.dirname(os.path.abspath(__file__))
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    parser.add_argument("--version", action="version", version=f"pkglayer {__version__} from {here} (python {py})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, fill) in _COMMANDS.items():
        if command in (None, name):
            fill(sub, summary)
    return parser


def _named_command(argv: list[str]) -> str | None:
    """The command a command line names: its first word that is not an option (the
    top-level options take no value); None when it names none that exists."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in _COMMANDS else None
        if word == "--":
            return None
    return None


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


def run() -> NoReturn:
    """The `pkglayer` command: main(), then an exit that skips tearing the interpreter
    down when nothing else runs (unloading every module and its caches took ~10 ms of
    each command, 4% of an unchanged rebuild), nor freeing what a build made: its scan,
    databases and ownership, some 100,000 objects, 15 ms of every build, are held
    (_UntilExit) for the exit to drop. Output is flushed first; atexit handlers are
    logging's, run here."""
    _UntilExit.held = []
    code = main()
    if threading.active_count() == 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class _UntilExit:
    # What a command made, kept alive for run()'s os._exit to drop (None: freed as usual,
    # main() being called by a process that goes on).
    held: list[object] | None = None


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
    if argv is None:
        argv = sys.argv[1:]
    args = make_parser(_named_command(argv)).parse_args(argv)
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
