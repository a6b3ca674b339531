"""Decide which components become which layer, within a layer budget.

Objective: the bytes a client re-downloads per update, in expectation,
    sum over layers of size(layer) x P(any member changes),
with P = 1 - prod(1 - p) over members' weekly change probabilities (independence).
One layer per component reaches the lower bound; a budget forces sharing.

Fresh plan: start from one layer per component and repeatedly merge the pair of
layers whose merge adds the least expected cost,
    size(A) * P(B) * (1 - P(A)) + size(B) * P(A) * (1 - P(B)),
so large volatile components keep layers of their own and small stable ones share.
With 16 or more package layers, one stays free for components added later.

With a prior plan, components stay where they were (removed ones just leave), new
ones take free slots or join the layer where they cost least. When the component set
or the budget changed, a fresh plan is adopted only if its saving per build, times
`horizon` builds, outweighs the one-time cost of moving: every layer whose membership
changes is downloaded again in full. Estimates drifting alone never move anything.

Special homes (unowned, modified, pkgdb) always get their own layers, on top.
Package layers are ordered stable-first, so the layers that change most sit high in
the stack, where a change invalidates the fewest layers above it (Docker's chain IDs).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from .components import Component
from .history import LayerRecord

# Builds over which a re-plan must pay for itself (about half a year of weekly builds).
DEFAULT_HORIZON = 26


@dataclass(frozen=True)
class PlannedLayer:
    name: str
    homes: tuple[str, ...]  # package keys, or one special home
    packages: tuple[str, ...]  # package keys (empty for special layers)
    components: tuple[str, ...]  # component names (empty for special layers)
    size: int  # bytes of regular-file data
    weekly: float  # probability that some member changes in a given week
    moved: tuple[tuple[str, str], ...] = ()  # (component, why) for members placed anew

    @property
    def expected_bytes(self) -> float:
        return self.size * self.weekly


@dataclass
class Plan:
    layers: list[PlannedLayer]
    budget: int
    decision: str  # how this plan came about, one line
    removed: tuple[str, ...] = ()  # prior components gone from the tree
    lower_bound: float = 0.0  # expected bytes per update with one layer per component
    single_layer: float = 0.0  # expected bytes per update with everything in one layer
    fresh_saving: float = 0.0  # expected bytes per update a fresh plan would save (prior kept)
    move_cost: int = 0  # bytes clients would download once if the fresh plan were adopted
    moved: dict[str, str] = field(default_factory=dict)  # component -> why

    @property
    def expected_bytes(self) -> float:
        return sum(layer.expected_bytes for layer in self.layers)


class _Group:
    """A set of components planned into one layer."""

    __slots__ = ("members", "size", "q", "key")

    def __init__(self, members: Sequence[Component]):
        self.members = sorted(members, key=lambda c: c.name)
        self.size = sum(c.size for c in self.members)
        q = 1.0
        for c in self.members:
            q *= 1.0 - c.weekly
        self.q = q  # probability that no member changes
        self.key = self.members[0].name

    @property
    def cost(self) -> float:
        return self.size * (1.0 - self.q)

    def names(self) -> frozenset[str]:
        return frozenset(c.name for c in self.members)


def _merge_cost(a: _Group, b: _Group) -> float:
    return a.size * a.q * (1.0 - b.q) + b.size * b.q * (1.0 - a.q)


def _merge_down(groups: list[_Group], target: int) -> list[_Group]:
    """Greedy: merge the cheapest pair until at most `target` groups remain.

    The heap holds every live pair; pairs of groups already merged away are skipped
    when popped. Ties break on group keys, so the result never depends on input order."""
    if len(groups) <= target:
        return groups
    live: dict[int, _Group] = dict(enumerate(sorted(groups, key=lambda g: g.key)))
    next_id = len(live)
    # Each group's factors of _merge_cost, (size * q, 1 - q, key): the same products in
    # the same order, so the same costs to the bit (a few thousand pairs a plan).
    factors = {i: (g.size * g.q, 1.0 - g.q, g.key) for i, g in live.items()}

    def entry(ia: int, ib: int) -> tuple[float, str, str, int, int]:
        (sa, pa, ka), (sb, pb, kb) = factors[ia], factors[ib]
        if kb < ka:
            return (sb * pa + sa * pb, kb, ka, ib, ia)
        return (sa * pb + sb * pa, ka, kb, ia, ib)

    items = [(i, *factors[i]) for i in sorted(live)]  # by key
    heap = [
        (sa * pb + sb * pa, ka, kb, ia, ib)
        for n, (ia, sa, pa, ka) in enumerate(items) for ib, sb, pb, kb in items[n + 1 :]
    ]
    heapq.heapify(heap)
    while len(live) > target:
        *_, ia, ib = heapq.heappop(heap)
        if ia not in live or ib not in live:
            continue
        merged = live[next_id] = _Group(live.pop(ia).members + live.pop(ib).members)
        factors[next_id] = (merged.size * merged.q, 1.0 - merged.q, merged.key)
        for other in list(live):
            if other != next_id:
                heapq.heappush(heap, entry(next_id, other))
        next_id += 1
    return list(live.values())


def prior_groups(layers: Sequence[LayerRecord], components: Sequence[Component]) -> list[list[str]]:
    """The package layers of an earlier build as component names, bottom first.

    Histories written before components were recorded name packages only: those map
    through the package keys that are still installed (an upgraded package's old key
    maps to nothing, and its component is then placed as new)."""
    by_key = {k: c.name for c in components for k in c.packages}
    out = []
    for rec in layers:
        names = list(rec.components) or [by_key[k] for k in rec.packages if k in by_key]
        if names:
            out.append(list(dict.fromkeys(names)))
    return out


# From this many package layers on, a fresh plan leaves one free for components that
# later builds add: a new package then gets a layer of its own instead of changing one.
RESERVE_FROM = 16


def _fresh(components: list[Component], budget: int) -> list[_Group]:
    groups = [_Group([c]) for c in components]
    target = budget - 1 if budget >= RESERVE_FROM else budget
    return _merge_down(groups, target)


def _sticky(
    components: list[Component], prior_groups: list[list[str]], budget: int
) -> tuple[list[_Group], dict[str, str]]:
    """Prior groups minus removed components, plus the new ones where they cost least."""
    by_name = {c.name: c for c in components}
    moved: dict[str, str] = {}
    groups = []
    placed: set[str] = set()
    for names in prior_groups:
        members = [by_name[n] for n in names if n in by_name and n not in placed]
        placed.update(c.name for c in members)
        if members:
            groups.append(_Group(members))
    if len(groups) > budget:
        before = {n: g.names() for g in groups for n in g.names()}
        groups = _merge_down(groups, budget)
        for g in groups:
            for n in g.names():
                if before[n] != g.names():
                    moved[n] = f"merged: the budget of {budget} package layers is smaller than before"
    new = sorted((c for c in components if c.name not in placed), key=lambda c: (-c.size, c.name))
    for comp in new:
        if len(groups) < budget:
            groups.append(_Group([comp]))
            moved[comp.name] = "new: own layer (a slot was free)"
            continue
        single = _Group([comp])
        best = min(groups, key=lambda g: (_merge_cost(g, single), g.key))
        groups[groups.index(best)] = _Group([*best.members, comp])
        moved[comp.name] = (
            f"new: joined {best.key} where it costs least "
            f"(+{_merge_cost(best, single):,.0f} bytes per update)"
        )
    return groups, moved


def _downloads_once(groups: list[_Group], prior: set[frozenset[str]]) -> int:
    """Bytes of layers whose membership is not one of the prior layers'."""
    return sum(g.size for g in groups if g.names() not in prior)


def plan_layers(
    components: list[Component],
    max_layers: int,
    prior_groups: list[list[str]] | None = None,
    horizon: int = DEFAULT_HORIZON,
    replan: bool = False,
) -> Plan:
    """Place `components` (from find_components) into at most `max_layers` layers.

    `prior_groups`: the previous build's package layers, bottom first, as lists of
    component names (see prior_groups). `replan` forces a fresh plan."""
    specials = [c for c in components if c.special]
    packages = sorted((c for c in components if not c.special), key=lambda c: c.name)
    budget = max_layers - len(specials)
    if budget < 1:
        raise ValueError("layer budget leaves no room for packages")
    lower = sum(c.size * c.weekly for c in packages)
    single = _Group(packages).cost if packages else 0.0

    fresh = _fresh(packages, budget)
    removed: tuple[str, ...] = ()
    fresh_saving = 0.0
    move_cost = 0
    if not prior_groups:
        groups, moved = fresh, {}
        decision = "fresh plan (no prior plan)"
        order_prior: list[frozenset[str]] = []
    else:
        names = {c.name for c in packages}
        prior_names = [n for g in prior_groups for n in g]
        removed = tuple(sorted(set(prior_names) - names))
        added = names - set(prior_names)
        sticky, moved = _sticky(packages, prior_groups, budget)
        prior_sets = {frozenset(g) & names for g in prior_groups} - {frozenset()}
        fresh_saving = sum(g.cost for g in sticky) - sum(g.cost for g in fresh)
        move_cost = max(0, _downloads_once(fresh, prior_sets) - _downloads_once(sticky, prior_sets))
        set_changed = bool(added or removed) or len(prior_groups) > budget
        if replan or (set_changed and fresh_saving * horizon > move_cost):
            why = (
                "re-planned on request"
                if replan
                else f"re-planned: saves {fresh_saving:,.0f} bytes per update, "
                f"x {horizon} builds > {move_cost:,.0f} bytes moved once"
            )
            before = {n: frozenset(g) & names for g in prior_groups for n in g if n in names}
            groups, moved = fresh, {}
            for g in fresh:
                for n in g.names():
                    if n not in before:
                        moved[n] = "new"
                    elif before[n] != g.names() & set(before):
                        moved[n] = why
            decision = why
        else:
            groups = sticky
            decision = (
                "kept the prior plan"
                if not (added or removed)
                else f"kept the prior plan: {len(added)} added, {len(removed)} removed"
            )
            if fresh_saving > 0 and set_changed:
                decision += (
                    f" (a fresh plan would save {fresh_saving:,.0f} bytes per update,"
                    f" not worth moving {move_cost:,.0f} bytes)"
                )
            elif fresh_saving > 0:
                decision += (
                    f" (a fresh plan would save {fresh_saving:,.0f} bytes per update and move"
                    f" {move_cost:,.0f} bytes; --replan moves)"
                )
        order_prior = [frozenset(g) for g in prior_groups]

    layers = [_layer(g, moved) for g in _ordered(groups, order_prior)]
    layers += [
        PlannedLayer(name=c.name, homes=(c.name,), packages=(), components=(), size=c.size, weekly=c.weekly)
        for c in specials
    ]
    return Plan(
        layers=layers,
        budget=max_layers,
        decision=decision,
        removed=removed,
        lower_bound=lower,
        single_layer=single,
        fresh_saving=fresh_saving,
        move_cost=move_cost,
        moved=moved,
    )


def _ordered(groups: list[_Group], prior: list[frozenset[str]]) -> list[_Group]:
    """Layers that keep a prior member stay in the prior order; the others go above
    them, each set stable-first (lowest change probability at the bottom)."""

    def prior_index(g: _Group) -> int | None:
        mine = g.names()
        return next((i for i, names in enumerate(prior) if not names.isdisjoint(mine)), None)

    placed = [(prior_index(g), g) for g in groups]
    kept = [(i, g) for i, g in placed if i is not None]
    fresh = [g for i, g in placed if i is None]
    kept.sort(key=lambda t: (t[0], t[1].key))
    fresh.sort(key=lambda g: (1.0 - g.q, g.key))
    return [g for _, g in kept] + fresh


def _layer(group: _Group, moved: dict[str, str]) -> PlannedLayer:
    packages = tuple(sorted(k for c in group.members for k in c.packages))
    return PlannedLayer(
        name=packages[0] if len(packages) == 1 else f"{packages[0]}+{len(packages) - 1}",
        homes=packages,
        packages=packages,
        components=tuple(c.name for c in group.members),
        size=group.size,
        weekly=1.0 - group.q,
        moved=tuple((c.name, moved[c.name]) for c in group.members if c.name in moved),
    )
