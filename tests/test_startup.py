"""What `pkglayer build` loads before it starts: an unchanged rebuild is mostly Python
start-up (issue 12), so a local build must not load the registry client or the
zstd:chunked encoder just by being imported."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

# ssl, urllib.request and http.client: registry.py's blob check before a push; zstandard
# and anycrc: zstd layers and zstd:chunked's TOC. Together ~45 ms of every start.
NOT_AT_START = ("ssl", "urllib.request", "http.client", "zstandard", "anycrc")

_CHILD = """
import json, sys
before = set(sys.modules)
import pkglayer.cli, pkglayer.outputs, pkglayer.build
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_build_command_modules_load_no_registry_client_or_zstd():
    # Each name must be installed, or its absence from sys.modules would prove nothing.
    assert all(importlib.util.find_spec(name) is not None for name in NOT_AT_START)
    out = subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True, text=True).stdout
    added = set(json.loads(out))
    assert "pkglayer.build" in added  # what the child saw was the import itself
    assert sorted(added & set(NOT_AT_START)) == []
