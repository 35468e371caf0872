"""``w2s-theory check``: run every paper check and print one row per claim; exit 0 iff all are met.

The default table fits a 100-column terminal (long check names are shortened in the middle); ``--wide`` adds
each claim and its source; ``--explain NAME`` prints one check's statement, source and provenance;
``--list`` names the checks; ``--only NAME[,NAME]`` runs some of them. ``--json`` writes every field.
"""

from __future__ import annotations

import sys
import textwrap

from ..checks import discover, provenance_of, run_check
from ..io import format_table, save_json

#: The default table: (key, header); ``WIDE_COLUMNS`` adds claim and source after the name.
COLUMNS = [
    ("name", "check"), ("expected", "expected"), ("verdict", "verdict"), ("met", "met"),
    ("worst_slack", "worst slack"), ("certificate", "certificate"), ("instances", "instances"), ("seconds", "s"),
]
WIDE_COLUMNS = COLUMNS[:1] + [("claim", "claim"), ("source", "source")] + COLUMNS[1:]

#: Width of the default table (an ordinary terminal).
TABLE_WIDTH = 100

#: The table shows an expectation as the verdict that meets it (the JSON keeps ``counterexample``).
_EXPECTED_VERDICT = {"holds": "holds", "counterexample": "violated"}


def register(sub) -> None:
    p = sub.add_parser("check", help="run every paper check (the claims of docs/theory.md) with certificates",
                       description="Run the paper checks and print one row per claim: the verdict it expects, "
                                   "the verdict found, whether that meets the expectation, the worst slack "
                                   "and its certificate. Exit 0 iff every check is met.")
    p.add_argument("--quick", action="store_true", help="fewer instances per check (a few seconds each)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the random instances (default 0)")
    p.add_argument("--only", metavar="NAME[,NAME]", action="append",
                   help="run only the named check(s); comma-separated or repeated")
    p.add_argument("--wide", action="store_true", help="add each check's claim and source to the table")
    p.add_argument("--list", action="store_true", help="list the checks (name, expectation, claim) and exit")
    p.add_argument("--explain", metavar="NAME", help="print one check's statement, source and provenance and exit")
    p.set_defaults(handler=handle)


def _select(checks, names: list[str] | None):
    from ..validation import InputError

    if not names:
        return checks
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    known = {c.name for c in checks}
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise InputError(f"unknown check {', '.join(unknown) or '(empty name)'}; `w2s-theory check --list` "
                         "names them")
    return [c for c in checks if c.name in wanted]


def explain(check) -> str:
    """One check in words: claim, expectation, source, provenance and its statement (the module docstring)."""
    provenance = provenance_of(check)
    meaning = ("the inequality as the source states it" if provenance == "paper" else
               "the form or constant was reconstructed or derived in this project; the source states it "
               "differently or not at all")
    lines = [check.name, "=" * len(check.name), f"claim:      {check.claim}",
             f"expected:   {check.expected}", f"source:     {check.source}",
             f"provenance: {provenance} ({meaning})", ""]
    lines += [textwrap.dedent(check.statement).strip() or "(no statement)"]
    return "\n".join(lines)


def handle(args) -> int:
    from ..io import check_output_paths
    from ..validation import InputError

    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    check_output_paths({"--json": args.json})
    checks = discover()
    if args.explain:
        print(explain(_select(checks, [args.explain])[0]))
        return 0
    checks = _select(checks, args.only)
    if args.list:
        rows = [{"name": c.name, "expected": c.expected, "provenance": provenance_of(c), "claim": c.claim}
                for c in checks]
        print(format_table(rows, [("name", "check"), ("expected", "expected"), ("provenance", "provenance"),
                                  ("claim", "claim")]))
        return 0
    rows = []
    for check in checks:
        row = run_check(check, quick=args.quick, seed=args.seed)
        rows.append(row)
        print(f"  {row['name']}: {row['verdict']} ({row['seconds']} s)", file=sys.stderr, flush=True)
    all_met = all(r["met"] for r in rows)
    if args.json:  # written before anything is printed: a closed stdout cannot lose it
        save_json(args.json, {"all_met": all_met, "checks": rows})
    shown = [{**r, "expected": _EXPECTED_VERDICT.get(r["expected"], r["expected"])} for r in rows]
    if args.wide:
        print(format_table(shown, WIDE_COLUMNS))
    else:
        print(format_table(shown, COLUMNS, max_width=TABLE_WIDTH, shrink="name"))
    for row in rows:
        if "error" in row:
            print(f"{row['name']}: {row['error']}", file=sys.stderr)
    print(f"\n{sum(r['met'] for r in rows)}/{len(rows)} checks met their expectation", flush=True)
    return 0 if all_met else 1
