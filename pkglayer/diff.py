"""What a client downloads to go from one build to the next, and why.

Both sides are layer records (history.json, a /layers directory, or an OCI layout
written by pkglayer). A layer of the new build costs nothing when its blob digest is
already in the old build; otherwise the client downloads it whole. Each changed layer
is matched to the old layer it shares most components (or packages) with, to say which
packages were added, removed or upgraded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import PkglayerError
from .history import History, LayerRecord, load_history
from .layout import parse_layout_ref
from .prior import earlier_image


@dataclass(frozen=True)
class LayerChange:
    name: str
    status: str  # "unchanged", "changed", "new" (in the new build); "removed" (old only)
    size: int  # compressed bytes
    download: int  # bytes a client holding the old image downloads for this layer
    was: str | None  # the old layer it was matched to
    added: tuple[str, ...] = ()  # package keys only in the new layer
    removed: tuple[str, ...] = ()  # package keys only in the old layer


@dataclass(frozen=True)
class ImageDiff:
    layers: tuple[LayerChange, ...]

    @property
    def download(self) -> int:
        return sum(c.download for c in self.layers)

    @property
    def total(self) -> int:
        return sum(c.size for c in self.layers if c.status != "removed")


def load_layers(spec: str) -> tuple[LayerRecord, ...]:
    """Layer records of a build: `oci:DIR[:TAG]`, a /layers directory, or a history.json."""
    if spec.startswith("oci:"):
        layout, tag = parse_layout_ref(spec, "latest")
        assert tag is not None
        plan = earlier_image(layout, tag)
        if plan is None:
            raise PkglayerError(f"{spec}: no image written by pkglayer with that tag (or its blobs are damaged)")
        return plan.layers
    path = os.path.join(spec, "history.json") if os.path.isdir(spec) else spec
    history: History | None = load_history(path)
    if history is None:
        raise PkglayerError(f"{spec}: no such history.json, /layers directory or oci: layout")
    return history.layers


def _members(rec: LayerRecord) -> set[str]:
    return set(rec.components) or set(rec.packages) or {rec.name}


def diff_layers(old: tuple[LayerRecord, ...], new: tuple[LayerRecord, ...]) -> ImageDiff:
    old_digests = {r.digest for r in old}
    matched: set[str] = set()
    changes = []
    for rec in new:
        if rec.digest in old_digests:
            was = next(r.name for r in old if r.digest == rec.digest)
            matched.add(was)
            changes.append(LayerChange(rec.name, "unchanged", rec.size, 0, was))
            continue
        mine = _members(rec)
        overlap = [(len(mine & _members(r)), r.name, r) for r in old]
        best = max((o for o in overlap if o[0]), default=None, key=lambda o: (o[0], o[1]))
        if best is None:
            changes.append(LayerChange(rec.name, "new", rec.size, rec.size, None, added=rec.packages))
            continue
        prev = best[2]
        matched.add(prev.name)
        changes.append(
            LayerChange(
                rec.name,
                "changed",
                rec.size,
                rec.size,
                prev.name,
                added=tuple(sorted(set(rec.packages) - set(prev.packages))),
                removed=tuple(sorted(set(prev.packages) - set(rec.packages))),
            )
        )
    for rec in old:
        if rec.name not in matched and rec.digest not in {r.digest for r in new}:
            changes.append(LayerChange(rec.name, "removed", rec.size, 0, rec.name, removed=rec.packages))
    return ImageDiff(tuple(changes))
