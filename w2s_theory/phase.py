r"""Phase diagrams: paired differences between two losses over a grid of settings, with standard errors.

A comparison of losses ``a`` and ``b`` is *paired*: for every run of ``a`` the run of ``b`` with the same
spec except the loss (same world, seed, teacher, noise draw, split and — for the practice trainer — the same
mini-batch order) is found, and the difference of a metric is taken run by run. Over the :math:`n` seeds of a
cell,

.. math:: \bar d = \frac1n\sum_s d_s,\qquad \mathrm{SE} = \frac{\mathrm{sd}(d)}{\sqrt n},

and a cell is *significant* when :math:`|\bar d| \ge 2\,\mathrm{SE}` (about a 5% two-sided test per cell; no
correction for the number of cells, so expect about one false positive in twenty null cells).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .validation import InputError

__all__ = ["spec_columns", "paired_differences", "resolve_axis", "axis_labels", "plot_phase", "SIGNIFICANCE"]

#: A cell is significant when |mean| >= SIGNIFICANCE * SE.
SIGNIFICANCE = 2.0

#: Metrics that are not part of a run's spec even though they sit beside it in a row.
_NOT_SPEC = ("run_id", "study", "loss", "seed")


def spec_columns() -> list[str]:
    """The flat column names of a run's spec (``world_<field>`` and the run fields)."""
    from .pipeline import RunSpec, _flat_spec

    return list(_flat_spec(RunSpec()))


def resolve_axis(name: str, study_axes: dict) -> list[str]:
    """An ``--axes`` entry -> store columns. ``run.noise``, ``world.temperature``, ``noise`` and
    ``temperature`` (a world field) are accepted; ``A+B`` joins several columns into one axis (e.g.
    ``noise_kind+noise``). Each part must be swept by the study."""
    columns = []
    swept = {key.split(".", 1)[-1]: key for key in study_axes if key != "seed"}
    for part in name.split("+"):
        part = part.strip()
        bare = part.split(".", 1)[-1]
        if bare not in swept and bare != "noise_kind":
            raise InputError(f"--axes: {part!r} is not an axis the study sweeps; swept axes: "
                             f"{', '.join(sorted(swept)) or 'none'}")
        key = swept.get(bare, "run.noise_kind")
        columns.append(f"world_{bare}" if key.startswith("world.") else bare)
    return columns


def axis_labels(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One label per row for an axis of one or several columns (``"flip 0.3"``)."""
    return frame[columns].astype(str).agg(" ".join, axis=1) if len(columns) > 1 else frame[columns[0]]


def paired_differences(frame: pd.DataFrame, pairs: list[tuple[str, str]], group_columns: list[str],
                       metric: str = "student_test_accuracy") -> pd.DataFrame:
    """One row per (pair, group): ``mean``, ``se``, ``n`` (paired seeds) and ``significant`` of the difference
    ``metric(a) - metric(b)`` (see the module docstring). ``group_columns`` are the spec columns that define a
    cell (the others, except loss and seed, must be equal within a pair: they are part of the pairing key)."""
    if metric not in frame:
        raise InputError(f"--metric: {metric!r} is not a column of the results; e.g. student_test_accuracy, pgr, ece")
    key = [c for c in spec_columns() if c in frame and c not in _NOT_SPEC] + ["seed"]
    key += [c for c in group_columns if c not in key]  # derived label columns (equal within a pair)
    out = []
    for a, b in pairs:
        left = frame[frame["loss"] == a][key + [metric]]
        right = frame[frame["loss"] == b][key + [metric]]
        merged = left.merge(right, on=key, suffixes=("_a", "_b"))
        if merged.empty:
            continue
        merged["difference"] = merged[f"{metric}_a"] - merged[f"{metric}_b"]
        for values, g in merged.groupby(group_columns, dropna=False, sort=True):
            values = values if isinstance(values, tuple) else (values,)
            d = g["difference"].to_numpy(float)
            n = int(np.isfinite(d).sum())
            mean = float(np.nanmean(d)) if n else math.nan
            se = float(np.nanstd(d, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
            out.append({"loss_a": a, "loss_b": b, **dict(zip(group_columns, values)), "metric": metric,
                        "mean": mean, "se": se, "n": n,
                        "significant": bool(n > 1 and abs(mean) >= SIGNIFICANCE * se)})
    return pd.DataFrame(out)


def _sort_key(values):
    try:
        return sorted(values, key=lambda v: float(v))
    except (TypeError, ValueError):
        return sorted(values, key=str)


def plot_phase(ax, cells: pd.DataFrame, x: str, y: str, limit: float, *, annotate: bool = True):
    """Draw one heatmap of ``cells`` (rows of :func:`paired_differences` with label columns ``x`` and ``y``)
    on ``ax``: colour = mean difference on a diverging scale symmetric about 0; cells that are not
    significant are drawn light grey and hatched, so only significant colour is visible. Returns the image."""
    from matplotlib.colors import ListedColormap  # noqa: F401  (matplotlib is imported by the caller)
    from matplotlib.patches import Rectangle

    xs, ys = _sort_key(cells[x].unique()), _sort_key(cells[y].unique())
    grid = np.full((len(ys), len(xs)), np.nan)
    for _, c in cells.iterrows():
        grid[ys.index(c[y]), xs.index(c[x])] = c["mean"] if c["significant"] else np.nan
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, origin="lower", aspect="auto")
    for _, c in cells.iterrows():
        i, j = ys.index(c[y]), xs.index(c[x])
        if not c["significant"]:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.9", edgecolor="0.6", hatch="///",
                                   linewidth=0))
        if annotate:
            text = f"{100 * c['mean']:+.1f}\n±{100 * c['se']:.1f}" if np.isfinite(c["se"]) else f"{100 * c['mean']:+.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="black" if not c["significant"] or abs(c["mean"]) < 0.6 * limit else "white")
    ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(ys)), [str(v) for v in ys], fontsize=7)
    return image
