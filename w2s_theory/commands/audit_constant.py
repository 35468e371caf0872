"""``w2s-theory audit-constant``: search for instances that violate a candidate constant of the sqrt-bound.

Exit status: 0 when no violation was found within the budget, 1 when one was (the counterexample is printed and,
with ``--json``, saved), 2 for bad input (one line on stderr, nothing written).
"""

from __future__ import annotations

import numpy as np

import signal
import threading
from contextlib import contextmanager

from ..bounds import DIRECTIONS, SIDES, _constant_value, audit_constant, parse_constant
from ..io import check_output_paths, save_json
from ..validation import InputError

#: Seconds allowed for parsing and evaluating the candidate constant (the search itself is bounded by --budget).
EXPRESSION_SECONDS = 10


def register(sub) -> None:
    p = sub.add_parser(
        "audit-constant",
        help="search for violations of |L(F*,F_w) - L(F*,F_sw)| <= C sqrt(d) for a candidate constant C",
        description="Random search plus local optimisation over instances whose probabilities are at least gamma; "
                    "the worst instance is re-evaluated in 50-digit arithmetic. Exit 1 if a violation is found.",
    )
    p.add_argument("expression", metavar="EXPR",
                   help="the candidate constant: a number or an expression in gamma, e.g. \"sqrt(2)*log(1/gamma)\"")
    p.add_argument("--gamma", type=float, required=True, help="probability floor of teacher and student, in (0, 0.5) (two classes need 2 gamma < 1 for "
                        "the teacher and the student to differ)")
    p.add_argument("--direction", choices=DIRECTIONS, default="reverse",
                   help="d = E KL(F_sw||F_w) (reverse, default) or E KL(F_w||F_sw) (forward)")
    p.add_argument("--side", choices=SIDES, default="both",
                   help="both: |gain| (default); upper: -gain (student worse); lower: gain (student better)")
    p.add_argument("--budget", type=int, default=2000, help="instance evaluations (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search, >= 0 (default 0)")
    p.add_argument("--json", metavar="PATH", help="write the result (violated, worst_ratio, worst instance) as JSON")
    p.set_defaults(handler=handle)


def _fmt_rows(rows) -> str:
    return "[" + ", ".join("(" + ", ".join(f"{x:.6g}" for x in row) + ")" for row in np.asarray(rows)) + "]"


@contextmanager
def _time_limit(seconds: int, what: str):
    """Raise :class:`InputError` if the block runs longer than ``seconds`` (main thread on POSIX; elsewhere
    the limits of :func:`w2s_theory.bounds.parse_constant` alone bound the work)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise InputError(f"{what} took more than {seconds} s to evaluate; give a simpler expression")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def handle(args) -> int:
    if not (0 < args.gamma < 0.5):
        raise InputError(f"--gamma: the probability floor must be in (0, 0.5), got {args.gamma}")
    if args.budget < 10:
        raise InputError(f"--budget: at least 10 evaluations are needed, got {args.budget}")
    if args.seed < 0:
        raise InputError(f"--seed: must be >= 0, got {args.seed}")
    check_output_paths({"--json": args.json})
    try:
        with _time_limit(EXPRESSION_SECONDS, "EXPR"):
            _constant_value(parse_constant(args.expression), args.gamma)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"EXPR: {exc}") from None
    result = audit_constant(args.expression, args.gamma, direction=args.direction, budget=args.budget,
                            seed=args.seed, side=args.side)
    if args.json:  # written before anything is printed: a closed stdout cannot lose it
        save_json(args.json, result.as_dict())
    print(f"candidate C(gamma) = {args.expression}  ->  C({args.gamma:g}) = {result.constant:.10g}")
    print(f"sharp constant sqrt(2(1-gamma)/gamma) = {result.sharp_constant:.10g}; "
          f"provable 1/(sqrt(2) gamma) = {result.provable_constant:.10g}")
    print(f"searched {result.evaluations} instances ({args.direction} d, side {args.side}, seed {args.seed})")
    print(f"worst ratio |gain|/sqrt(d) found: {result.worst_ratio:.10g}  (worst / C = {result.margin:.6g})")
    inst = result.worst_instance
    if inst:
        print(f"worst instance (n = {inst['n']}, k = {inst['k']}): truth {_fmt_rows(inst['truth'])}")
        print(f"  teacher {_fmt_rows(inst['teacher'])}")
        print(f"  student {_fmt_rows(inst['student'])}")
        change = np.abs(np.asarray(inst["student"]) - np.asarray(inst["teacher"])).max()
        print(f"  gain {inst['gain']:.6g}, misfit {inst['misfit']:.6g}, largest |student - teacher| {change:.3g}")
        print("  (the supremum is approached as the student tends to the teacher at a floored class, so the worst "
              "instances have tiny misfits; the ratio was re-evaluated in 50-digit arithmetic)")
    verdict = "VIOLATED: a counterexample to the candidate constant" if result.violated else \
        "no violation found within the budget (this does not prove the constant valid)"
    print(verdict)
    return 1 if result.violated else 0
