"""Build settings: built-in defaults, overridden by a TOML file, overridden by the command line.

`conf/pkglayer.toml` in the repository spells out the same defaults with comments; a test
keeps the two in step.
"""

from __future__ import annotations

import os
import re
from collections import namedtuple
from collections.abc import Iterable

from .errors import ConfigError
from .fsutil import read_regular

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing takes ~3 ms to load: annotations only
    from typing import Any

    from .usercomponents import ComponentSpec

# "none": uncompressed layers, for outputs that go straight into local storage
# (containers-storage keeps layers uncompressed: compressing would be undone at once);
# "zstd:chunked": zstd that clients with partial pulls fetch file by file (zstd_chunked.py).
COMPRESSIONS = ("gzip", "zstd", "zstd:chunked", "none")

DEFAULT_EXCLUDES = (
    # package-manager caches and downloaded indexes: rebuilt on demand, change every run
    "var/cache/apt/**",
    "var/lib/apt/lists/**",
    "var/cache/dnf/**",
    "var/cache/yum/**",
    "var/cache/ldconfig/aux-cache",
    "var/lib/pacman/sync/**",
    "var/cache/pacman/pkg/**",
    "root/.cache/pip/**",
    "home/*/.cache/pip/**",
    # scratch space
    "tmp/**",
    "var/tmp/**",
    # kernel API filesystems, in case the rootfs has them mounted or populated
    "proc/**",
    "sys/**",
    # sqlite's shared-memory index of the rpm database: rebuilt on open, host-specific.
    # (The -wal file is kept: it may hold committed transactions not yet checkpointed.)
    "**/rpmdb.sqlite-shm",
    # Berkeley DB environment files of old rpm databases
    "**/rpm/__db.*",
)

# Host-specific labels and overlay bookkeeping must not leak into layers;
# security.capability and user.* are content and are kept.
DEFAULT_DROP_XATTRS = ("security.selinux", "security.ima", "security.evm", "trusted.*")

SYSTEM_CONFIG = "/etc/pkglayer/pkglayer.toml"
# The latest time unpacking accepts (tarread.MAX_MTIME): SOURCE_DATE_EPOCH ends up in
# every directory entry and in the image config.
MAX_EPOCH = 2**34 - 1

# Unowned files from this size on get components of their own (as chunkah's).
DEFAULT_BIG_FILE_SIZE = 1 << 20

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?")


def parse_size(value: object, where: str) -> int:
    """Bytes from an integer or a string: "500M", "64G" (k, M, G, T: powers of 1000) or
    "512MiB", "64Gi" (Ki, Mi, Gi, Ti: powers of 1024), a trailing B allowed. The one
    size syntax of the command line and the configuration."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(f"{where}: must be a positive size")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m:
            number, unit, binary = m.groups()
            if not (binary and not unit):
                base = 1024 if binary else 1000
                size = int(float(number) * base ** " kmgt".index(unit.lower() or " "))
                if size > 0:
                    return size
    raise ConfigError(
        f"{where}: must be a positive size in bytes or a string like \"500M\" or \"64Gi\", not {value!r}"
    )


# The fields of BuildSettings, each with its default. A named tuple, not a dataclass:
# every command reads its settings before anything else, and loading dataclasses (with
# inspect) took ~8 ms of an unchanged rebuild's 0.12 s.
_SETTINGS = (
    ("compression", "gzip"),
    # libdeflate's level 5 writes layers no larger than zlib's default (6) with about a
    # fifth less CPU than its own level 6 (compress.py, docs/benchmark.md). Layers made
    # at another level stay reusable (reuse.py), so changing it re-ships nothing.
    ("gzip_level", 5),
    ("zstd_level", 3),
    # 64 (as ostree chunking and chunkah): every runtime accepts it, and images built
    # FROM this one keep ~60 layers of headroom below moby's failures around 122-125.
    ("max_layers", 64),
    # builds over which moving components to a fresh plan must pay for itself
    ("replan_horizon", 26),
    ("excludes", DEFAULT_EXCLUDES),
    ("extra_excludes", ()),
    ("drop_xattrs", DEFAULT_DROP_XATTRS),
    # mtime given to every directory entry and to image timestamps (SOURCE_DATE_EPOCH)
    ("source_date_epoch", 0),
    ("one_file_system", True),
    # Whether a package file whose mtime differs from the database's counts as modified.
    # Off for ostree checkouts (bootc images), where every mtime is 0.
    ("compare_mtimes", True),
    # Read and hash every package file to tell edits, even those the package database's
    # timestamps vouch for (dpkg: ownership.vouched_for), as debsums does.
    ("hash_package_files", False),
    # package database format to read; None detects it ("rpm", "dpkg", "none")
    ("package_format", None),
    # file-digest cache (see hashcache.py): None = the per-user default, "" = none
    ("hash_cache", None),
    # [[component]] tables and --component (usercomponents.ComponentSpec): paths users
    # group into components
    ("components", ()),
    ("big_file_size", DEFAULT_BIG_FILE_SIZE),
    # read reused blobs through once and check the layer they hold (docs/security.md)
    ("verify_reused", False),
    ("jobs", os.cpu_count() or 1),
)


class BuildSettings(namedtuple("BuildSettings", [name for name, _ in _SETTINGS],
                               defaults=[default for _, default in _SETTINGS])):
    """What a build does: defaults, then the configuration file, then the command line.
    Immutable: `settings._replace(name=value)` is a changed copy."""

    __slots__ = ()

    @property
    def all_excludes(self) -> tuple[str, ...]:
        return self.excludes + self.extra_excludes

    @property
    def hash_cache_path(self) -> str | None:
        if self.hash_cache is None:
            # Here, not in hashcache.py: every command reads the settings, and that
            # module loads sqlite3.
            base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            return os.path.join(base, "pkglayer", "file-digests.sqlite")
        return self.hash_cache or None

    @property
    def compression_level(self) -> int:
        return {"gzip": self.gzip_level, "zstd": self.zstd_level, "zstd:chunked": self.zstd_level}.get(
            self.compression, 0
        )

    @property
    def compression_spec(self) -> str:
        """Names compression and level ("gzip-5"), as history records them. The level
        decides how new blobs are written; a prior blob is reused whatever its level
        (reuse.py)."""
        if self.compression == "none":
            return "none"
        return f"{self.compression}-{self.compression_level}"

    def validated(self) -> BuildSettings:
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"unknown compression {self.compression!r} (choose {', '.join(COMPRESSIONS)})"
            )
        if not 1 <= self.gzip_level <= 9:
            raise ConfigError(f"gzip level must be 1..9, not {self.gzip_level}")
        if not 1 <= self.zstd_level <= 19:
            raise ConfigError(f"zstd level must be 1..19, not {self.zstd_level}")
        if not 4 <= self.max_layers <= 127:
            raise ConfigError(
                f"max-layers must be between 4 and 127 (container runtimes fail above ~125), "
                f"not {self.max_layers}"
            )
        if not 0 <= self.replan_horizon <= 10000:
            raise ConfigError(f"replan-horizon must be between 0 and 10000 builds, not {self.replan_horizon}")
        if self.jobs < 1:
            raise ConfigError("jobs must be at least 1")
        if not 0 <= self.source_date_epoch <= MAX_EPOCH:
            raise ConfigError(f"source-date-epoch must be between 0 and {MAX_EPOCH} (2514), "
                              f"not {self.source_date_epoch}")
        if self.big_file_size < 1:
            raise ConfigError(f"big-file-size must be a positive size, not {self.big_file_size}")
        return self


_TOML_KEYS = {
    "compression": str,
    "gzip-level": int,
    "zstd-level": int,
    "max-layers": int,
    "replan-horizon": int,
    "excludes": list,
    "extra-excludes": list,
    "drop-xattrs": list,
    "source-date-epoch": int,
    "one-file-system": bool,
    "hash-package-files": bool,
    "hash-cache": str,
    "verify-reused": bool,
    "jobs": int,
    "big-file-size": (int, str),
}


MAX_CONFIG_BYTES = 1 << 20


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """What to add to "unknown setting": the known key it most resembles (state_dir:
    state-dir), else the known keys."""
    import difflib  # here: only an error message needs it, and loading it slows every start

    known = sorted(known)
    match = difflib.get_close_matches(key.replace("_", "-"), known, n=1, cutoff=0.6)
    if match:
        return f" (did you mean {match[0]!r}?)"
    return f" (known: {', '.join(known)})"


def read_config(path: str) -> dict[str, Any]:
    """A TOML configuration file. It must be a regular file of at most 1 MiB: a FIFO or a
    device would block the reader or never end. A symlink is followed (files in /etc are
    often links), to a regular file only."""
    import tomllib  # here: ~6 ms to load, and most builds read no config file

    real = os.path.realpath(path)
    raw = read_regular(real, MAX_CONFIG_BYTES, "config file", ConfigError, missing_ok=True)
    if raw is None:
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_settings(path: str | None = None, base: BuildSettings | None = None) -> BuildSettings:
    """Settings from the [build] table of a TOML file. Without a path, the system file is
    read if it exists. Unknown keys are an error: a typo must not silently do nothing."""
    settings = base or BuildSettings()
    if path is None:
        if not os.path.exists(SYSTEM_CONFIG):
            return settings
        path = SYSTEM_CONFIG
    data = read_config(path)
    table = data.get("build", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [build] must be a table")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        want = _TOML_KEYS.get(key)
        if want is None:
            raise ConfigError(f"{path}: unknown setting build.{key}{did_you_mean(key, _TOML_KEYS)}")
        if key == "big-file-size":
            changes["big_file_size"] = parse_size(value, f"{path}: build.{key}")
            continue
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: build.{key} must be a {want.__name__}")
        if want is list:
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: build.{key} must be a list of strings")
            value = tuple(value)
        changes[key.replace("-", "_")] = value
    changes["components"] = settings.components + components_from(data.get("component", []), "component", path)
    assert set(changes) <= set(BuildSettings._fields)
    return settings._replace(**changes)


def components_from(tables: object, key: str, source: str | None = None) -> tuple[ComponentSpec, ...]:
    """The `[[component]]` array of tables at `key` of the file `source`."""
    from .usercomponents import spec_from_table  # here: it loads dataclasses, which a start does without

    if not isinstance(tables, list):
        raise ConfigError(f"{source + ': ' if source else ''}{key} must be an array of tables ([[{key}]])")
    return tuple(spec_from_table(t, f"{key}[{i}]", source) for i, t in enumerate(tables))
