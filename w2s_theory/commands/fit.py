"""``w2s-theory fit``: fit last-layer students on saved features and teacher probabilities (docs/design.md)."""

from __future__ import annotations

import numpy as np

from .._backend import to_numpy
from ..divergences import LOSSES, get_loss, kl
from ..heads import HEADS
from ..io import check_output_paths, format_table, load_array, save_json, save_npz
from ..solvers import fit
from ..validation import InputError, check_device, check_distributions, check_positive


def register(sub) -> None:
    p = sub.add_parser("fit", help="fit students on saved features and teacher probabilities")
    p.add_argument("--features", required=True, metavar="F.npy",
                   help="(n, m) or (B, n, m) features: .npy, .npz, .pt, .parquet or .csv (FILE.npz:NAME picks an array)")
    p.add_argument("--teacher", required=True, metavar="Q.npy", help="(n, k) or (B, n, k) teacher probabilities")
    p.add_argument("--loss", required=True, help=f"one of: {' '.join(LOSSES)}")
    p.add_argument("--head", default="mixture", help=f"one of: {' '.join(HEADS)} (default mixture)")
    p.add_argument("--out", required=True, metavar="OUT.npz", help="where to write probs, objective, gap")
    p.add_argument("--truth", metavar="T.npy", help="ground-truth probabilities: adds errors, gain, misfit")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--backend", default="batched", choices=["batched", "cvxpy"])
    p.add_argument("--tol", type=float, default=1e-10, help="target certified gap (default 1e-10)")
    p.add_argument("--gamma", type=float, default=0.0, help="probability floor of the linear head")
    p.add_argument("--json", metavar="REPORT.json", help="also write a per-student report")
    p.add_argument("--strong-convexity", action="store_true",
                   help="mixture head, two classes, KL losses: certify objective - optimum by strong convexity "
                        "(about one iteration fewer; not the first-order gap the theorem checks use)")
    p.set_defaults(handler=handle)


def _student_report(result, teacher, truth, loss_name):
    """Per-student numbers; with the truth also the errors, gain and misfit in the trained direction."""
    rows = []
    probs = to_numpy(result.probs)
    loss = get_loss(loss_name)
    for b in range(result.batch_size):
        row = {
            "student": b,
            "objective": float(result.objective[b]),
            "gap": float(result.gap[b]),
            "converged": bool(result.converged[b]),
            "iterations": int(result.iterations[b]),
        }
        if truth is not None and result.head != "squared":
            q, p, t = teacher[b], probs[b], truth[b]
            row["student_error"] = float(kl(t, p).mean())  # E KL(F* || F_sw)
            row["teacher_error"] = float(kl(t, q).mean())  # E KL(F* || F_w)
            row["gain"] = row["teacher_error"] - row["student_error"]
            row["misfit"] = float(loss.per_sample(q, p).mean()) if loss.name in ("forward_kl", "reverse_kl") \
                else float(kl(p, q).mean())
            row["accuracy"] = float((p.argmax(-1) == t.argmax(-1)).mean())
        rows.append(row)
    return rows


def handle(args) -> int:
    check_positive("--tol", args.tol)
    check_device(args.device)
    check_output_paths({"--out": args.out, "--json": args.json},
                       {"--features": args.features, "--teacher": args.teacher, "--truth": args.truth})
    features = load_array(args.features, "--features")
    teacher = load_array(args.teacher, "--teacher")
    truth = None
    if args.truth:
        truth = load_array(args.truth, "--truth")
        if truth.shape[-2:] != teacher.shape[-2:] or truth.ndim not in (2, 3):
            raise InputError(f"--truth has shape {truth.shape}, expected the teacher's (n, k) = {teacher.shape[-2:]}")
        truth = check_distributions("--truth", truth)
    result = fit(features, teacher, loss=args.loss, head=args.head, backend=args.backend, device=args.device,
                 tol=args.tol, gamma=args.gamma, strong_convexity=args.strong_convexity)
    arrays = result.numpy()
    if teacher.ndim == 2:  # unbatched in, unbatched out
        arrays = {k: (v[0] if np.ndim(v) >= 1 else v) for k, v in arrays.items()}
    save_npz(args.out, **arrays)
    teacher_b = teacher if teacher.ndim == 3 else teacher[None]
    truth_b = None if truth is None else (truth if truth.ndim == 3 else np.broadcast_to(truth, teacher_b.shape))
    rows = _student_report(result, teacher_b, truth_b, args.loss)
    columns = [("student", "student"), ("objective", "objective"), ("gap", "certified gap"),
               ("converged", "converged"), ("iterations", "iters")]
    if truth is not None:
        columns += [("student_error", "E KL(F*||F_sw)"), ("gain", "gain"), ("misfit", "misfit"),
                    ("accuracy", "accuracy")]
    if args.json:
        save_json(args.json, {"head": args.head, "loss": args.loss, "certificate": result.certificate,
                              "method": result.method, "students": rows})
    shown = rows if len(rows) <= 20 else rows[:10] + rows[-10:]
    print(format_table(shown, columns))
    if len(rows) > 20:
        print(f"... ({len(rows)} students; all in {args.out})")
    gaps = np.asarray(arrays["gap"], dtype=float)
    worst = float(gaps.max()) if gaps.size else float("nan")  # nan when any student is uncertified
    print(f"\n{result.batch_size} student(s), {args.head} head, {args.loss}; certificate: {result.certificate}; "
          f"worst gap {worst:.3g}; wrote {args.out}")
    for reason, count in _uncertified_reasons(result, gaps).items():
        print(f"{count} student(s) {reason}")
    return 0


def _uncertified_reasons(result, gaps) -> dict[str, int]:
    """Why students have no finite gap, counted by reason: the solvers say it per student
    (``info["reasons"]``) or once for the batch (``info["uncertified_reason"]``)."""
    uncertified = ~np.isfinite(np.atleast_1d(gaps))
    per_student = result.info.get("reasons")
    if per_student is None:
        per_student = [result.info.get("uncertified_reason") or ""] * len(uncertified)
    counts: dict[str, int] = {}
    for flag, reason in zip(uncertified, per_student):
        if flag:
            reason = reason or "uncertified (no reason recorded)"
            counts[reason] = counts.get(reason, 0) + 1
    return counts
