"""Where a build's result goes, each a step of its own after `build()`: an OCI layout
(`--output oci:DIR[:TAG]`), the /layers directory's history.json (`--layers DIR`), and
any other destination (a registry, local containers-storage, an archive), copied from
that layout, or from a layout staged in the workspace when none was named (the daemon
stages it in its state directory instead, and keeps it from build to build).

New layer blobs are written by the build itself into `Outputs.new_blobs()`: the /layers
output directory, else the OCI layout.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from .blobstore import BlobDir
from .build import BuildResult, build
from .config import BuildSettings
from .errors import PkglayerError
from .fsutil import Workspace
from .hashcache import TreeRecords
from .history import History, dumps_history, save_history
from .layout import (
    DEFAULT_LIMITS,
    HISTORY_LABEL,
    REF_RE,
    ImageOptions,
    ImageResult,
    Limits,
    Platform,
    parse_layout_ref,
    write_image,
)
from .prior import Prior, PriorRequest, resolve_prior
from .transports import ImageRef, parse_image_ref, publish

log = logging.getLogger(__name__)

MAX_HISTORY_LABEL = 1 << 20
# An image's environment when neither the command line nor a source image sets one.
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)


@dataclass
class Outputs:
    layout: tuple[str, str] | None = None  # OCI layout directory and tag
    layers_dir: str | None = None  # the /layers protocol directory
    destinations: tuple[ImageRef, ...] = ()  # published from `layout` afterwards
    staged: bool = False  # `layout` is a private staging layout for `destinations`
    kept: bool = False  # ...that stays from build to build (the daemon's): it holds the prior

    def new_blobs(self) -> BlobDir:
        """Where the build writes the layers it does not reuse."""
        if self.layers_dir:
            return BlobDir(os.path.join(self.layers_dir, "output"), create=True)
        if self.layout:
            return BlobDir(self.layout[0], create=True)
        raise PkglayerError("nothing to do: give --output IMAGE and/or --layers DIR")

    def prior_request(self, explicit: str | History | None = None, read_outputs: bool = False,
                      cache=None) -> PriorRequest:
        """Where earlier builds of these outputs are: their plan and blobs."""
        if self.kept:
            # The kept layout holds the last image built for the destinations, plan label
            # and blobs: it is read like an oci: output, and the destinations never are.
            return PriorRequest(explicit=explicit, layers_dir=self.layers_dir, layout=self.layout,
                                read_outputs=read_outputs, cache=cache)
        return PriorRequest(
            explicit=explicit, layers_dir=self.layers_dir, layout=self.layout, destinations=self.destinations,
            staged=self.staged, read_outputs=read_outputs, cache=cache,
        )


def parse_outputs(refs: list[str] | None, layers_dir: str | None, work: Workspace | None,
                  stage: str | None = None) -> Outputs:
    """--output (repeatable: at most one oci: layout; registries, local storage and
    archives are published from it, or from a staged layout) and --layers. With `stage`
    the staged layout is that directory, kept from build to build (a daemon root's)
    instead of one in `work`."""
    parsed = [parse_image_ref(r, "--output") for r in refs or []]
    layouts = [r for r in parsed if r.is_layout]
    if len(layouts) > 1:
        raise PkglayerError("--output: give at most one oci:DIR[:TAG]; other outputs are copied from it")
    stdout = [r for r in parsed if r.is_stdout]
    if len(stdout) > 1:
        raise PkglayerError("--output: standard output can take one image")
    out = Outputs(layers_dir=layers_dir, destinations=tuple(r for r in parsed if not r.is_layout))
    if layouts:
        directory, tag = parse_layout_ref(layouts[0].text, "latest")
        assert tag is not None
        out.layout = (directory, tag)
    elif out.destinations and stage is not None:
        # One tag whatever the destination's name: the kept layout holds one image (the
        # destinations are named by their own references; oci-archive: without a tag gets
        # "latest" either way).
        out.layout, out.staged, out.kept = (stage, "latest"), True, True
    elif out.destinations:
        assert work is not None
        tag = next((_plain_tag(d) for d in out.destinations if _plain_tag(d)), "latest")
        out.layout, out.staged = (work.path("layout"), tag), True
    if out.layout is None and not layers_dir:
        raise PkglayerError("nothing to do: give --output IMAGE and/or --layers DIR")
    if layers_dir and not os.path.isdir(layers_dir):
        os.makedirs(layers_dir, exist_ok=True)
    return out


def _plain_tag(ref: ImageRef) -> str | None:
    """A destination's tag, if it is also a valid OCI ref name (for the staged layout)."""
    tag = ref.tag.rsplit(":", 1)[-1] if ref.tag else None
    return tag if tag and REF_RE.fullmatch(tag) else None


@dataclass
class OutputReport:
    image: ImageResult | None = None
    image_ref: str | None = None  # oci:DIR:TAG written (a staged one included)
    history_path: str | None = None
    external_blobs: list[str] = field(default_factory=list)  # reused from the destination, not in the layout
    published: list[str] = field(default_factory=list)  # destinations written
    push: Any = None  # registry.PushReport of a registry destination
    seconds: float = 0.0  # writing the layout, the history, the other destinations

    def as_json(self) -> dict[str, Any]:
        return {
            "outputSeconds": round(self.seconds, 3),
            "image": self.image_ref,
            "manifestDigest": self.image.manifest_digest if self.image else None,
            "history": self.history_path,
            "published": list(self.published),
            "externalBlobs": list(self.external_blobs),
            "push": self.push.as_json() if self.push else None,
        }


@dataclass(frozen=True)
class ImageContent:
    """What an image is made of: its layers (bottom first), the history recording them,
    its platform, where the blobs are, and which blobs need no local copy."""

    history: History
    platform: Platform
    blob_sources: tuple[BlobDir, ...]
    fresh: frozenset[str] = frozenset()  # blobs this process just wrote and hashed
    remote: frozenset[str] = frozenset()  # layer digests the one destination already has
    records: TreeRecords | None = None  # blobs checked earlier whose files are unchanged

    @staticmethod
    def of_build(result: BuildResult, prior: Prior) -> ImageContent:
        return ImageContent(
            history=result.history,
            platform=result.platform,
            blob_sources=(result.blobs, *prior.blob_sources),
            fresh=frozenset(o.record.digest for o in result.layers if not o.reused or o.cached),
            remote=prior.remote_blobs,
            records=result.records,
        )


def write_outputs(
    content: ImageContent,
    outputs: Outputs,
    options: ImageOptions,
    source_date_epoch: int,
    registry_options=None,
    limits: Limits = DEFAULT_LIMITS,
) -> OutputReport:
    """The image into the layout, then copied to every other destination; the history
    into the /layers directory."""
    started = time.perf_counter()
    report = OutputReport()
    if outputs.layout:
        directory, tag = outputs.layout
        report.image, report.external_blobs = write_layout(content, directory, tag, options, source_date_epoch)
        report.image_ref = f"oci:{directory}:{tag}"
        if outputs.kept:
            # It holds this one image (earlier images' blobs go), complete before anything
            # is published: after a failed copy it is still the next build's prior.
            image = report.image
            BlobDir(directory).remove_except(
                {image.manifest_digest, image.config_digest, *(rec.digest for rec in content.history.layers)})
        for dest in outputs.destinations:
            pushed = publish(directory, tag, dest, registry_options, limits, source_date_epoch)
            report.published.append(dest.text)
            if pushed is not None:
                report.push = pushed
    if outputs.layers_dir:
        report.history_path = os.path.join(outputs.layers_dir, "history.json")
        save_history(report.history_path, content.history)
    report.seconds = time.perf_counter() - started
    return report


def write_layout(
    content: ImageContent, directory: str, tag: str, options: ImageOptions, source_date_epoch: int
) -> tuple[ImageResult, list[str]]:
    """The image into an OCI layout, its plan as a config label; also the layers left
    out of the layout because the destination has them."""
    layout = BlobDir(directory, create=True)
    records = content.history.layers
    external = {
        rec.digest
        for rec in records
        if rec.digest in content.remote and not any(d.has(rec.digest) for d in (layout, *content.blob_sources))
    }
    options = replace(
        options, env=options.env or list(DEFAULT_ENV), labels=with_history_label(options.labels, content.history)
    )
    image = write_image(
        directory, tag, records, options, content.platform, rfc3339(source_date_epoch),
        content.blob_sources, fresh=content.fresh, external=external, records=content.records,
    )
    if content.records is not None:
        content.records.save()
    return image, sorted(external)


def history_label(history: History) -> str:
    """The history.json of the build as one compact line (same fields, no whitespace)."""
    obj = json.loads(dumps_history(history))
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def with_history_label(labels: dict[str, str], history: History) -> dict[str, str]:
    """The labels plus the plan (HISTORY_LABEL), which overrides one carried over from a
    source image. Left out, with a warning, if it would make the config unreasonably big."""
    value = history_label(history)
    out = {k: v for k, v in labels.items() if k != HISTORY_LABEL}
    if len(value) > MAX_HISTORY_LABEL:
        log.warning("plan label would be %d bytes; leaving it out of the config", len(value))
        return out
    out[HISTORY_LABEL] = value
    return out


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_to(
    rootfs: str,
    settings: BuildSettings,
    *,
    layout: tuple[str, str] | None = None,
    layers_dir: str | None = None,
    options: ImageOptions | None = None,
) -> tuple[BuildResult, OutputReport]:
    """`pkglayer build ROOTFS [--output oci:DIR:TAG] [--layers DIR]` as one call, for
    programs that use pkglayer as a library: the prior those outputs hold, the build,
    the outputs."""
    outputs = Outputs(layout=layout, layers_dir=layers_dir)
    prior = resolve_prior(outputs.prior_request())
    result = build(rootfs, settings, prior, outputs.new_blobs())
    report = write_outputs(ImageContent.of_build(result, prior), outputs, options or ImageOptions(),
                           settings.source_date_epoch)
    return result, report
