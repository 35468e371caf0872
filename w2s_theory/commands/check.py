"""``w2s-theory check``: run every paper check and print one row per claim; exit 0 iff all are met."""

from __future__ import annotations

import sys

from ..checks import discover, run_check
from ..io import format_table, save_json

COLUMNS = [
    ("name", "check"), ("claim", "claim"), ("source", "source"), ("expected", "expected"), ("verdict", "verdict"),
    ("met", "met"), ("worst_slack", "worst slack"), ("certificate", "certificate"), ("instances", "instances"),
    ("seconds", "s"),
]


def register(sub) -> None:
    p = sub.add_parser("check", help="run every paper check (THEORY.md claims) with certificates")
    p.add_argument("--quick", action="store_true", help="fewer instances per check (a few seconds each)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the random instances (default 0)")
    p.add_argument("--only", metavar="NAME", action="append", help="run only the named check(s)")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    checks = discover()
    if args.only:
        unknown = set(args.only) - {c.name for c in checks}
        if unknown:
            from ..validation import InputError

            raise InputError(f"unknown check(s): {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(c.name for c in checks)}")
        checks = [c for c in checks if c.name in args.only]
    rows = []
    for check in checks:
        row = run_check(check, quick=args.quick, seed=args.seed)
        rows.append(row)
        print(f"  {row['name']}: {row['verdict']} ({row['seconds']} s)", file=sys.stderr, flush=True)
    print(format_table(rows, COLUMNS))
    for row in rows:
        if "error" in row:
            print(f"{row['name']}: {row['error']}", file=sys.stderr)
    all_met = all(r["met"] for r in rows)
    print(f"\n{sum(r['met'] for r in rows)}/{len(rows)} checks met their expectation", flush=True)
    if args.json:
        save_json(args.json, {"all_met": all_met, "checks": rows})
    return 0 if all_met else 1
