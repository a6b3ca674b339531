"""Components: the units the planner places in layers, and how often each changes.

Packages built from one source (deb `Source:`, rpm SOURCERPM) are updated together, so
they form one component. A component's chance of changing in a given week comes from
its changelogs: the share of the last 52 weeks with at least one entry, counted back
from the newest entry in the whole rootfs (not the wall clock, so the same tree always
gives the same plan). Changes observed across earlier builds (history.json) add to the
evidence, each build counting like one week.

Components without changelogs (pip packages, user components, big files) start from
a stated rate instead: a `user.update-interval` or `[[component]]` interval, which
counts like a year of evidence, or a default for their origin, which counts like a few
builds; observed builds add to it the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .history import ComponentRecord
from .ownership import SPECIAL_HOMES, Ownership
from .usercomponents import interval_weekly

WEEK = 7 * 24 * 3600
YEAR_WEEKS = 52
# No changelog and no observations: assume a change every few weeks rather than
# "never", so that an unknown large component is not buried in a stable shared layer.
UNKNOWN_WEEKLY_RATE = 0.25
# Without a changelog, by origin: (weekly rate, what `pkglayer plan` calls it). pip
# packages of an application are upgraded when its requirements are bumped; nothing
# in a dist-info dates earlier releases, so it is a guess, and observations soon
# replace it.
DEFAULT_RATES = {
    "pip": (0.25, "pip default"),
    "xattr": (UNKNOWN_WEEKLY_RATE, "default"),
    "config": (UNKNOWN_WEEKLY_RATE, "default"),
    "big file": (UNKNOWN_WEEKLY_RATE, "big file default"),
}
# Builds' worth of evidence a stated rate counts as.
STATED_WEIGHT = YEAR_WEEKS
DEFAULT_WEIGHT = 4


@dataclass(frozen=True)
class ChangeRate:
    weekly: float  # probability of at least one change in a given week
    changelog_weeks: int  # weeks of the last year with a changelog entry
    observed_builds: int
    observed_changes: int
    known: bool  # False: no evidence at all, `weekly` is UNKNOWN_WEEKLY_RATE
    basis: str = ""  # a stated or default rate this one starts from, instead of changelogs

    def explain(self) -> str:
        if not self.known:
            return "no changelog: assumed"
        parts = [self.basis or f"changelog in {self.changelog_weeks}/{YEAR_WEEKS} weeks"]
        if self.observed_builds:
            parts.append(f"changed in {self.observed_changes}/{self.observed_builds} builds")
        return ", ".join(parts)


def weekly_change_rate(
    changelog: tuple[int, ...] | list[int], reference: int, observed: ComponentRecord | None = None
) -> ChangeRate:
    """Estimate from changelog entry times (seconds) up to `reference`.

    Add-one-half smoothing keeps a quiet year from meaning "never changes"."""
    builds = observed.builds if observed else 0
    changes = observed.changes if observed else 0
    weeks = {(reference - t) // WEEK for t in changelog if 0 <= reference - t < YEAR_WEEKS * WEEK}
    if not changelog and not builds:
        return ChangeRate(UNKNOWN_WEEKLY_RATE, 0, 0, 0, known=False)
    # below 1: at most 52 weeks, and history.json never has more changes than builds
    rate = (len(weeks) + changes + 0.5) / (YEAR_WEEKS + builds + 1)
    return ChangeRate(rate, len(weeks), builds, changes, known=True)


def stated_change_rate(
    weekly: float, weight: int, basis: str, observed: ComponentRecord | None = None
) -> ChangeRate:
    """A rate that starts from `weekly`, given as `weight` weeks of evidence; each
    observed build adds one."""
    builds = observed.builds if observed else 0
    changes = observed.changes if observed else 0
    # at most 1: `weekly` is, and history.json never has more changes than builds
    rate = (weekly * weight + changes) / (weight + builds)
    return ChangeRate(rate, 0, builds, changes, known=True, basis=basis)


ALWAYS = ChangeRate(1.0, YEAR_WEEKS, 0, 0, known=True)


@dataclass(frozen=True)
class Component:
    name: str  # source package name, or a special home ("unowned", "modified", "pkgdb")
    packages: tuple[str, ...]  # package keys, sorted; () for a special home
    size: int  # bytes of regular-file data in the layer
    rate: ChangeRate
    special: bool = False
    origin: str = ""  # "dpkg", "rpm", "pacman", "pip", "xattr", "config", "big file"; "" for a special home

    @property
    def weekly(self) -> float:
        return self.rate.weekly


def changelog_reference(ownership: Ownership) -> int:
    """The newest changelog entry of any package: "now" for the estimates."""
    return max((p.changelog[0] for p in ownership.packages.values() if p.changelog), default=0)


def find_components(
    ownership: Ownership, observed: Mapping[str, ComponentRecord] | None = None
) -> list[Component]:
    """Package components sorted by name, then the non-empty special homes in layer order.

    Only packages with something in the tree (a home) take part; a component's change
    rate merges the changelogs of all its packages."""
    observed = observed or {}
    reference = changelog_reference(ownership)
    by_source: dict[str, list[str]] = {}
    for key in ownership.homes:
        if key in SPECIAL_HOMES:
            continue
        pkg = ownership.packages[key]
        by_source.setdefault(pkg.source or pkg.name, []).append(key)
    out = []
    for name in sorted(by_source):
        keys = tuple(sorted(by_source[name]))
        times = sorted({t for k in keys for t in ownership.packages[k].changelog}, reverse=True)
        origin = ownership.origin(keys[0])
        seen = observed.get(name)
        if name in ownership.intervals:
            days, where = ownership.intervals[name]
            every = "every day" if days == 1 else f"every {days} days"
            rate = stated_change_rate(interval_weekly(days), STATED_WEIGHT, f"{every} ({where})", seen)
        elif not times and origin.split(", ")[0] in DEFAULT_RATES:
            weekly, label = DEFAULT_RATES[origin.split(", ")[0]]
            rate = stated_change_rate(weekly, DEFAULT_WEIGHT, f"{label} {weekly:g}/week", seen)
        else:
            rate = weekly_change_rate(times, reference, seen)
        out.append(
            Component(
                name=name,
                packages=keys,
                size=sum(ownership.home_bytes(k) for k in keys),
                rate=rate,
                origin=origin,
            )
        )
    # The database and unowned files change with every transaction; edits are unpredictable.
    out += [
        Component(name=h, packages=(), size=ownership.home_bytes(h), rate=ALWAYS, special=True)
        for h in SPECIAL_HOMES
        if ownership.homes.get(h)
    ]
    return out


def observe(
    components: list[Component], prior: Mapping[str, ComponentRecord]
) -> dict[str, ComponentRecord]:
    """The planner state to record for this build: one more observation per component
    seen before, a change when its package set (names and versions) differs.

    A build in which no package changed is no observation: it teaches nothing, and
    keeping the state as it was keeps the rebuilt image (its plan label) identical."""
    current = {c.name: c.packages for c in components if not c.special}
    if current.keys() == prior.keys() and all(prior[n].packages == keys for n, keys in current.items()):
        return dict(prior)
    out = {}
    for comp in components:
        if comp.special:
            continue
        before = prior.get(comp.name)
        if before is None:
            out[comp.name] = ComponentRecord(packages=comp.packages, builds=0, changes=0)
        else:
            changed = before.packages != comp.packages
            out[comp.name] = ComponentRecord(
                packages=comp.packages, builds=before.builds + 1, changes=before.changes + int(changed)
            )
    return out
