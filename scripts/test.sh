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

# Say how much disk the run has: it needs several GB where pytest makes its temporary
# directories (shared container stores and images; a passed test's own directory is
# deleted when it ends, see pyproject.toml), and a run that fills the disk fails in
# ways that do not say so.
tmp=${TMPDIR:-/tmp}
free_gb=$(($(df --output=avail -k "$tmp" | tail -n 1) / 1048576))
echo "test: ${free_gb} GB free in $tmp"
((free_gb >= 20)) || echo "test: warning: the suite may need about 20 GB free in $tmp" >&2
exec "$venv/bin/python" -m pytest -q "$@"
