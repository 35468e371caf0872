r"""Matplotlib drawings of the paper-style figures (Agg backend: no display needed).

Each ``plot_*`` function draws one figure from data that :mod:`w2s_theory.figures` computed (from the results
store for sweep-driven figures) and returns the :class:`matplotlib.figure.Figure`; :func:`save_figure` writes
it as ``<name>.png`` (for the README) and ``<name>.pdf`` (for papers), atomically and without timestamps so
that regenerated files only change when the numbers do.
"""

from __future__ import annotations

import io as _io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .io import atomic_write  # noqa: E402

__all__ = ["save_figure", "plot_mode_seeking", "plot_gain_vs_misfit", "plot_noise_robustness",
           "plot_bound_tightness", "plot_guarantee_table", "plot_loss_comparison", "plot_demo", "LOSS_STYLE"]

#: One look per training loss, shared by every figure. Forward KL and forward CE have the same gradients
#: (their curves coincide), so they differ in marker and line style to stay visible on top of each other.
LOSS_STYLE = {
    "forward_kl": dict(color="#1f77b4", marker="o", linestyle="-", label="forward KL"),
    "forward_ce": dict(color="#17becf", marker="x", linestyle="--", label="forward CE"),
    "reverse_kl": dict(color="#d62728", marker="s", linestyle="-", label="reverse KL"),
    "reverse_ce": dict(color="#ff7f0e", marker="^", linestyle="--", label="reverse CE"),
}
LOSS_ORDER = ("forward_kl", "forward_ce", "reverse_kl", "reverse_ce")

plt.rcParams.update({"font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "legend.fontsize": 8.5,
                     "figure.dpi": 100, "savefig.dpi": 150, "axes.grid": True, "grid.alpha": 0.3})


def save_figure(fig, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.png`` and ``out_dir/name.pdf``; returns the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        buffer = _io.BytesIO()
        fig.savefig(buffer, format=fmt, bbox_inches="tight", metadata=metadata)
        path = out / f"{name}.{fmt}"
        atomic_write(path, lambda fh, data=buffer.getvalue(): fh.write(data))
        paths.append(path)
    plt.close(fig)
    return paths


def _caption(fig, text: str, y: float, width: int = 150) -> None:
    """A caption under the figure, wrapped to ``width`` characters per line (paragraphs kept)."""
    import textwrap

    wrapped = "\n".join(textwrap.fill(part, width) for part in text.split("\n"))
    fig.text(0.5, y, wrapped, ha="center", va="top", fontsize=8.5)


def _identity_line(ax, lo: float, hi: float, label: str = "y = x") -> None:
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle="-", zorder=1, label=label)


def _square_limits(ax, x, y) -> None:
    values = np.concatenate([np.asarray(x, float), np.asarray(y, float)])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    lo, hi = min(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    _identity_line(ax, lo, hi)


# --------------------------------------------------------------------------------------------------------
# mode_seeking
# --------------------------------------------------------------------------------------------------------


def plot_mode_seeking(study: dict):
    """The mixture density with the forward-KL and reverse-KL Gaussian fits (Figure 1 of the paper)."""
    x = study["x"]
    mix = study["mixture"]
    parts = " + ".join(f"{w:g}·N({m:g}, {s:g}²)" for w, m, s in zip(mix["weights"], mix["means"], mix["sds"]))
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    ax.fill_between(x, study["p"], color="0.8", label=f"target p = {parts}")
    fw = study["forward"]
    ax.plot(x, fw["density"], color=LOSS_STYLE["forward_kl"]["color"], linewidth=2,
            label=f"forward KL(p‖q) fit: μ={fw['mu']:.2f}, σ={fw['sigma']:.2f} (covers both modes)")
    for i, rv in enumerate(study["reverse"]):
        ax.plot(x, rv["density"], color=LOSS_STYLE["reverse_kl"]["color"], linewidth=2 if i == 0 else 1.2,
                linestyle=("-", ":", "-.", "--")[min(i, 3)],
                label=(f"reverse KL(q‖p) fit: μ={rv['mu']:.2f}, σ={rv['sigma']:.2f} (locks onto one mode)" if i == 0
                       else f"reverse KL, other local minimum: μ={rv['mu']:.2f} (KL {rv['kl']:.2f} vs "
                            f"{study['reverse'][0]['kl']:.2f})"))
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title("One Gaussian q fitted to a mixture p (numerically): forward KL covers the mass, "
                 "reverse KL seeks a mode", fontsize=10)
    ax.set_ylim(0, max(np.max(study["p"]), max(r["density"].max() for r in study["reverse"])) * 1.45)
    ax.legend(loc="upper left", frameon=True)
    return fig


# --------------------------------------------------------------------------------------------------------
# gain_vs_misfit
# --------------------------------------------------------------------------------------------------------

VARIANT_TITLES = {
    "pretrained": "pretrained $h_s$ (the notebook's experiment)",
    "perturbed": "perturbed $h^\\star$ (this project's variant)",
    "realizable": "realizable $h_s = h^\\star$ (this project's variant)",
}

#: One colour and marker per draw of h* (the notebook's own draw first, in black).
_DRAW_STYLE = [dict(color="black", marker="o"), dict(color="#1f77b4", marker="s"),
               dict(color="#ff7f0e", marker="^"), dict(color="#2ca02c", marker="D"),
               dict(color="#9467bd", marker="v"), dict(color="#8c564b", marker="P")]


def _violation_scatter(ax, x, y, violated, color, marker, label):
    ok = ~violated
    ax.scatter(x[ok], y[ok], s=14, color=color, marker=marker, alpha=0.65, linewidths=0.5,
               label=f"{label}: holds ({int(ok.sum())})")
    if violated.any():
        ax.scatter(x[violated], y[violated], s=34, facecolors="none", edgecolors="black", marker="D",
                   linewidths=1.0, label=f"{label}: violated ({int(violated.sum())})")
        ax.scatter(x[violated], y[violated], s=12, color=color, marker=marker, alpha=0.9)


def _draw_scatter(ax, d: pd.DataFrame, stats: dict, draws: list, title: str, digitised: dict | None = None,
                  order: list | None = None):
    """Fresh-input gain vs misfit of one Charikar variant, one colour per draw of h*; the legend carries each
    draw's ε, weak error and distance to y = x."""
    xs, ys = [], []
    for draw in draws:
        e = d[d["draw"] == draw]
        if e.empty:
            continue
        style = _DRAW_STYLE[min((order or draws).index(draw), len(_DRAW_STYLE) - 1)]
        st = stats[draw]
        x, y = e["gain"].to_numpy(), e["misfit"].to_numpy()
        ax.scatter(x, y, s=13, alpha=0.6, linewidths=0.4, **style,
                   label=f"{draw}: ε {st['median_eps']:.3g}, weak err {st['weak_error']:.3g},\n"
                         f"   |g−m| {st['mean_abs_gain_minus_misfit']:.3g}, m/g {st['misfit_over_gain']:.2f}")
        xs.append(x)
        ys.append(y)
    if digitised is not None:
        ax.scatter([digitised["median_gain"]], [digitised["median_misfit"]], s=160, marker="*", color="#d62728",
                   edgecolors="black", linewidths=0.6, zorder=5,
                   label=f"notebook's scatter (digitised): median\n   ({digitised['median_gain']:g}, "
                         f"{digitised['median_misfit']:g}), |g−m| {digitised['mean_abs_gain_minus_misfit']:g}")
        xs.append([digitised["median_gain"]])
        ys.append([digitised["median_misfit"]])
    x, y = np.concatenate(xs), np.concatenate(ys)
    both = np.concatenate([x, y])
    # A few tasks have a huge error on fresh inputs (x ~ N(0, 500²) reaches far out): keep the axes on the
    # bulk (1st-99th percentile) and say how many points lie beyond.
    lo, hi = np.quantile(both, [0.01, 0.99])
    inside = (x >= lo) & (x <= hi) & (y >= lo) & (y <= hi)
    off = int((~inside).sum()) if (both.max() - both.min()) > 1.5 * (hi - lo) else 0
    _square_limits(ax, x[inside], y[inside]) if off else _square_limits(ax, x, y)
    ax.set_title(title + (f"\n({off} points beyond the axes)" if off else ""))
    ax.set_xlabel("gain  E(f_w−f*)² − E(f_sw−f*)²  (fresh inputs)")
    ax.set_ylabel("misfit  E(f_sw−f_w)²  (fresh inputs)")
    ax.legend(loc="upper left", fontsize=7.5, handletextpad=0.3, framealpha=0.6)


def plot_gain_vs_misfit(charikar: pd.DataFrame, kl: pd.DataFrame, kl_caption: str, charikar_caption: str,
                        summary: dict):
    """(a) Charikar et al.'s notebook setup: the pretrained variant on the notebook's draw of h* (against its
    digitised scatter) and on other draws, and the project's perturbed and realizable variants; (b) mixture
    head, forward vs reverse KL. One point per task, gain on x, misfit on y, the line y = x."""
    stats = summary["variants"]
    draws = list(dict.fromkeys(charikar["draw"]))  # "authors" first
    others = [d for d in draws if d != "authors"]
    fig, grid = plt.subplots(2, 4, figsize=(19, 10))
    pre = charikar[charikar["variant"] == "pretrained"]
    digitised = (summary.get("notebook_replication") or {}).get("digitised_notebook")
    _draw_scatter(grid[0, 0], pre, stats.get("pretrained", {}), ["authors"],
                  "(a) notebook's experiment, notebook's draw of h*", digitised)
    if others:
        _draw_scatter(grid[0, 1], pre, stats.get("pretrained", {}), others,
                      "(a) notebook's experiment, other draws of h*", order=draws)
    else:
        grid[0, 1].axis("off")
    for ax, variant in ((grid[0, 2], "perturbed"), (grid[0, 3], "realizable")):
        d = charikar[charikar["variant"] == variant]
        if d.empty:
            ax.axis("off")
            continue
        _draw_scatter(ax, d, stats[variant], draws, f"(a) ours: {VARIANT_TITLES[variant].split(' (')[0]}",
                      order=draws)
    for ax, loss in zip(grid[1, :2], ("reverse_kl", "forward_kl")):
        d = kl[kl["loss"] == loss]
        x, y = d["gain_train"].to_numpy(), d["misfit"].to_numpy()
        style = LOSS_STYLE[loss]
        _violation_scatter(ax, x, y, (d["theorem_verdict"] == "violated").to_numpy(), style["color"],
                           style["marker"], "gain ≥ misfit")
        _square_limits(ax, x, y)
        direction = "KL(F_sw‖F_w)" if loss == "reverse_kl" else "KL(F_w‖F_sw)"
        ax.set_title(f"(b) mixture head, {style['label']}")
        ax.set_xlabel("gain  E KL(F*‖F_w) − E KL(F*‖F_sw)")
        ax.set_ylabel(f"misfit  E {direction}")
        ax.legend(loc="upper left")
    # In-sample check of Theorem 1 (the equality of the realizable variant) and the pre-training lengths.
    realizable = charikar[charikar["variant"] == "realizable"]
    lines = ["How to read it", "",
             "One point per transfer task: gain = weak error −",
             "student error, misfit = student–weak disagreement,",
             "on fresh inputs (as the notebook). ε = error of the",
             "strong head fitted on the truth (in-sample), weak err",
             "= weak head's error, |g−m| = mean |gain − misfit|,",
             "m/g = Σ misfit / Σ gain over the tasks.", "",
             "Squared loss (Charikar et al., Thm 1): gain ≥ misfit if",
             "f* is in the strong class, with equality for least",
             "squares; only up to O(√ε) otherwise."]
    if not realizable.empty:
        dev = (realizable["gain_train"] - realizable["misfit_train"]).abs().max()
        lines += [f"Realizable, in-sample: max |gain − misfit| = {dev:.1e}."]
    epochs = summary.get("pretrain_epochs_authors_draw") or {}
    if len(epochs) > 1:
        lines += ["", "Notebook's draw, pre-training epochs:", "epochs   ε      |g−m|   m/g"]
        lines += [f"{e:>6}  {v['median_eps']:.3f}  {v['mean_abs_gain_minus_misfit']:.3f}  {v['misfit_over_gain']:.2f}"
                  for e, v in sorted(epochs.items(), key=lambda kv: int(kv[0]))]
    lines += ["", "Mixture head (b): guaranteed for reverse KL", "(Yao et al. 2025, Thm 2), not for forward KL;",
              "ringed points violate it beyond the certificate."]
    for ax in grid[1, 2:]:
        ax.axis("off")
    grid[1, 2].text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8.8, transform=grid[1, 2].transAxes,
                    family="monospace")
    fig.suptitle("Gain vs misfit, one point per task", y=1.0)
    _caption(fig, f"(a) {charikar_caption}\n(b) {kl_caption}", -0.005, width=190)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------
# noise_robustness
# --------------------------------------------------------------------------------------------------------


def _fmt_ref(value: float) -> str:
    return f"{0.0 if abs(value) < 5e-4 else value:.3f}"


def _reference_lines(ax, weak: float, ceiling: float) -> None:
    """Weak teacher and strong ceiling as horizontal lines, each labelled with its value at the right edge
    (above its line, or below it when the line runs along the top of the axes). Call after the y-limits are
    final."""
    lo, hi = ax.get_ylim()
    for value, style, name in ((weak, dict(color="0.35", linestyle=":", linewidth=1.6), "weak"),
                               (ceiling, dict(color="black", linestyle="-.", linewidth=1.2), "ceiling")):
        ax.axhline(value, **style)
        above = (value - lo) / (hi - lo) < 0.9
        ax.annotate(f"{name} {_fmt_ref(value)}", xy=(1.0, value), xycoords=("axes fraction", "data"),
                    xytext=(-3, 2 if above else -2), textcoords="offset points", ha="right",
                    va="bottom" if above else "top", fontsize=8, color=style["color"])


def plot_noise_robustness(summary: pd.DataFrame, references: pd.DataFrame, world_titles: dict, caption: str):
    """Student test accuracy (top) and KL error (bottom) against the flipped fraction, one column per world;
    mean ± standard error over seeds; weak teacher and strong ceiling as horizontal lines. KL errors that are
    infinite (a saturated student) or far off the scale of the other curves are listed in the panel instead
    of stretching its axis."""
    from matplotlib.lines import Line2D

    worlds = list(world_titles)
    fig, axes = plt.subplots(2, len(worlds), figsize=(5.6 * len(worlds), 7.6), squeeze=False)
    for col, world in enumerate(worlds):
        d = summary[summary["world"] == world]
        ref = references[references["world"] == world].iloc[0]
        for row, (metric, ylabel) in enumerate((("accuracy", "student test accuracy"),
                                                ("kl_error", "student test error  E KL(F*‖F_sw)"))):
            ax = axes[row, col]
            finite_values = d.loc[np.isfinite(d[f"{metric}_mean"]) & (d["loss"] != "reverse_ce"), f"{metric}_mean"]
            largest = max(float(finite_values.max()) if len(finite_values) else 0.0, ref[f"weak_{metric}"])
            top = largest * (1.25 if metric == "accuracy" else 1.45)
            notes = []
            for loss in LOSS_ORDER:
                e = d[d["loss"] == loss].sort_values("noise")
                if e.empty:
                    continue
                noise = e["noise"].to_numpy()
                mean, se = e[f"{metric}_mean"].to_numpy(), e[f"{metric}_se"].to_numpy()
                shown = np.isfinite(mean) if metric == "accuracy" else np.isfinite(mean) & (mean <= top)
                st = LOSS_STYLE[loss]
                if shown.any():
                    ax.errorbar(noise[shown], mean[shown], yerr=np.where(np.isfinite(se[shown]), se[shown], 0),
                                color=st["color"], marker=st["marker"], linestyle=st["linestyle"], capsize=3,
                                markersize=5, linewidth=1.4)
                if (~shown).any():
                    items = [f"{x:.0%}: {'+∞' if not np.isfinite(m) else f'{m:.3g}'}"
                             for x, m in zip(noise[~shown], mean[~shown])]
                    off = ",\n".join(", ".join(items[i:i + 3]) for i in range(0, len(items), 3))  # fits the axes
                    notes.append(f"{st['label']} off scale — {off}")
            if metric == "kl_error":
                ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]), top=top)
            else:
                lo, hi = ax.get_ylim()
                ax.set_ylim(min(lo, ref["weak_accuracy"]) - 0.01, max(hi, ref["ceiling_accuracy"]) + 0.01)
            _reference_lines(ax, ref[f"weak_{metric}"], ref[f"ceiling_{metric}"])
            if metric == "kl_error":
                if notes:
                    ax.text(0.02, 0.97, "\n".join(notes) + "\n(+∞: some test probabilities are exactly 0)",
                            transform=ax.transAxes, va="top", fontsize=7.5, color="#b35900", wrap=True)
            else:
                ax.set_title(world_titles[world])
            ax.set_xlabel("fraction of teacher labels flipped (p → 1 − p)")
            ax.set_ylabel(ylabel)
    handles = [Line2D([], [], color=LOSS_STYLE[l]["color"], marker=LOSS_STYLE[l]["marker"],
                      linestyle=LOSS_STYLE[l]["linestyle"], label=LOSS_STYLE[l]["label"]) for l in LOSS_ORDER]
    handles += [Line2D([], [], color="0.35", linestyle=":", linewidth=1.6, label="weak teacher"),
                Line2D([], [], color="black", linestyle="-.", linewidth=1.2, label="strong ceiling")]
    fig.legend(handles=handles, loc="upper center", ncol=6, bbox_to_anchor=(0.5, 0.965), frameon=False)
    fig.suptitle("Label-noise robustness, softmax head (mean ± standard error over seeds)", y=1.0)
    _caption(fig, caption, -0.01)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


# --------------------------------------------------------------------------------------------------------
# bound_tightness
# --------------------------------------------------------------------------------------------------------


def plot_bound_tightness(instances: pd.DataFrame, gamma: float, provable: float, sharp: float, caption: str):
    """``|L(F*,F_w) − L(F*,F_sw)|`` against ``sqrt(d)`` (forward and reverse ``d``), log-log, with the lines
    ``C sqrt(d)`` for the provable and the sharp constants."""
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.6))
    kinds = {"random": ("#7f7f7f", "random instances (k = 2, 3; 16 points)"),
             "near-extremal": ("#9467bd", "near-extremal binary instances")}
    for ax, (direction, label) in zip(axes, (("forward", "d = E KL(F_w‖F_sw)"), ("reverse", "d = E KL(F_sw‖F_w)"))):
        col = f"sqrt_{direction}"
        finite = instances[np.isfinite(instances[col]) & (instances[col] > 0) & (instances["abs_diff"] > 0)]
        for kind, (color, name) in kinds.items():
            d = finite[finite["kind"] == kind]
            ax.scatter(d[col], d["abs_diff"], s=6, color=color, alpha=0.45, label=name, linewidths=0,
                       rasterized=True)  # thousands of points: a bitmap layer keeps the PDF small
        x = finite[col].to_numpy()
        grid = np.logspace(math.log10(x.min()) - 0.2, math.log10(x.max()) + 0.2, 50)
        ax.plot(grid, provable * grid, color="#d62728", linewidth=1.6,
                label=f"provable: C = 1/(√2 γ) = {provable:.1f}")
        ax.plot(grid, sharp * grid, color="black", linewidth=1.6, linestyle="--",
                label=f"sharp: C* = √(2(1−γ)/γ) = {sharp:.2f}")
        ratio = (finite["abs_diff"] / finite[col]).max()
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"√d,  {label}")
        ax.set_ylabel("|L(F*,F_w) − L(F*,F_sw)|")
        ax.set_title(f"{direction} direction: largest ratio found {ratio:.2f} (sharp C* = {sharp:.2f})")
        ax.set_ylim(top=max(ax.get_ylim()[1], 1.0))
        ax.legend(loc="upper left", markerscale=3)  # above the provable line nothing is drawn
    fig.suptitle(f"Lemma 1 √-bound |ΔL| ≤ C √d with probability floor γ = {gamma:g}", y=1.01)
    _caption(fig, caption, -0.02)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------
# guarantee_table
# --------------------------------------------------------------------------------------------------------


def plot_guarantee_table(table: pd.DataFrame, caption: str):
    """The guarantee table as a coloured table: one row per head x loss x direction x inequality."""
    columns = ["head", "loss", "error_direction", "inequality", "expected", "instances", "holds", "violated",
               "inconclusive", "fraction_holds"]
    headers = ["head", "loss", "error", "inequality", "expected", "instances", "holds", "violated",
               "inconcl.", "fraction holds"]
    met = "pattern_met" in table.columns
    if met:
        headers.append("as expected")
    cells = []
    colours = []
    cmap = plt.get_cmap("RdYlGn")
    for _, r in table.iterrows():
        frac = float(r["fraction_holds"])
        cells.append([str(r["head"]), str(r["loss"]), str(r["error_direction"]), str(r["inequality"]),
                      str(r["expected"]), str(int(r["instances"])), str(int(r["holds"])), str(int(r["violated"])),
                      str(int(r["inconclusive"])), f"{frac:.3f}"]
                     + (["yes" if r["pattern_met"] else "NO"] if met else []))
        shade = cmap(0.15 + 0.7 * frac) if math.isfinite(frac) else (1, 1, 1, 1)
        colours.append(["white"] * (len(columns) - 1) + [shade] + (["white"] if met else []))
    fig, ax = plt.subplots(figsize=(15, 0.3 * (len(cells) + 1)))
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=headers, cellColours=colours, cellLoc="left", bbox=[0, 0, 1, 1])
    tab.auto_set_font_size(False)
    tab.set_fontsize(8.5)
    tab.auto_set_column_width(list(range(len(headers))))
    for (row, _col), cell in tab.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e6e6e6")
    ax.set_title("Guarantee table: fraction of random instances on which each inequality holds "
                 "(certified verdicts)", fontsize=11, pad=10)
    # "expected" is what the theory predicts: holds / equality (every instance) or may fail (counterexamples).
    _caption(fig, caption, -0.03)
    return fig


# --------------------------------------------------------------------------------------------------------
# loss_comparison and the demo
# --------------------------------------------------------------------------------------------------------


def _grouped_bars(ax, groups: list[str], series: dict, errors: dict, references: dict | None = None):
    width = 0.8 / max(len(series), 1)
    xs = np.arange(len(groups))
    for i, (loss, values) in enumerate(series.items()):
        st = LOSS_STYLE[loss]
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, values, width, yerr=errors.get(loss), color=st["color"],
               label=st["label"], capsize=2, edgecolor="black", linewidth=0.4,
               hatch="//" if st["linestyle"] == "--" else None)
    if references:
        for name, (values, style) in references.items():
            for j, v in enumerate(values):
                ax.hlines(v, xs[j] - 0.45, xs[j] + 0.45, label=name if j == 0 else None, **style)
    ax.set_xticks(xs)
    ax.set_xticklabels(groups)


def plot_loss_comparison(summary: pd.DataFrame, caption: str):
    """Test accuracy of the four losses per weak -> strong pair, with the weak and ceiling references (top),
    and PGR (bottom)."""
    pairs = list(dict.fromkeys(summary["pair"]))
    losses = [loss for loss in LOSS_ORDER if loss in set(summary["loss"])]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.5, 1.6 * len(pairs) + 3), 8.2), sharex=True)

    def series(column):
        out, err = {}, {}
        for loss in losses:
            d = summary[summary["loss"] == loss].set_index("pair").loc[pairs]
            out[loss], err[loss] = d[f"{column}_mean"].to_numpy(), d[f"{column}_se"].to_numpy()
        return out, err

    first = summary.drop_duplicates("pair").set_index("pair").loc[pairs]
    acc, acc_err = series("accuracy")
    _grouped_bars(axes[0], pairs, acc, acc_err, {
        "weak teacher": (first["weak_accuracy"].to_numpy(), dict(color="0.3", linestyle=":", linewidth=2)),
        "strong ceiling": (first["ceiling_accuracy"].to_numpy(), dict(color="black", linestyle="-.", linewidth=1.5)),
    })
    lo = min(np.nanmin(first["weak_accuracy"]), min(np.nanmin(v) for v in acc.values()))
    hi = max(np.nanmax(first["ceiling_accuracy"]), max(np.nanmax(v) for v in acc.values()))
    axes[0].set_ylim(lo - 0.05 * (hi - lo) - 0.01, hi + 0.25 * (hi - lo) + 0.01)
    axes[0].set_ylabel("student test accuracy")
    axes[0].legend(ncol=3, loc="upper left")
    axes[0].set_title("Loss comparison per weak → strong representation pair (mean ± s.e. over seeds)")
    pgr, pgr_err = series("pgr")
    _grouped_bars(axes[1], pairs, pgr, pgr_err)
    tops = [np.nanmax(v + np.nan_to_num(pgr_err[k])) for k, v in pgr.items()]
    bottoms = [np.nanmin(v - np.nan_to_num(pgr_err[k])) for k, v in pgr.items()]
    axes[1].set_ylim(min(0.0, min(bottoms) * 1.15), max(tops) * 1.25 if max(tops) > 0 else 0.1)
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set_ylabel("PGR = (student − weak) / (ceiling − weak)")
    axes[1].set_xlabel("weak → strong representation pair")
    axes[1].legend(ncol=4, loc="upper left")
    for label in axes[1].get_xticklabels():
        label.set_fontsize(8.5)
    _caption(fig, caption, -0.005)
    fig.tight_layout()
    return fig


def plot_demo(report: dict, title: str, caption: str):
    """Bring-your-own demo: test accuracy and KL error per loss, weak and ceiling as lines."""
    losses = [loss for loss in LOSS_ORDER if loss in report]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, ylabel in ((axes[0], "accuracy", "test accuracy"),
                               (axes[1], "kl_error", "test error  E KL(F*‖F) = cross-entropy")):
        values = np.array([report[loss][metric] for loss in losses], float)
        errors = np.array([report[loss][f"{metric}_se"] for loss in losses], float)
        finite = np.isfinite(values)
        xs = np.arange(len(losses))
        for i, loss in enumerate(losses):
            st = LOSS_STYLE[loss]
            if finite[i]:
                ax.bar(xs[i], values[i], 0.6, yerr=errors[i] if np.isfinite(errors[i]) else None, color=st["color"],
                       edgecolor="black", linewidth=0.4, capsize=3, hatch="//" if st["linestyle"] == "--" else None)
            else:
                ax.text(xs[i], 0.02, "+∞", ha="center", va="bottom", transform=ax.get_xaxis_transform(),
                        fontsize=12, color=st["color"], weight="bold")
        for name, style in (("weak", dict(color="0.3", linestyle=":", linewidth=2)),
                            ("ceiling", dict(color="black", linestyle="-.", linewidth=1.5))):
            v = report[name][metric]
            ax.axhline(v, label=f"{'weak teacher' if name == 'weak' else 'strong ceiling'} ({v:.3f})", **style)
        ax.set_xticks(xs)
        ax.set_xticklabels([LOSS_STYLE[loss]["label"] for loss in losses])
        ax.set_xlim(-0.6, len(losses) - 0.4)
        ax.set_ylabel(ylabel)
        finite_values = values[finite] if finite.any() else np.zeros(1)
        top = max(report["ceiling"][metric], report["weak"][metric], float(np.max(finite_values))) * 1.3
        ax.set_ylim(0, min(1.05, top) if metric == "accuracy" else top)
        ax.legend(loc="upper left", ncol=2)
    fig.suptitle(title)
    _caption(fig, caption, -0.01)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------
# phase_diagram and learning_curves (the practice trainer)
# --------------------------------------------------------------------------------------------------------


def plot_phase_diagram(table: pd.DataFrame, pairs: list, variants: list, x: str, y: str, caption: str):
    """Paired test-accuracy differences (one row of panels per loss pair, one column per trainer variant),
    cells with |mean| < 2 SE hatched (:func:`w2s_theory.phase.plot_phase`); one colour scale per row."""
    from .phase import plot_phase

    fig, axes = plt.subplots(len(pairs), len(variants), figsize=(4.4 * len(variants), 3.5 * len(pairs) + 1.4),
                             squeeze=False)
    fig.subplots_adjust(hspace=0.5, bottom=0.2)  # before the colour bars take their room
    for r, (a, b) in enumerate(pairs):
        rows = table[(table["loss_a"] == a) & (table["loss_b"] == b)]
        limit = max(0.01, float(np.nanmax(np.abs(rows["mean"])))) if len(rows) else 0.01
        image = None
        for c, variant in enumerate(variants):
            ax = axes[r, c]
            ax.grid(False)
            cells = rows[rows["variant"] == variant]
            if cells.empty:
                ax.axis("off")
                continue
            image = plot_phase(ax, cells, x, y, limit)
            ax.set_title(f"{LOSS_STYLE[a]['label']} − {LOSS_STYLE[b]['label']}: {variant}", fontsize=9)
            ax.set_xlabel("teacher noise" if r == len(pairs) - 1 else "", fontsize=8.5)
            ax.set_ylabel("teacher temperature T" if c == 0 else "", fontsize=8.5)
        if image is not None:
            fig.colorbar(image, ax=list(axes[r]), shrink=0.85, pad=0.02,
                         label="test accuracy difference")
    _caption(fig, caption, y=0.06, width=170)
    return fig


def plot_learning_curves(curves: pd.DataFrame, exact: pd.DataFrame, weak_accuracy: float, caption: str,
                         title: str):
    """Test accuracy (left) and weight norm (right) against the training step, mean ± standard error over
    seeds per loss; the exact minimisers' mean test accuracy as dashed lines, the weak teacher's as grey."""
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for loss in LOSS_ORDER:
        d = curves[curves["loss"] == loss]
        if d.empty:
            continue
        st = LOSS_STYLE[loss]
        for ax, metric in zip(axes, ("test_accuracy", "weight_norm")):
            ax.plot(d["step"], d[f"{metric}_mean"], color=st["color"], linestyle=st["linestyle"],
                    marker=st["marker"], markersize=3, markevery=max(1, len(d) // 8), linewidth=1.4,
                    label=st["label"])
            ax.fill_between(d["step"], d[f"{metric}_mean"] - d[f"{metric}_se"],
                            d[f"{metric}_mean"] + d[f"{metric}_se"], color=st["color"], alpha=0.15, linewidth=0)
        e = exact[exact["loss"] == loss]
        if not e.empty:
            axes[0].axhline(float(e["accuracy"].iloc[0]), color=st["color"], linestyle=":", linewidth=1.2)
    axes[0].axhline(weak_accuracy, color="0.5", linewidth=1.2, label="weak teacher")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("student test accuracy")
    axes[0].set_title("test accuracy (dotted: exact minimiser of the same loss)")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("weight norm ‖W‖_F")
    axes[1].set_title("weight norm")
    axes[0].legend(loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _caption(fig, caption, y=-0.01, width=150)
    return fig


# --------------------------------------------------------------------------------------------------------
# the field's theorems: k-head mixtures and f-divergences
# --------------------------------------------------------------------------------------------------------


def plot_k_heads(ks, deficits: np.ndarray, caption: str):
    """Mean deficit (misfit - gain) +- standard error vs the number of heads: log k, symmetric-log deficit
    (linear within 1e-4 of 0, so that deficits <= 0 stay visible)."""
    ks = np.asarray(ks, dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j, k in enumerate(ks):
        d = deficits[j]
        ax.scatter(np.full(d.size, k), d, s=10, color="0.6", alpha=0.6, label="instances" if j == 0 else None)
    mean = deficits.mean(1)
    se = deficits.std(1, ddof=1) / np.sqrt(deficits.shape[1])
    ax.errorbar(ks, mean, yerr=se, color="C0", marker="o", capsize=3, label="mean deficit ± s.e.")
    ref = max(mean[0], 1e-6) * (ks / ks[0]) ** -0.5
    ax.plot(ks, ref, "--", color="C3", label="slope −1/2 (reference only)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("number of softmax heads k")
    ax.set_ylabel("deficit = misfit − gain (reverse KL)")
    ax.set_title("k-head mixtures, joint training: deficit vs k")
    ax.legend(loc="upper right")
    _caption(fig, caption, -0.02, width=95)
    return fig


def plot_f_divergences(rows, caption: str):
    """Grouped bars: fraction of instances with gain >= misfit, per loss (x) and head (colour)."""
    losses = list(dict.fromkeys(rows["loss"]))
    heads = list(dict.fromkeys(rows["head"]))
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    width = 0.8 / len(heads)
    for h, head in enumerate(heads):
        sub = rows[rows["head"] == head].set_index("loss")
        vals = [float(sub.loc[l, "fraction_gain_ge_misfit"]) if l in sub.index else np.nan for l in losses]
        x = np.arange(len(losses)) + (h - (len(heads) - 1) / 2) * width
        bars = ax.bar(x, vals, width, label=f"{head} head" + (" (certified)" if head == "mixture" else
                                                               " (uncertified fits)"), color=f"C{h}")
        for xi, v in zip(x, vals):
            if np.isfinite(v):
                ax.text(xi, v + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=7.5)
    ax.set_xticks(np.arange(len(losses)), losses, rotation=20)
    ax.set_ylim(0, 1.32)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("fraction with gain ≥ misfit")
    ax.set_title("f-divergence losses: how often gain ≥ misfit (realizable instances)")
    ax.legend(loc="upper left", ncol=2)
    _caption(fig, caption, -0.06, width=120)
    return fig


# --------------------------------------------------------------------------------------------------------
# paper_tables
# --------------------------------------------------------------------------------------------------------

#: The paper's column order (forward KL, reverse KL, forward CE, reverse CE).
PAPER_LOSS_ORDER = ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce")


def plot_paper_tables(cells: pd.DataFrame, diffs: pd.DataFrame, pairs: list, paper_main: dict, paper_noise: dict,
                      paper_label: str, caption: str):
    """The paper's two tables as grouped bars, one column of panels per table: test accuracy (%) of the four
    losses per row (top) and the paired differences against forward KL (points, bottom). Bars: practice
    students, mean ± s.e.; black ticks (right of the bar's centre, grey s.e.): exact minimisers; white diamonds: the paper's reported numbers; dotted
    and dash-dotted ticks: weak teacher and strong ceiling of the row."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    tables = sorted(cells["table"].unique())
    fig, axes = plt.subplots(2, len(tables), figsize=(6.6 * len(tables), 8.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1.25, 1]})
    paper_style = dict(marker="D", markersize=6.5, markerfacecolor="white", markeredgecolor="black",
                       markeredgewidth=1.1, linestyle="none", zorder=5)
    exact_style = dict(marker="_", markersize=13, markeredgewidth=2.4, color="black", linestyle="none", zorder=4)
    for col, table in enumerate(tables):
        d = cells[cells["table"] == table]
        rows = list(dict.fromkeys(d["row"]))
        first = {r: d[d["row"] == r].iloc[0] for r in rows}
        refs = {r: (paper_main.get(r) if table == 1 else paper_noise.get(round(float(first[r]["noise"]), 4)))
                for r in rows}
        xs = np.arange(len(rows))
        # -- accuracies --
        ax = axes[0, col]
        losses = [loss for loss in PAPER_LOSS_ORDER if loss in set(d["loss"])]
        width = 0.8 / len(losses)
        shown = []
        for i, loss in enumerate(losses):
            st = LOSS_STYLE[loss]
            x = xs + (i - (len(losses) - 1) / 2) * width
            e = d[d["loss"] == loss].set_index(["row", "trainer"])
            practice = np.array([100 * e.loc[(r, "practice"), "accuracy_mean"] for r in rows])
            practice_se = np.array([100 * e.loc[(r, "practice"), "accuracy_se"] for r in rows])
            ax.bar(x, practice, width, yerr=np.nan_to_num(practice_se), color=st["color"], capsize=2,
                   edgecolor="black", linewidth=0.4, hatch="//" if st["linestyle"] == "--" else None)
            exact = np.array([100 * e.loc[(r, "exact"), "accuracy_mean"] if (r, "exact") in e.index else np.nan
                              for r in rows])
            ax.plot(x + 0.22 * width, exact, **exact_style)
            paper = np.array([refs[r][loss] if refs[r] else np.nan for r in rows])
            ax.plot(x, paper, **paper_style)
            shown += [practice, exact, paper]
        for j, r in enumerate(rows):
            ax.hlines(100 * first[r]["weak_accuracy"], xs[j] - 0.45, xs[j] + 0.45, color="0.3", linestyle=":",
                      linewidth=2)
            ax.hlines(100 * first[r]["ceiling_accuracy"], xs[j] - 0.45, xs[j] + 0.45, color="black",
                      linestyle="-.", linewidth=1.3)
            shown.append(np.array([100 * first[r]["weak_accuracy"], 100 * first[r]["ceiling_accuracy"]]))
        values = np.concatenate(shown)
        values = values[np.isfinite(values)]
        ax.set_ylim(np.floor(values.min() / 5) * 5 - 2, 100)
        ax.set_xticks(xs, [_paper_row_label(table, r, first[r]) for r in rows], fontsize=8.5)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Table 1 — main comparison (clean teacher)" if table == 1 else
                     f"Table 2 — Base→Medium with flipped teacher labels")
        # -- paired differences against forward KL --
        ax = axes[1, col]
        width = 0.8 / len(pairs)
        for i, (a, b) in enumerate(pairs):
            st = LOSS_STYLE[a]
            x = xs + (i - (len(pairs) - 1) / 2) * width
            e = diffs[(diffs["table"] == table) & (diffs["loss_a"] == a) & (diffs["loss_b"] == b)]
            e = e.set_index(["row", "trainer"])
            get = lambda r, t, c: 100 * e.loc[(r, t), c] if (r, t) in e.index else np.nan  # noqa: E731
            ax.bar(x, [get(r, "practice", "mean") for r in rows], width,
                   yerr=np.nan_to_num([get(r, "practice", "se") for r in rows]), color=st["color"], capsize=2,
                   edgecolor="black", linewidth=0.4, hatch="//" if st["linestyle"] == "--" else None)
            ax.errorbar(x + 0.22 * width, [get(r, "exact", "mean") for r in rows],
                        yerr=np.nan_to_num([get(r, "exact", "se") for r in rows]), capsize=2, elinewidth=1, ecolor="0.45",
                        **exact_style)
            ax.plot(x, [refs[r][a] - refs[r][b] if refs[r] else np.nan for r in rows], **paper_style)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(xs, [_paper_row_label(table, r, first[r]) for r in rows], fontsize=8.5)
        ax.set_ylabel("paired difference vs forward KL\n(percentage points)")
        ax.set_title("reverse KL − forward KL and reverse CE − forward KL (paired over seeds)", fontsize=9.5)
    handles = [Patch(facecolor=LOSS_STYLE[loss]["color"], edgecolor="black", linewidth=0.4,
                     hatch="//" if LOSS_STYLE[loss]["linestyle"] == "--" else None,
                     label=f"simulated, practice: {LOSS_STYLE[loss]['label']}") for loss in PAPER_LOSS_ORDER]
    handles += [Line2D([], [], label="simulated, exact minimiser", **exact_style),
                Line2D([], [], label=paper_label, **paper_style),
                Line2D([], [], color="0.3", linestyle=":", linewidth=2, label="simulated weak teacher"),
                Line2D([], [], color="black", linestyle="-.", linewidth=1.3, label="simulated strong ceiling")]
    fig.legend(handles=handles, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.985), frameon=False)
    fig.suptitle("The paper's two tables, simulated in their shape (bars) beside the paper's numbers (diamonds)",
                 y=1.0)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    _caption(fig, caption, -0.005, width=160)
    return fig


def _paper_row_label(table: int, row: str, first) -> str:
    if table == 1:
        return f"{row}\n({int(first['weak_dim'])} → {int(first['strong_dim'])} feats)"
    return row
