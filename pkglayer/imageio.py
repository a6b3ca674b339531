"""Images in and out of `pkglayer build`: `--from IMAGE`, `--output docker://REF`,
`--prior docker://REF|oci:DIR:TAG`, and `pkglayer push`.

`build()` itself only knows directories and OCI layouts. `prepared()` turns the image
options into those: it pulls and unpacks a source image into a private working tree,
reads a prior image's plan from its config, picks a temporary layout for a registry
output, and afterwards pushes that layout. Everything it creates lives in one temporary
directory that is removed when the build ends, whether it succeeded or not.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from .blobstore import BlobDir
from .build import ImageOptions
from .errors import PkglayerError
from .history import History, parse_history
from .imagesource import DEFAULT_LIMITS, ImageError, Limits, SourceImage, open_layout, parse_layout_ref, unpack
from .oci import HISTORY_LABEL
from .registry import (
    PushReport,
    RegistryOptions,
    blob_presence,
    fetch_image,
    is_docker_ref,
    parse_docker_ref,
    pull,
    push,
)

log = logging.getLogger(__name__)

DEFAULT_TMPDIR = "/var/tmp"  # disk-backed on Debian; an unpacked OS image can be large


@dataclass
class SourceInfo:
    ref: str
    manifest_digest: str
    layers: int
    entries: int
    bytes: int
    whiteouts: int
    opaque: int

    def as_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "manifestDigest": self.manifest_digest, "layers": self.layers,
            "entries": self.entries, "bytes": self.bytes, "whiteouts": self.whiteouts, "opaqueDirs": self.opaque,
        }


@dataclass
class Prepared:
    rootfs: str  # the directory to build from
    oci_ref: str | None  # the layout to write
    image: ImageOptions
    prior_history: History | None = None
    prior_sources: list[BlobDir] = field(default_factory=list)
    remote_blobs: set[str] = field(default_factory=set)
    push_to: str | None = None
    source: SourceInfo | None = None


# ---------------------------------------------------------------- config carried over


def _str_list(value: object, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"source image config: {what} must be an array of strings")
    return list(value)


def _str(value: object, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ImageError(f"source image config: {what} must be a string")
    return value


def _set(value: object, what: str) -> dict[str, dict] | None:
    if not value:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ImageError(f"source image config: {what} must be an object with string keys")
    return {k: {} for k in value}


def merge_config(source: SourceImage, cli: ImageOptions) -> ImageOptions:
    """The source image's configuration, with what the command line set on top: --env
    and --label replace or add single keys, --cmd/--entrypoint/--workdir/--user replace.
    Platform (architecture, os, variant) always comes from the source image."""
    runtime = source.runtime
    env = _str_list(runtime.get("Env"), "Env") or []
    for item in cli.env:
        key = item.partition("=")[0]
        env = [e for e in env if e.partition("=")[0] != key]
        env.append(item)
    labels = runtime.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ImageError("source image config: Labels must be an object of strings")
    return ImageOptions(
        env=env,
        labels={**labels, **cli.labels},
        cmd=cli.cmd if cli.cmd is not None else _str_list(runtime.get("Cmd"), "Cmd"),
        entrypoint=cli.entrypoint if cli.entrypoint is not None else _str_list(runtime.get("Entrypoint"), "Entrypoint"),
        workdir=cli.workdir if cli.workdir is not None else _str(runtime.get("WorkingDir"), "WorkingDir"),
        user=cli.user if cli.user is not None else _str(runtime.get("User"), "User"),
        exposed_ports=_set(runtime.get("ExposedPorts"), "ExposedPorts"),
        volumes=_set(runtime.get("Volumes"), "Volumes"),
        stop_signal=_str(runtime.get("StopSignal"), "StopSignal"),
        architecture=source.architecture,
        os=source.os,
        variant=_str(source.variant, "variant"),
    )


# ---------------------------------------------------------------- the plan in a config


def plan_from_image(image: SourceImage, where: str) -> History:
    """The History stored in the image's HISTORY_LABEL, validated as untrusted input and
    cross-checked against the manifest's layers, the config's diff_ids and history."""
    labels = image.runtime.get("Labels") or {}
    raw = labels.get(HISTORY_LABEL) if isinstance(labels, dict) else None
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
    entries = [h for h in image.config.get("history") or [] if isinstance(h, dict) and not h.get("empty_layer")]
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


# ---------------------------------------------------------------- build


def _split_outputs(outputs: list[str] | None) -> tuple[str | None, str | None]:
    oci = [o for o in outputs or [] if not is_docker_ref(o)]
    docker = [o for o in outputs or [] if is_docker_ref(o)]
    if len(oci) > 1 or len(docker) > 1:
        raise PkglayerError("--output: give at most one oci:DIR[:TAG] and one docker://REF")
    for ref in docker:
        parse_docker_ref(ref)
    return (oci[0] if oci else None), (docker[0] if docker else None)


def _make_tmp(tmpdir: str | None) -> str:
    base = tmpdir or os.environ.get("TMPDIR") or DEFAULT_TMPDIR
    try:
        return tempfile.mkdtemp(prefix="pkglayer-", dir=base)
    except OSError as e:
        raise PkglayerError(f"cannot create a working directory in {base}: {e.strerror}") from None


@contextmanager
def prepared(
    *,
    rootfs: str | None,
    source_ref: str | None,
    outputs: list[str] | None,
    prior: str | None,
    image: ImageOptions,
    opts: RegistryOptions,
    limits: Limits = DEFAULT_LIMITS,
    tmpdir: str | None = None,
    progress=None,
) -> Iterator[Prepared]:
    """Everything `build()` needs for these image options; see the module docstring.
    `prior` is handled only for docker:// and oci: specs (a history.json file is the
    caller's)."""
    if (rootfs is None) == (source_ref is None):
        raise PkglayerError("give either a ROOTFS directory or --from IMAGE, not both" if rootfs
                            else "give a ROOTFS directory or --from IMAGE")
    oci_out, docker_out = _split_outputs(outputs)
    if source_ref is not None and not (source_ref.startswith("oci:") or is_docker_ref(source_ref)):
        raise PkglayerError(f"--from {source_ref!r}: expected oci:DIR[:TAG] or docker://REF")
    work: str | None = None

    def workdir() -> str:
        nonlocal work
        if work is None:
            work = _make_tmp(tmpdir)
        return work

    try:
        result = Prepared(rootfs=rootfs or "", oci_ref=oci_out, image=image)
        if docker_out:
            result.push_to = docker_out
            if oci_out is None:
                result.oci_ref = f"oci:{os.path.join(workdir(), 'layout')}:{parse_docker_ref(docker_out).tag}"

        if prior is not None and is_docker_ref(prior):
            pinned, prior_image = fetch_image(prior, opts, limits)
            result.prior_history = plan_from_image(prior_image, prior)
            log.info("prior plan from %s: %d layers", pinned.transport, len(result.prior_history.layers))
            digests = [rec.digest for rec in result.prior_history.layers]
            if docker_out and oci_out is None:
                result.remote_blobs = _remote_blobs(prior, docker_out, digests, opts)
            elif docker_out:
                log.info("--output %s is written complete: unchanged layers are rewritten locally "
                         "(same digests; the push skips them)", oci_out)
        elif prior is not None and prior.startswith("oci:"):
            layout, tag = parse_layout_ref(prior)
            prior_image = open_layout(layout, tag, limits)
            result.prior_history = plan_from_image(prior_image, prior)
            result.prior_sources.append(BlobDir(layout))

        if source_ref is not None:
            if os.geteuid() != 0:
                raise PkglayerError("--from needs root: unpacking keeps file owners and device nodes")
            if is_docker_ref(source_ref):
                layout, tag = os.path.join(workdir(), "source"), "source"
                log.info("pulling %s", source_ref)
                pull(source_ref, layout, tag, opts)
            else:
                layout, tag = parse_layout_ref(source_ref)
            source = open_layout(layout, tag, limits)
            tree = os.path.join(workdir(), "rootfs")
            os.mkdir(tree, 0o755)
            stats = unpack(source, tree, limits, progress=progress)
            log.info("unpacked %s: %d layers, %d entries", source_ref, stats.layers, stats.entries)
            result.rootfs = tree
            result.image = merge_config(source, image)
            result.source = SourceInfo(
                ref=source_ref, manifest_digest=source.manifest_digest, layers=stats.layers,
                entries=stats.entries, bytes=stats.bytes, whiteouts=stats.whiteouts, opaque=stats.opaque,
            )
        yield result
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _remote_blobs(prior: str, dest: str, digests: list[str], opts: RegistryOptions) -> set[str]:
    """Prior layer digests that the destination repository has: those need neither a
    local blob nor an upload."""
    presence = blob_presence(dest, digests, opts)
    if presence is not None:
        have = {d for d, there in presence.items() if there}
        if len(have) < len(set(digests)):
            log.info("%s has %d of the prior image's %d layers", dest, len(have), len(set(digests)))
        return have
    if parse_docker_ref(prior).same_repository(parse_docker_ref(dest)):
        # The prior manifest is in this very repository, so its layers are too; the push
        # checks again before anything is written to the registry.
        return set(digests)
    log.warning("cannot ask %s which prior layers it has; all layers are written locally", dest)
    return set()


def publish(prep: Prepared, opts: RegistryOptions, limits: Limits = DEFAULT_LIMITS) -> PushReport | None:
    """Push the layout `build()` wrote to `prep.push_to`; None when there is nothing to push."""
    if not prep.push_to or not prep.oci_ref:
        return None
    layout, tag = parse_layout_ref(prep.oci_ref)
    return push_layout(layout, tag, prep.push_to, opts, limits)


def push_layout(layout: str, tag: str | None, dest: str, opts: RegistryOptions,
                limits: Limits = DEFAULT_LIMITS) -> PushReport:
    image = open_layout(layout, tag, limits)
    blobs = BlobDir(layout)
    local = {d for d in [image.config_digest, *(x.digest for x in image.layers)] if blobs.has(d)}
    if tag is None:
        # skopeo needs the tag that names the image in index.json
        tag = _tag_of(layout, image.manifest_digest)
    return push(layout, tag, image, dest, opts, local=local)


def _tag_of(layout: str, digest: str) -> str:
    import json

    with open(os.path.join(layout, "index.json"), "rb") as f:
        index = json.loads(f.read(DEFAULT_LIMITS.index_bytes))
    for m in index.get("manifests", []):
        if m.get("digest") == digest:
            name = (m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
            if name:
                return name
    raise PkglayerError(f"oci:{layout}: the image has no tag; give oci:{layout}:TAG")


def with_source_settings(settings, from_image: bool):
    """A tree unpacked into a fresh temporary directory never hits the digest cache:
    don't fill the cache with its entries."""
    return replace(settings, hash_cache="") if from_image else settings
