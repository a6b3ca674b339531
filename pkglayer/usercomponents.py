"""Components no package database declares: the ones users name, and big unowned files.

- `user.component` / `user.update-interval` extended attributes (as rpm-ostree and
  chunkah read them): a tagged file or directory belongs to the named component, a
  directory with all that is below it unless something below is tagged again.
- `[[component]]` tables of the configuration and `--component NAME=GLOB`: paths
  matching a glob (rootfs-relative, `**` crosses directories), a matching directory with
  all that is below it.
- A regular file of at least `big-file-size` that no package or user component claims:
  a component of its own, named after its path.

An update interval is `daily`, `weekly`, `biweekly`, `monthly`, `quarterly`, `yearly`
or a number of days. Component names become layer and history names, so they must be
valid ones (history.NAME_RE), short enough to leave room for the version suffix.
This module holds the parsing and naming; the rules that claim objects are in
ownership.py.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .scan import FsObject

XATTR_COMPONENT = "user.component"
XATTR_INTERVAL = "user.update-interval"

ORIGIN_XATTR = "xattr"
ORIGIN_CONFIG = "config"
ORIGIN_BIG_FILE = "big file"

INTERVAL_DAYS = {"daily": 1, "weekly": 7, "biweekly": 14, "monthly": 30, "quarterly": 91, "yearly": 365}
_MAX_DAYS = 36500

# A component's key (its layer name when alone) is NAME-FINGERPRINT, and a shared layer
# adds "+N": 200 leaves room for both within NAME_RE's 255 characters.
MAX_NAME = 200
FINGERPRINT_HEX = 12

# Big-file components are named "file:" + the path with "/" as ":" (and "^XX" escapes),
# so that no package or user component can have the name of one.
BIG_FILE_PREFIX = "file:"
_SAFE = re.compile(r"[A-Za-z0-9._+~@-]")


@dataclass(frozen=True)
class ComponentSpec:
    """A component from the configuration or the command line."""

    name: str
    paths: tuple[str, ...]  # rootfs-relative globs
    interval: str | None = None  # as written: "monthly", "30"
    where: str = "config"  # for messages: "component[0] in FILE", "--component"


def interval_days(value: object) -> int | None:
    """Days from an interval name or a positive number of days (an int, or digits in
    a string); None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in INTERVAL_DAYS:
            return INTERVAL_DAYS[text]
        if not text.isdigit() or len(text) > 6:
            return None
        value = int(text)
    if isinstance(value, int) and 1 <= value <= _MAX_DAYS:
        return value
    return None


def interval_weekly(days: int) -> float:
    """Chance of a change in a given week for something that changes every `days` days."""
    return min(1.0, 7 / days)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a component name, or None."""
    from .history import NAME_RE  # here: config imports this module at every start, history is 5 ms

    if len(name) > MAX_NAME:
        return f"longer than {MAX_NAME} characters"
    if not NAME_RE.fullmatch(name):
        return "not a valid layer name (letters, digits and . _ + ~ : @ ^ -, starting with a letter or digit)"
    if name.startswith(BIG_FILE_PREFIX):
        return f"reserved for big files' components (it starts with {BIG_FILE_PREFIX!r})"
    return None


def shown(value: bytes | str, limit: int = 40) -> str:
    """A value from the tree, short and printable, for a warning."""
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(value)} bytes)"


def big_file_name(path: str) -> str:
    """A stable, valid component name for a big file: a function of its path only, and
    different for different paths ("usr/share/x.bin" -> "file:usr:share:x.bin")."""
    escaped = "".join(":" if ch == "/" else ch if _SAFE.fullmatch(ch) else _escape(ch) for ch in path)
    name = BIG_FILE_PREFIX + escaped
    if len(name) > MAX_NAME:
        # keep the tail (the file name says most); the hash keeps long paths apart
        digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        name = f"{BIG_FILE_PREFIX}{digest}:{escaped[-(MAX_NAME - len(BIG_FILE_PREFIX) - 17):]}"
    return name


def _escape(ch: str) -> str:
    return "".join(f"^{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))


def fingerprint(objects: Iterable[FsObject], all_objects: dict[str, FsObject]) -> str:
    """A version for a component that has none: a digest of its layer's members as the
    scan sees them (paths, types, modes, owners, sizes, mtimes, link targets, xattrs),
    without file contents, so `pkglayer plan` and `pkglayer build` agree without
    reading any file. It changes when the layer's tar would, but for an edit that keeps
    a file's size and mtime (the layer is still rebuilt then: its content key changes)."""
    from .tarwriter import layer_members  # here: config imports this module, and --help need not load the scanner

    h = hashlib.sha256()
    for m in layer_members(objects, all_objects, 0):
        h.update(replace(m, content_hash="", source=None).key_line().encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:FINGERPRINT_HEX]


def spec_from_table(table: Any, key: str, source: str | None = None) -> ComponentSpec:
    """A `[[component]]` table (`name`, `paths` globs, optional `update-interval`) found
    at `key` ("component[0]") of the file `source`; errors name both."""
    at = f"{source}: {key}" if source else key

    def error(field: str, message: str) -> ConfigError:
        return ConfigError(f"{at}.{field}: {message}")

    if not isinstance(table, dict):
        raise ConfigError(f"{at}: must be a table ([[component]])")
    unknown = sorted(set(table) - {"name", "paths", "update-interval"})
    if unknown:
        raise error(unknown[0], "unknown setting (expected name, paths, update-interval)")
    name = table.get("name")
    if not isinstance(name, str):
        raise error("name", "missing or not a string")
    problem = name_problem(name)
    if problem:
        raise error("name", f"{shown(name)} is {problem}")
    paths = table.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and _glob(p) for p in paths):
        raise error("paths", "must be a non-empty list of rootfs path globs")
    interval = table.get("update-interval")
    if interval is not None:
        if interval_days(interval) is None:
            raise error("update-interval", f"must be {', '.join(INTERVAL_DAYS)} or a number of days, not {interval!r}")
        interval = str(interval)
    where = f"{key} in {source}" if source else key
    return ComponentSpec(name, tuple(_glob(p) for p in paths), interval, where)


def spec_from_argument(text: str) -> ComponentSpec:
    """`--component NAME=GLOB`."""
    name, sep, pattern = text.partition("=")
    if not sep or not name:
        raise ConfigError(f"--component must look like NAME=GLOB, not {text!r}")
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"--component: {shown(name)} is {problem}")
    if not _glob(pattern):
        raise ConfigError(f"--component: {pattern!r} is not a rootfs path glob")
    return ComponentSpec(name, (_glob(pattern),), None, "--component")


def _glob(pattern: str) -> str:
    """A glob made rootfs-relative; "" when it is none."""
    rel = pattern.strip().lstrip("/")
    return "" if "\0" in rel else rel
