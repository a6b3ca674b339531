"""The build pipeline: prior -> scan -> plan -> layer members and keys -> reuse or write
-> history. Outputs (an OCI layout, the /layers history, a push) are separate steps
(outputs.py); a prebuild is a build whose new blobs go into the daemon's cache and that
has no output step at all.

Faces (the CLI, the daemon) call these; nothing here knows about them.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .arch import oci_platform
from .blobstore import BlobDir
from .components import Component, find_components, observe
from .compress import implementation
from .config import BuildSettings
from .digests import CONTENT_HASH
from .errors import PkglayerError
from .forked import die_with_parent, single_threaded
from .fsutil import fsync_dir, unlink_quiet
from .hashcache import HashCache, TreeRecords
from .history import History, LayerRecord
from .keptscan import DiskScans, KeptScans, LayerContents, fingerprint, scan_kept
from .layout import Platform
from .mediatypes import LAYER_MEDIA_TYPES
from .ownership import Ownership, scan_ownership
from .plan import Plan, PlannedLayer, plan_layers, prior_groups
from .prior import LayerCache, Prior
from .reuse import MustRead, Reuse, ReuseIndex
from .rootfs import Rootfs
from .scan import Progress
from .sources import open_source
from .tarwriter import TAR_FORMAT, content_key, write_layer
from .timings import Timings, working_for

log = logging.getLogger(__name__)


@dataclass
class LayerOutcome:
    record: LayerRecord
    reused: bool
    files: int
    cached: bool = False  # taken from the layer cache (reused is then True too)

    def as_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "name": r.name,
            "packages": list(r.packages),
            "components": list(r.components),
            "reused": self.reused,
            "cached": self.cached,
            "digest": r.digest,
            "diffID": r.diff_id,
            "contentKey": r.content_key,
            "size": r.size,
            "mediaType": r.media_type,
        }


@dataclass
class BuildResult:
    ownership: Ownership
    components: list[Component]
    plan: Plan
    layers: list[LayerOutcome]
    platform: Platform
    history: History  # what history.json and the image's plan label record
    blobs: BlobDir  # where this build wrote its new blobs
    rejected_inputs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: Timings = field(default_factory=Timings)  # where the time went
    records: TreeRecords | None = None  # blobs found valid (for the outputs, see ImageContent)

    @property
    def architecture(self) -> str:
        return self.platform.architecture

    @property
    def written(self) -> int:
        return sum(1 for o in self.layers if not o.reused)

    @property
    def reused(self) -> int:
        return sum(1 for o in self.layers if o.reused)

    @property
    def from_cache(self) -> int:
        return sum(1 for o in self.layers if o.cached)

    def as_json(self) -> dict[str, Any]:
        """The result as the CLI prints it (--json) and the daemon stores and serves it."""
        return {
            "layers": [o.as_json() for o in self.layers],
            "written": self.written,
            "reused": self.reused,
            "fromCache": self.from_cache,
            "architecture": self.architecture,
            "planDecision": self.plan.decision,
            "warnings": [*self.ownership.warnings, *self.rejected_inputs],
            "seconds": round(self.seconds, 3),
            "timings": self.timings.as_json(),
        }


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
    return scan_ownership(
        rootfs,
        source,
        excludes=settings.all_excludes,
        drop_xattrs=settings.drop_xattrs,
        one_file_system=settings.one_file_system,
        jobs=settings.jobs,
        hash_content=hash_content,
        cache=cache,
        progress=progress,
        compare_mtimes=settings.compare_mtimes,
        hash_package_files=settings.hash_package_files,
        components=settings.components,
        big_file_size=settings.big_file_size,
    )


def plan_components(
    ownership: Ownership, settings: BuildSettings, prior: Prior, replan: bool = False
) -> tuple[list[Component], Plan]:
    components = find_components(ownership, prior.observed)
    plan = plan_layers(
        components,
        settings.max_layers,
        prior_groups(prior.layers, components),
        horizon=settings.replan_horizon,
        replan=replan,
    )
    return components, plan


def plan_rootfs(
    rootfs_path: str,
    settings: BuildSettings,
    prior: Prior | None = None,
    replan: bool = False,
    progress: Progress | None = None,
) -> tuple[Ownership, list[Component], Plan]:
    """Scan and plan without writing anything (`pkglayer plan`)."""
    settings = settings.validated()
    with Rootfs(rootfs_path) as rootfs:
        ownership = scan_rootfs(rootfs, settings, progress=progress)
    components, plan = plan_components(ownership, settings, prior or Prior(), replan)
    return ownership, components, plan


def build(
    rootfs_path: str,
    settings: BuildSettings,
    prior: Prior,
    blobs: BlobDir,
    *,
    platform: Platform | None = None,
    progress: Progress | None = None,
    replan: bool = False,
    scans: KeptScans | None = None,
) -> BuildResult:
    """Layer `rootfs_path`: new blobs go to `blobs`, unchanged layers come from `prior`.

    `platform` is a source image's (--from); by default the package database's. `scans`
    keeps the scan of each root for the next build (keptscan.py); by default on disk
    beside the digest cache."""
    settings = settings.validated()
    started = time.monotonic()
    timings = Timings()
    records = TreeRecords(settings.hash_cache_path)
    with Rootfs(rootfs_path) as rootfs:
        scans = scans if scans is not None else DiskScans.for_settings(settings)
        kept, check = scans.take(rootfs.path, fingerprint(settings))
        cache = HashCache(settings.hash_cache_path)
        cache.load(rootfs.path)
        # Content keys are needed before writing only when there is something to reuse.
        now = scan_kept(rootfs, settings, kept, check, hash_content=prior.can_reuse, cache=cache,
                        progress=progress, timings=timings)
        ownership = now.ownership
        log.info("digest cache: %d files unchanged since they were last hashed", cache.hits)
        with timings.step("plan"):
            if platform is None:
                arch, variant = oci_platform(ownership.architecture, rootfs)
                platform = Platform(arch, "linux", variant)
            components, plan = plan_components(ownership, settings, prior, replan)
        log.info(
            "%d packages in %d components, %d objects -> %d layers; %s",
            len(ownership.packages), sum(not c.special for c in components), len(ownership.objects),
            len(plan.layers), plan.decision,
        )
        # zstd:chunked layers start with the layer root: clients that build a layer from
        # its table of contents would otherwise leave their 0700 staging directory there.
        with_root = settings.compression == "zstd:chunked"
        with timings.step("keys"):
            contents = LayerContents(now, plan.layers, settings.source_date_epoch, with_root, prior.can_reuse)
        reuse = ReuseIndex(
            prior, settings.compression_spec, LAYER_MEDIA_TYPES[settings.compression], blobs, ownership,
            settings.source_date_epoch, with_root, verify=settings.verify_reused, records=records,
        )
        write_started = time.time()
        outcomes, rejected, hashes = reuse_or_write(
            rootfs, plan.layers, contents, reuse, blobs, settings, prior.cache, progress, timings
        )
        if cache.path:  # else it keeps nothing: a loop over every file spared
            for path, content_hash in hashes.items():
                cache.put(ownership.objects[path].st, {CONTENT_HASH: content_hash}, write_started)
        cache.save()
        records.save()
        now.took(hashes, CONTENT_HASH)
        contents.remember({o.record.name: o.record.content_key for o in outcomes if not o.reused})
        scans.keep(now)

    history = History(
        layers=tuple(o.record for o in outcomes),
        architecture=platform.architecture,
        os=platform.os,
        variant=platform.variant or "",
        generator=f"pkglayer {__version__}",
        tar_format=TAR_FORMAT,
        components=observe(components, prior.observed),
    )
    return BuildResult(
        ownership=ownership, components=components, plan=plan, layers=outcomes, platform=platform,
        history=history, blobs=blobs, rejected_inputs=rejected, seconds=time.monotonic() - started,
        timings=timings, records=records,
    )


def reuse_or_write(
    rootfs: Rootfs,
    planned: list[PlannedLayer],
    contents: LayerContents,
    reuse: ReuseIndex,
    output: BlobDir,
    settings: BuildSettings,
    layer_cache: LayerCache | None,
    progress: Progress | None,
    timings: Timings,
) -> tuple[list[LayerOutcome], list[str], dict[str, str]]:
    """Every planned layer, reused or written into `output`, in plan order; the warnings
    about turned-down inputs; and the content hashes taken while writing (by path)."""
    rejected: list[str] = []
    outcomes: dict[str, LayerOutcome] = {}
    hashes: dict[str, str] = {}
    to_write: list[PlannedLayer] = []
    total = len(planned)
    keys = contents.keys
    writer = _LayerWriter(rootfs, contents, reuse, output, settings, layer_cache, timings)
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        with timings.step("reuse"):
            # Here, what the records answer (a stat or two per layer: a worker per check
            # cost more in thread hand-offs than the checks); on the workers, the layers
            # whose blobs must be read.
            answered: dict[str, tuple[Reuse | None, str | None]] = {}
            for layer in planned:
                with contextlib.suppress(MustRead):
                    answered[layer.name] = reuse.find(layer, keys[layer.name], read=False)
            checks = {
                layer.name: pool.submit(reuse.find, layer, keys[layer.name])
                for layer in planned if layer.name not in answered
            }
            for layer in planned:
                found, why_not = answered[layer.name] if layer.name in answered else checks[layer.name].result()
                if found is not None:
                    outcomes[layer.name] = LayerOutcome(
                        found.record, reused=True, files=contents.files(layer.name), cached=found.cached
                    )
                    if progress:
                        progress("layers", len(outcomes), total)
                    continue
                if why_not:
                    log.warning("%s", why_not)
                    rejected.append(why_not)
                to_write.append(layer)

        # Largest first, so the last layers to finish are small ones and the cores stay busy.
        with timings.step("write"):
            order = sorted(to_write, key=lambda x: (-x.size, x.name))
            if len(order) > 1 and settings.jobs > 1 and layer_cache is None and single_threaded():
                written = _write_in_processes(writer, order, settings.jobs)
            else:
                written = _write_on_threads(writer, order, pool)
            for outcome, taken in written:
                outcomes[outcome.record.name] = outcome
                contents.wrote(outcome.record.name, outcome.files)
                hashes.update(taken)
                if progress:
                    progress("layers", len(outcomes), total)
    return [outcomes[layer.name] for layer in planned], rejected, hashes


Written = Iterator[tuple["LayerOutcome", Mapping[str, str]]]


def _write_on_threads(writer: _LayerWriter, order: list[PlannedLayer], pool: ThreadPoolExecutor) -> Written:
    futures = [pool.submit(writer.write, layer) for layer in order]
    try:
        for fut in as_completed(futures):
            yield fut.result()
    except BaseException:
        # Don't start more layers after a failure; running ones drop their temp files.
        for fut in futures:
            fut.cancel()
        raise


# In a process of _write_in_processes: its writer and the layers by name (_adopt).
_WRITING: dict[str, Any] = {}


def _write_in_processes(writer: _LayerWriter, order: list[PlannedLayer], jobs: int) -> Written:
    """The layers written by forked processes: a layer's tar headers, file reads and
    buffers are Python that holds the GIL, and two threads writing layers of many small
    files take turns for it (the app tree's zstd layers, five alternating runs: write
    step 1.34-1.73 s in two processes, 1.56-1.99 s on two threads). Only from a
    single-threaded process (forked.py says why). Each process writes whole layers into
    the output as a thread would, and sends back the outcome, the content hashes it took
    and the CPU time it charged. It holds each blob's temp file (BlobWriter.hold) for
    this process to fsync and rename, and goes on with its next layer meanwhile: an
    fsync waits 2-20 ms for the journal here (app tree: 0.23-0.27 s in all, plus 0.06-0.08 s
    for the directory after each rename, which is now synced once, at the end)."""
    # Here: multiprocessing loads tempfile and shutil, which a rebuild never needs.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # Objects made before the fork stay out of the processes' garbage collections, which
    # would otherwise write to (and so copy) every page of them.
    gc.freeze()
    futures: list[Future] = []
    try:
        with ProcessPoolExecutor(
            min(jobs, len(order)), mp_context=multiprocessing.get_context("fork"),
            # Under fork the initializer's arguments are inherited, not pickled.
            initializer=_adopt, initargs=(os.getpid(), writer, {layer.name: layer for layer in order}),
        ) as pool:
            futures = [pool.submit(_write_forked, layer.name) for layer in order]
            try:
                for fut in as_completed(futures):
                    outcome, taken, cpu, held = fut.result()
                    for tmp_path, digest, size in held:
                        writer.output.commit_held(tmp_path, digest, size)
                    for work, seconds in cpu.items():
                        writer.timings.add_cpu(work, seconds)
                    yield outcome, taken
                fsync_dir(writer.output.blobs)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    except BaseException as e:
        # The pool has shut down, every layer begun is finished: remove the blobs written
        # and not committed (a committed one's temp name is gone already).
        for fut in futures:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                for tmp_path, _, _ in fut.result()[3]:
                    unlink_quiet(tmp_path)
        if isinstance(e, BrokenProcessPool):
            raise PkglayerError(f"a process writing layers died ({e}); the build stopped, rerun") from None
        raise
    finally:
        gc.unfreeze()


def _adopt(parent: int, writer: _LayerWriter, layers: dict[str, PlannedLayer]) -> None:
    die_with_parent(parent)
    writer.held = []
    _WRITING.update(writer=writer, layers=layers)


def _write_forked(
    name: str,
) -> tuple[LayerOutcome, dict[str, str], dict[str, float], list[tuple[str, str, int]]]:
    writer, layers = _WRITING["writer"], _WRITING["layers"]
    before = dict(writer.timings.cpu)
    assert writer.held is not None
    writer.held.clear()
    outcome, taken = writer.write(layers[name])
    cpu = {k: v - before.get(k, 0.0) for k, v in writer.timings.cpu.items()}
    return outcome, dict(taken), cpu, list(writer.held)


class _LayerWriter:
    """Writes one planned layer; with a layer cache, under the key's claim, so that
    concurrent builds of the same content write it once and the others take it."""

    def __init__(self, rootfs, contents: LayerContents, reuse: ReuseIndex, output: BlobDir, settings: BuildSettings,
                 layer_cache: LayerCache | None, timings: Timings):
        self.rootfs = rootfs
        self.contents = contents
        self.keys = contents.keys
        self.reuse = reuse
        self.output = output
        self.settings = settings
        self.cache = layer_cache
        self.timings = timings
        # In a process of _write_in_processes: the blobs written and held, for the parent to commit.
        self.held: list[tuple[str, str, int]] | None = None

    def write(self, layer: PlannedLayer) -> tuple[LayerOutcome, Mapping[str, str]]:
        key = self.keys[layer.name]
        if self.cache is None or key is None:
            return self._write_new(layer)
        # Another build may be writing the same content right now: wait for it.
        with self.cache.claim(key, self.settings.compression_spec):
            found = self.reuse.cached(layer, key)
            if found is not None:
                return LayerOutcome(found.record, reused=True, files=self.contents.files(layer.name), cached=True), {}
            outcome, hashes = self._write_new(layer)
            self.cache.add(outcome.record, self.output)
            return outcome, hashes

    def _write_new(self, layer: PlannedLayer) -> tuple[LayerOutcome, Mapping[str, str]]:
        settings = self.settings
        members = self.contents.members(layer.name)
        with working_for(self.timings), self.output.writer() as w:
            written = write_layer(self.rootfs, members, settings.compression, settings.compression_level, w)
            if self.held is None:
                digest, size = w.commit()
            else:
                digest, size = w.hold()
                self.held.append((w.tmp_path, digest, size))
        key = self.keys[layer.name] or content_key(members, written.hashes)
        assert key is not None  # every file was hashed while writing
        record = LayerRecord(
            name=layer.name,
            packages=layer.packages,
            content_key=key,
            digest=digest,
            diff_id=written.diff_id,
            size=size,
            media_type=LAYER_MEDIA_TYPES[settings.compression],
            compression=settings.compression_spec,
            components=layer.components,
            annotations=tuple(sorted(written.annotations.items())),
            compressor=implementation(settings.compression, settings.compression_level),
        )
        # Member names are the objects' rootfs-relative paths.
        return LayerOutcome(record, reused=False, files=len(members)), written.hashes
