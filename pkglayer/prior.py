"""What came before a build, resolved once: the plan to keep stable, the layers whose
blobs may be reused and where those blobs are, and which blobs the destination already
has.

The plan to keep stable is the first of:
1. the plan given explicitly: `--prior SOURCE` (a history.json, a /layers directory, or
   an image built by pkglayer, whose config label carries the plan), or the plan the
   daemon kept from a root's last build;
2. the history of the `--layers` directory;
3. the earlier image of the output tag in the output layout (its plan label when that
   agrees with the image's layers, else its layer annotations).

Every one of those sources that exists also contributes its layers as reuse candidates
(the plan's first), with the blob directories that may hold them: an `oci:` prior's
layout, `/layers/input` (and `/layers/output` when a prebuild reads the outputs without
writing them), the output layout. Blobs are verified before reuse (reuse.py).

Nothing here writes anything.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

from .blobstore import BlobDir
from .errors import PkglayerError
from .history import ComponentRecord, History, LayerRecord, load_history, parse_history
from .layout import DEFAULT_LIMITS, HISTORY_LABEL, Image, ImageError, Limits, annotated_layers, open_layout

log = logging.getLogger(__name__)


class LayerCache(Protocol):
    """A shared store of layer blobs keyed by (content key, compression spec), such as
    the daemon's (pkglayer.daemon.cache). A build consults it before writing a layer and
    feeds it every layer it writes; the pipeline never imports an implementation."""

    blobs: BlobDir

    def lookup(self, content_key: str, compression: str) -> LayerRecord | None:
        """A record (digest, diff_id, size, media_type) whose blob is in `blobs`, or None."""

    def claim(self, content_key: str, compression: str):  # -> ContextManager[None]
        """Held while one writer produces this key, so concurrent builds write it once."""

    def add(self, record: LayerRecord, source: BlobDir) -> None:
        """Take the blob `record.digest` from `source` (just written, trusted) into the cache."""

    def export(self, digest: str, dest: BlobDir, size: int | None = None) -> None:
        """Make the cached blob (of `size` bytes) present in `dest` (a hard link where
        possible). Cached blobs are trusted like fresh ones: only the cache's owner writes
        them, always by rename."""


@dataclass(frozen=True)
class Prior:
    plan: History | None = None  # the plan to keep stable, with the planner's observations
    plan_from: str | None = None  # where the plan came from, for messages
    reusable: tuple[LayerRecord, ...] = ()  # reuse candidates, the plan's first
    blob_sources: tuple[BlobDir, ...] = ()  # where their blobs may be
    remote_blobs: frozenset[str] = frozenset()  # layer digests the destination registry has
    cache: LayerCache | None = field(default=None, compare=False)

    @property
    def layers(self) -> tuple[LayerRecord, ...]:
        """The layer assignment to keep stable."""
        return self.plan.layers if self.plan else ()

    @property
    def observed(self) -> dict[str, ComponentRecord]:
        """The planner's observations from earlier builds."""
        return self.plan.components if self.plan else {}

    @property
    def can_reuse(self) -> bool:
        """Anything to reuse at all: if not, content keys need not be known before writing."""
        return bool(self.reusable) or self.cache is not None


@dataclass(frozen=True)
class ImagePrior:
    """An image given as --prior: its plan, where its blobs are, and its reference."""

    plan: History
    blobs: BlobDir | None  # its layout, when its blobs are local
    ref: str


def resolve_prior(
    *,
    explicit: History | ImagePrior | None = None,
    explicit_from: str | None = None,
    layers_dir: str | None = None,
    layout: tuple[str, str] | None = None,
    read_outputs: bool = False,
    remote_blobs: frozenset[str] = frozenset(),
    cache: LayerCache | None = None,
) -> Prior:
    """One `Prior` from everything that came before (see the module docstring).

    `explicit` is the plan given with --prior (or kept by the daemon), `layers_dir` the
    /layers directory, `layout` the output OCI layout and tag; `read_outputs` adds
    /layers/output to the blob sources (a prebuild that writes nothing there);
    `remote_blobs` are prior layer digests the destination registry has."""
    plans: list[tuple[History, str]] = []
    reusable: list[LayerRecord] = []
    sources: list[BlobDir] = []
    if isinstance(explicit, ImagePrior):
        plans.append((explicit.plan, explicit.ref))
        if explicit.blobs is not None:
            sources.append(explicit.blobs)
    elif explicit is not None:
        plans.append((explicit, explicit_from or "the plan kept from the last build"))

    if layers_dir:
        history = load_history(os.path.join(layers_dir, "history.json"))
        if history is not None:
            plans.append((history, f"{layers_dir}/history.json"))
        for sub in ("input", "output") if read_outputs else ("input",):
            if os.path.isdir(os.path.join(layers_dir, sub)):
                sources.append(BlobDir(os.path.join(layers_dir, sub)))

    if layout is not None:
        earlier = earlier_image(*layout)
        if earlier is not None:
            plans.append((earlier, f"the earlier image oci:{layout[0]}:{layout[1]}"))
            sources.append(BlobDir(layout[0]))

    for history, _ in plans:
        reusable.extend(history.layers)
    plan, plan_from = plans[0] if plans else (None, None)
    if plan is not None:
        log.info("prior plan from %s: %d layers", plan_from, len(plan.layers))
    return Prior(plan, plan_from, tuple(reusable), tuple(sources), remote_blobs, cache)


def load_plan(spec: str) -> History:
    """--prior SOURCE for a history.json file or a /layers directory."""
    path = os.path.join(spec, "history.json") if os.path.isdir(spec) else spec
    history = load_history(path)
    if history is None:
        raise PkglayerError(f"--prior {spec}: no such history.json")
    return history


def image_prior(ref: str, opts=None, limits: Limits = DEFAULT_LIMITS) -> ImagePrior:
    """--prior IMAGE: the plan in an image built by pkglayer (`oci:DIR[:TAG]`, or
    `docker://REF`, whose manifest and config only are read from the registry)."""
    from .layout import parse_layout_ref
    from .registry import RegistryOptions, fetch_image

    if ref.startswith("oci:"):
        layout, tag = parse_layout_ref(ref)
        return ImagePrior(plan_from_image(open_layout(layout, tag, limits), ref), BlobDir(layout), ref)
    _, image = fetch_image(ref, opts or RegistryOptions(), limits)
    return ImagePrior(plan_from_image(image, ref), None, ref)


def remote_blobs(prior_ref: str, dest: str, plan: History, opts) -> frozenset[str]:
    """The prior layer digests that the destination repository has: those need neither a
    local blob nor an upload."""
    from .registry import blob_presence, parse_docker_ref

    digests = [rec.digest for rec in plan.layers]
    presence = blob_presence(dest, digests, opts)
    if presence is not None:
        have = {d for d, there in presence.items() if there}
        if len(have) < len(set(digests)):
            log.info("%s has %d of the prior image's %d layers", dest, len(have), len(set(digests)))
        return frozenset(have)
    if parse_docker_ref(prior_ref).same_repository(parse_docker_ref(dest)):
        # The prior manifest is in this very repository, so its layers are too; the push
        # checks again before anything is written to the registry.
        return frozenset(digests)
    log.warning("cannot ask %s which prior layers it has; all layers are written locally", dest)
    return frozenset()


def earlier_image(layout_dir: str, tag: str) -> History | None:
    """The plan of the image tagged `tag` that an earlier build wrote into `layout_dir`:
    its plan label, or when that is missing or does not agree with the image, its
    layers' own annotations without the planner's observations. None when there is no
    such image, it was not written by pkglayer, or it is damaged: the build then simply
    reuses nothing from it."""
    if not os.path.exists(os.path.join(layout_dir, "index.json")):
        return None
    try:
        image = open_layout(layout_dir, tag)
    except ImageError as e:
        if "no image tagged" not in str(e):
            log.warning("not reusing the earlier image in %s: %s", layout_dir, e)
        return None
    try:
        return plan_from_image(image, f"oci:{layout_dir}:{tag}")
    except PkglayerError:
        records = annotated_layers(image)
        return None if records is None else History(tuple(records), image.architecture, image.os, "unknown", 1)


def plan_from_image(image: Image, where: str) -> History:
    """The History stored in the image's HISTORY_LABEL, validated as untrusted input and
    cross-checked against the manifest's layers, the config's diff_ids and history."""
    raw = image.labels.get(HISTORY_LABEL)
    if raw is None:
        raise ImageError(f"{where}: the image has no {HISTORY_LABEL} label (not built by pkglayer?)")
    if not isinstance(raw, str):
        raise ImageError(f"{where}: label {HISTORY_LABEL} is not a string")
    history = parse_history(raw.encode("utf-8"), f"{where}: label {HISTORY_LABEL}")
    if len(history.layers) != len(image.layers):
        raise ImageError(
            f"{where}: label {HISTORY_LABEL} lists {len(history.layers)} layers, the manifest {len(image.layers)}"
        )
    if (history.architecture, history.os) != (image.architecture, image.os):
        raise ImageError(f"{where}: label {HISTORY_LABEL} is for {history.os}/{history.architecture}, "
                         f"the image for {image.os}/{image.architecture}")
    raw_entries = image.config.get("history")
    entries = [h for h in raw_entries if isinstance(h, dict) and not h.get("empty_layer")] \
        if isinstance(raw_entries, list) else []
    for i, (rec, desc, diff_id) in enumerate(zip(history.layers, image.layers, image.diff_ids)):
        if (rec.digest, rec.size, rec.media_type) != (desc.digest, desc.size, desc.media_type):
            raise ImageError(f"{where}: label {HISTORY_LABEL} layer {i} ({rec.name}) does not match the "
                             f"manifest's layer {desc.digest}")
        if rec.diff_id != diff_id:
            raise ImageError(f"{where}: label {HISTORY_LABEL} layer {i} ({rec.name}) does not match the "
                             f"config's diff_id {diff_id}")
        if len(entries) == len(history.layers) and entries[i].get("comment") not in (None, rec.name):
            raise ImageError(f"{where}: config history entry {i} names layer {str(entries[i].get('comment'))[:80]!r}, "
                             f"the label {rec.name!r}")
    return history
