#!/usr/bin/env bash
# Mutation testing of the core modules with the fast unit tests (docs/testing.md).
# A developer command, not part of CI: a whole run takes tens of minutes.
#
#   scripts/mutation.sh              fresh run of every mutant, then the scores per module
#   scripts/mutation.sh NAME...      run these mutants again in the existing mutants/
#                                    (with tests/ as it is now), then the scores
#   scripts/mutation.sh --scores     only print the scores of the last run
#
# What is mutated and which test files run: [tool.mutmut] in pyproject.toml. mutmut
# (pinned by the `mutation` extra there) works in a copy of the tree, mutants/, which
# stays behind for `mutmut show NAME` / `mutmut browse` (run them from the repository
# root with the venv's mutmut). Environment: PKGLAYER_VENV as for scripts/setup.sh;
# MUTATION_JOBS, mutants tested at once (default: the number of CPUs).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PKGLAYER_VENV:-$repo/.venv}
cd "$repo"
"$repo/scripts/setup.sh" >/dev/null

# mutmut at the version the `mutation` extra pins, installed into the venv if missing.
want=$("$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import tomllib

from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as f:
    (req,) = map(Requirement, tomllib.load(f)["project"]["optional-dependencies"]["mutation"])
try:
    ok = md.version(req.name) in req.specifier
except md.PackageNotFoundError:
    ok = False
print("" if ok else req)
EOF
)
if [[ -n $want ]]; then
    echo "mutation: pip install '$want'"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$want"
fi

scores() { "$venv/bin/python" "$repo/scripts/mutation_scores.py" "$@"; }
# Mutants killed while a test had a tmpfs mounted leave the mount behind.
unmount_stale() { "$venv/bin/python" -c 'from tests.helpers import unmount_stale_tmpfs; unmount_stale_tmpfs()'; }

if [[ ${1:-} == --scores ]]; then
    scores
    exit
fi

jobs=${MUTATION_JOBS:-$(nproc)}
start=$(date +%s)
if (($#)); then
    [[ -d mutants ]] || { echo "mutation: no mutants/ yet: run scripts/mutation.sh without arguments first" >&2; exit 2; }
    rm -rf mutants/tests && cp -a tests mutants/tests
    # Which tests run for a mutant comes from the functions each test called: collected
    # again, as the tests may have changed (else a changed test is not run for the
    # functions it newly reaches).
    rm -f mutants/mutmut-stats.json
else
    rm -rf mutants
fi
trap unmount_stale EXIT
# TERM=dumb: mutmut's progress line is then plain text, fit for a log file.
TERM=dumb "$venv/bin/mutmut" run --max-children "$jobs" "$@"
echo "mutation: mutmut run took $(($(date +%s) - start)) s with $jobs workers"
scores
