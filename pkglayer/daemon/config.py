"""The daemon's configuration: a `[daemon]` table and `[[root]]` entries in the same TOML
file as `[build]`, whose settings are every root's defaults.

Every error names the key, e.g. ``root[1].debounce: must be a positive number``
(roots are counted from 0, as in TOML's array).
"""

from __future__ import annotations

import grp
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import COMPRESSIONS, BuildSettings, components_from, did_you_mean, load_settings, parse_size, read_config
from ..errors import ConfigError, PkglayerError
from ..sources import source_formats
from ..transports import DOCKER_ARCHIVE, OCI, OCI_ARCHIVE, parse_image_ref

DEFAULT_SOCKET = "/run/pkglayer/pkglayer.sock"
DEFAULT_STATE_DIR = "/var/lib/pkglayer"
DEFAULT_CACHE_SIZE = 20 * 1000**3
# Work reported stuck by `health` when it has not progressed for this long: longer than
# the slowest single layer write (a build reports progress per file hashed and per layer).
DEFAULT_STALL_TIMEOUT = 600.0
# How long SIGTERM waits for work in progress: below systemd/pkglayer.service's
# TimeoutStopSec=120, after which systemd would SIGKILL.
DEFAULT_STOP_TIMEOUT = 90.0
LOG_LEVELS = ("debug", "info", "warning", "error")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RootConfig:
    name: str
    path: str
    output: str | None = None  # any --output reference but standard output
    layers: str | None = None  # /layers protocol directory
    settings: BuildSettings = field(default_factory=BuildSettings)
    debounce: float = 2.0
    auto_build: bool = True


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = DEFAULT_SOCKET
    socket_group: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    log_level: str = "info"
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    cache_max_size: int = DEFAULT_CACHE_SIZE
    parallel_builds: int = 1
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    roots: tuple[RootConfig, ...] = ()
    path: str | None = None  # the file it came from

    def root(self, name: str) -> RootConfig | None:
        return next((r for r in self.roots if r.name == name), None)

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.state_dir, "cache")


class _Table:
    """Typed reads from one TOML table, with errors that name the key."""

    def __init__(self, table: dict[str, Any], where: str):
        self.table = dict(table)
        self.where = where
        self.known: set[str] = set()  # every key asked for: the table's valid keys by done()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}"

    def take(self, name: str, kind: type | tuple[type, ...], what: str, default: Any = None) -> Any:
        self.known.add(name)
        if name not in self.table:
            return default
        value = self.table.pop(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.key(name)}: must be {what}, not {value!r}")
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.key(name)}: must be {what}, not {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...] | None:
        value = self.take(name, list, "a list of strings")
        if value is None:
            return None
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(name)}: must be a list of strings")
        return tuple(value)

    def done(self) -> None:
        if self.table:
            unknown = sorted(self.table)[0]
            raise ConfigError(f"{self.key(unknown)}: unknown setting{did_you_mean(unknown, self.known)}")


def load_daemon_config(path: str) -> DaemonConfig:
    data = read_config(path)
    defaults = load_settings(path)  # [build]: validated there; its errors name the file already
    try:
        return _parse(data, path, defaults)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _parse(data: dict[str, Any], path: str, defaults: BuildSettings) -> DaemonConfig:
    unknown = sorted(set(data) - {"build", "component", "daemon", "root"})
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown table{did_you_mean(unknown[0], ('build', 'component', 'daemon', 'root'))}; "
            "expected [build], [[component]], [daemon], [[root]]"
        )
    raw = data.get("daemon", {})
    if not isinstance(raw, dict):
        raise ConfigError("daemon: must be a table ([daemon])")
    t = _Table(raw, "daemon")
    socket = t.take("socket", str, "an absolute path", DEFAULT_SOCKET)
    if not os.path.isabs(socket):
        raise ConfigError(f"daemon.socket: must be an absolute path, not {socket!r}")
    if len(os.fsencode(socket)) > 107:
        raise ConfigError("daemon.socket: path is longer than a Unix socket address allows (107 bytes)")
    group = t.take("socket-group", str, "a group name") or None
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"daemon.socket-group: no group named {group!r}") from None
    state_dir = t.take("state-dir", str, "an absolute path", DEFAULT_STATE_DIR)
    if not os.path.isabs(state_dir):
        raise ConfigError(f"daemon.state-dir: must be an absolute path, not {state_dir!r}")
    log_level = t.take("log-level", str, f"one of {', '.join(LOG_LEVELS)}", "info")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"daemon.log-level: must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    jobs = t.take("jobs", int, "a positive integer", os.cpu_count() or 1)
    if jobs < 1:
        raise ConfigError(f"daemon.jobs: must be a positive integer, not {jobs}")
    parallel = t.take("parallel-builds", int, "a positive integer", 1)
    if parallel < 1:
        raise ConfigError(f"daemon.parallel-builds: must be a positive integer, not {parallel}")
    size_raw = t.take("cache-max-size", (int, str), "a size", DEFAULT_CACHE_SIZE)
    cache_max = parse_size(size_raw, "daemon.cache-max-size")
    timeouts = {}
    for key, default in (("stall-timeout", DEFAULT_STALL_TIMEOUT), ("stop-timeout", DEFAULT_STOP_TIMEOUT)):
        value = t.take(key, (int, float), "a positive number of seconds", default)
        if not 0 < value <= 86400:
            raise ConfigError(f"daemon.{key}: must be a positive number of seconds (at most 86400), not {value}")
        timeouts[key.replace("-", "_")] = float(value)
    t.done()

    raw_roots = data.get("root", [])
    if not isinstance(raw_roots, list):
        raise ConfigError("root: must be an array of tables ([[root]])")
    roots: list[RootConfig] = []
    for i, entry in enumerate(raw_roots):
        if not isinstance(entry, dict):
            raise ConfigError(f"root[{i}]: must be a table")
        root = _parse_root(entry, f"root[{i}]", defaults._replace(jobs=jobs, hash_cache=""))
        for other in roots:
            if other.name == root.name:
                raise ConfigError(f"root[{i}].name: {root.name!r} is already the name of another root")
            if other.path == root.path:
                raise ConfigError(f"root[{i}].path: {root.path} is already watched as root {other.name!r}")
        roots.append(root)
    hash_cache = os.path.join(state_dir, "file-digests.sqlite")
    roots = [replace(r, settings=r.settings._replace(hash_cache=hash_cache)) for r in roots]
    return DaemonConfig(
        socket=socket,
        socket_group=group,
        state_dir=state_dir,
        log_level=log_level,
        jobs=jobs,
        cache_max_size=cache_max,
        parallel_builds=parallel,
        **timeouts,
        roots=tuple(roots),
        path=os.path.abspath(path),
    )


def _check_output(text: str, key: str) -> None:
    """Any reference `pkglayer build --output` takes, but standard output; paths absolute
    (the daemon's working directory is nobody's)."""
    try:
        ref = parse_image_ref(text, "reference")
    except PkglayerError as e:
        raise ConfigError(f"{key}: {e}") from None
    if ref.is_stdout:
        raise ConfigError(f"{key}: standard output ({text}) is for the command line; give a layout, an archive "
                          "file, a store or a registry")
    path = ref.path if ref.transport in (OCI, OCI_ARCHIVE, DOCKER_ARCHIVE) else ref.store_root
    if path is not None and not os.path.isabs(path):
        what = "the layout directory" if ref.transport == OCI else "the archive" if ref.path else "the store"
        raise ConfigError(f"{key}: {what} must be an absolute path, not {path!r}")


def _parse_root(entry: dict[str, Any], where: str, defaults: BuildSettings) -> RootConfig:
    t = _Table(entry, where)
    if "name" not in entry:
        raise ConfigError(f"{where}.name: missing (every root needs a name)")
    name = t.take("name", str, "a string")
    if not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{where}.name: {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if "path" not in entry:
        raise ConfigError(f"{where}.path: missing (the root filesystem directory to watch)")
    path = t.take("path", str, "an absolute path")
    if not os.path.isabs(path) or os.path.normpath(path) == "/":
        raise ConfigError(f"{where}.path: must be an absolute path other than /, not {path!r}")
    path = os.path.normpath(path)
    output = t.take("output", str, "an image reference")
    if output is not None:
        _check_output(output, f"{where}.output")
    layers = t.take("layers", str, "an absolute path")
    if layers is not None and not os.path.isabs(layers):
        raise ConfigError(f"{where}.layers: must be an absolute path, not {layers!r}")
    changes: dict[str, Any] = {}
    compression = t.take("compression", str, f"one of {', '.join(COMPRESSIONS)}")
    if compression is not None:
        if compression not in COMPRESSIONS:
            raise ConfigError(f"{where}.compression: must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
        changes["compression"] = compression
    level = t.take("level", int, "an integer")
    if level is not None:
        comp = changes.get("compression", defaults.compression)
        changes["gzip_level" if comp == "gzip" else "zstd_level"] = level
    max_layers = t.take("max-layers", int, "an integer")
    if max_layers is not None:
        changes["max_layers"] = max_layers
    excludes = t.strings("excludes")
    if excludes is not None:
        changes["extra_excludes"] = defaults.extra_excludes + excludes
    formats = [*source_formats(), "none"]
    fmt = t.take("format", str, f"one of {', '.join(formats)}")
    if fmt is not None:
        if fmt not in formats:
            raise ConfigError(f"{where}.format: must be one of {', '.join(formats)}, not {fmt!r}")
        changes["package_format"] = fmt
    tables = t.take("component", list, "an array of tables ([[root.component]])")
    if tables is not None:
        changes["components"] = defaults.components + components_from(tables, f"{where}.component")
    big = t.take("big-file-size", (int, str), "a size")
    if big is not None:
        changes["big_file_size"] = parse_size(big, f"{where}.big-file-size")
    debounce = t.take("debounce", (int, float), "a positive number", 2.0)
    if not 0 < debounce <= 3600:
        raise ConfigError(f"{where}.debounce: must be a positive number of seconds (at most 3600), not {debounce}")
    auto_build = t.take("auto-build", bool, "true or false", True)
    t.done()
    settings = defaults._replace(**changes)
    try:
        settings.validated()
    except ConfigError as e:
        key = "level" if "level" in str(e) else "max-layers" if "max-layers" in str(e) else "compression"
        raise ConfigError(f"{where}.{key}: {e}") from None
    return RootConfig(
        name=name,
        path=path,
        output=output,
        layers=layers,
        settings=settings,
        debounce=float(debounce),
        auto_build=auto_build,
    )
