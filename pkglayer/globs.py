"""Glob patterns matched against rootfs-relative paths: excludes, dropped xattrs,
components. wcmatch's glob syntax: `*` and `?` within a name, dot files included, `**`
any number of directories (with `globstar`).

All the patterns become one regex, so a path is matched once, not once per pattern. But
Python's re runs a union that holds a `**/NAME` pattern in 10-15 µs a path (it tries
every directory boundary), and the walk asks for every object of the tree: with the
default excludes, a third of the cold walk of an 11,000-object tree. So each pattern also
gets a necessary condition that C string methods check in about a microsecond, and the
regex runs only for paths that pass one:
- a pattern that starts with a name: the path starts with its literal prefix;
- one that starts with a wildcard: the path holds its longest literal run within a name.
Two kinds of pattern are decided without the regex, their condition being sufficient
too: a literal path (equal), and, with `globstar`, a literal directory then `/**` (the
path starts with the directory and a slash). Most default excludes are such: a Debian
tree's apt caches then never load wcmatch, 15 ms of a first scan.
A pattern outside the plain syntax (brackets, backslashes, empty names) has no such
condition: then every path goes to the regex. Paths are the walk's: no empty, `.` or
`..` names (wcmatch reads `a//b` as `a/b`, a prefix test would not).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WILDCARD = re.compile(r"[*?]")
# Names of anything but what wcmatch reads otherwise ([...] classes, \ escapes); no
# empty name (so no leading, trailing or doubled slash).
_PLAIN = re.compile(r"[^/\[\]\\]+(?:/[^/\[\]\\]+)*")


def _condition(pattern: str, globstar: bool) -> tuple[str, str] | None:
    """("prefix", P) or ("needle", N) as in the module docstring, or ("exact", PATH),
    ("subtree", DIR/) when the test decides alone; None: no cheap condition."""
    if not _PLAIN.fullmatch(pattern):
        return None
    first = _WILDCARD.search(pattern)
    if first is None:
        return "exact", pattern
    if globstar and pattern.endswith("/**") and first.start() == len(pattern) - 2:
        return "subtree", pattern[: first.start()]
    if first.start() > 0:
        return "prefix", pattern[: first.start()]
    needle = max((run for name in pattern.split("/") for run in _WILDCARD.split(name)), key=len)
    return ("needle", needle) if needle else None


class PathGlobs:
    """A set of glob patterns; `matches(path)` when any of them matches the whole path.
    The regex is compiled (and wcmatch loaded) when a path first passes the cheap test."""

    __slots__ = ("_patterns", "_globstar", "_regex", "_prefixes", "_needles", "_always", "_exact", "_subtrees")

    def __init__(self, patterns: Iterable[str], globstar: bool = False):
        self._patterns = tuple(patterns)
        self._globstar = globstar
        self._regex: re.Pattern[str] | None = None
        conditions = [_condition(p, globstar) for p in self._patterns]
        self._always = None in conditions
        kinds: dict[str, list[str]] = {"prefix": [], "needle": [], "exact": [], "subtree": []}
        for kind, value in filter(None, conditions):
            kinds[kind].append(value)
        self._prefixes = tuple(kinds["prefix"])
        self._needles = tuple(kinds["needle"])
        self._exact = frozenset(kinds["exact"])
        self._subtrees = tuple(kinds["subtree"])

    def matches(self, path: str) -> bool:
        if path in self._exact or path.startswith(self._subtrees):
            return True
        if not (self._always or path.startswith(self._prefixes)):
            for needle in self._needles:  # a loop: any() over a generator cost more than the tests
                if needle in path:
                    break
            else:
                return False
        if self._regex is None:
            self._regex = self.regex()
        return self._regex.fullmatch(path) is not None

    def regex(self) -> re.Pattern[str]:
        """All the patterns as one regex (for a full match)."""
        from wcmatch import glob  # here: a sixth of the CLI's start-up, and most commands match no glob

        flags = glob.DOTGLOB | (glob.GLOBSTAR if self._globstar else 0)
        included, _ = glob.translate(list(self._patterns), flags=flags)
        return re.compile("|".join(f"(?:{p})" for p in included) or "(?!)")
