"""Decide which homes (packages, special homes) become which layer, within a budget.

One layer per package while the budget allows. Above it, the two smallest layers are
merged repeatedly (ties broken by name), so big packages keep layers of their own and
the small ones share. Special homes always get their own layers, on top.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .ownership import SPECIAL_HOMES, Ownership


@dataclass(frozen=True)
class PlannedLayer:
    name: str
    homes: tuple[str, ...]  # package keys, or one special home
    packages: tuple[str, ...]  # package keys (empty for special layers)
    size: int  # bytes of regular-file data


def plan_layers(ownership: Ownership, max_layers: int) -> list[PlannedLayer]:
    specials = [h for h in SPECIAL_HOMES if ownership.homes.get(h)]
    package_homes = sorted(h for h in ownership.homes if h not in SPECIAL_HOMES)
    budget = max_layers - len(specials)
    if budget < 1:
        raise ValueError("layer budget leaves no room for packages")

    groups = [(ownership.home_bytes(h), h, (h,)) for h in package_homes]
    if len(groups) > budget:
        heapq.heapify(groups)
        while len(groups) > budget:
            size_a, name_a, homes_a = heapq.heappop(groups)
            size_b, name_b, homes_b = heapq.heappop(groups)
            homes = tuple(sorted(homes_a + homes_b))
            heapq.heappush(groups, (size_a + size_b, homes[0], homes))

    layers = [
        PlannedLayer(
            name=homes[0] if len(homes) == 1 else f"{homes[0]}+{len(homes) - 1}",
            homes=homes,
            packages=homes,
            size=size,
        )
        for size, _, homes in groups
    ]
    layers.sort(key=lambda layer: layer.name)
    layers += [
        PlannedLayer(name=h, homes=(h,), packages=(), size=ownership.home_bytes(h)) for h in specials
    ]
    return layers
