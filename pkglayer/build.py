"""The build pipeline: rootfs -> package source -> ownership -> plan -> tar -> blobs/image.

Faces (CLI, daemon) call `build()`; nothing here knows about them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime

from . import __version__
from .arch import oci_platform
from .blobstore import BlobDir
from .config import BuildSettings
from .digests import CONTENT_HASH
from .errors import PkglayerError
from .hashcache import HashCache
from .history import History, LayerRecord, dumps_history, load_history, save_history
from .oci import HISTORY_LABEL, ImageConfig, ImageResult, parse_oci_ref, prior_layers, write_image
from .ownership import Ownership, Progress, scan
from .plan import PlannedLayer, plan_layers
from .pristine import is_pristine_layer
from .rootfs import Rootfs
from .sources import open_source
from .tarwriter import MEDIA_TYPES, TAR_FORMAT, Member, content_key, layer_members, write_layer

log = logging.getLogger(__name__)

MAX_HISTORY_LABEL = 1 << 20



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


@dataclass
class BuildResult:
    ownership: Ownership
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
    remote_blobs: Collection[str] = (),
    prior_sources: Sequence[BlobDir] = (),
) -> BuildResult:
    """Layer `rootfs_path` into an OCI layout (`oci_ref`) and/or a /layers directory.

    `prior_history` is an earlier build's plan (from --prior, or a registry): the planner
    keeps its layer assignment stable, and its layers are reuse candidates.

    `prior_sources` are extra blob directories holding prior layers. `remote_blobs` are
    layer digests known to be in the registry the image will be pushed to: a prior layer
    with such a digest is reused on an exact content-key match without a local blob, and
    the OCI layout written then lacks it (push it with skopeo to that registry)."""
    if not oci_ref and not layers_dir:
        raise PkglayerError("nothing to do: give --output oci:DIR[:TAG] and/or --layers DIR")
    settings = settings.validated()
    started = time.monotonic()
    oci_dir, oci_tag = parse_oci_ref(oci_ref) if oci_ref else (None, None)

    # Read everything that can be wrong before writing anything.
    prior: list[LayerRecord] = []
    inputs: list[BlobDir] = list(prior_sources)
    remote = frozenset(remote_blobs)
    if prior_history is not None:
        prior.extend(prior_history.layers)
    if layers_dir:
        if not os.path.isdir(layers_dir):
            os.makedirs(layers_dir, exist_ok=True)
        history = load_history(os.path.join(layers_dir, "history.json"))
        if history is not None:
            prior.extend(history.layers)
        if os.path.isdir(os.path.join(layers_dir, "input")):
            inputs.append(BlobDir(os.path.join(layers_dir, "input")))

    if oci_dir and os.path.isdir(oci_dir):
        # Writing over an earlier build of this tag: its blobs are candidates too.
        earlier = prior_layers(oci_dir, oci_tag)
        if earlier:
            inputs.append(BlobDir(oci_dir))
            prior.extend(earlier)

    with Rootfs(rootfs_path) as rootfs:
        cache = HashCache(settings.hash_cache_path)
        cache.load(rootfs.path)
        # Content keys are needed before writing only when there is something to reuse.
        ownership = scan_rootfs(rootfs, settings, hash_content=bool(prior), cache=cache, progress=progress)
        log.info("digest cache: %d files unchanged since they were last hashed", cache.hits)
        arch, variant = oci_platform(ownership.architecture, rootfs)
        plan = plan_layers(ownership, settings.max_layers)
        log.info(
            "%d packages, %d objects -> %d layers",
            len(ownership.packages), len(ownership.objects), len(plan),
        )

        output = BlobDir(os.path.join(layers_dir, "output") if layers_dir else oci_dir, create=True)
        members = {
            layer.name: layer_members(
                (o for h in layer.homes for o in ownership.homes[h]),
                ownership.objects,
                settings.source_date_epoch,
            )
            for layer in plan
        }
        keys = {name: content_key(ms) for name, ms in members.items()}

        write_started = time.time()
        outcomes, rejected = _reuse_or_write(
            rootfs, ownership, plan, members, keys, prior, inputs, output, settings, progress, remote
        )
        for obj in ownership.objects.values():
            if obj.content_hash:
                cache.put(obj.st, {CONTENT_HASH: obj.content_hash}, write_started)
        cache.save()

    result = BuildResult(
        ownership=ownership, layers=outcomes, architecture=arch, rejected_inputs=rejected
    )
    records = [o.record for o in outcomes]
    created = _rfc3339(settings.source_date_epoch)
    opts = image or ImageOptions()
    if opts.architecture:
        arch, variant, result.architecture = opts.architecture, opts.variant, opts.architecture
    history = History(
        layers=tuple(records),
        architecture=arch,
        os=opts.os or "linux",
        generator=f"pkglayer {__version__}",
        tar_format=TAR_FORMAT,
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
        fresh = {o.record.digest for o in outcomes if not o.reused}
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

    def find_reusable(layer: PlannedLayer) -> tuple[LayerRecord | None, str | None]:
        """A prior blob for this layer, or why a candidate was turned down."""
        key = keys[layer.name]
        if key is None:
            return None, None
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
        edited = ownership.modified_by_package.get(layer.packages[0]) if len(layer.packages) == 1 else None
        if edited:
            expected = layer_members(
                [*ownership.homes.get(layer.homes[0], []), *(obj for obj, _ in edited)],
                ownership.objects,
                settings.source_date_epoch,
            )
            wanted = {obj.path: (obj, rec) for obj, rec in edited}
            for rec in by_packages.get(layer.packages, []):
                src = source_of(rec)
                if src is not None and is_pristine_layer(src, rec, expected, wanted):
                    return rec, None
        return None, None

    rejected: list[str] = []
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
                    ),
                    reused=True,
                    files=len(members[layer.name]),
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
            with output.writer() as w:
                diff_id, _ = write_layer(rootfs, members[layer.name], settings.compression, level, w)
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
