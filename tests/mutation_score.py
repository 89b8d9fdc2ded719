"""Per-module mutation score from mutmut's results (`make mutate` prints it).

Reads mutants/<path>.meta (mutmut 3) for every mutated module and prints one
row per module: mutants, killed (a timeout counts as killed: the mutant made
the tests hang), survived, no tests, other (not yet checked, suspicious,
segfault), and the score = killed / mutants. A mutant without a test that
reaches it counts against the score.

    python -m tests.mutation_score                # the table
    python -m tests.mutation_score --json FILE    # also write it as JSON
    python -m tests.mutation_score --survivors    # the surviving mutants' names
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KILLED = {1, 3, 24, -24, 36, 152, 255}   # killed, pytest internal error, timeouts
SURVIVED = {0}
NO_TESTS = {5, 33}


def module_of(meta: Path, root: Path) -> str:
    rel = meta.relative_to(root).as_posix().removesuffix(".py.meta")
    rel = rel.removeprefix("dataplane/core/")
    return rel


def collect(root: Path = Path("mutants")) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        if not codes:
            continue
        row = {"mutants": len(codes), "killed": 0, "survived": 0, "no_tests": 0, "other": 0,
               "survivors": []}
        for name, code in sorted(codes.items()):
            if code in KILLED:
                row["killed"] += 1
            elif code in SURVIVED:
                row["survived"] += 1
                row["survivors"].append(name)
            elif code in NO_TESTS:
                row["no_tests"] += 1
                row["survivors"].append(name)
            else:
                row["other"] += 1
        row["score"] = round(100 * row["killed"] / row["mutants"], 1)
        table[module_of(meta, root)] = row
    return table


def render(table: dict[str, dict]) -> str:
    lines = [f"{'module':<24}{'mutants':>8}{'killed':>8}{'survived':>9}{'no tests':>9}"
             f"{'other':>7}{'score':>8}"]
    total = {"mutants": 0, "killed": 0, "survived": 0, "no_tests": 0, "other": 0}
    for module, row in table.items():
        lines.append(f"{module:<24}{row['mutants']:>8}{row['killed']:>8}{row['survived']:>9}"
                     f"{row['no_tests']:>9}{row['other']:>7}{row['score']:>7.1f}%")
        for key in total:
            total[key] += row[key]
    if total["mutants"]:
        lines.append(f"{'total':<24}{total['mutants']:>8}{total['killed']:>8}{total['survived']:>9}"
                     f"{total['no_tests']:>9}{total['other']:>7}"
                     f"{100 * total['killed'] / total['mutants']:>7.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("mutants"))
    ap.add_argument("--json", type=Path, help="also write the table to this file")
    ap.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    args = ap.parse_args(argv)
    table = collect(args.root)
    if not table:
        print("no mutmut results under", args.root, "(run `make mutate` first)", file=sys.stderr)
        return 1
    print(render(table))
    if args.survivors:
        for module, row in table.items():
            for name in row["survivors"]:
                print(name)
    if args.json:
        args.json.write_text(json.dumps({m: {k: v for k, v in r.items() if k != "survivors"}
                                         for m, r in table.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
