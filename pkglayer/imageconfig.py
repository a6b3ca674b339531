"""The configuration of the output image: what a source image's config carries over, with
what the command line sets on top."""

from __future__ import annotations

from .layout import Image, ImageError, ImageOptions


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


def merge_config(source: Image | None, cli: ImageOptions) -> ImageOptions:
    """The source image's configuration, with what the command line set on top: --env
    and --label replace or add single keys, --cmd/--entrypoint/--workdir/--user replace."""
    if source is None:
        return cli
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
    )
