"""Components (pkglayer.components): packages grouped by source, how often each changes
(changelog weeks counted back from the newest entry in the tree, plus observations), and
the planner state recorded per build."""

from __future__ import annotations

import os
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from pkglayer.build import scan_rootfs
from pkglayer.components import (
    WEEK,
    ChangeRate,
    Component,
    find_components,
    observe,
    stated_change_rate,
    weekly_change_rate,
)
from pkglayer.config import BuildSettings
from pkglayer.history import ComponentRecord
from pkglayer.rootfs import Rootfs
from pkglayer.usercomponents import ComponentSpec
from tests.helpers import deb_package, dpkg_install, dpkg_root, require_tools

DAY = 24 * 3600


def comp(name: str, weekly: float = 0.1) -> Component:
    return Component(name, (f"{name}-1.0-1-amd64",), 1, ChangeRate(weekly, 0, 0, 0, known=True))


# ------------------------------------------------------------------ weekly change rates


def test_weekly_rate_counts_weeks_with_entries_in_the_last_year() -> None:
    now = 100 * WEEK
    two_in_one_week = [now - 3600, now - 7200]
    old = [now - 60 * WEEK]
    rate = weekly_change_rate([*two_in_one_week, now - 5 * WEEK, *old], now)
    assert rate.changelog_weeks == 2
    assert rate.weekly == pytest.approx(2.5 / 53)
    observed = weekly_change_rate([now], now, ComponentRecord(packages=(), builds=10, changes=5))
    assert observed.weekly == pytest.approx((1 + 5 + 0.5) / (52 + 10 + 1))
    assert rate.known is True and observed.known is True
    # no changelog and no observation: nothing is known
    assert weekly_change_rate([], now) == ChangeRate(0.25, 0, 0, 0, known=False)


def test_weeks_are_counted_back_from_the_reference_not_the_epoch() -> None:
    # A reference in the middle of a calendar week: entries 10 s and 6 days 23 h back are
    # in its week 0, although an epoch-aligned week boundary lies between them.
    ref = 2900 * WEEK + 3 * DAY + 17
    rate = weekly_change_rate([ref - 10, ref - (WEEK - 3600)], ref)
    assert rate.changelog_weeks == 1 and rate.weekly == pytest.approx(1.5 / 53)
    # exactly one week back is week 1, one second less is week 0
    assert weekly_change_rate([ref - WEEK, ref - WEEK + 1], ref).changelog_weeks == 2
    assert weekly_change_rate([ref - WEEK + 1, ref - 1], ref).changelog_weeks == 1


def test_the_year_ends_52_weeks_back_and_starts_at_the_reference() -> None:
    ref = 2900 * WEEK + 5 * DAY + 3600
    year = 52 * WEEK
    assert weekly_change_rate([ref - year], ref).changelog_weeks == 0  # 52 weeks back: out
    assert weekly_change_rate([ref - year + 1], ref).changelog_weeks == 1  # week 51: in
    assert weekly_change_rate([ref], ref).changelog_weeks == 1  # the reference itself: in
    assert weekly_change_rate([ref + 1], ref).changelog_weeks == 0  # after it: out
    every_week = [ref - i * WEEK for i in range(60)]
    assert weekly_change_rate(every_week, ref).changelog_weeks == 52
    assert weekly_change_rate(every_week, ref).weekly == pytest.approx(52.5 / 53)
    busiest = weekly_change_rate(every_week, ref, ComponentRecord(packages=(), builds=3, changes=3))
    assert busiest.weekly == pytest.approx((52 + 3 + 0.5) / (52 + 3 + 1))


def test_observations_count_builds_that_changed_something() -> None:
    a, b = comp("a"), comp("b")
    first = observe([a, b], {})
    assert first == {n: ComponentRecord(packages=c.packages, builds=0, changes=0) for n, c in (("a", a), ("b", b))}
    # an unchanged rebuild leaves the state (and so the image's plan label) as it was
    assert observe([a, b], first) == first
    b2 = Component("b", ("b-2.0-1-amd64",), 1, b.rate)
    second = observe([a, b2], first)
    assert second["a"] == ComponentRecord(packages=a.packages, builds=1, changes=0)
    assert second["b"] == ComponentRecord(packages=("b-2.0-1-amd64",), builds=1, changes=1)


# ------------------------------------------------------------------ components of a real tree


def _t(date: str) -> int:
    return int(parsedate_to_datetime(date).timestamp())


# The newest entry of the tree (solo's): the reference the weeks count back from.
REFERENCE = "Sun, 14 Jun 2026 18:30:00 +0000"
SRCA_A1 = ["Wed, 10 Jun 2026 12:00:00 +0000", "Mon, 01 Jun 2026 09:00:00 +0000", "Thu, 01 Jan 2026 00:00:00 +0000"]
SRCA_BIN = ["Tue, 09 Jun 2026 08:00:00 +0000", "Fri, 15 Aug 2025 00:00:00 +0000"]
# 52 weeks minus one second back (week 51), and exactly 52 weeks back (out of the year)
SOLO = [REFERENCE, "Sun, 15 Jun 2025 18:30:01 +0000", "Sun, 15 Jun 2025 18:30:00 +0000"]


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real packages installed with dpkg: liba1 and liba-bin built from source srca,
    solo (no Source: field) and quiet (no changelog); an unowned file; an edited one."""
    require_tools("dpkg", "dpkg-deb")
    work = tmp_path_factory.mktemp("debs")
    debs = [
        deb_package(work, "liba1", "1.0-1", {"usr/lib/liba.so.1": b"\x7fELF" + bytes(996)},
                    source="srca", changelog=SRCA_A1),
        deb_package(work, "liba-bin", "1.0-1", {"usr/bin/a": b"0123456789", "usr/share/a/data": b"d" * 300},
                    source="srca (1.0-1)", changelog=SRCA_BIN),
        deb_package(work, "solo", "2.0-1", {"usr/bin/solo": b"s" * 4000}, changelog=SOLO),
        deb_package(work, "quiet", "0.1", {"usr/share/quiet/q": b"q" * 20}),
    ]
    root = dpkg_root(work / "root")
    dpkg_install(root, *debs)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("small\n")
    with open(root / "usr/bin/a", "ab") as f:
        f.write(b"!!")  # edited after installation: goes to "modified"
    return root


def _bytes(root: Path, *paths: str) -> int:
    return sum((root / p).stat().st_size for p in paths)


def test_packages_of_one_source_are_one_component(small_tree: Path) -> None:
    with Rootfs(small_tree) as rootfs:
        own = scan_rootfs(rootfs, BuildSettings())
    keys = {p.name: k for k, p in own.packages.items()}
    observed = {"srca": ComponentRecord(packages=(), builds=4, changes=2)}
    components = find_components(own, observed)
    assert [c.name for c in components] == ["quiet", "solo", "srca", "unowned", "modified", "pkgdb"]
    by_name = {c.name: c for c in components}

    srca = by_name["srca"]
    assert srca.packages == tuple(sorted([keys["liba1"], keys["liba-bin"]])) and not srca.special
    # usr/bin/a was edited: it is in the modified layer, not in its package's
    # ... and dpkg's records of the two packages (info/liba1.list, .md5sums...) are theirs
    records = [str(p.relative_to(small_tree)) for name in ("liba1", "liba-bin")
               for p in (small_tree / "var/lib/dpkg/info").glob(f"{name}.*")]
    assert len(records) >= 4
    assert srca.size == _bytes(small_tree, "usr/lib/liba.so.1", "usr/share/a/data",
                               "usr/share/doc/liba1/changelog.Debian.gz",
                               "usr/share/doc/liba-bin/changelog.Debian.gz", *records)
    # Both packages' changelogs, counted back from solo's newest entry (the tree's):
    # Jun 10 and Jun 9 in week 0, Jun 1 in week 1, Jan 1 in week 23, Aug 15 in week 43.
    # Neither package alone has four weeks.
    assert srca.rate.changelog_weeks == 4
    assert srca.rate.observed_builds == 4 and srca.rate.observed_changes == 2
    assert srca.weekly == pytest.approx((4 + 2 + 0.5) / (52 + 4 + 1))

    solo = by_name["solo"]
    assert solo.packages == (keys["solo"],)
    assert solo.size == _bytes(small_tree, "usr/bin/solo", "usr/share/doc/solo/changelog.Debian.gz",
                               "var/lib/dpkg/info/solo.list", "var/lib/dpkg/info/solo.md5sums")
    assert solo.rate.changelog_weeks == 2 and solo.weekly == pytest.approx(2.5 / 53)
    assert not by_name["quiet"].rate.known and by_name["quiet"].weekly == 0.25
    assert by_name["quiet"].size == 20 + _bytes(small_tree, "var/lib/dpkg/info/quiet.list",
                                                "var/lib/dpkg/info/quiet.md5sums")

    assert all(c.special and c.weekly == 1.0 and c.packages == () for c in components[3:])
    assert by_name["unowned"].size == len("small\n")
    assert by_name["modified"].size == 12
    dbdir = small_tree / "var/lib/dpkg"
    # pkgdb: the database but the packages' own records (info/PKG.*, counted above)
    assert by_name["pkgdb"].size == sum(
        os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(dbdir) for f in files
        if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
        and not (os.path.basename(d) == "info" and f.split(".")[0] in ("liba1", "liba-bin", "solo", "quiet"))
    )
    # The reference is the tree's newest entry, not the clock: the same tree gives the same rates.
    assert solo.rate == weekly_change_rate([_t(d) for d in SOLO], _t(REFERENCE))


def test_only_what_is_in_the_tree_makes_components(small_tree: Path) -> None:
    with Rootfs(small_tree) as rootfs:
        own = scan_rootfs(rootfs, BuildSettings(extra_excludes=("usr/share/quiet", "usr/bin/a")))
    # quiet's only file and the edited file are left out: no quiet, no modified layer
    assert [c.name for c in find_components(own)] == ["solo", "srca", "unowned", "pkgdb"]


# ------------------------------------------------------------------ components without changelogs


def test_components_without_changelogs_start_from_a_stated_or_default_rate(tmp_path: Path) -> None:
    """User components (a [[component]] with and without an interval, a `user.component`
    tag with `user.update-interval`) and a big unowned file: their rates start from the
    stated interval, counted as a year of builds, or from their origin's default, counted
    as four builds; observed builds add to either."""
    require_tools("dpkg", "dpkg-deb")
    root = dpkg_root(tmp_path / "root")
    dpkg_install(root, deb_package(tmp_path, "solo", "1.0", {"usr/bin/solo": b"s" * 10}, changelog=[REFERENCE]))
    for path, data in {"opt/app/main": b"a" * 100, "opt/cfg/x": b"c" * 7, "opt/tagged/t": b"t" * 3,
                       "srv/big.bin": b"b" * 5000}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    os.setxattr(root / "opt/tagged", "user.component", b"tagged")
    os.setxattr(root / "opt/tagged", "user.update-interval", b"daily")
    (root / "opt/more").write_bytes(b"m")
    os.setxattr(root / "opt/more", "user.component", b"cfg")  # declared twice: the first origin's default
    specs = (ComponentSpec("app", ("opt/app",), "monthly", "component[0] in t.toml"),
             ComponentSpec("cfg", ("opt/cfg",), where="--component"))
    with Rootfs(root) as rootfs:
        own = scan_rootfs(rootfs, BuildSettings(components=specs, big_file_size=4096))
    observed = {"app": ComponentRecord(packages=(), builds=8, changes=4),
                "cfg": ComponentRecord(packages=(), builds=2, changes=2)}
    by_name = {c.name: c for c in find_components(own, observed)}
    assert sorted(by_name) == ["app", "cfg", "file:srv:big.bin", "pkgdb", "solo", "tagged", "unowned"]

    app = by_name["app"].rate
    assert app.weekly == pytest.approx((7 / 30 * 52 + 4) / (52 + 8))
    assert (app.known, app.changelog_weeks, app.observed_builds, app.observed_changes) == (True, 0, 8, 4)
    assert app.explain() == "every 30 days (component[0] in t.toml), changed in 4/8 builds"
    assert by_name["app"].origin == "config" and by_name["app"].size == 100

    cfg = by_name["cfg"].rate
    assert cfg.weekly == pytest.approx((0.25 * 4 + 2) / (4 + 2))
    assert cfg.explain() == "default 0.25/week, changed in 2/2 builds"
    assert by_name["cfg"].origin == "xattr, config"

    big = by_name["file:srv:big.bin"]
    assert big.origin == "big file" and big.size == 5000
    assert big.weekly == 0.25 and big.rate.explain() == "big file default 0.25/week"

    tagged = by_name["tagged"].rate
    assert tagged.weekly == 1.0
    assert tagged.explain() == "every day (user.update-interval on /opt/tagged)"
    assert by_name["tagged"].origin == "xattr"

    solo = by_name["solo"].rate
    assert solo.explain() == "changelog in 1/52 weeks"
    assert by_name["pkgdb"].rate.explain() == "changelog in 52/52 weeks"
    assert weekly_change_rate([], 0).explain() == "no changelog: assumed"


def test_a_stated_rate_is_a_weighted_mean_of_the_interval_and_the_observations() -> None:
    never = stated_change_rate(0.1, 10, "b", ComponentRecord(packages=(), builds=10, changes=0))
    assert never.weekly == pytest.approx(0.05)
    assert (never.observed_builds, never.observed_changes, never.basis, never.known) == (10, 0, "b", True)
    always = stated_change_rate(0.1, 10, "b", ComponentRecord(packages=(), builds=30, changes=30))
    assert always.weekly == pytest.approx((1 + 30) / 40)
    assert stated_change_rate(0.5, 3, "b").weekly == 0.5
