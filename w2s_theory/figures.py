r"""The studies behind the paper-style figures (``w2s-theory figures``), and the tables drawn from them.

Each figure has one ``*_figure`` function that runs (or reads) its study and writes ``<name>.png`` and
``<name>.pdf`` (plus ``<name>.md`` for tables) into the output folder:

=================  ===================================================================================
figure             study
=================  ===================================================================================
mode_seeking       one Gaussian fitted to a two-component mixture by forward and by reverse KL,
                   numerically (quadrature + L-BFGS from several starts), not by formula
gain_vs_misfit     (a) Charikar et al.'s notebook setup (:mod:`w2s_theory.charikar`): pretrained on several
                   draws of h*, and the project's realizable and perturbed variants (plus
                   ``gain_vs_misfit.json``, the statistics per draw); (b) sweep
                   ``experiments/gain_vs_misfit_kl.toml`` (mixture head, reverse vs forward KL)
noise_robustness   sweep ``experiments/noise_robustness.toml`` (softmax head, four losses, flipped labels)
bound_tightness    random and near-extremal instances of Lemma 1's √-bound with floor γ = 10⁻³
guarantee_table    :func:`w2s_theory.guarantees.guarantee_table`
loss_comparison    sweep ``experiments/loss_comparison.toml`` (weak → strong pairs, four losses, PGR)
demo_digits        the bring-your-own pipeline (:mod:`w2s_theory.byo`) on scikit-learn's digits
phase_diagram      sweep ``experiments/phase_diagram.toml``: reverse − forward losses, paired, over teacher
                   temperature × noise kind, for exact / shared-lr / tuned-lr practice students
learning_curves    sweep ``experiments/learning_curves.toml``: practice training curves of four losses
paper_tables       sweep ``experiments/paper_tables.toml``: the paper's two tables (weak → strong pairs; 10–40%
                   flips) in their shape, practice (1 epoch, batch 16, shared lr) beside exact students
=================  ===================================================================================

Sweep-driven and per-task results go through the results store: a sweep writes its rows with
:func:`w2s_theory.sweep.run_sweep` (which skips runs already stored), and the figure is drawn from
``ResultsStore.dataframe(study)`` — never from memory. ``quick=True`` runs a smaller version of every study
(fewer seeds, fewer samples; studies named ``<name>_quick`` so they never mix with the full ones).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from .store import ResultsStore
from .validation import InputError

__all__ = ["FIGURES", "EXPERIMENTS_DIR", "make_figures", "sweep_results", "mode_seeking_study",
           "bound_tightness_instances", "summarise_noise_robustness", "summarise_loss_comparison",
           "charikar_results", "QUICK"]

FIGURES = ("mode_seeking", "gain_vs_misfit", "noise_robustness", "bound_tightness", "guarantee_table",
           "k_heads", "f_divergences", "loss_comparison", "demo_digits", "phase_diagram", "learning_curves",
           "paper_tables")

#: Sweep configs of the sweep-driven figures (a fresh clone has them next to the package).
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"

#: The smaller version of each study for ``--quick``: seeds kept and samples per split.
QUICK = {
    "noise_robustness": dict(seeds=2, n=300),
    "loss_comparison": dict(seeds=1, n=300),
    "gain_vs_misfit_kl": dict(seeds=15, n=200),
    "phase_diagram": dict(seeds=2, n=80),
    "learning_curves": dict(seeds=2, n=100),
    "paper_tables": dict(seeds=2, n=100),
}

#: The probability floor of the bound_tightness figure (the paper's example value, docs/theory.md).
BOUND_GAMMA = 1e-3


# --------------------------------------------------------------------------------------------------------
# Sweeps through the store
# --------------------------------------------------------------------------------------------------------


def _shrink(specs, seeds: int, n: int):
    kept = sorted({s.seed for s in specs})[:seeds]
    return [replace(s, n_weak=min(s.n_weak, n), n_train=min(s.n_train, n), n_test=min(s.n_test, n))
            for s in specs if s.seed in kept]


def sweep_results(name: str, store: ResultsStore, *, quick: bool = False, device=None, progress: bool = True,
                  experiments: Path | None = None, ledger: list | None = None) -> tuple[pd.DataFrame, str]:
    """Run the sweep ``experiments/<name>.toml`` into ``store`` (runs already there are skipped) and return
    its rows read back from the store, with the study's description. ``ledger`` collects
    ``(study, computed, read from the store)`` counts."""
    from .config import load_study
    from .sweep import run_sweep

    path = Path(experiments or EXPERIMENTS_DIR) / f"{name}.toml"
    study = load_study(path)
    specs, study_name = study.specs, study.name
    if quick:
        specs, study_name = _shrink(specs, **QUICK[name]), f"{study.name}_quick"
    summary = run_sweep(specs, store, study_name, device=device, progress=progress)
    if ledger is not None:
        ledger.append((study_name, summary.ran, summary.skipped))
    frame = store.dataframe(study_name)
    wanted = {s.run_id for s in specs}
    frame = frame[frame["run_id"].isin(wanted)].reset_index(drop=True)
    if len(frame) != len(wanted):
        raise RuntimeError(f"study {study_name}: {len(wanted)} runs expected in the store, found {len(frame)}")
    return frame, study.description


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    mean = float(np.mean(v))
    if v.size < 2 or not np.all(np.isfinite(v)):
        return mean, float("nan")
    return mean, float(np.std(v, ddof=1) / math.sqrt(v.size))


# --------------------------------------------------------------------------------------------------------
# mode_seeking
# --------------------------------------------------------------------------------------------------------

#: The two-component mixture of the mode-seeking figure (unequal weights, so reverse KL has one global fit).
MIXTURE = dict(weights=(0.6, 0.4), means=(-2.0, 2.0), sds=(0.7, 0.7))


def _normal_pdf(x, mu, sigma):
    return np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def _normal_logpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def mode_seeking_study(mixture: dict = MIXTURE, grid_points: int = 6001) -> dict:
    r"""Fit :math:`q = \mathcal N(\mu, \sigma^2)` to the mixture :math:`p` by minimising
    :math:`\mathrm{KL}(p\|q)` (forward) and :math:`\mathrm{KL}(q\|p)` (reverse) numerically: both integrals by
    the trapezoidal rule on a fine grid, minimised over :math:`(\mu, \log\sigma)` by L-BFGS from a grid of
    starts. Returns the grid, :math:`p`, the forward fit and every distinct local minimum of the reverse
    objective (best first). The forward fit must match :math:`p`'s mean and variance (moment matching); that
    is checked by the tests, not used here."""
    from scipy.optimize import minimize

    w, m, s = (np.asarray(mixture[k], float) for k in ("weights", "means", "sds"))
    lo, hi = float((m - 8 * s).min()), float((m + 8 * s).max())
    x = np.linspace(lo, hi, grid_points)
    comp = np.stack([_normal_logpdf(x, mi, si) for mi, si in zip(m, s)]) + np.log(w)[:, None]
    log_p = np.logaddexp.reduce(comp, axis=0)
    p = np.exp(log_p)

    def forward(theta):  # KL(p||q) = int p (log p - log q)
        return float(np.trapezoid(p * (log_p - _normal_logpdf(x, theta[0], math.exp(theta[1]))), x))

    def reverse(theta):  # KL(q||p) = int q (log q - log p)
        lq = _normal_logpdf(x, theta[0], math.exp(theta[1]))
        return float(np.trapezoid(np.exp(lq) * (lq - log_p), x))

    starts = [(mu0, math.log(s0)) for mu0 in np.linspace(lo / 2, hi / 2, 7) for s0 in (0.5, 2.0)]

    def minima(objective):
        found = []
        for start in starts:
            r = minimize(objective, np.array(start), method="L-BFGS-B",
                         bounds=[(lo, hi), (math.log(1e-2), math.log(hi - lo))], options={"ftol": 1e-14, "gtol": 1e-10})
            if r.success and not any(abs(r.x[0] - f[0]) < 1e-2 and abs(r.x[1] - f[1]) < 1e-2 for f, _ in found):
                found.append((r.x, float(r.fun)))
        return sorted(found, key=lambda t: t[1])

    def record(theta, value):
        mu, sigma = float(theta[0]), float(math.exp(theta[1]))
        return {"mu": mu, "sigma": sigma, "kl": value, "density": _normal_pdf(x, mu, sigma)}

    fw = minima(forward)[0]
    return {"x": x, "p": p, "mixture": mixture, "forward": record(*fw),
            "reverse": [record(t, v) for t, v in minima(reverse)]}


# --------------------------------------------------------------------------------------------------------
# bound_tightness
# --------------------------------------------------------------------------------------------------------


def _floored(rng, shape, k, gamma):
    return gamma + (1 - k * gamma) * rng.dirichlet(np.full(k, 0.5), size=shape)


def bound_tightness_instances(gamma: float = BOUND_GAMMA, count: int = 4000, seed: int = 0) -> pd.DataFrame:
    r"""Instances of Lemma 1, :math:`|L(F^*,F_w) - L(F^*,F_{sw})| \le C\sqrt d` with every probability of
    :math:`F_w` and :math:`F_{sw}` at least :math:`\gamma`, evaluated by :func:`w2s_theory.bounds.sqrt_bound`;
    returns ``kind``, ``abs_diff`` and ``sqrt_forward`` / ``sqrt_reverse`` (:math:`\sqrt{\mathbb E\,
    \mathrm{KL}(F_w\|F_{sw})}` and :math:`\sqrt{\mathbb E\,\mathrm{KL}(F_{sw}\|F_w)}`).

    * ``random``: 16 points, ``k`` in {2, 3}, :math:`F_w, F_{sw}` floored Dirichlet(0.5) draws, :math:`F^*`
      a Dirichlet(0.5) draw;
    * ``near-extremal``: one binary point with :math:`F_w = (a, 1-a)`, :math:`a` log-uniform in
      :math:`[\gamma, 1/2]`, :math:`F_{sw} = (a e^{\delta}, \cdot)` with a small log-ratio :math:`\delta`, and
      :math:`F^*` all on the first class — the configuration whose limit :math:`a\to\gamma`,
      :math:`\delta\to 0` attains the sharp constant :math:`\sqrt{2(1-\gamma)/\gamma}`.
    """
    from .bounds import sqrt_bound
    from .synthetic import rng_for

    rng = rng_for(seed, "bound-tightness")
    batches = []
    per_k = count // 4
    for k in (2, 3):
        teacher, student = _floored(rng, (per_k, 16), k, gamma), _floored(rng, (per_k, 16), k, gamma)
        truth = rng.dirichlet(np.full(k, 0.5), size=(per_k, 16))
        batches.append(("random", truth, teacher, student))
    m = count - 2 * per_k
    a = np.exp(rng.uniform(math.log(gamma), math.log(0.5), m))
    delta = rng.choice([-1.0, 1.0], m) * np.exp(rng.uniform(math.log(1e-4), math.log(1.0), m))
    b = np.clip(a * np.exp(delta), gamma, 1 - gamma)
    truth = np.zeros((m, 1, 2))
    truth[..., 0] = 1.0
    batches.append(("near-extremal", truth, np.stack([a, 1 - a], -1)[:, None], np.stack([b, 1 - b], -1)[:, None]))
    frames = []
    for kind, truth, teacher, student in batches:
        forward = sqrt_bound(truth, teacher, student, direction="forward", gamma=gamma)
        reverse = sqrt_bound(truth, teacher, student, direction="reverse", gamma=gamma)
        frames.append(pd.DataFrame({"kind": kind, "abs_diff": np.abs(forward.details["gain"]),
                                    "d_forward": forward.details["misfit"], "d_reverse": reverse.details["misfit"],
                                    "verdict_forward": forward.verdict, "verdict_reverse": reverse.verdict}))
    frame = pd.concat(frames, ignore_index=True)
    frame["sqrt_forward"] = np.sqrt(frame["d_forward"].clip(lower=0))
    frame["sqrt_reverse"] = np.sqrt(frame["d_reverse"].clip(lower=0))
    return frame


# --------------------------------------------------------------------------------------------------------
# Charikar et al.'s setup through the store
# --------------------------------------------------------------------------------------------------------


def charikar_config(quick: bool):
    """The main configuration (the notebook's, several draws of h*), and the shorter pre-trainings of the
    authors' draw that the figure compares it with. Quick: the notebook's draws with 500 inputs per
    pre-training task, 3 epochs, 30 transfer tasks of 500 inputs (seconds; nothing to compare with it)."""
    from .charikar import AUTHORS_SEED, CharikarConfig

    if quick:
        return CharikarConfig(seeds=(AUTHORS_SEED, 1), pretrain_samples=500, pretrain_epochs=3, fresh_tasks=30,
                              n_transfer=500, n_test=500), []
    main = CharikarConfig()
    return main, [replace(main, seeds=(AUTHORS_SEED,), pretrain_epochs=e) for e in CHARIKAR_SHORTER_EPOCHS]


#: Shorter pre-trainings of the authors' draw shown next to the notebook's 1000 epochs.
CHARIKAR_SHORTER_EPOCHS = (60, 250)


def charikar_results(store: ResultsStore, *, quick: bool = False, progress=None,
                     ledger: list | None = None, cache=None) -> tuple[pd.DataFrame, object]:
    """Rows of Charikar et al.'s experiment (one per draw x variant x fresh task, plus the pretrained rows of
    the shorter pre-trainings), computed only when the store does not have them yet, and read back from the
    store. Pre-trained representations come from ``cache`` (default: the on-disk cache)."""
    from .charikar import VARIANTS, RepresentationCache, run_charikar

    main, shorter = charikar_config(quick)
    cache = RepresentationCache() if cache is None else cache
    study = "charikar_notebook" + ("_quick" if quick else "")
    all_ids = []
    for config, variants in [(main, VARIANTS)] + [(c, ("pretrained",)) for c in shorter]:
        ids = [config.run_id(s, v, t) for s in config.seeds for v in variants for t in range(config.fresh_tasks)]
        computed = 0
        if len(store.done_ids(ids)) < len(ids):
            rows = run_charikar(config, variants=variants, cache=cache, progress=progress)
            spec = {k: v for k, v in config.as_dict().items() if k != "seeds"}
            store.write(study, rows, [{**spec, "seed": r["seed"], "variant": r["variant"], "task": r["task"]}
                                      for r in rows])
            computed = len(rows)
        if ledger is not None:
            ledger.append((study, computed, len(ids) - computed))
        all_ids += ids
    store.link(study, all_ids)
    frame = store.dataframe(study)
    frame = frame[frame["run_id"].isin(set(all_ids))].reset_index(drop=True)
    return frame, main


def charikar_summary(frame: pd.DataFrame, main) -> dict:
    """What ``gain_vs_misfit.json`` holds: per variant and draw of the main configuration the statistics of
    :func:`w2s_theory.charikar.summarise`; the replication of the notebook (authors' draw, pretrained) against
    its digitised scatter, with the issue's acceptance bounds; and the pretrained authors' draw per
    pre-training length."""
    from .charikar import DIGITISED, NOTEBOOK_FINAL_LOSS, summarise

    at = lambda e: frame[frame["pretrain_epochs"] == e]  # noqa: E731
    per_variant: dict = {}
    for s in summarise(at(main.pretrain_epochs)):
        stats = {k: v for k, v in s.items() if k not in ("variant", "draw")}
        per_variant.setdefault(s["variant"], {})[s["draw"]] = stats
    authors = per_variant.get("pretrained", {}).get("authors")
    replication = None
    if authors is not None:
        replication = {
            "digitised_notebook": DIGITISED, "notebook_final_pretrain_loss": NOTEBOOK_FINAL_LOSS,
            "replication": authors,
            "mean_abs_gain_minus_misfit_at_most_0.03": authors["mean_abs_gain_minus_misfit"] <= 0.03,
            "misfit_over_gain_within_0.9_1.25": 0.9 <= authors["misfit_over_gain"] <= 1.25,
        }
    epochs = {}
    for e in sorted(frame["pretrain_epochs"].unique()):
        rows = [s for s in summarise(at(e)) if s["variant"] == "pretrained" and s["draw"] == "authors"]
        if rows:
            epochs[str(int(e))] = {k: v for k, v in rows[0].items() if k not in ("variant", "draw")}
    statistics = ("on fresh inputs (the notebook's scatter) except median_eps (in-sample least-squares error of "
                  "the strong head fitted on the truth); misfit_over_gain = sum of misfits / sum of gains over the tasks")
    return _rounded({"config": main.as_dict(), "statistics": statistics, "variants": per_variant,
                     "notebook_replication": replication, "pretrain_epochs_authors_draw": epochs})


def _rounded(obj, digits: int = 6):
    """Floats to ``digits`` significant digits (the committed JSON does not change with the last bits)."""
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    if isinstance(obj, float) and math.isfinite(obj):
        return float(f"{obj:.{digits}g}")
    return obj


# --------------------------------------------------------------------------------------------------------
# Summaries (tables)
# --------------------------------------------------------------------------------------------------------


def _world_label(temperature: float, bayes: float) -> str:
    return f"temperature {temperature:g} (Bayes accuracy {bayes:.2f})"


def summarise_noise_robustness(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean ± standard error over seeds of the student's test accuracy and KL error per (world, loss,
    noise); and the weak / ceiling references per world (means over seeds)."""
    rows = []
    for (temp, loss, noise), g in frame.groupby(["world_temperature", "loss", "noise"]):
        acc = _mean_se(g["student_test_accuracy"])
        err = _mean_se(g["student_test_kl_error"])
        rows.append({"world": temp, "loss": loss, "noise": noise, "accuracy_mean": acc[0], "accuracy_se": acc[1],
                     "kl_error_mean": err[0], "kl_error_se": err[1], "seeds": len(g)})
    refs = []
    for temp, g in frame.groupby("world_temperature"):
        one = g.drop_duplicates("seed")
        refs.append({"world": temp, "weak_accuracy": one["weak_test_accuracy"].mean(),
                     "ceiling_accuracy": one["ceiling_test_accuracy"].mean(),
                     "weak_kl_error": one["weak_test_kl_error"].mean(),
                     "ceiling_kl_error": one["ceiling_test_kl_error"].mean(), "bayes": one["bayes_accuracy"].mean()})
    return pd.DataFrame(rows), pd.DataFrame(refs)


def _pair_label(row) -> str:
    return f"{int(row['world_weak_dim'])} feats → {int(row['world_strong_dim'])} feats"


def summarise_loss_comparison(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± standard error over seeds of test accuracy and PGR per (weak -> strong pair, loss), with the
    weak and ceiling accuracies of the pair."""
    frame = frame.copy()
    frame["pair"] = frame.apply(_pair_label, axis=1)
    order = (frame[["world_weak_dim", "world_strong_dim", "pair"]].drop_duplicates()
             .sort_values(["world_strong_dim", "world_weak_dim"])["pair"].tolist())
    rows = []
    for pair in order:
        g = frame[frame["pair"] == pair]
        one = g.drop_duplicates("seed")
        by_seed = g.pivot_table(index="seed", columns="loss", values="student_test_accuracy")
        for loss, gl in g.groupby("loss"):
            acc, pgr = _mean_se(gl["student_test_accuracy"]), _mean_se(gl["pgr"])
            # Paired over seeds (same world, same teacher): the seed-to-seed spread of the worlds cancels.
            diff = _mean_se(by_seed[loss] - by_seed["forward_kl"]) if "forward_kl" in by_seed else (math.nan,) * 2
            rows.append({"pair": pair, "loss": loss, "accuracy_mean": acc[0], "accuracy_se": acc[1],
                         "pgr_mean": pgr[0], "pgr_se": pgr[1], "weak_accuracy": one["weak_test_accuracy"].mean(),
                         "ceiling_accuracy": one["ceiling_test_accuracy"].mean(), "seeds": len(gl),
                         "vs_forward_kl_mean": diff[0], "vs_forward_kl_se": diff[1]})
    return pd.DataFrame(rows)


def _pm(mean, se, digits=3) -> str:
    if not math.isfinite(mean):
        return "+inf" if mean == math.inf else str(mean)
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"


LOSS_NAMES = {"forward_kl": "forward KL", "reverse_kl": "reverse KL", "forward_ce": "forward CE",
              "reverse_ce": "reverse CE"}
LOSS_ORDER = ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce")


def loss_comparison_markdown(summary: pd.DataFrame) -> str:
    """The paper's main-table shape: one row per pair, test accuracy of each loss (best in bold), PGR, and
    the paired difference reverse KL - forward KL (mean ± s.e. over seeds)."""
    losses = [loss for loss in LOSS_ORDER if loss in set(summary["loss"])]
    paired = "reverse_kl" in losses and "forward_kl" in losses
    head = ("| weak → strong | weak | " + " | ".join(LOSS_NAMES[loss] for loss in losses)
            + " | ceiling | " + " | ".join(f"PGR {LOSS_NAMES[loss]}" for loss in losses)
            + (" | reverse − forward KL (paired) |" if paired else " |"))
    lines = [head, "|" + "---|" * (3 + 2 * len(losses) + paired)]
    for pair in dict.fromkeys(summary["pair"]):
        d = summary[summary["pair"] == pair].set_index("loss")
        best = max(losses, key=lambda loss: d.loc[loss, "accuracy_mean"])
        cells = [f"**{_pm(d.loc[loss, 'accuracy_mean'], d.loc[loss, 'accuracy_se'])}**" if loss == best
                 else _pm(d.loc[loss, "accuracy_mean"], d.loc[loss, "accuracy_se"]) for loss in losses]
        pgrs = [_pm(d.loc[loss, "pgr_mean"], d.loc[loss, "pgr_se"], 2) for loss in losses]
        first = d.iloc[0]
        diff = ""
        if paired:
            mean, se = d.loc["reverse_kl", "vs_forward_kl_mean"], d.loc["reverse_kl", "vs_forward_kl_se"]
            diff = f" | {mean:+.4f}" + (f" ± {se:.4f}" if math.isfinite(se) else "")
        lines.append(f"| {pair} | {first['weak_accuracy']:.3f} | " + " | ".join(cells)
                     + f" | {first['ceiling_accuracy']:.3f} | " + " | ".join(pgrs) + diff + " |")
    return "\n".join(lines)


def noise_robustness_markdown(summary: pd.DataFrame, references: pd.DataFrame) -> str:
    losses = [loss for loss in LOSS_ORDER if loss in set(summary["loss"])]
    blocks = []
    for _, ref in references.iterrows():
        d = summary[summary["world"] == ref["world"]]
        lines = [f"**{_world_label(ref['world'], ref['bayes'])}** — weak teacher {ref['weak_accuracy']:.3f}, "
                 f"strong ceiling {ref['ceiling_accuracy']:.3f} (test accuracy); cells: accuracy / KL error",
                 "", "| flipped | " + " | ".join(LOSS_NAMES[loss] for loss in losses) + " |",
                 "|" + "---|" * (1 + len(losses))]
        for noise in sorted(set(d["noise"])):
            e = d[d["noise"] == noise].set_index("loss")
            cells = [f"{_pm(e.loc[loss, 'accuracy_mean'], e.loc[loss, 'accuracy_se'])} / "
                     f"{_pm(e.loc[loss, 'kl_error_mean'], e.loc[loss, 'kl_error_se'])}" for loss in losses]
            lines.append(f"| {noise:.0%} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def guarantee_markdown(table: pd.DataFrame) -> str:
    cols = ["head", "loss", "error_direction", "inequality", "expected", "instances", "holds", "violated",
            "inconclusive", "fraction_holds"] + (["pattern_met"] if "pattern_met" in table.columns else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        # "KL(F*||F)" would end the cell: escape the pipes inside cells.
        cells = [f"{r[c]:.3f}" if c == "fraction_holds" else str(r[c]).replace("|", "\\|") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> Path:
    from .io import atomic_write

    atomic_write(path, lambda fh: fh.write((text.rstrip() + "\n").encode()))
    return path


# --------------------------------------------------------------------------------------------------------
# One function per figure
# --------------------------------------------------------------------------------------------------------


def mode_seeking_figure(out: Path, **_) -> list[Path]:
    from . import plots

    return plots.save_figure(plots.plot_mode_seeking(mode_seeking_study()), out, "mode_seeking")


def gain_vs_misfit_figure(out: Path, store: ResultsStore, quick: bool, device, progress, say, ledger, experiments,
                          **_) -> list[Path]:
    from . import plots
    from .io import save_json

    charikar, config = charikar_results(store, quick=quick, progress=say, ledger=ledger)
    summary = charikar_summary(charikar, config)
    kl, _ = sweep_results("gain_vs_misfit_kl", store, quick=quick, device=device, progress=progress, ledger=ledger,
                          experiments=experiments)
    spec = kl.iloc[0]
    charikar_caption = (f"Charikar et al.'s notebook setup: x ~ N(0, {config.input_scale:g}² I_{config.input_dim}), "
                        f"width {config.width}, h* {config.target_depth} blocks, weak {config.weak_depth} / strong "
                        f"{config.strong_depth} blocks pre-trained on T = {config.pretrain_tasks} tasks "
                        f"({config.pretrain_samples} inputs each, {config.pretrain_epochs} epochs, tasks in order, "
                        f"AdamW, float64); {config.fresh_tasks} transfer tasks of {config.n_transfer} inputs, exact "
                        f"least squares; gain and misfit on fresh inputs. Draws of h*: the notebook's seed "
                        f"('authors') and seeds {', '.join(str(s) for s in config.seeds[1:])}. Realizable and "
                        f"perturbed (weight noise {config.perturbation:g}×sd) are this project's own variants.")
    kl_caption = (f"Synthetic world k = {spec['world_k']}, temperature {spec['world_temperature']:g}, "
                  f"truth_concentration {spec['world_truth_concentration']:g} (realizable), "
                  f"{kl['seed'].nunique()} tasks (world seeds), {spec['n_train']} transfer samples.")
    main = charikar[charikar["pretrain_epochs"] == config.pretrain_epochs]
    fig = plots.plot_gain_vs_misfit(main, kl, kl_caption, charikar_caption, summary)
    paths = plots.save_figure(fig, out, "gain_vs_misfit")
    json_path = Path(out) / "gain_vs_misfit.json"
    save_json(json_path, summary)
    return [*paths, json_path]


def noise_robustness_figure(out: Path, store: ResultsStore, quick: bool, device, progress, ledger, experiments,
                            **_) -> list[Path]:
    from . import plots

    frame, _ = sweep_results("noise_robustness", store, quick=quick, device=device, progress=progress,
                             ledger=ledger, experiments=experiments)
    summary, refs = summarise_noise_robustness(frame)
    titles = {r["world"]: _world_label(r["world"], r["bayes"]) for _, r in refs.iterrows()}
    spec = frame.iloc[0]
    caption = (f"Synthetic worlds k = {spec['world_k']}, truth_concentration {spec['world_truth_concentration']:g}, "
               f"weak: {spec['world_weak_dim']} features after {spec['world_weak_depth']} block (mixture head), "
               f"strong: {spec['world_strong_dim']} features; {frame['seed'].nunique()} seeds, "
               f"{spec['n_train']} transfer / {spec['n_test']} test samples. A flipped row swaps the teacher's two "
               "probabilities. Accuracy = expected accuracy against labels drawn from F*.")
    acc = summary.pivot_table(index=["world", "noise"], columns="loss", values="accuracy_mean")
    if {"forward_kl", "reverse_kl"} <= set(acc.columns):
        gap = float((acc["reverse_kl"] - acc["forward_kl"]).abs().max())
        caption += (f" Forward CE coincides with forward KL (same gradients); reverse KL differs from forward KL by "
                    f"at most {gap:.3f} in mean accuracy, so their curves overlap.")
    fig = plots.plot_noise_robustness(summary, refs, titles, caption)
    paths = plots.save_figure(fig, out, "noise_robustness")
    paths.append(_write_text(Path(out) / "noise_robustness.md", noise_robustness_markdown(summary, refs)))
    return paths


def bound_tightness_figure(out: Path, quick: bool, **_) -> list[Path]:
    from . import plots
    from .bounds import provable_sqrt_constant, sharp_binary_constant

    instances = bound_tightness_instances(BOUND_GAMMA, count=1000 if quick else 6000)
    caption = ("Every probability of F_w and F_sw is at least γ. Random instances sit far below both lines; "
               "near-extremal binary instances (F_w → (γ, 1−γ), F_sw → F_w, F* on the rare class) approach the "
               "sharp constant from below.")
    fig = plots.plot_bound_tightness(instances, BOUND_GAMMA, float(provable_sqrt_constant(BOUND_GAMMA)),
                                     float(sharp_binary_constant(BOUND_GAMMA)), caption)
    return plots.save_figure(fig, out, "bound_tightness")


def guarantee_table_figure(out: Path, quick: bool, **_) -> list[Path]:
    from . import plots
    from .guarantees import guarantee_table

    table = guarantee_table(quick=quick, seed=0)
    caption = ("Verdicts use each solver's certificate: violated = slack below −certificate − rounding. "
               f"{'Quick instance counts.' if quick else ''}")
    paths = plots.save_figure(plots.plot_guarantee_table(table, caption), out, "guarantee_table")
    paths.append(_write_text(Path(out) / "guarantee_table.md", guarantee_markdown(table)))
    return paths


def loss_comparison_figure(out: Path, store: ResultsStore, quick: bool, device, progress, ledger, experiments,
                           **_) -> list[Path]:
    from . import plots

    frame, _ = sweep_results("loss_comparison", store, quick=quick, device=device, progress=progress,
                             ledger=ledger, experiments=experiments)
    summary = summarise_loss_comparison(frame)
    spec = frame.iloc[0]
    caption = (f"Synthetic worlds k = {spec['world_k']}, temperature {spec['world_temperature']:g}, "
               f"truth_concentration {spec['world_truth_concentration']:g}; weak representation read after "
               f"{spec['world_weak_depth']} block, strong after {spec['world_strong_depth']} blocks; softmax head; "
               f"{frame['seed'].nunique()} seeds, {spec['n_train']} transfer / {spec['n_test']} test samples; "
               "clean teacher.")
    fig = plots.plot_loss_comparison(summary, caption)
    paths = plots.save_figure(fig, out, "loss_comparison")
    paths.append(_write_text(Path(out) / "loss_comparison.md", loss_comparison_markdown(summary)))
    return paths


def demo_digits_figure(out: Path, quick: bool, device, say, **_) -> list[Path]:
    from . import plots
    from .byo import DEMOS, ByoSettings, format_report, load_demo, run_byo

    try:
        weak, strong, labels = load_demo("digits")
    except InputError as exc:
        say(f"demo_digits: skipped ({exc})")
        return []
    settings = ByoSettings(repeats=1 if quick else 10, device=device or "cpu")
    report = run_byo(weak, strong, labels, settings)
    caption = (f"{DEMOS['digits']}. {settings.repeats} random splits into thirds (weak head / students / test), "
               "mean ± s.e.; softmax heads; weak head and ceiling L2-regularised (λ = "
               f"{settings.l2:g}), students unregularised.")
    fig = plots.plot_demo(report, "Bring your own representations: scikit-learn digits (no download)", caption)
    paths = plots.save_figure(fig, out, "demo_digits")
    paths.append(_write_text(Path(out) / "demo_digits.md", format_report(report, markdown=True)))
    return paths


PHASE_PAIRS = [("reverse_ce", "forward_kl"), ("reverse_kl", "forward_kl")]
PHASE_VARIANTS = ["exact minimiser", "practice, shared lr", "practice, tuned lr"]


def _variant(row) -> str:
    if row["trainer"] == "exact":
        return PHASE_VARIANTS[0]
    return PHASE_VARIANTS[1] if row["lr_grid"] in ("[]", "", None) else PHASE_VARIANTS[2]


def _noise_setting(row) -> str:
    names = {"flip": "flip", "confident_wrong": "conf. wrong", "uncertain": "uncertain"}
    return "clean" if row["noise"] == 0 else f"{names[row['noise_kind']]} {row['noise']:.0%}"


def summarise_phase_diagram(frame: pd.DataFrame) -> pd.DataFrame:
    """Paired differences (:func:`w2s_theory.phase.paired_differences`) of test accuracy for
    :data:`PHASE_PAIRS` per (trainer variant, teacher temperature, noise setting)."""
    from .phase import paired_differences

    frame = frame.assign(variant=frame.apply(_variant, axis=1), setting=frame.apply(_noise_setting, axis=1))
    return paired_differences(frame, PHASE_PAIRS, ["variant", "teacher_temperature", "setting"])


def phase_diagram_markdown(table: pd.DataFrame, lr_picks: pd.DataFrame) -> str:
    lines = ["Paired test-accuracy differences (percentage points, mean ± s.e. over seeds; **bold**: |mean| ≥ 2 s.e.).", ""]
    settings = sorted(table["setting"].unique(), key=lambda s: (s != "clean", s))
    for a, b in PHASE_PAIRS:
        lines += [f"**{a} − {b}**", "", "| trainer | T | " + " | ".join(settings) + " |",
                  "|---|---|" + "---|" * len(settings)]
        rows = table[(table.loss_a == a) & (table.loss_b == b)]
        for variant in PHASE_VARIANTS:
            for temp in sorted(rows["teacher_temperature"].unique()):
                cells = []
                for setting in settings:
                    c = rows[(rows.variant == variant) & (rows.teacher_temperature == temp) & (rows.setting == setting)]
                    if c.empty:
                        cells.append("")
                        continue
                    c = c.iloc[0]
                    text = f"{100 * c['mean']:+.1f} ± {100 * c['se']:.1f}"
                    cells.append(f"**{text}**" if c["significant"] else text)
                lines.append(f"| {variant} | {temp:g} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(lr_picks):
        lines += ["Learning rates picked per loss on the weak-labelled validation split (tuned lr; share of runs):", ""]
        for loss, g in lr_picks.groupby("loss"):
            share = g["lr_selected"].value_counts(normalize=True).sort_index()
            lines.append(f"- {loss}: " + ", ".join(f"{lr:g}: {100 * p:.0f}%" for lr, p in share.items()))
    return "\n".join(lines) + "\n"


def phase_diagram_figure(out: Path, store: ResultsStore, quick: bool, device, progress, ledger, experiments,
                         **_) -> list[Path]:
    from . import plots

    frame, _ = sweep_results("phase_diagram", store, quick=quick, device=device, progress=progress,
                             ledger=ledger, experiments=experiments)
    table = summarise_phase_diagram(frame)
    spec = frame.iloc[0]
    caption = (f"Softmax students on a weak teacher; synthetic world k = {spec['world_k']}, temperature "
               f"{spec['world_temperature']:g}, truth_concentration {spec['world_truth_concentration']:g}, "
               f"{spec['world_strong_dim']} strong / {spec['world_weak_dim']} weak features; "
               f"{frame['seed'].nunique()} paired seeds, {spec['n_train']} transfer / {spec['n_test']} test samples. "
               "Teacher: q ∝ q^(1/T), then 30% of rows flipped / made confidently wrong (0.95 on a wrong class) / "
               f"uniform, floor {spec['teacher_floor']:g}. Practice: Adam, batch {spec['batch_size']}, "
               f"{spec['epochs']} epochs, lr {spec['lr']:g} shared, or tuned per loss over "
               "{0.001, 0.003, 0.01, 0.03, 0.1} on a weak-labelled validation split. Colour: significant cells "
               "only (|mean| ≥ 2 s.e.); hatched: not significant. Text: percentage points ± s.e.")
    fig = plots.plot_phase_diagram(table, PHASE_PAIRS, PHASE_VARIANTS, "setting", "teacher_temperature", caption)
    paths = plots.save_figure(fig, out, "phase_diagram")
    tuned = frame[(frame["trainer"] == "practice") & (frame["lr_grid"] != "[]")]
    paths.append(_write_text(Path(out) / "phase_diagram.md", phase_diagram_markdown(table, tuned)))
    return paths


def summarise_learning_curves(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean ± s.e. over seeds of each practice student's curve per (loss, step); the exact students' mean
    test accuracy per loss."""
    import json

    rows = []
    for _, r in frame[frame["trainer"] == "practice"].iterrows():
        c = json.loads(r["curve"])
        for step, acc, norm in zip(c["step"], c["test_accuracy"], c["weight_norm"]):
            rows.append({"loss": r["loss"], "seed": r["seed"], "step": step, "test_accuracy": acc, "weight_norm": norm})
    long = pd.DataFrame(rows)
    curves = []
    for (loss, step), g in long.groupby(["loss", "step"]):
        acc, norm = _mean_se(g["test_accuracy"]), _mean_se(g["weight_norm"])
        curves.append({"loss": loss, "step": step, "test_accuracy_mean": acc[0], "test_accuracy_se": acc[1],
                       "weight_norm_mean": norm[0], "weight_norm_se": norm[1]})
    exact = (frame[frame["trainer"] == "exact"].groupby("loss")["student_test_accuracy"].mean()
             .rename("accuracy").reset_index())
    return pd.DataFrame(curves), exact


def learning_curves_figure(out: Path, store: ResultsStore, quick: bool, device, progress, ledger, experiments,
                           **_) -> list[Path]:
    from . import plots

    frame, _ = sweep_results("learning_curves", store, quick=quick, device=device, progress=progress,
                             ledger=ledger, experiments=experiments)
    curves, exact = summarise_learning_curves(frame)
    spec = frame[frame["trainer"] == "practice"].iloc[0]
    caption = (f"Practice training (Adam, lr {spec['lr']:g} shared, batch {spec['batch_size']}, {spec['epochs']} "
               f"epochs, zero init) of a softmax head on {spec['n_train']} teacher-labelled samples; teacher "
               f"temperature {spec['teacher_temperature']:g}, {spec['noise']:.0%} {spec['noise_kind']} noise; "
               f"mean ± s.e. over {frame['seed'].nunique()} seeds; accuracy on {spec['n_test']} held-out samples "
               "against the truth. Forward CE and forward KL have the same gradients (their curves coincide).")
    fig = plots.plot_learning_curves(curves, exact, float(frame["weak_test_accuracy"].mean()), caption,
                                     "Learning curves: what finite training does with each loss")
    return plots.save_figure(fig, out, "learning_curves")


def k_heads_figure(out: Path, quick: bool, **_) -> list[Path]:
    """Deficit (misfit - gain) of jointly trained k-head students vs k, log-log (the ``k_head_mixture`` check)."""
    from paper_checks.k_head_mixture import deficits, slope_with_interval

    from . import plots

    ks, D = deficits(quick, 0)
    slope, (lo, hi) = slope_with_interval(ks, D, np.random.default_rng(0))
    caption = (f"Reverse-KL students, truth = mixture of 8 softmax heads, teacher = truth corrupted in logit space; "
               f"{D.shape[1]} instances per k, joint training uncertified (best of L-BFGS restarts). Fitted slope "
               f"{slope:.2f} (95% bootstrap interval {lo:.2f} to {hi:.2f}) on log-log axes, over the k whose mean "
               "deficit is positive; the dashed line has slope -1/2 (a third-party summary's O(sqrt(c/k)), shown, "
               "not tested). Deficit axis symmetric-log: linear within 1e-4 of 0.")
    return plots.save_figure(plots.plot_k_heads(ks, D, caption), out, "k_heads")


def f_divergences_figure(out: Path, quick: bool, **_) -> list[Path]:
    """Fraction of instances with gain >= misfit per f-divergence loss and head (``f_divergence_table``)."""
    from paper_checks.f_divergence_table import table

    from . import plots

    rows = pd.DataFrame(table(quick, 0, ("mixture", "softmax")))
    caption = ("Mixture head: certified fraction (gain >= misfit proved for the exact minimiser; TV: measured, its "
               "minimiser is not unique). Softmax head: measured on uncertified fits. Gain and misfit in each "
               "loss's own divergence, student first.")
    paths = plots.save_figure(plots.plot_f_divergences(rows, caption), out, "f_divergences")
    cols = ["head", "loss", "instances", "holds", "violated", "inconclusive", "fraction_gain_ge_misfit", "certified"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for _, r in rows.iterrows()]
    paths.append(_write_text(Path(out) / "f_divergences.md", "\n".join(lines) + "\n"))
    return paths


# --------------------------------------------------------------------------------------------------------
# paper_tables
# --------------------------------------------------------------------------------------------------------

#: The paper's test accuracies (%, GPT-2 on CAI-Harmless; fwd/rev KL, fwd/rev CE) as quoted in docs/theory.md
#: ("What the paper reports empirically": from a third-party note, not verified against the paper itself).
#: Reported data, drawn as reference markers only; nothing here is computed from them.
PAPER_SOURCE = "paper (GPT-2, CAI-Harmless)"
PAPER_TABLE_MAIN = {
    "Base→Medium": {"forward_kl": 89.7, "reverse_kl": 91.5, "forward_ce": 89.7, "reverse_ce": 91.2},
    "Base→Large": {"forward_kl": 93.6, "reverse_kl": 94.2, "forward_ce": 93.6, "reverse_ce": 93.9},
    "Medium→Large": {"forward_kl": 93.5, "reverse_kl": 94.1, "forward_ce": 93.5, "reverse_ce": 93.8},
}
#: Base→Medium with a fraction of the weak labels flipped (p → 1 − p), same source.
PAPER_TABLE_NOISE = {
    0.1: {"forward_kl": 90.1, "reverse_kl": 92.4, "forward_ce": 90.1, "reverse_ce": 92.0},
    0.2: {"forward_kl": 86.3, "reverse_kl": 91.3, "forward_ce": 86.2, "reverse_ce": 90.8},
    0.3: {"forward_kl": 81.7, "reverse_kl": 90.0, "forward_ce": 81.6, "reverse_ce": 89.5},
    0.4: {"forward_kl": 72.8, "reverse_kl": 80.6, "forward_ce": 72.8, "reverse_ce": 81.8},
}
#: The paired differences the tables report (each against forward KL, same world, teacher, split and batches).
PAPER_PAIRS = [("reverse_kl", "forward_kl"), ("reverse_ce", "forward_kl")]
PAPER_TABLE_TRAINERS = ("practice", "exact")


def paper_pair_dims(frame: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """The paper's rows as (weak_dim, strong_dim) of the study: Base = the smaller weak size, Medium = the
    larger weak size and the smaller strong size, Large = the larger strong size."""
    weak, strong = sorted(frame["world_weak_dim"].unique()), sorted(frame["world_strong_dim"].unique())
    if len(weak) != 2 or len(strong) != 2:
        raise InputError(f"paper_tables: the study needs two weak_dim and two strong_dim values (Base, Medium; "
                         f"Medium, Large), found weak_dim {weak} and strong_dim {strong}")
    return {"Base→Medium": (int(weak[0]), int(strong[0])), "Base→Large": (int(weak[0]), int(strong[1])),
            "Medium→Large": (int(weak[1]), int(strong[1]))}


def _paper_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs of the two tables, each labelled with its ``table`` (1: pairs, clean teacher; 2: Base→Medium
    with flips) and ``row``; runs of other (pair, noise) cells are dropped."""
    dims = paper_pair_dims(frame)
    parts = []
    for name, (weak, strong) in dims.items():
        at = frame[(frame["world_weak_dim"] == weak) & (frame["world_strong_dim"] == strong)]
        parts.append(at[at["noise"] == 0].assign(table=1, row=name, order=len(parts)))
    weak, strong = dims["Base→Medium"]
    base = frame[(frame["world_weak_dim"] == weak) & (frame["world_strong_dim"] == strong)]
    for noise in sorted(v for v in base["noise"].unique() if v > 0):
        parts.append(base[base["noise"] == noise].assign(table=2, row=f"{noise:.0%} flipped", order=len(parts)))
    return pd.concat(parts, ignore_index=True)


def summarise_paper_tables(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean ± standard error over seeds of the student's test accuracy per (table, row, trainer, loss), with
    the row's weak teacher and strong ceiling; and the paired differences
    (:func:`w2s_theory.phase.paired_differences`) of :data:`PAPER_PAIRS` per (table, row, trainer)."""
    from .phase import paired_differences

    rows = _paper_rows(frame)
    cells = []
    for (table, order, row, trainer, loss), g in rows.groupby(["table", "order", "row", "trainer", "loss"]):
        acc = _mean_se(g["student_test_accuracy"])
        one = g.drop_duplicates("seed")
        cells.append({"table": table, "order": order, "row": row, "trainer": trainer, "loss": loss,
                      "weak_dim": int(g["world_weak_dim"].iloc[0]), "strong_dim": int(g["world_strong_dim"].iloc[0]),
                      "noise": float(g["noise"].iloc[0]), "accuracy_mean": acc[0], "accuracy_se": acc[1],
                      "seeds": len(g), "weak_accuracy": one["weak_test_accuracy"].mean(),
                      "ceiling_accuracy": one["ceiling_test_accuracy"].mean()})
    cells = pd.DataFrame(cells).sort_values(["table", "order"], kind="stable").reset_index(drop=True)
    diffs = paired_differences(rows, PAPER_PAIRS, ["table", "order", "row", "trainer"])
    return cells, diffs.sort_values(["table", "order"], kind="stable").reset_index(drop=True)


def paper_reference(table: int, row: str, noise: float) -> dict | None:
    """The paper's accuracies (%) for a row of :func:`summarise_paper_tables` (None where it reports none)."""
    return PAPER_TABLE_MAIN.get(row) if table == 1 else PAPER_TABLE_NOISE.get(round(float(noise), 4))


def paper_tables_markdown(cells: pd.DataFrame, diffs: pd.DataFrame, settings: str) -> str:
    """The paper's two tables in their shape: one row per weak → strong pair (table 1) or flip rate (table 2),
    one column per loss with the practice student's test accuracy (%, mean ± s.e.) and, in brackets, the
    exact minimiser's; then the paired differences reverse KL / reverse CE − forward KL (points, mean ± s.e.,
    bold when |mean| ≥ 2 s.e.) for both trainers, and the paper's."""
    losses = [loss for loss in LOSS_ORDER if loss in set(cells["loss"])]
    seeds = int(cells["seeds"].max())
    lines = [f"Simulated in the paper's shape ({settings}). Cells: test accuracy %, practice student, mean ± s.e. "
             f"over {seeds} seeds; [exact minimiser of the same loss on the same data]. Weak: the weak teacher's "
             "test accuracy (before any flips); ceiling: the strong head fitted to the truth. Differences: paired "
             "over seeds, percentage points, mean ± s.e., **bold** when |mean| ≥ 2 s.e. Paper: the paper's "
             "reported differences (GPT-2 on CAI-Harmless, as quoted in docs/theory.md).", ""]
    short = {"forward_kl": "fwd KL", "reverse_kl": "rev KL", "forward_ce": "fwd CE", "reverse_ce": "rev CE"}
    pair_heads = [f"{short[a]} − {short[b]}, {trainer}" for a, b in PAPER_PAIRS for trainer in PAPER_TABLE_TRAINERS]
    titles = {1: "Table 1 — main comparison (clean teacher)", 2: None}
    for table in sorted(cells["table"].unique()):
        d = cells[cells["table"] == table]
        first = d.iloc[0]
        if table == 2:
            titles[2] = f"Table 2 — Base→Medium ({first['weak_dim']} → {first['strong_dim']} feats) with flipped labels"
        label = "weak → strong" if table == 1 else "flipped labels"
        lines += [f"**{titles[table]}**", "",
                  f"| {label} | weak | " + " | ".join(LOSS_NAMES[loss] for loss in losses) + " | ceiling | "
                  + " | ".join(pair_heads) + " | paper: " + " / ".join(f"{short[a]} − {short[b]}" for a, b in PAPER_PAIRS) + " |",
                  "|" + "---|" * (3 + len(losses) + len(pair_heads) + 1)]
        for row in dict.fromkeys(d["row"]):
            e = d[d["row"] == row]
            acc = {(r["trainer"], r["loss"]): r for _, r in e.iterrows()}
            cols = []
            for loss in losses:
                p, x = acc.get(("practice", loss)), acc.get(("exact", loss))
                text = _pm(100 * p["accuracy_mean"], 100 * p["accuracy_se"], 1) if p is not None else "–"
                cols.append(text + (f" [{100 * x['accuracy_mean']:.1f}]" if x is not None else ""))
            for a, b in PAPER_PAIRS:
                for trainer in PAPER_TABLE_TRAINERS:
                    c = diffs[(diffs["row"] == row) & (diffs["table"] == table) & (diffs["trainer"] == trainer)
                              & (diffs["loss_a"] == a) & (diffs["loss_b"] == b)]
                    if c.empty:
                        cols.append("–")
                        continue
                    c = c.iloc[0]
                    text = f"{100 * c['mean']:+.2f}" + (f" ± {100 * c['se']:.2f}" if math.isfinite(c["se"]) else "")
                    cols.append(f"**{text}**" if c["significant"] else text)
            ref = paper_reference(table, row, e.iloc[0]["noise"])
            paper = " / ".join(f"{ref[a] - ref[b]:+.1f}" for a, b in PAPER_PAIRS) if ref else "–"
            name = f"{row} ({e.iloc[0]['weak_dim']} → {e.iloc[0]['strong_dim']} feats)" if table == 1 else f"{e.iloc[0]['noise']:.0%}"
            lines.append(f"| {name} | {100 * e.iloc[0]['weak_accuracy']:.1f} | " + " | ".join(cols[:len(losses)])
                         + f" | {100 * e.iloc[0]['ceiling_accuracy']:.1f} | " + " | ".join(cols[len(losses):])
                         + f" | {paper} |")
        lines.append("")
    return "\n".join(lines)


def paper_tables_figure(out: Path, store: ResultsStore, quick: bool, device, progress, ledger, experiments,
                        **_) -> list[Path]:
    from . import plots

    frame, _ = sweep_results("paper_tables", store, quick=quick, device=device, progress=progress,
                             ledger=ledger, experiments=experiments)
    cells, diffs = summarise_paper_tables(frame)
    spec = frame[frame["trainer"] == "practice"].iloc[0]
    settings = (f"synthetic world k = {spec['world_k']}, temperature {spec['world_temperature']:g}, "
                f"truth_concentration {spec['world_truth_concentration']:g}; softmax students on "
                f"{spec['n_train']} teacher-labelled samples, {spec['n_test']} test samples; practice = "
                f"{spec['optimizer'].capitalize()}, lr {spec['lr']:g} shared by all losses, batch {spec['batch_size']}, "
                f"{spec['epochs']} epoch{'s' if spec['epochs'] != 1 else ''}, zero init, no early stopping")
    caption = (f"Simulated: {settings}; {frame['seed'].nunique()} paired seeds. Model sizes are representation "
               "sizes (features); the weak teacher is a mixture head fitted to the truth on its own split. "
               "Bars: practice students (mean ± s.e.); black ticks: the exact minimiser of the same loss (beside the "
               "bar's centre; its s.e. in grey); dotted: the weak teacher's test accuracy before flips; "
               f"diamonds: {PAPER_SOURCE}, as quoted in docs/theory.md (a different task and scale: compare "
               "shapes and signs, not levels).")
    fig = plots.plot_paper_tables(cells, diffs, PAPER_PAIRS, PAPER_TABLE_MAIN, PAPER_TABLE_NOISE, PAPER_SOURCE,
                                  caption)
    paths = plots.save_figure(fig, out, "paper_tables")
    paths.append(_write_text(Path(out) / "paper_tables.md", paper_tables_markdown(cells, diffs, settings)))
    return paths


_BUILDERS = {
    "k_heads": k_heads_figure,
    "f_divergences": f_divergences_figure,
    "mode_seeking": mode_seeking_figure,
    "gain_vs_misfit": gain_vs_misfit_figure,
    "noise_robustness": noise_robustness_figure,
    "bound_tightness": bound_tightness_figure,
    "guarantee_table": guarantee_table_figure,
    "loss_comparison": loss_comparison_figure,
    "demo_digits": demo_digits_figure,
    "phase_diagram": phase_diagram_figure,
    "learning_curves": learning_curves_figure,
    "paper_tables": paper_tables_figure,
}


def make_figures(store_path, out_dir, *, quick: bool = False, only=None, device=None, progress: bool = True,
                 say=print, experiments=None) -> dict[str, dict]:
    """Build the figures named in ``only`` (default: all of :data:`FIGURES`) into ``out_dir``; returns
    ``{name: {"files": [...], "seconds": s, "computed": runs computed now, "stored": runs read from the
    store}}`` (the last two count the runs of stored studies only). ``experiments`` is the folder of the sweep
    configs (default :data:`EXPERIMENTS_DIR`, the repository's ``experiments/``)."""
    names = list(FIGURES if not only else only)
    unknown = [n for n in names if n not in _BUILDERS]
    if unknown:
        raise InputError(f"unknown figure(s): {', '.join(unknown)}; choose from: {', '.join(FIGURES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    import torch

    threads = torch.get_num_threads()
    with ResultsStore(store_path) as store:
        for name in names:
            start = time.perf_counter()
            ledger: list = []
            try:
                # The studies are many small problems: one thread avoids oversubscribing a shared CPU.
                torch.set_num_threads(1)
                files = _BUILDERS[name](out=out, store=store, quick=quick, device=device, progress=progress,
                                        say=say, ledger=ledger, experiments=experiments)
            finally:
                torch.set_num_threads(threads)
            seconds = time.perf_counter() - start
            done[name] = {"files": [str(p) for p in files], "seconds": seconds,
                          "computed": sum(c for _, c, _ in ledger), "stored": sum(r for _, _, r in ledger)}
            runs = (f"; {done[name]['computed']} runs computed, {done[name]['stored']} read from the store"
                    if ledger else "")
            say(f"{name}: {', '.join(Path(p).name for p in files) or 'nothing written'} ({seconds:.1f} s{runs})")
    return done
