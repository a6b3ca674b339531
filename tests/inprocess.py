"""The pipeline driven in-process the way `pkglayer build ROOTFS --layers DIR` drives it,
for tests that patch pipeline functions."""

from __future__ import annotations

import os

from pkglayer.config import BuildSettings
from pkglayer.outputs import build_to


def build_into_layers(rootfs: str | os.PathLike[str], settings: BuildSettings, layers: str | os.PathLike[str]):
    return build_to(os.fspath(rootfs), settings, layers_dir=os.fspath(layers))[0]
