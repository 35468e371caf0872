"""``w2s-theory phase CONFIG.toml --store DB --axes A,B [--compare a:b ...] --out DIR``: run a grid through
the sweep machinery (resumable, Ray-capable) and write paired loss differences with standard errors (CSV)
and one heatmap per compared pair, non-significant cells masked (:mod:`w2s_theory.phase`).

The config and the options are checked in full before the store is opened.
"""

from __future__ import annotations

DEFAULT_COMPARE = "reverse_ce:forward_kl,reverse_kl:forward_kl"


def register(sub) -> None:
    p = sub.add_parser("phase", help="phase diagram: paired loss differences over two axes of a sweep",
                       description="Run a sweep config (resumable: finished runs are skipped) and write, for each "
                                   "compared pair of losses, the paired difference of a metric over two axes, "
                                   "with standard errors across seeds (CSV) and a heatmap whose cells with "
                                   "|mean| < 2 SE are masked.")
    p.add_argument("config", metavar="CONFIG.toml", help="sweep config, e.g. experiments/phase_diagram.toml")
    p.add_argument("--store", default="results.db", help="SQLite results store (default results.db)")
    p.add_argument("--axes", required=True, metavar="A,B",
                   help="the two swept axes, x then y (e.g. noise_kind+noise,teacher_temperature; A+B joins "
                        "columns into one axis)")
    p.add_argument("--compare", default=DEFAULT_COMPARE, metavar="A:B[,C:D]",
                   help=f"loss pairs, difference = first - second (default {DEFAULT_COMPARE})")
    p.add_argument("--metric", default="student_test_accuracy", help="metric column (default student_test_accuracy)")
    p.add_argument("--out", default="phase", help="output directory (default ./phase)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--backend", default="local", choices=("local", "ray"), help="local or ray (as for sweep)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N", help="at most N students per chunk")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(handler=handle)


def parse_pairs(text: str, losses: list[str]) -> list[tuple[str, str]]:
    from ..validation import InputError

    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(parts):
            raise InputError(f"--compare: {item!r} is not a pair of losses such as reverse_ce:forward_kl")
        for loss in parts:
            if loss not in losses:
                raise InputError(f"--compare: loss {loss!r} is not in the study (its losses: {', '.join(losses)})")
        pairs.append((parts[0], parts[1]))
    return pairs


def handle(args) -> int:
    import sys
    from pathlib import Path

    from .._backend import resolve_device
    from ..config import load_study
    from ..phase import paired_differences, resolve_axis
    from ..store import ResultsStore
    from ..sweep import run_sweep
    from ..validation import InputError

    study = load_study(args.config)
    axes = [a for a in args.axes.split(",") if a.strip()]
    if len(axes) != 2:
        raise InputError(f"--axes: give two axes separated by a comma, e.g. noise,teacher_temperature; got {args.axes!r}")
    x_columns, y_columns = (resolve_axis(a, study.axes) for a in axes)
    losses = sorted({spec.loss for spec in study.specs})
    pairs = parse_pairs(args.compare, losses)
    if args.chunk_size is not None and args.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.backend == "local":
        try:
            resolve_device(args.device)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"--device: {exc}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} exists and is not a directory")

    with ResultsStore(args.store) as store:
        run_sweep(study.specs, store, study.name, device=args.device, backend=args.backend,
                  progress=not args.quiet, chunk_size=args.chunk_size)
        frame = store.dataframe(study.name)
    frame = frame[frame["run_id"].isin({spec.run_id for spec in study.specs})]
    x_name, y_name = "+".join(x_columns), "+".join(y_columns)
    frame = frame.assign(**{x_name: _labels(frame, x_columns), y_name: _labels(frame, y_columns)})
    others = [c.split(".", 1)[-1] for c in study.axes if c not in ("seed", "run.loss")]
    others = [f"world_{c}" if f"world.{c}" in study.axes else c for c in others]
    others = [c for c in others if c not in (*x_columns, *y_columns)]
    table = paired_differences(frame, pairs, [*others, y_name, x_name], args.metric)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "phase_differences.csv"
    table.to_csv(csv, index=False)
    figures = [write_heatmap(table, a, b, x_name, y_name, others, args.metric, out / f"phase_{a}_vs_{b}.png")
               for a, b in pairs if not table.empty and ((table.loss_a == a) & (table.loss_b == b)).any()]
    significant = int(table["significant"].sum()) if not table.empty else 0
    print(f"phase {study.name}: {len(table)} cells ({significant} significant at |mean| >= 2 SE) -> {csv}"
          + "".join(f", {f}" for f in figures), file=sys.stderr if args.quiet else sys.stdout)
    return 0


def _labels(frame, columns):
    from ..phase import axis_labels

    return axis_labels(frame, columns)


def write_heatmap(table, a, b, x, y, others, metric, path) -> str:
    """One figure per pair: a panel per combination of the other swept axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_write
    from ..phase import plot_phase

    cells = table[(table.loss_a == a) & (table.loss_b == b)]
    groups = list(cells.groupby(others, sort=True)) if others else [((), cells)]
    limit = max(1e-6, float(np.nanmax(np.abs(cells["mean"]))))
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1, 3.4 * rows + 0.6), squeeze=False,
                             constrained_layout=True)
    image = None
    for ax, (values, g) in zip(axes.flat, groups):
        image = plot_phase(ax, g, x, y, limit)
        values = values if isinstance(values, tuple) else (values,)
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(others, values)) or f"{a} - {b}", fontsize=8)
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel(y, fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"{a} - {b}")
    fig.suptitle(f"{a} - {b} ({metric}, paired over seeds; hatched: |mean| < 2 SE; text: x100)", fontsize=9)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return str(path)
