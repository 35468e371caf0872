"""``w2s-theory bench``: the performance benchmark of DESIGN.md (batched vs cvxpy vs a per-student Adam loop)."""

from __future__ import annotations

import sys

from ..io import format_table, save_json
from ..validation import InputError


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the batched solver against cvxpy and an Adam loop")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: cuda if available)")
    p.add_argument("--sizes", default="1,10,100,1000", help="batch sizes B (default 1,10,100,1000)")
    p.add_argument("--cvxpy-students", type=int, default=3, help="students solved by cvxpy (default 3)")
    p.add_argument("--adam-students", type=int, default=3, help="students fitted by the Adam loop (default 3)")
    p.add_argument("--adam-epochs", type=int, default=20, help="epochs of the Adam loop (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per size after a warm-up (default 3)")
    p.add_argument("--n", type=int, default=2000, help="samples per student (default 2000)")
    p.add_argument("--m", type=int, default=64, help="features (default 64)")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from ..bench import run_bench

    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    except ValueError:
        raise InputError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    if not sizes or min(sizes) < 1 or min(args.cvxpy_students, args.adam_students, args.repeats, args.n, args.m) < 1:
        raise InputError("--sizes, --cvxpy-students, --adam-students, --repeats, --n and --m must be >= 1")
    try:
        result = run_bench(device=args.device, sizes=sizes, cvxpy_students=args.cvxpy_students,
                           adam_students=args.adam_students, adam_epochs=args.adam_epochs, repeats=args.repeats,
                           n=args.n, m=args.m, progress=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as exc:  # e.g. cuda asked for but absent
        raise InputError(str(exc)) from None
    rows = [{"solver": "cvxpy (Clarabel)", "B": 1, "ms": result["cvxpy_s_per_student"] * 1e3,
             "gap": result["cvxpy_worst_gap"]},
            {"solver": f"AdamW loop ({result['adam']['epochs']} epochs)", "B": 1,
             "ms": result["adam_s_per_student"] * 1e3, "gap": result["adam_worst_gap"]}]
    for layout, key in (("batched, per-student features", "batched"), ("batched, shared features", "batched_shared")):
        for r in result[key]:
            rows.append({"solver": layout, "B": r["B"], "ms": r["s_per_student"] * 1e3, "gap": r["worst_gap"],
                         "mem": r["peak_mem_mb"], "rate": r["students_per_s"]})
    print(format_table(rows, [("solver", "solver"), ("B", "B"), ("ms", "ms/student"), ("rate", "students/s"),
                              ("gap", "worst certified gap"), ("mem", "peak MB")]))
    machine = result["machine"]
    print(f"\nmachine: {machine['device']} ({machine['gpu'] or machine['cpu']}, {machine['threads']} threads)")
    print(f"throughput at B={result['batched'][-1]['B']}: {result['ratio_vs_cvxpy']:.0f}x cvxpy, "
          f"{result['ratio_vs_adam']:.0f}x the Adam loop (per-student features); "
          f"{result['ratio_vs_cvxpy_shared']:.0f}x cvxpy, {result['ratio_vs_adam_shared']:.0f}x Adam (shared features)")
    if args.json:
        save_json(args.json, result)
    return 0 if result["all_gaps_certified_below_tol"] else 1
