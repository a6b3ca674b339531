#!/usr/bin/env bash
# Set the machine up (idempotent), then run the test suite. Extra arguments go to
# pytest, e.g.  scripts/test.sh -k blobstore -x
# The first run builds the cached root filesystems under $PKGLAYER_TEST_CACHE
# (default /var/cache/pkglayer-tests) and needs root and network access.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PKGLAYER_VENV:-$repo/.venv}
cd "$repo"
"$repo/scripts/setup.sh"
exec "$venv/bin/python" -m pytest -q "$@"
