"""The configuration of the output image: the runtime config of a source image (or of
another image or an inspect file, --config-from), with what the command line sets on top
and the labels it removes.

A source config is untrusted: every string carried over must be text that can be
written back (JSON allows lone surrogates, UTF-8 does not), and keys (labels, Env names)
must be non-empty and free of control characters. `merge_config` checks all of it, and
inputs.py calls it before anything is unpacked or written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import PkglayerError
from .fsutil import read_regular
from .layout import ImageError, ImageOptions

log = logging.getLogger(__name__)

MAX_CONFIG_FILE = 16 << 20
# Labels that describe an ostree repository inside the image: stale once it is left out.
OSTREE_LABEL_PREFIX = "ostree."

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def _key(key: str, what: str) -> None:
    if not key or _CONTROL.search(key):
        raise ImageError(f"source image config: {what} key {key[:80]!r} is empty or holds control characters")


def _writable(options: ImageOptions) -> None:
    """Every string can be written back as UTF-8 JSON."""
    try:
        json.dumps(options.__dict__, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ImageError(f"source image config: a string is not valid Unicode ({e.reason}: "
                         f"{e.object[max(e.start - 20, 0):e.end + 20]!r})") from None


def merge_config(
    runtime: Mapping[str, Any] | None, cli: ImageOptions, remove_labels: Iterable[str] = ()
) -> ImageOptions:
    """A runtime config (an image's `config` object: Env, Cmd, Labels...), with what the
    command line set on top: --env and --label replace or add single keys,
    --cmd/--entrypoint/--workdir/--user replace; then the labels in `remove_labels` go."""
    if runtime is None:
        runtime = {}
    env = _str_list(runtime.get("Env"), "Env") or []
    for item in env:
        _key(item.partition("=")[0], "Env")
    for item in cli.env:
        key = item.partition("=")[0]
        env = [e for e in env if e.partition("=")[0] != key]
        env.append(item)
    labels = runtime.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ImageError("source image config: Labels must be an object of strings")
    for key in labels:
        _key(key, "Labels")
    drop = set(remove_labels)
    merged = ImageOptions(
        env=env,
        labels={k: v for k, v in {**labels, **cli.labels}.items() if k not in drop},
        cmd=cli.cmd if cli.cmd is not None else _str_list(runtime.get("Cmd"), "Cmd"),
        entrypoint=cli.entrypoint if cli.entrypoint is not None else _str_list(runtime.get("Entrypoint"), "Entrypoint"),
        workdir=cli.workdir if cli.workdir is not None else _str(runtime.get("WorkingDir"), "WorkingDir"),
        user=cli.user if cli.user is not None else _str(runtime.get("User"), "User"),
        exposed_ports=_set(runtime.get("ExposedPorts"), "ExposedPorts"),
        volumes=_set(runtime.get("Volumes"), "Volumes"),
        stop_signal=_str(runtime.get("StopSignal"), "StopSignal"),
    )
    _writable(merged)
    return merged


def config_from(spec: str, read_image) -> dict[str, Any]:
    """--config-from IMAGE|FILE|-: an image's runtime config (`read_image(ref)` reads it,
    any transport), or JSON from a file or standard input: an OCI/Docker image config, or
    what `podman inspect` or `docker inspect` prints for an image (a list of one object
    with `Config`)."""
    from .transports import PREFIXES

    if any(spec.startswith(prefix) for _, prefix in PREFIXES):
        return dict(read_image(spec).runtime)
    if spec == "-":  # e.g. `printf %s "$(podman inspect BASE)" | pkglayer build ... --config-from -`
        raw = sys.stdin.buffer.read(MAX_CONFIG_FILE + 1)
        if len(raw) > MAX_CONFIG_FILE:
            raise PkglayerError(f"--config-from -: more than {MAX_CONFIG_FILE} bytes on standard input")
    else:
        raw = read_regular(os.path.abspath(spec), MAX_CONFIG_FILE, "--config-from", PkglayerError)
    assert raw is not None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise PkglayerError(f"--config-from {spec}: not JSON: {str(e)[:200]}") from None
    if isinstance(obj, list):
        if len(obj) != 1:
            raise PkglayerError(f"--config-from {spec}: an inspect list of {len(obj)} images; give one")
        obj = obj[0]
    if not isinstance(obj, dict):
        raise PkglayerError(f"--config-from {spec}: not a JSON object")
    for key in ("Config", "config"):  # inspect output, then an image config
        runtime = obj.get(key)
        if isinstance(runtime, dict):
            return runtime
    raise PkglayerError(f"--config-from {spec}: no Config object (expected an image config or inspect output)")


def ostree_labels(runtime: Mapping[str, Any] | None) -> list[str]:
    """The labels of a bootc/ostree image that describe its ostree repository."""
    labels = (runtime or {}).get("Labels") or {}
    return sorted(k for k in labels if isinstance(k, str) and k.startswith(OSTREE_LABEL_PREFIX))
