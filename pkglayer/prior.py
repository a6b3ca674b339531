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
from .fsutil import Workspace
from .history import ComponentRecord, History, LayerRecord, load_history, parse_history
from .layout import DEFAULT_LIMITS, HISTORY_LABEL, Image, ImageError, Limits, annotated_layers, open_layout
from .transports import (
    DOCKER,
    DOCKER_ARCHIVE,
    OCI_ARCHIVE,
    PREFIXES,
    STORAGE,
    ImageRef,
    exists,
    fetch,
    inspect,
    parse_image_ref,
)

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
class PriorRequest:
    """Where to look for what came before."""

    explicit: str | History | None = None  # --prior SOURCE, or the plan the daemon kept
    layers_dir: str | None = None  # the /layers directory
    layout: tuple[str, str] | None = None  # the output OCI layout and tag (not a staged one)
    destinations: tuple[ImageRef, ...] = ()  # other outputs: registries, local storage, archives
    staged: bool = False  # the layout is a private staging area for `destinations`
    read_outputs: bool = False  # a prebuild: /layers/output holds blobs too (it writes none there)
    cache: LayerCache | None = None


def resolve_prior(
    request: PriorRequest, work: Workspace | None = None, opts=None, limits: Limits = DEFAULT_LIMITS
) -> Prior:
    """One `Prior` from everything that came before, in the precedence the module
    docstring gives. Images given as --prior, or written earlier to a destination, are
    read (with skopeo where they are not an oci: layout) into `work`."""
    plans: list[tuple[History, str]] = []
    sources: list[BlobDir] = []
    remote: set[str] = set()
    own_images: set[str] = set()  # destinations holding the labelled blobs of their earlier image
    explicit = request.explicit
    explicit_image: ImageRef | None = None
    if isinstance(explicit, History):
        plans.append((explicit, "the plan kept from the last build"))
    elif explicit is not None and _is_image_ref(explicit):
        explicit_image = parse_image_ref(explicit, "--prior")
        plan, blobs, exact = _image_plan(explicit_image, work, opts, limits, "--prior")
        plans.append((plan, explicit))
        if blobs is not None:
            sources.append(blobs)
        if not exact:
            explicit_image = None  # its layers are not the labelled blobs: the destination may lack them
    elif explicit is not None:
        plans.append((load_plan(explicit), f"--prior {explicit}"))

    if request.layers_dir:
        history = load_history(os.path.join(request.layers_dir, "history.json"))
        if history is not None:
            plans.append((history, f"{request.layers_dir}/history.json"))
        for sub in ("input", "output") if request.read_outputs else ("input",):
            if os.path.isdir(os.path.join(request.layers_dir, sub)):
                sources.append(BlobDir(os.path.join(request.layers_dir, sub)))

    if request.layout is not None and not request.staged:
        earlier = earlier_image(*request.layout)
        if earlier is not None:
            plans.append((earlier, f"the earlier image oci:{request.layout[0]}:{request.layout[1]}"))
            sources.append(BlobDir(request.layout[0]))
    for dest in request.destinations:
        if dest.transport in (STORAGE, OCI_ARCHIVE, DOCKER_ARCHIVE) and exists(dest, opts):
            try:
                plan, blobs, exact = _image_plan(dest, work, opts, limits, "the earlier image of")
            except PkglayerError as e:
                log.warning("not reusing the earlier image %s: %s", dest, e)
                continue
            plans.append((plan, f"the earlier image {dest}"))
            if blobs is not None:
                sources.append(blobs)
            if exact:
                own_images.add(dest.text)

    # Layers the one destination already has need no local blob and no upload: the
    # staged layout goes to it alone, and the copy reuses what is there.
    if request.staged and len(request.destinations) == 1:
        dest = request.destinations[0]
        for plan, where in plans:
            if where == f"the earlier image {dest}" and dest.text in own_images:
                remote |= {rec.digest for rec in plan.layers}  # the destination's own image, as written
            elif explicit_image is not None and where == explicit:
                remote |= destination_has(explicit_image, dest, plan, opts)

    reusable = [rec for plan, _ in plans for rec in plan.layers]
    plan, plan_from = plans[0] if plans else (None, None)
    if plan is not None:
        log.info("prior plan from %s: %d layers", plan_from, len(plan.layers))
    return Prior(plan, plan_from, tuple(reusable), tuple(sources), frozenset(remote), request.cache)


def _is_image_ref(spec: str) -> bool:
    return any(spec.startswith(prefix) for _, prefix in PREFIXES)


def load_plan(spec: str) -> History:
    """--prior SOURCE for a history.json file or a /layers directory."""
    path = os.path.join(spec, "history.json") if os.path.isdir(spec) else spec
    history = load_history(path)
    if history is None:
        raise PkglayerError(f"--prior {spec}: no such history.json")
    return history


def _image_plan(
    ref: ImageRef, work: Workspace | None, opts, limits: Limits, what: str
) -> tuple[History, BlobDir | None, bool]:
    """The plan an image built by pkglayer carries; a blob directory holding its layers
    when they are local byte for byte (an oci: layout or archive); and whether the
    image's layers are the labelled blobs themselves. Registries and containers-storage
    are asked for the manifest and config only: local storage keeps layers uncompressed
    (their compressed blobs cannot come back from it), and buildah may have committed
    the image again with layers of its own (its plan still holds, matched by diff_id)."""
    if ref.transport in (DOCKER, STORAGE):
        image = inspect(ref, work or Workspace(), opts, limits, what)
        try:
            return plan_from_image(image, ref.text), None, True
        except PkglayerError:
            if ref.transport == DOCKER:
                raise
            return plan_from_image(image, ref.text, blobs_as_labelled=False), None, False
    if work is None:
        raise PkglayerError(f"{what} {ref}: reading an archive needs a working directory")
    layout, tag = fetch(ref, work, work.new("prior"), opts, what=what)
    return plan_from_image(open_layout(layout, tag, limits), ref.text), BlobDir(layout), True


def destination_has(prior: ImageRef, dest: ImageRef, plan: History, opts) -> set[str]:
    """The prior's layer digests that the destination already holds."""
    digests = [rec.digest for rec in plan.layers]
    if dest.transport == DOCKER and prior.transport == DOCKER:
        from .registry import blob_presence, parse_docker_ref

        presence = blob_presence(dest.text, digests, opts)
        if presence is not None:
            have = {d for d, there in presence.items() if there}
            if len(have) < len(set(digests)):
                log.info("%s has %d of the prior image's %d layers", dest, len(have), len(set(digests)))
            return have
        if parse_docker_ref(prior.text).same_repository(parse_docker_ref(dest.text)):
            # The prior manifest is in this very repository, so its layers are too; the push
            # checks again before anything is written to the registry.
            return set(digests)
        log.warning("cannot ask %s which prior layers it has; all layers are written locally", dest)
        return set()
    if dest.transport == STORAGE and prior.transport == STORAGE and dest.store_root == prior.store_root:
        return set(digests)  # the prior image is in the very store written to
    return set()


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


def plan_from_image(image: Image, where: str, blobs_as_labelled: bool = True) -> History:
    """The History stored in the image's HISTORY_LABEL, validated as untrusted input and
    cross-checked against the config's diff_ids and history, and against the manifest's
    layers unless `blobs_as_labelled` is False: local storage keeps layers uncompressed,
    so an image copied out of it has blobs other than those it was built with (same
    diff_ids), and buildah may have committed layers above them."""
    raw = image.labels.get(HISTORY_LABEL)
    if raw is None:
        raise ImageError(f"{where}: the image has no {HISTORY_LABEL} label (not built by pkglayer?)")
    if not isinstance(raw, str):
        raise ImageError(f"{where}: label {HISTORY_LABEL} is not a string")
    history = parse_history(raw.encode("utf-8"), f"{where}: label {HISTORY_LABEL}")
    if (history.architecture, history.os) != (image.architecture, image.os):
        raise ImageError(f"{where}: label {HISTORY_LABEL} is for {history.os}/{history.architecture}, "
                         f"the image for {image.os}/{image.architecture}")
    labelled = len(history.layers)
    # As stored by the containers tools, the image may carry layers above the labelled
    # ones (buildah commits an empty layer for a LABEL or CMD after FROM).
    if len(image.layers) != labelled and (blobs_as_labelled or len(image.layers) < labelled):
        raise ImageError(
            f"{where}: label {HISTORY_LABEL} lists {labelled} layers, the manifest {len(image.layers)}"
        )
    raw_entries = image.config.get("history")
    entries = [h for h in raw_entries if isinstance(h, dict) and not h.get("empty_layer")] \
        if isinstance(raw_entries, list) else []
    for i, (rec, desc, diff_id) in enumerate(zip(history.layers, image.layers, image.diff_ids)):
        if blobs_as_labelled and (rec.digest, rec.size, rec.media_type) != (desc.digest, desc.size, desc.media_type):
            raise ImageError(f"{where}: label {HISTORY_LABEL} layer {i} ({rec.name}) does not match the "
                             f"manifest's layer {desc.digest}")
        if rec.diff_id != diff_id:
            raise ImageError(f"{where}: label {HISTORY_LABEL} layer {i} ({rec.name}) does not match the "
                             f"config's diff_id {diff_id}")
        if len(entries) >= labelled and entries[i].get("comment") not in (None, rec.name):
            raise ImageError(f"{where}: config history entry {i} names layer {str(entries[i].get('comment'))[:80]!r}, "
                             f"the label {rec.name!r}")
    return history
