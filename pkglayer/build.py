"""The build pipeline: rootfs -> package source -> ownership -> plan -> tar -> blobs/image.

Faces (CLI, daemon) call `build()`; nothing here knows about them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from . import __version__
from .arch import oci_platform
from .blobstore import BlobDir
from .components import Component, find_components, observe
from .config import BuildSettings
from .digests import CONTENT_HASH
from .errors import PkglayerError
from .hashcache import HashCache
from .history import ComponentRecord, History, LayerRecord, dumps_history, load_history, save_history
from .oci import HISTORY_LABEL, ImageConfig, ImageResult, parse_oci_ref, prior_image, write_image
from .ownership import Ownership, Progress, scan
from .plan import Plan, PlannedLayer, plan_layers, prior_groups
from .pristine import is_pristine_layer
from .rootfs import Rootfs
from .sources import open_source
from .tarwriter import MEDIA_TYPES, TAR_FORMAT, Member, content_key, layer_members, write_layer
from .zstd_chunked import read_annotations

log = logging.getLogger(__name__)

MAX_HISTORY_LABEL = 1 << 20


class LayerCache(Protocol):
    """A shared store of layer blobs keyed by (content key, compression spec), such as
    the daemon's (pkglayer.daemon.cache). `build()` consults it before writing a layer
    and feeds it every layer it writes; the pipeline never imports an implementation."""

    blobs: BlobDir

    def lookup(self, content_key: str, compression: str) -> LayerRecord | None:
        """A record (digest, diff_id, size, media_type) whose blob is in `blobs`, or None."""

    def claim(self, content_key: str, compression: str):  # -> ContextManager[None]
        """Held while one writer produces this key, so concurrent builds write it once."""

    def add(self, record: LayerRecord, source: BlobDir) -> None:
        """Take the blob `record.digest` from `source` (just written, trusted) into the cache."""

    def export(self, digest: str, dest: BlobDir) -> None:
        """Make the cached blob present in `dest` (a hard link where possible). Cached blobs
        are trusted like fresh ones: only the cache's owner writes them, always by rename."""


@dataclass
class ImageOptions:
    env: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    workdir: str | None = None
    user: str | None = None
    exposed_ports: dict[str, dict] | None = None
    volumes: dict[str, dict] | None = None
    stop_signal: str | None = None
    # The platform of a source image (--from); None: from the package database.
    architecture: str | None = None
    os: str | None = None
    variant: str | None = None


@dataclass
class LayerOutcome:
    record: LayerRecord
    reused: bool
    files: int
    cached: bool = False  # taken from the layer cache (reused is then True too)


@dataclass
class BuildResult:
    ownership: Ownership
    plan: Plan
    layers: list[LayerOutcome]
    architecture: str
    image: ImageResult | None = None
    oci_ref: str | None = None
    history_path: str | None = None
    rejected_inputs: list[str] = field(default_factory=list)
    # layer blobs the OCI layout lacks because they are reused from the destination registry
    external_blobs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return sum(1 for o in self.layers if not o.reused)

    @property
    def reused(self) -> int:
        return sum(1 for o in self.layers if o.reused)


def scan_rootfs(
    rootfs: Rootfs,
    settings: BuildSettings,
    hash_content: bool = False,
    cache: HashCache | None = None,
    progress: Progress | None = None,
) -> Ownership:
    source = open_source(rootfs, settings.package_format)
    log.info(
        "reading %s", f"{source.format} database" if source else "rootfs without a package database"
    )
    return scan(
        rootfs,
        source,
        excludes=settings.all_excludes,
        drop_xattrs=settings.drop_xattrs,
        one_file_system=settings.one_file_system,
        jobs=settings.jobs,
        hash_content=hash_content,
        cache=cache,
        progress=progress,
    )


def _plan(
    ownership: Ownership,
    settings: BuildSettings,
    prior: Sequence[LayerRecord],
    observed: Mapping[str, ComponentRecord],
    replan: bool,
) -> tuple[list[Component], Plan]:
    components = find_components(ownership, observed)
    plan = plan_layers(
        components,
        settings.max_layers,
        prior_groups(prior, components),
        horizon=settings.replan_horizon,
        replan=replan,
    )
    return components, plan


def plan_rootfs(
    rootfs_path: str,
    settings: BuildSettings,
    prior_history: History | None = None,
    replan: bool = False,
    progress: Progress | None = None,
) -> tuple[Ownership, list[Component], Plan]:
    """Scan and plan without writing anything (`pkglayer plan`)."""
    settings = settings.validated()
    with Rootfs(rootfs_path) as rootfs:
        ownership = scan_rootfs(rootfs, settings, progress=progress)
    prior = prior_history.layers if prior_history else ()
    observed = prior_history.components if prior_history else {}
    components, plan = _plan(ownership, settings, prior, observed, replan)
    return ownership, components, plan


def _with_history_label(labels: dict[str, str], history: History) -> dict[str, str]:
    """The labels plus the plan (HISTORY_LABEL), which overrides one carried over from a
    source image. Left out, with a warning, if it would make the config unreasonably big."""
    value = history_label(history)
    out = {k: v for k, v in labels.items() if k != HISTORY_LABEL}
    if len(value) > MAX_HISTORY_LABEL:
        log.warning("plan label would be %d bytes; leaving it out of the config", len(value))
        return out
    out[HISTORY_LABEL] = value
    return out


def history_label(history: History) -> str:
    """The history.json of the build as one compact line (same fields, no whitespace)."""
    obj = json.loads(dumps_history(history))
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build(
    rootfs_path: str,
    settings: BuildSettings,
    oci_ref: str | None = None,
    layers_dir: str | None = None,
    image: ImageOptions | None = None,
    progress: Progress | None = None,
    prior_history: History | None = None,
    replan: bool = False,
    layer_cache: LayerCache | None = None,
    prebuild: bool = False,
    remote_blobs: Collection[str] = (),
    prior_sources: Sequence[BlobDir] = (),
) -> BuildResult:
    """Layer `rootfs_path` into an OCI layout (`oci_ref`) and/or a /layers directory.

    `prior_history` is an earlier build's plan (from --prior, or a registry): the planner
    keeps its layer assignment stable, and its layers are reuse candidates. Without it,
    the history in `layers_dir`, else the earlier image of the tag, is the prior plan.
    `replan` ignores the prior plan's assignment (its blobs are still reused).

    `layer_cache`: layers found there are not written again, written layers are added to
    it. `prebuild` (implied by a cache and no output at all): every layer not yet in the
    cache is written into it, and no image or history is produced; outputs named are
    only read, for the prior plan and reusable blobs, so the later real build plans the
    same layers.

    `prior_sources` are extra blob directories holding prior layers. `remote_blobs` are
    layer digests known to be in the registry the image will be pushed to: a prior layer
    with such a digest is reused on an exact content-key match without a local blob, and
    the OCI layout written then lacks it (push it with skopeo to that registry)."""
    prebuild = layer_cache is not None and (prebuild or not (oci_ref or layers_dir))
    if not oci_ref and not layers_dir and layer_cache is None:
        raise PkglayerError("nothing to do: give --output oci:DIR[:TAG] and/or --layers DIR")
    settings = settings.validated()
    started = time.monotonic()
    oci_dir, oci_tag = parse_oci_ref(oci_ref) if oci_ref else (None, None)

    # Read everything that can be wrong before writing anything.
    prior: list[LayerRecord] = []
    inputs: list[BlobDir] = list(prior_sources)
    remote = frozenset(remote_blobs)
    # The plan to keep stable: the first of --prior, the /layers history, the earlier image.
    plan_source: History | None = prior_history
    if prior_history is not None:
        prior.extend(prior_history.layers)
    if layers_dir:
        if not os.path.isdir(layers_dir) and not prebuild:
            os.makedirs(layers_dir, exist_ok=True)
        history = load_history(os.path.join(layers_dir, "history.json"))
        if history is not None:
            prior.extend(history.layers)
            plan_source = plan_source or history
        for sub in ("input", "output") if prebuild else ("input",):
            if os.path.isdir(os.path.join(layers_dir, sub)):
                inputs.append(BlobDir(os.path.join(layers_dir, sub)))

    earlier: list[LayerRecord] = []
    earlier_observed: dict[str, ComponentRecord] = {}
    if oci_dir and os.path.isdir(oci_dir):
        # Writing over an earlier build of this tag: its blobs are candidates too.
        earlier, earlier_observed = prior_image(oci_dir, oci_tag)
        if earlier:
            inputs.append(BlobDir(oci_dir))
            prior.extend(earlier)
    plan_records = plan_source.layers if plan_source else tuple(earlier)

    with Rootfs(rootfs_path) as rootfs:
        cache = HashCache(settings.hash_cache_path)
        cache.load(rootfs.path)
        # Content keys are needed before writing only when there is something to reuse.
        ownership = scan_rootfs(
            rootfs, settings, hash_content=bool(prior) or layer_cache is not None, cache=cache, progress=progress
        )
        log.info("digest cache: %d files unchanged since they were last hashed", cache.hits)
        arch, variant = oci_platform(ownership.architecture, rootfs)
        observed = plan_source.components if plan_source else earlier_observed
        components, the_plan = _plan(ownership, settings, plan_records, observed, replan)
        plan = the_plan.layers
        log.info(
            "%d packages in %d components, %d objects -> %d layers; %s",
            len(ownership.packages), sum(not c.special for c in components), len(ownership.objects),
            len(plan), the_plan.decision,
        )

        if prebuild:
            assert layer_cache is not None
            output = layer_cache.blobs
        else:
            output = BlobDir(os.path.join(layers_dir, "output") if layers_dir else oci_dir, create=True)
        members = {
            layer.name: layer_members(
                (o for h in layer.homes for o in ownership.homes[h]),
                ownership.objects,
                settings.source_date_epoch,
                with_root=settings.compression == "zstd:chunked",
            )
            for layer in plan
        }
        keys = {name: content_key(ms) for name, ms in members.items()}

        write_started = time.time()
        outcomes, rejected = _reuse_or_write(
            rootfs, ownership, plan, members, keys, prior, inputs, output, settings, progress, layer_cache,
            remote,
        )
        for obj in ownership.objects.values():
            if obj.content_hash:
                cache.put(obj.st, {CONTENT_HASH: obj.content_hash}, write_started)
        cache.save()

    result = BuildResult(
        ownership=ownership, plan=the_plan, layers=outcomes, architecture=arch, rejected_inputs=rejected
    )
    records = [o.record for o in outcomes]
    created = _rfc3339(settings.source_date_epoch)
    if prebuild:
        result.seconds = time.monotonic() - started
        return result
    opts = image or ImageOptions()
    if opts.architecture:
        arch, variant, result.architecture = opts.architecture, opts.variant, opts.architecture
    history = History(
        layers=tuple(records),
        architecture=arch,
        os=opts.os or "linux",
        generator=f"pkglayer {__version__}",
        tar_format=TAR_FORMAT,
        components=observe(components, observed),
    )
    if oci_dir:
        env = opts.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        config = ImageConfig(
            architecture=arch,
            os=history.os,
            variant=variant,
            env=env,
            cmd=opts.cmd,
            entrypoint=opts.entrypoint,
            labels=_with_history_label(opts.labels, history),
            workdir=opts.workdir,
            user=opts.user,
            exposed_ports=opts.exposed_ports,
            volumes=opts.volumes,
            stop_signal=opts.stop_signal,
            created=created,
        )
        fresh = {o.record.digest for o in outcomes if not o.reused or o.cached}
        external = {
            o.record.digest
            for o in outcomes
            if o.reused and o.record.digest in remote and not any(d.has(o.record.digest) for d in (output, *inputs))
        }
        result.image = write_image(
            oci_dir, oci_tag, records, config, [output, *inputs], fresh=fresh, external=external
        )
        result.external_blobs = sorted(external)
        result.oci_ref = f"oci:{oci_dir}:{oci_tag}"
    if layers_dir:
        result.history_path = os.path.join(layers_dir, "history.json")
        save_history(result.history_path, history)
    result.seconds = time.monotonic() - started
    return result


def _reuse_or_write(
    rootfs: Rootfs,
    ownership: Ownership,
    plan: list[PlannedLayer],
    members: dict[str, list[Member]],
    keys: dict[str, str | None],
    prior: list[LayerRecord],
    inputs: list[BlobDir],
    output: BlobDir,
    settings: BuildSettings,
    progress: Progress | None,
    layer_cache: LayerCache | None = None,
    remote: Collection[str] = frozenset(),
) -> tuple[list[LayerOutcome], list[str]]:
    spec = settings.compression_spec
    media_type = MEDIA_TYPES[settings.compression]
    by_key: dict[str, LayerRecord] = {}
    by_packages: dict[tuple[str, ...], list[LayerRecord]] = {}
    for rec in prior:
        if rec.compression == spec and rec.media_type == media_type:
            by_key.setdefault(rec.content_key, rec)
            # An earlier image in the OCI layout records names only: a one-package
            # layer is named after its package.
            by_packages.setdefault(rec.packages or (rec.name,), []).append(rec)
    sources = (*inputs, output)

    def source_of(rec: LayerRecord) -> BlobDir | None:
        return next((d for d in sources if d.has(rec.digest) and d.verify(rec.digest)), None)

    def from_cache(key: str | None) -> LayerRecord | None:
        if layer_cache is None or key is None:
            return None
        rec = layer_cache.lookup(key, spec)
        if rec is None or rec.media_type != media_type:
            return None
        if settings.compression == "zstd:chunked" and not rec.annotations:
            # The cache records no annotations: read them back from the blob's footer.
            try:
                with open(layer_cache.blobs.path(rec.digest), "rb") as f:
                    notes = read_annotations(f, rec.size)
            except (PkglayerError, OSError) as e:
                log.warning("layer cache: blob %s: %s", rec.digest, e)
                return None
            rec = replace(rec, annotations=tuple(sorted(notes.items())))
        if output is not layer_cache.blobs and not (output.has(rec.digest) and output.size(rec.digest) == rec.size):
            try:
                layer_cache.export(rec.digest, output)
            except (PkglayerError, OSError) as e:  # evicted meanwhile: write it instead
                log.warning("layer cache: %s", e)
                return None
        return rec

    def find_reusable(layer: PlannedLayer) -> tuple[LayerRecord | None, str | None]:
        """A prior blob for this layer, or why a candidate was turned down."""
        key = keys[layer.name]
        if key is None:
            return None, None
        # The cache first: its blobs need no re-hashing (see LayerCache.export).
        cached = from_cache(key)
        if cached is not None:
            cached_names.add(layer.name)
            return cached, None
        exact = by_key.get(key)
        if exact is not None:
            if source_of(exact) is not None:
                return exact, None
            if exact.digest in remote:  # in the destination registry: reused by digest
                return exact, None
            return None, (
                f"input blob {exact.digest} for layer {layer.name} is missing or does not "
                "match its digest; rebuilding the layer"
            )
        edited = [e for key in layer.packages for e in ownership.modified_by_package.get(key, ())]
        if edited:
            expected = layer_members(
                [*(o for h in layer.homes for o in ownership.homes.get(h, [])), *(obj for obj, _ in edited)],
                ownership.objects,
                settings.source_date_epoch,
                with_root=settings.compression == "zstd:chunked",
            )
            wanted = {obj.path: (obj, rec) for obj, rec in edited}
            for rec in by_packages.get(layer.packages, []):
                src = source_of(rec)
                if src is not None and is_pristine_layer(src, rec, expected, wanted):
                    return rec, None
        return None, None

    rejected: list[str] = []
    cached_names: set[str] = set()
    outcomes: dict[str, LayerOutcome] = {}
    to_write: list[PlannedLayer] = []
    done = 0
    total = len(plan)
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        checks = {layer.name: pool.submit(find_reusable, layer) for layer in plan}
        for layer in plan:
            rec, why_not = checks[layer.name].result()
            if rec is not None:
                outcomes[layer.name] = LayerOutcome(
                    record=LayerRecord(
                        name=layer.name,
                        packages=layer.packages,
                        content_key=rec.content_key,
                        digest=rec.digest,
                        diff_id=rec.diff_id,
                        size=rec.size,
                        media_type=rec.media_type,
                        compression=rec.compression,
                        components=layer.components,
                        annotations=rec.annotations,
                    ),
                    reused=True,
                    files=len(members[layer.name]),
                    cached=layer.name in cached_names,
                )
                done += 1
                if progress:
                    progress("layers", done, total)
                continue
            if why_not:
                log.warning("%s", why_not)
                rejected.append(why_not)
            to_write.append(layer)

        level = settings.gzip_level if settings.compression == "gzip" else settings.zstd_level

        def write_one(layer: PlannedLayer) -> LayerOutcome:
            if layer_cache is None or keys[layer.name] is None:
                return write_new(layer)
            # Another build may be writing the same content right now: wait for it.
            with layer_cache.claim(keys[layer.name], spec):
                rec = from_cache(keys[layer.name])
                if rec is not None:
                    return LayerOutcome(
                        record=replace(rec, name=layer.name, packages=layer.packages),
                        reused=True,
                        files=len(members[layer.name]),
                        cached=True,
                    )
                outcome = write_new(layer)
                layer_cache.add(outcome.record, output)
                return outcome

        def write_new(layer: PlannedLayer) -> LayerOutcome:
            with output.writer() as w:
                diff_id, _, annotations = write_layer(rootfs, members[layer.name], settings.compression, level, w)
                digest, size = w.commit()
            key = keys[layer.name] or content_key(members[layer.name])
            assert key is not None  # every file was hashed while writing
            return LayerOutcome(
                record=LayerRecord(
                    name=layer.name,
                    packages=layer.packages,
                    content_key=key,
                    digest=digest,
                    diff_id=diff_id,
                    size=size,
                    media_type=media_type,
                    compression=spec,
                    components=layer.components,
                    annotations=tuple(sorted(annotations.items())),
                ),
                reused=False,
                files=len(members[layer.name]),
            )

        # Largest first, so the last layers to finish are small ones and the cores stay busy.
        futures = {
            pool.submit(write_one, layer): layer
            for layer in sorted(to_write, key=lambda layer: (-layer.size, layer.name))
        }
        try:
            for fut in as_completed(futures):
                outcome = fut.result()
                outcomes[outcome.record.name] = outcome
                done += 1
                if progress:
                    progress("layers", done, total)
        except BaseException:
            # Don't start more layers after a failure; running ones drop their temp files.
            for fut in futures:
                fut.cancel()
            raise
    return [outcomes[layer.name] for layer in plan], rejected
