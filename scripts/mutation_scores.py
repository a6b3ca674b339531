"""Per-module mutation scores of the last `scripts/mutation.sh` run, read from mutants/.

score = (killed + timeout + segfault) / mutants: a mutant that makes a test run past
mutmut's time limit is caught (an endless loop), as is one whose test process dies (mutmut
calls exit code -9, its own SIGKILL after the time limit, and -11 "segfault"); one no fast
test executes counts as surviving.
`--survivors` also lists the mutants not caught by name (`mutmut show NAME` prints one).
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

REPO = Path(__file__).resolve().parent.parent
CAUGHT = ("killed", "timeout", "segfault")
COLUMNS = ("killed", "survived", "timeout", "segfault", "no tests")


def main(argv: list[str]) -> int:
    with open(REPO / "pyproject.toml", "rb") as f:
        modules = tomllib.load(f)["tool"]["mutmut"]["only_mutate"]
    rows: list[tuple[str, Counter[str]]] = []
    survivors: list[str] = []
    for module in modules:
        meta = REPO / "mutants" / f"{module}.meta"
        if not meta.exists():
            print(f"{meta.relative_to(REPO)} is missing: run scripts/mutation.sh first", file=sys.stderr)
            return 1
        statuses = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(status_by_exit_code[code] for code in statuses.values())
        rows.append((module, counts))
        survivors += sorted(f"{k}: {status_by_exit_code[code]}" for k, code in statuses.items()
                            if status_by_exit_code[code] not in CAUGHT)
    total: Counter[str] = Counter()
    for _, counts in rows:
        total.update(counts)
    print(f"| module | mutants | {' | '.join(COLUMNS)} | other | score |")
    print("|---|---:|" + "---:|" * (len(COLUMNS) + 2))
    for name, counts in [*rows, ("**total**", total)]:
        n = sum(counts.values())
        other = n - sum(counts[c] for c in COLUMNS)
        score = sum(counts[c] for c in CAUGHT) / n if n else 0.0
        print(f"| {name} | {n} | {' | '.join(str(counts[c]) for c in COLUMNS)} | {other} | {score:.1%} |")
    if "--survivors" in argv:
        print("\nnot caught:")
        print("\n".join(survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
