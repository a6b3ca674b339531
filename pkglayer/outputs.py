"""Where a build's result goes, each a step of its own after `build()`: an OCI layout
(`--output oci:DIR[:TAG]`), the /layers directory's history.json (`--layers DIR`), a
registry (`--output docker://REF`, pushed from a layout: the user's, or a staged one).

New layer blobs are written by the build itself into `Outputs.new_blobs()`: the /layers
output directory, else the OCI layout (staged for a push when no layout was named).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from .blobstore import BlobDir
from .build import BuildResult
from .errors import PkglayerError
from .fsutil import Workspace
from .history import History, dumps_history, save_history
from .layout import (
    DEFAULT_LIMITS,
    HISTORY_LABEL,
    ImageOptions,
    ImageResult,
    Limits,
    open_layout,
    parse_layout_ref,
    tag_of,
    write_image,
)
from .prior import Prior

log = logging.getLogger(__name__)

MAX_HISTORY_LABEL = 1 << 20
# An image's environment when neither the command line nor a source image sets one.
DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)


@dataclass
class Outputs:
    layout: tuple[str, str] | None = None  # OCI layout directory and tag
    layers_dir: str | None = None  # the /layers protocol directory
    push_to: str | None = None  # docker://REF, pushed from `layout` afterwards
    staged: bool = False  # `layout` is a private staging layout for `push_to`

    def new_blobs(self) -> BlobDir:
        """Where the build writes the layers it does not reuse."""
        if self.layers_dir:
            return BlobDir(os.path.join(self.layers_dir, "output"), create=True)
        if self.layout:
            return BlobDir(self.layout[0], create=True)
        raise PkglayerError("nothing to do: give --output oci:DIR[:TAG] and/or --layers DIR")


def parse_outputs(refs: list[str] | None, layers_dir: str | None, work: Workspace) -> Outputs:
    """--output (repeatable: at most one oci: and one docker://) and --layers."""
    from .registry import is_docker_ref, parse_docker_ref

    oci = [r for r in refs or [] if not is_docker_ref(r)]
    docker = [r for r in refs or [] if is_docker_ref(r)]
    if len(oci) > 1 or len(docker) > 1:
        raise PkglayerError("--output: give at most one oci:DIR[:TAG] and one docker://REF")
    out = Outputs(layers_dir=layers_dir)
    if oci:
        directory, tag = parse_layout_ref(oci[0], "latest")
        assert tag is not None
        out.layout = (directory, tag)
    if docker:
        out.push_to = docker[0]
        tag = parse_docker_ref(docker[0]).tag or "latest"
        if out.layout is None:
            out.layout, out.staged = (work.path("layout"), tag), True
    if out.layout is None and not layers_dir:
        raise PkglayerError("nothing to do: give --output oci:DIR[:TAG] and/or --layers DIR")
    if layers_dir and not os.path.isdir(layers_dir):
        os.makedirs(layers_dir, exist_ok=True)
    return out


@dataclass
class OutputReport:
    image: ImageResult | None = None
    image_ref: str | None = None  # oci:DIR:TAG written (a staged one included)
    history_path: str | None = None
    external_blobs: list[str] = field(default_factory=list)  # reused from the registry, not in the layout
    push: Any = None  # registry.PushReport

    def as_json(self) -> dict[str, Any]:
        return {
            "image": self.image_ref,
            "manifestDigest": self.image.manifest_digest if self.image else None,
            "history": self.history_path,
            "push": self.push.as_json() if self.push else None,
        }


def write_outputs(
    result: BuildResult,
    outputs: Outputs,
    options: ImageOptions,
    prior: Prior,
    source_date_epoch: int,
    registry_options=None,
    limits: Limits = DEFAULT_LIMITS,
) -> OutputReport:
    report = OutputReport()
    if outputs.layout:
        directory, tag = outputs.layout
        report.image, report.external_blobs = write_layout(
            result, directory, tag, options, prior, source_date_epoch
        )
        report.image_ref = f"oci:{directory}:{tag}"
    if outputs.layers_dir:
        report.history_path = save_layers_history(result, outputs.layers_dir)
    if outputs.push_to and outputs.layout:
        report.push = push_layout(outputs.layout[0], outputs.layout[1], outputs.push_to, registry_options, limits)
    return report


def write_layout(
    result: BuildResult, directory: str, tag: str, options: ImageOptions, prior: Prior, source_date_epoch: int
) -> tuple[ImageResult, list[str]]:
    """The image into an OCI layout, its plan as a config label; also the layers left
    out of the layout because the destination registry has them."""
    layout = BlobDir(directory, create=True)
    records = [o.record for o in result.layers]
    fresh = {o.record.digest for o in result.layers if not o.reused or o.cached}
    sources = [result.blobs, *prior.blob_sources]
    external = {
        o.record.digest
        for o in result.layers
        if o.reused and o.record.digest in prior.remote_blobs
        and not any(d.has(o.record.digest) for d in (layout, *sources))
    }
    options = replace(
        options, env=options.env or list(DEFAULT_ENV), labels=with_history_label(options.labels, result.history)
    )
    image = write_image(
        directory, tag, records, options, result.platform, rfc3339(source_date_epoch),
        sources, fresh=fresh, external=external,
    )
    return image, sorted(external)


def save_layers_history(result: BuildResult, layers_dir: str) -> str:
    path = os.path.join(layers_dir, "history.json")
    save_history(path, result.history)
    return path


def push_layout(layout: str, tag: str | None, dest: str, registry_options=None,
                limits: Limits = DEFAULT_LIMITS):
    """Copy oci:LAYOUT:TAG to docker://DEST with skopeo, reporting what was uploaded."""
    from .registry import RegistryOptions, push

    image = open_layout(layout, tag, limits)
    blobs = BlobDir(layout)
    local = {d for d in [image.config_digest, *(x.digest for x in image.layers)] if blobs.has(d)}
    if tag is None:
        tag = tag_of(layout, image.manifest_digest, limits)  # skopeo needs the tag
    return push(layout, tag, image, dest, registry_options or RegistryOptions(), local=local)


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
