"""``w2s-theory bench``: the performance benchmark of docs/design.md, every head against its natural baseline
(cvxpy, a per-student Adam loop, L-BFGS, numpy least squares), dense and sparse workloads, FLOP rate.

Every option and the ``--json`` path are checked before anything is computed: a bad value is a one-line
error (exit 2), never a traceback after minutes of work.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from ..io import format_table, save_json
from ..validation import InputError

#: Integer options that must be >= 1 (option name, attribute).
_POSITIVE = ("cvxpy_students", "adam_students", "adam_epochs", "repeats", "head_repeats", "n", "m", "linear_m",
             "lbfgs_students", "numpy_students", "peak_matrix", "practice", "practice_loop_students")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the batched solvers of every head against their baselines",
                       description="Time the batched, certified solvers of every head against what a user would "
                                   "run one student at a time (cvxpy, an AdamW loop, L-BFGS, numpy least "
                                   "squares), on dense and sparse workloads, and report the FLOP rate against "
                                   "the machine's matmul peak. Exit 1 if a batched gap is not certified <= tol.")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: cuda if available)")
    p.add_argument("--heads", default="mixture,linear,softmax,squared",
                   help="comma-separated heads to run (default mixture,linear,softmax,squared)")
    p.add_argument("--sizes", default="1,10,100,1000", help="batch sizes B (default 1,10,100,1000)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per size of the mixture head (the headline) after a warm-up; times are their "
                        "median (default 3)")
    p.add_argument("--head-repeats", type=int, default=1,
                   help="the same for the other heads and the sparse workloads (default 1)")
    p.add_argument("--tol", type=float, default=1e-9, help="certified gap asked of the batched solvers (1e-9)")
    p.add_argument("--no-sparse", action="store_true", help="skip the sparse mixture workloads")
    p.add_argument("--cvxpy-students", type=int, default=3,
                   help="students solved by cvxpy per workload (mixture, sparse, linear; default 3)")
    p.add_argument("--adam-students", type=int, default=3, help="students fitted by the Adam loop (default 3)")
    p.add_argument("--adam-epochs", type=int, default=20, help="epochs of the Adam loop (default 20)")
    p.add_argument("--lbfgs-students", type=int, default=3, help="softmax students fitted by L-BFGS (default 3)")
    p.add_argument("--numpy-students", type=int, default=10,
                   help="squared-head students fitted by numpy.linalg.lstsq (default 10)")
    p.add_argument("--n", type=int, default=2000, help="samples per student (default 2000)")
    p.add_argument("--m", type=int, default=64, help="features (default 64)")
    p.add_argument("--linear-m", type=int, default=16, help="features of the linear head's workload (default 16)")
    p.add_argument("--practice", type=int, default=None, metavar="B",
                   help="also time the practice trainer: B students (2 epochs, batch 32) in one batch against a "
                        "per-student loop of the same arithmetic, both on --device")
    p.add_argument("--practice-loop-students", type=int, default=20,
                   help="students of the per-student practice loop; its rate extrapolates (default 20)")
    p.add_argument("--practice-dtype", default="float32", choices=("float32", "float64"),
                   help="dtype of the practice workload, batched and per-student loop alike (default float32, a "
                        "practitioner's; the pipeline trains in float64)")
    p.add_argument("--peak-matrix", type=int, default=None, metavar="N",
                   help="size of the matmul that measures the peak FLOP rate (default 2048 on CPU, 8192 on CUDA)")
    p.set_defaults(handler=handle)


def check_output_path(path: str, option: str) -> None:
    """Fail now, not after the computation, if ``path`` cannot be written: a directory, a path under a regular
    file, or a directory without write permission."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{option} {path}: is a directory; give a file path")
    ancestor = p.parent
    while not ancestor.exists():  # the file's directories are created on writing; check the first that exists
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{option} {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: no permission to write in {ancestor}")


def _parse_list(text: str, option: str, cast):
    try:
        items = [cast(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"{option} must be a comma-separated list, got {text!r}") from None
    if not items:
        raise InputError(f"{option}: give at least one value")
    return items


def handle(args) -> int:
    from .._backend import resolve_device
    from ..bench import HEADS, run_bench
    from ..sweep import free_memory_bytes

    sizes = _parse_list(args.sizes, "--sizes", int)
    if min(sizes) < 1:
        raise InputError(f"--sizes must be integers >= 1, got {args.sizes!r}")
    heads = _parse_list(args.heads, "--heads", str)
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise InputError(f"--heads: unknown head {unknown[0]!r}; choose from {', '.join(HEADS)}")
    heads = tuple(h for h in HEADS if h in heads)
    for name in _POSITIVE:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.tol) and args.tol > 0):
        raise InputError(f"--tol must be a positive finite number, got {args.tol}")
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:  # torch.device('tpu') is a RuntimeError
        raise InputError(f"--device: {str(exc).splitlines()[0]}") from None
    # The largest workload holds one (n, m) float64 feature matrix per student; the solvers' temporaries take
    # about as much again (the softmax head's whitened basis is one more copy).
    needed = 3 * 8 * max(sizes) * args.n * max(args.m, args.linear_m)
    free = free_memory_bytes(device)
    if needed > free:
        raise InputError(f"--sizes {max(sizes)} x --n {args.n} x --m {args.m} needs about {needed / 2**30:.1f} GiB "
                         f"on {device}, {free / 2**30:.1f} GiB free; use smaller sizes")
    if args.json:
        check_output_path(args.json, "--json")
    try:
        result = run_bench(device=str(device), sizes=tuple(sizes), cvxpy_students=args.cvxpy_students,
                           adam_students=args.adam_students, adam_epochs=args.adam_epochs, repeats=args.repeats,
                           tol=args.tol, n=args.n, m=args.m, heads=heads, sparse=not args.no_sparse,
                           linear_m=args.linear_m, lbfgs_students=args.lbfgs_students,
                           numpy_students=args.numpy_students, peak_matrix_size=args.peak_matrix,
                           head_repeats=args.head_repeats, practice=args.practice,
                           practice_loop_students=args.practice_loop_students, practice_dtype=args.practice_dtype,
                           progress=lambda s: print(s, file=sys.stderr, flush=True))
    except MemoryError:
        raise InputError("ran out of memory; use smaller --sizes, --n or --m") from None
    print(report(result))
    if args.json:
        save_json(args.json, result)
    return 0 if result["all_heads_certified_below_tol"] else 1


def report(result: dict) -> str:
    """The printed tables: mixture rows (with GFLOP/s), the other heads with their baselines, the sparse
    workloads, then the headline ratios."""
    lines = []
    if result["batched"] is not None:
        rows = [{"solver": "cvxpy (Clarabel)", "B": 1, "ms": result["cvxpy_s_per_student"] * 1e3,
                 "gap": result["cvxpy_worst_gap"]},
                {"solver": f"AdamW loop ({result['adam']['epochs']} epochs)", "B": 1,
                 "ms": result["adam_s_per_student"] * 1e3, "gap": result["adam_worst_gap"]}]
        for layout, key in (("batched, per-student features", "batched"),
                            ("batched, shared features", "batched_shared")):
            for r in result[key]:
                rows.append({"solver": layout, "B": r["B"], "ms": r["s_per_student"] * 1e3, "gap": r["worst_gap"],
                             "mem": r["peak_mem_mb"], "rate": r["students_per_s"], "gflops": r["gflop_per_s"]})
        w = result["workload"]
        lines.append(f"mixture head, {w['loss']}, n = {w['n']}, m = {w['m']}, k = {w['k']}:")
        lines.append(format_table(rows, [("solver", "solver"), ("B", "B"), ("ms", "ms/student"),
                                         ("rate", "students/s"), ("gap", "worst certified gap"),
                                         ("mem", "peak MB"), ("gflops", "GFLOP/s")]))
    for head, h in result["heads"].items():
        lines.append(f"\n{head} head, {h['loss']}, n = {h['n']}, m = {h['m']}, k = {h['k']} ({h['features']} "
                     f"features):")
        base = h["baseline"]
        rows = [{"solver": base["solver"], "B": 1, "ms": base["s_per_student"] * 1e3,
                 "gap": base.get("worst_gap")}]
        if h.get("torch_baseline"):
            rows.append({"solver": h["torch_baseline"]["solver"], "B": 1,
                         "ms": h["torch_baseline"]["s_per_student"] * 1e3})
        rows += [{"solver": "batched", "B": r["B"], "ms": r["s_per_student"] * 1e3, "rate": r["students_per_s"],
                  "gap": r["worst_gap"], "mem": r["peak_mem_mb"]} for r in h["sizes"]]
        lines.append(format_table(rows, [("solver", "solver"), ("B", "B"), ("ms", "ms/student"),
                                         ("rate", "students/s"), ("gap", "worst certified gap"),
                                         ("mem", "peak MB")]))
        if not h["batched_available"]:
            lines.append(f"  {h['note']}")
        elif head == "softmax":
            for label, b in (("scipy L-BFGS", base), ("torch L-BFGS", h.get("torch_baseline"))):
                if b:
                    lines.append(f"  {label} reached the batched objective + tol on every student: "
                                 f"{'yes' if b['reached_objective'] else 'NO'} (worst excess "
                                 f"{b['worst_excess_objective']:.1e}, {b['mean_iterations']:.0f} iterations on "
                                 "average)")
        elif head == "squared":
            lines.append(f"  objective difference to numpy: {base['worst_objective_difference']:.1e}")
    if result.get("sparse"):
        rows = [{"workload": name, "loss": w["loss"], "B": w["B"], "ms": w["s_per_student"] * 1e3,
                 "gap": w["worst_gap"], "cvx": w["cvxpy_s_per_student"], "ratio": w["ratio_vs_cvxpy"]}
                for name, w in result["sparse"].items()]
        lines.append("\nmixture head, sparse workloads (cvxpy on the first students of the same instances):")
        lines.append(format_table(rows, [("workload", "workload"), ("loss", "loss"), ("B", "B"),
                                         ("ms", "ms/student"), ("gap", "worst certified gap"),
                                         ("cvx", "cvxpy s/student"), ("ratio", "x cvxpy")]))
    machine = result["machine"]
    lines.append(f"\nmachine: {machine['device']} ({machine['gpu'] or machine['cpu']}, {machine['threads']} threads); "
                 f"float64 matmul peak {result['flops']['peak_gflop_per_s']:.1f} GFLOP/s")
    if result["batched"] is not None:
        B = result["batched"][-1]["B"]
        runs = ", ".join(_times(r) for r in result["ratio_vs_cvxpy_runs"])
        lines.append(f"mixture at B={B}: {_times(result['ratio_vs_cvxpy'])} cvxpy (median of "
                     f"{len(result['ratio_vs_cvxpy_runs'])} runs: {runs}), {_times(result['ratio_vs_adam'])} the Adam "
                     f"loop (per-student features); {_times(result['ratio_vs_cvxpy_shared'])} cvxpy, "
                     f"{_times(result['ratio_vs_adam_shared'])} Adam (shared features)")
        flops = result["flops"]
        lines.append(f"mixture FLOP rate at B={B}: {flops['mixture_gflop_per_s']:.2f} GFLOP/s = "
                     f"{100 * flops['mixture_fraction_of_peak']:.1f}% of the float64 matmul peak "
                     f"({flops['mixture_multiply_adds_per_student'] / 1e6:.1f} M multiply-adds per student)")
        sc = result.get("strong_convexity")
        if sc:
            sc_runs = ", ".join(_times(r) for r in sc["ratio_vs_cvxpy_runs"])
            lines.append(f"mixture at B={sc['B']} with the strong-convexity certificate (opt-in; bounds objective - "
                         f"optimum only): {sc['s_per_student'] * 1e3:.3f} ms/student, {_times(sc['ratio_vs_cvxpy'])} "
                         f"cvxpy (median of {len(sc['ratio_vs_cvxpy_runs'])} runs: {sc_runs}), "
                         f"{sc['mean_iterations']:.2f} iterations")
        largest = result["batched"][-1]
        if largest.get("floor"):
            work, floor = largest["work_per_student"], largest["floor"]
            lines.append(f"mixture work at B={B}: {work['feature_reads']:.1f} reads of a student's features and "
                         f"{work['hessians']:.1f} Hessians per student, {floor['s_per_student'] * 1e3:.3f} ms at this "
                         f"machine's measured rates ({floor['read_s_per_student'] * 1e6:.0f} us a read, "
                         f"{floor['hessian_s_per_student'] * 1e6:.0f} us a Hessian) = "
                         f"{100 * floor['share_of_measured']:.0f}% of the measured "
                         f"{largest['s_per_student'] * 1e3:.3f} ms")
        target = result.get("mixture_target")
        if target:
            lines.append(f"mixture: {target['target_ratio']:g}x cvxpy would leave "
                         f"{target['budget_s_per_student'] * 1e3:.3f} ms per student = "
                         f"{target['budget_over_floor']:.2f} times the counted work at this machine's rates")
    for head, key, name in (("linear", "ratio_vs_cvxpy", "cvxpy"), ("softmax", "ratio_vs_lbfgs", "scipy L-BFGS"),
                            ("squared", "ratio_vs_numpy", "numpy lstsq")):
        h = result["heads"].get(head)
        if h is not None and h.get(key) is not None:
            extra = (f", {_times(h['ratio_vs_torch_lbfgs'])} torch L-BFGS"
                     if h.get("ratio_vs_torch_lbfgs") is not None else "")
            lines.append(f"{head} at B={h['B']}: {_times(h[key])} {name}{extra}")
            budget = h.get("read_budget")
            if budget:
                evaluations = h["baseline"].get("mean_evaluations")
                lines.append(f"softmax: {budget['target_ratio']:g}x scipy L-BFGS would leave "
                             f"{budget['budget_s_per_student'] * 1e3:.3f} ms per student = "
                             f"{budget['budget_reads']:.1f} reads of its features "
                             f"({budget['read_s_per_student'] * 1e6:.0f} us a read here); a certified solve needs "
                             f"at least 2 (a step, then the certificate at its end point)"
                             + (f"; L-BFGS made {evaluations:.1f} evaluations (2 reads each)" if evaluations else ""))
    for name, w in (result.get("sparse") or {}).items():
        lines.append(f"mixture, {name} at B={w['B']}: {_times(w['ratio_vs_cvxpy'])} cvxpy"
                     + (f"; {_times(w['strong_convexity']['ratio_vs_cvxpy'])} with the strong-convexity certificate"
                        if w.get("strong_convexity") else ""))
    if result.get("practice"):
        p, w = result["practice"], result["practice"]["workload"]
        lines.append(f"practice trainer ({w['head']}, {w['loss']}, {w['epochs']} epochs, batch {w['batch_size']}, "
                     f"{w['dtype']}, {w.get('device', 'cpu')}): {p['batched_students_per_s']:.1f} students/s at B={w['B']}, "
                     f"{p['loop_students_per_s']:.2f} in a per-student torch loop: {_times(p['speedup'])} "
                     f"({_times(p['speedup_vs_one_at_a_time'])} vs the batched trainer called one student at a time)")
    lines.append("all batched gaps certified <= tol: " + ("yes" if result["all_heads_certified_below_tol"] else "NO"))
    return "\n".join(lines)


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"
