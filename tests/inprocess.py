"""The pipeline driven in-process the way `pkglayer build ROOTFS --layers DIR` drives it,
for tests that patch pipeline functions."""

from __future__ import annotations

import os

from pkglayer import build as build_mod
from pkglayer.config import BuildSettings
from pkglayer.history import save_history
from pkglayer.outputs import Outputs
from pkglayer.prior import resolve_prior


def build_into_layers(rootfs: str | os.PathLike[str], settings: BuildSettings, layers: str | os.PathLike[str]):
    layers = os.fspath(layers)
    outputs = Outputs(layers_dir=layers)
    prior = resolve_prior(outputs.prior_request())
    result = build_mod.build(os.fspath(rootfs), settings, prior, outputs.new_blobs())
    save_history(os.path.join(layers, "history.json"), result.history)
    return result
