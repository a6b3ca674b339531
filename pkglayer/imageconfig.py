"""The configuration of the output image: what a source image's config carries over, with
what the command line sets on top.

The source config is untrusted: every string carried over must be text that can be
written back (JSON allows lone surrogates, UTF-8 does not), and keys (labels, Env names)
must be non-empty and free of control characters. `merge_config` checks all of it, and
inputs.py calls it before anything is unpacked or written.
"""

from __future__ import annotations

import json
import re

from .layout import Image, ImageError, ImageOptions

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


def merge_config(source: Image | None, cli: ImageOptions) -> ImageOptions:
    """The source image's configuration, with what the command line set on top: --env
    and --label replace or add single keys, --cmd/--entrypoint/--workdir/--user replace."""
    if source is None:
        return cli
    runtime = source.runtime
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
    merged = ImageOptions(
        env=env,
        labels={**labels, **cli.labels},
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
