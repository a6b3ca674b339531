"""Glob sets (pkglayer.globs): the cheap test in front of the regex never changes an
answer, and spares the regex for paths no pattern can match."""

from __future__ import annotations

import random

import pytest

from pkglayer.config import DEFAULT_DROP_XATTRS, DEFAULT_EXCLUDES
from pkglayer.globs import PathGlobs

# Pattern names: plain, with wildcards, and what the cheap test must leave to the regex
# (classes, escapes, dot names, empty names from doubled, leading or trailing slashes).
_NAMES = ["a", "ab", ".a", "b.c", "rpm", "__db.1", "*", "?", "**", "a*", "*.c", "?b", "a?c", "*b*",
          "[ab]", "[!a]*", "\\*", "a\\?", ".", "..", ""]
# Path names: what the patterns' literals and wildcards can and cannot match. The walk's
# paths have no empty, `.` or `..` names.
_PATH_NAMES = ["a", "ab", ".a", "b.c", "rpm", "__db.1", "abc", "b", "c", "*", "x.c", "cb", "aXc", "..a"]


def _pattern(rng: random.Random) -> str:
    return "/".join(rng.choice(_NAMES) for _ in range(rng.randint(1, 4)))


def _path(rng: random.Random) -> str:
    return "/".join(rng.choice(_PATH_NAMES) for _ in range(rng.randint(1, 5)))


@pytest.mark.parametrize("globstar", [True, False])
def test_the_cheap_test_never_changes_what_matches(globstar: bool) -> None:
    rng = random.Random(12)
    checked = matched = 0
    for _ in range(400):
        patterns = [_pattern(rng) for _ in range(rng.randint(1, 4))]
        globs = PathGlobs(patterns, globstar=globstar)
        regex = globs.regex()
        for _ in range(60):
            path = _path(rng)
            expected = regex.fullmatch(path) is not None
            assert globs.matches(path) == expected, (patterns, path)
            checked += 1
            matched += expected
    assert checked == 24_000 and matched > 500  # the paths reach both answers often


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("a/**/b", "a/b", True),  # `**` as no directory at all
        ("var/cache/ldconfig/aux-cache", "var/cache/ldconfig/aux-cache", True),
        ("var/cache/ldconfig/aux-cache", "var/cache/ldconfig/aux-cache2", False),
        ("**/rpm/__db.*", "usr/lib/sysimage/rpm/__db.001", True),
        ("**/rpm/__db.*", "usr/lib/sysimage/rpm/Packages", False),
        ("home/*/.cache/pip/**", "home/u/.cache/pip/http/x", True),
        ("a//b", "a/b", True),  # no cheap test: the regex decides
        ("[ab]/x", "b/x", True),
    ],
)
def test_patterns_match_as_wcmatch_globs(pattern: str, path: str, expected: bool) -> None:
    assert PathGlobs([pattern], globstar=True).matches(path) is expected
    assert (PathGlobs([pattern], globstar=True).regex().fullmatch(path) is not None) is expected


def test_paths_no_default_exclude_can_match_never_reach_the_regex() -> None:
    excludes = PathGlobs(DEFAULT_EXCLUDES, globstar=True)
    xattrs = PathGlobs(DEFAULT_DROP_XATTRS)
    for path in ("usr/bin/bash", "usr/lib/x86_64-linux-gnu/perl/5.36.0/auto/POSIX/POSIX.so", "etc/passwd",
                 "var/lib/dpkg/status", "usr/lib/sysimage/rpm/rpmdb.sqlite"):
        assert not excludes.matches(path)
    assert not xattrs.matches("security.capability")
    assert excludes._regex is None and xattrs._regex is None  # never compiled
    # a literal path, or a literal directory's subtree: decided without the regex
    assert excludes.matches("var/cache/apt/archives/bash.deb") and excludes.matches("var/cache/ldconfig/aux-cache")
    assert not excludes.matches("var/cache/apt") and not excludes.matches("var/cache/ldconfig/aux-cache2")
    assert excludes._regex is None
    assert excludes.matches("usr/lib/sysimage/rpm/rpmdb.sqlite-shm")
    assert excludes._regex is not None


def test_no_pattern_matches_nothing() -> None:
    assert not PathGlobs([]).matches("")
    assert not PathGlobs([]).matches("anything")
    both = PathGlobs(["a/*", "b"])
    assert [p for p in ("a/x", "b", "c", "a/x/y") if both.matches(p)] == ["a/x", "b"]
