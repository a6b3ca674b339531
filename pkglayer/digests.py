"""Digest algorithms by name.

File contents are identified by BLAKE3 in content keys: as collision-resistant as
sha256 for that purpose and several times faster, which matters because every file is
hashed on a build without a warm cache. OCI digests (diff_id, blob) stay sha256, and
package databases bring their own (md5 for dpkg, mostly sha256 for rpm).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import blake3

CONTENT_HASH = "blake3"
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def is_digest(value: object) -> bool:
    """True for a string "sha256:" followed by 64 lower-case hex digits, nothing else."""
    return isinstance(value, str) and DIGEST_RE.fullmatch(value) is not None


def new_hasher(algo: str) -> Any:
    if algo == "blake3":
        return blake3.blake3()
    return hashlib.new(algo)
