r"""Bring your own representations: the weak-to-strong pipeline on user embeddings (docs/design.md, ``study``).

Input: a weak representation :math:`h_w` (``(n, m_w)``), a strong one :math:`h_s` (``(n, m_s)``) of the same
``n`` samples (embeddings saved from two models, row ``i`` = sample ``i``) and integer labels
:math:`y\in\{0,\dots,k-1\}`. The truth :math:`F^*` is the one-hot label, so the error of a model
:math:`L(F^*, F) = \mathbb E\,\mathrm{KL}(F^*\|F) = \mathbb E[-\log F_y]` is its cross-entropy on the labels.

The flow (docs/design.md), once per random split of the rows into thirds A / B / C (``repeats`` splits, seeded):

1. **weak teacher**: a softmax head on :math:`h_w` fitted to the labels of split A by L2-regularised
   cross-entropy (:func:`fit_softmax_ridge`; the penalty keeps the teacher's probabilities away from 0 and 1,
   as a fine-tuned weak model's are, so that every loss is finite);
2. **teacher probabilities** :math:`F_w` on split B (optionally with a fraction ``noise`` of rows flipped,
   :func:`w2s_theory.synthetic.flip_labels`);
3. **students**: a softmax head on :math:`h_s` fitted to :math:`F_w` on split B under each of the four
   losses (``forward_kl reverse_kl forward_ce reverse_ce``; :func:`w2s_theory.solvers.fit`, unregularised:
   the objective is the paper's);
4. **strong ceiling**: the same head on :math:`h_s` fitted to the labels of split B (regularised as in 1);
5. **evaluation on split C**: accuracy, KL error, gain = weak error - student error, and PGR = (student
   accuracy - weak accuracy) / (ceiling accuracy - weak accuracy); the misfit (the KL between student and
   teacher in the trained direction) and the guarantee check are in-sample on split B, where they are
   stated.

Each representation is standardised (columns to mean 0, standard deviation 1) with the statistics of the
split its head is trained on (A for the weak one, B for the strong one).

**The guarantee check** (per loss, on split B; docs/theory.md):

* ``gain >= misfit`` (the Theorem-2 form). It is *guaranteed* only for the reverse KL with a head class
  that is convex in probability space and contains the truth; neither holds here (softmax head, real
  labels), so it is reported as observed, not as a test of the theorem.
* ``|gain| <= C(gamma) sqrt(misfit)`` (Lemma 1, the provable constant :math:`C = 1/(\sqrt2\gamma)` with
  :math:`\gamma` the smallest probability of teacher and student on the split): always true; reported with
  the ratio :math:`|\text{gain}|/\sqrt{\text{misfit}}` and the sharp constant
  :math:`C^*(\gamma) = \sqrt{2(1-\gamma)/\gamma}` (:func:`w2s_theory.bounds.sharp_binary_constant`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax

from ._backend import to_numpy
from .pipeline import CLASSIFICATION_LOSSES, predict
from .solvers import fit
from .synthetic import flip_labels, rng_for
from .validation import InputError, check_finite

__all__ = ["ByoSettings", "check_inputs", "fit_softmax_ridge", "run_byo", "format_report", "DEMOS",
           "load_demo", "REPORT_COLUMNS"]

#: The smallest split: fewer rows than this in A, B or C cannot fit or evaluate anything meaningful.
MIN_SPLIT_ROWS = 2

#: Size limits checked before anything is allocated: the number of classes, and the entries of the largest
#: arrays the pipeline holds (n x k probabilities, (m + 1) x k head weights; 1e8 float64 = 0.8 GB each).
MAX_CLASSES = 100_000
MAX_ENTRIES = 100_000_000


@dataclass(frozen=True)
class ByoSettings:
    """Options of :func:`run_byo` (all have defaults; ``seed`` fixes the splits and the label noise)."""

    seed: int = 0
    repeats: int = 5
    l2: float = 1e-2  # penalty of the weak head and the ceiling, on standardised features
    noise: float = 0.0  # fraction of teacher rows flipped on split B
    losses: tuple = CLASSIFICATION_LOSSES
    device: str = "cpu"

    def __post_init__(self):
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise InputError(f"repeats: expected an integer >= 1, got {self.repeats!r}")
        if not (isinstance(self.l2, (int, float)) and math.isfinite(self.l2) and self.l2 > 0):
            raise InputError(f"l2: expected a positive number, got {self.l2!r}")
        if not (isinstance(self.noise, (int, float)) and 0 <= self.noise <= 1):
            raise InputError(f"noise: expected a fraction in [0, 1], got {self.noise!r}")
        unknown = [loss for loss in self.losses if loss not in CLASSIFICATION_LOSSES]
        if unknown or not self.losses:
            raise InputError(f"losses: choose from {', '.join(CLASSIFICATION_LOSSES)}, got {list(self.losses)}")


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


def check_inputs(weak_features, strong_features, labels, classes: int | None = None):
    """Validate user arrays; returns ``(weak (n, m_w), strong (n, m_s), labels (n,) int, k)``.

    Raises :class:`InputError` (one line naming the argument and the fix) for wrong shapes, a mismatch in
    the number of rows, NaN/inf, labels that are not integers in ``[0, classes)``, or fewer than two classes.
    """
    names = ("--weak-features", "--strong-features", "--labels")
    weak = np.asarray(weak_features, dtype=np.float64)
    strong = np.asarray(strong_features, dtype=np.float64)
    y = np.asarray(labels)
    for name, a in zip(names[:2], (weak, strong)):
        if a.ndim != 2:
            raise InputError(f"{name}: expected a 2-D array (n samples, m features), got shape {a.shape}")
        if a.shape[0] < 1 or a.shape[1] < 1:
            raise InputError(f"{name}: empty array of shape {a.shape}")
        check_finite(name, a)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(f"--labels: expected a 1-D array of n class indices, got shape {y.shape}")
    n = weak.shape[0]
    for name, rows in ((names[1], strong.shape[0]), (names[2], y.shape[0])):
        if rows != n:
            raise InputError(f"{name} has {rows} rows but --weak-features has {n}; the three arrays must "
                             "describe the same samples (row i = sample i)")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise InputError(f"--labels: expected integer class indices, got dtype {y.dtype}")
    yf = y.astype(np.float64)
    check_finite("--labels", yf)
    bad = (yf != np.round(yf)) | (yf < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"--labels: {int(bad.sum())} labels are not class indices 0, 1, 2, ... (first at row "
                         f"{i}: {y[i]!r}); encode the classes as integers starting at 0")
    y = yf.astype(np.int64)
    k = int(y.max()) + 1 if classes is None else int(classes)
    if classes is not None:
        if k < 2:
            raise InputError(f"--classes: expected at least 2 classes, got {classes}")
        if y.max() >= k:
            i = int(np.argmax(y >= k))
            raise InputError(f"--labels: label {int(y[i])} at row {i} is out of range for --classes {k} "
                             f"(labels must be in 0..{k - 1})")
    if k > MAX_CLASSES or max(n, weak.shape[1] + 1, strong.shape[1] + 1) * k > MAX_ENTRIES:
        source = "--classes" if classes is not None else f"--labels (largest label {k - 1})"
        raise InputError(f"{source}: {k} classes is too many for {n} samples and {max(weak.shape[1], strong.shape[1])}"
                         f" features (at most {MAX_CLASSES} classes and {MAX_ENTRIES:.0e} entries per array)")
    if np.unique(y).size < 2:
        raise InputError(f"--labels: all {n} labels are {int(y[0])}; at least two classes are needed")
    if n < 3 * MIN_SPLIT_ROWS:
        raise InputError(f"only {n} samples: the pipeline splits them into thirds and needs at least "
                         f"{3 * MIN_SPLIT_ROWS} rows")
    return weak, strong, y, k


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Centre and scale columns with the statistics of ``train`` (constant columns are only centred)."""
    mean = train.mean(axis=0)
    sd = train.std(axis=0)
    sd = np.where(sd > 1e-12 * (1 + np.abs(mean)), sd, 1.0)
    return [(a - mean) / sd for a in (train, *others)]


def _split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    a, b = n // 3, 2 * n // 3
    return order[:a], order[a:b], order[b:]


# --------------------------------------------------------------------------------------------------------
# Heads fitted on labels
# --------------------------------------------------------------------------------------------------------


def fit_softmax_ridge(features: np.ndarray, labels: np.ndarray, k: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    r"""L2-regularised multinomial logistic regression (a softmax head fitted to hard labels):

    .. math:: \min_{W, b}\ \frac1n\sum_i -\log\mathrm{softmax}(W h_i + b)_{y_i} + \frac{\lambda}{2}\|W\|_F^2

    (the bias is not penalised). Strictly convex, so L-BFGS (scipy) finds the unique minimiser; returns
    ``W (k, m)`` and ``b (k,)``.
    """
    n, m = features.shape
    Y = np.zeros((n, k))
    Y[np.arange(n), labels] = 1.0

    def objective(theta):
        W, b = theta[: k * m].reshape(k, m), theta[k * m :]
        logp = log_softmax(features @ W.T + b, axis=1)
        residual = (np.exp(logp) - Y) / n
        value = -(Y * logp).sum() / n + 0.5 * l2 * (W**2).sum()
        grad = np.concatenate([(residual.T @ features + l2 * W).ravel(), residual.sum(axis=0)])
        return value, grad

    result = minimize(objective, np.zeros(k * (m + 1)), jac=True, method="L-BFGS-B",
                      options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-15})
    theta = result.x
    return theta[: k * m].reshape(k, m), theta[k * m :]


def _softmax_probs(W: np.ndarray, b: np.ndarray, features: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(features @ W.T + b, axis=1))


def _error(labels: np.ndarray, probs: np.ndarray) -> float:
    r""":math:`\mathbb E\,\mathrm{KL}(F^*\|F)` for one-hot :math:`F^*`: the mean of :math:`-\log F_y`."""
    with np.errstate(divide="ignore"):
        return float(-np.log(probs[np.arange(labels.size), labels]).mean())


def _accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


# --------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------


def _one_split(weak, strong, y, k, settings: ByoSettings, repeat: int) -> dict:
    from .bounds import sqrt_bound

    a, b, c = _split(y.size, rng_for(settings.seed, "byo-split", repeat))
    weak_a, weak_b, weak_c = _standardise(weak[a], weak[b], weak[c])
    strong_b, strong_c = _standardise(strong[b], strong[c])
    W, bias = fit_softmax_ridge(weak_a, y[a], k, settings.l2)
    teacher_b, teacher_c = _softmax_probs(W, bias, weak_b), _softmax_probs(W, bias, weak_c)
    if settings.noise > 0:
        teacher_b, _ = flip_labels(teacher_b, settings.noise, rng_for(settings.seed, "byo-noise", repeat))
    Wc, bc = fit_softmax_ridge(strong_b, y[b], k, settings.l2)
    ceiling_c = _softmax_probs(Wc, bc, strong_c)
    out = {
        "weak": {"accuracy": _accuracy(y[c], teacher_c), "kl_error": _error(y[c], teacher_c)},
        "ceiling": {"accuracy": _accuracy(y[c], ceiling_c), "kl_error": _error(y[c], ceiling_c)},
        "sizes": (a.size, b.size, c.size),
    }
    truth_b = np.eye(k)[y[b]]
    for loss in settings.losses:
        try:
            result = fit(strong_b, teacher_b, loss=loss, head="softmax", device=settings.device)
        except ValueError as exc:  # e.g. a teacher probability that underflowed to 0 under a reverse loss
            raise InputError(f"{loss} student: {str(exc).splitlines()[0]}") from None
        probs_b = to_numpy(result.probs)[0]
        probs_c = to_numpy(predict("softmax", result.params,
                                   torch.as_tensor(strong_c, device=result.probs.device)))[0]
        # The misfit in the trained direction, the in-sample gain and Lemma 1's check, all from one formula.
        direction = "reverse" if loss.startswith("reverse") else "forward"
        lemma = sqrt_bound(truth_b, teacher_b, probs_b, direction=direction)
        misfit, gain_train = float(lemma.details["misfit"]), float(lemma.details["gain"])
        applicable = bool(lemma.details["applicable"])
        row = {
            "accuracy": _accuracy(y[c], probs_c),
            "kl_error": _error(y[c], probs_c),
            "misfit": misfit,
            "gain": out["weak"]["kl_error"] - _error(y[c], probs_c),
            "gain_train": gain_train,
            "converged": bool(result.converged[0]),
            "gain_ge_misfit": bool(gain_train >= misfit),
            "sqrt_ratio": abs(float(lemma.details["ratio"])) if misfit > 0 else float("nan"),
            "gamma": float(lemma.details["floor"]),
        }
        if applicable:
            row["provable_constant"] = float(lemma.details["constant"])
            row["sharp_constant"] = float(lemma.details["sharp_constant"])
            row["sqrt_bound_holds"] = str(lemma.verdict) == "holds"
        acc_w, acc_c = out["weak"]["accuracy"], out["ceiling"]["accuracy"]
        row["pgr"] = (row["accuracy"] - acc_w) / (acc_c - acc_w) if abs(acc_c - acc_w) > 1e-12 else float("nan")
        out[loss] = row
    return out


def _mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if v.size < 2 or not np.all(np.isfinite(v)):
        return mean, float("nan")
    return mean, float(v.std(ddof=1) / math.sqrt(v.size))


def run_byo(weak_features, strong_features, labels, settings: ByoSettings = ByoSettings(),
            classes: int | None = None, progress=None) -> dict:
    """The full pipeline on user arrays (module docstring). Returns the report: one entry per loss with
    ``accuracy``, ``kl_error``, ``misfit``, ``gain``, ``pgr`` (means over the ``repeats`` splits, each with a
    ``*_se`` standard error), the guarantee check (``gain_ge_misfit`` and ``sqrt_bound_holds``: the fraction
    of splits where it held), and the ``weak`` and ``ceiling`` references; ``settings`` records the run."""
    weak, strong, y, k = check_inputs(weak_features, strong_features, labels, classes)
    splits = []
    # One student is a small dense problem: on a shared CPU, extra torch threads mostly wait for each other
    # (measured: `study --demo digits --repeats 3` took 330 s with 2 threads on a busy 2-core machine, 5 s
    # with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(settings.repeats):
            splits.append(_one_split(weak, strong, y, k, settings, r))
            if progress:
                progress(f"split {r + 1}/{settings.repeats} done")
    finally:
        torch.set_num_threads(threads)
    report: dict = {}
    for name in ("weak", "ceiling"):
        report[name] = {}
        for key in ("accuracy", "kl_error"):
            report[name][key], report[name][f"{key}_se"] = _mean_se([s[name][key] for s in splits])
    for loss in settings.losses:
        entry: dict = {}
        for key in ("accuracy", "kl_error", "misfit", "gain", "pgr", "gain_train", "sqrt_ratio"):
            entry[key], entry[f"{key}_se"] = _mean_se([s[loss][key] for s in splits])
        for key in ("gain_ge_misfit", "sqrt_bound_holds", "converged"):
            flags = [s[loss][key] for s in splits if key in s[loss]]
            entry[key] = float(np.mean(flags)) if flags else float("nan")
        entry["gamma"] = float(min(s[loss]["gamma"] for s in splits))
        if entry["gamma"] > 0:
            from .bounds import provable_sqrt_constant, sharp_binary_constant

            entry["provable_constant"] = float(provable_sqrt_constant(entry["gamma"]))
            entry["sharp_constant"] = float(sharp_binary_constant(entry["gamma"]))
        report[loss] = entry
    report["settings"] = {**asdict(settings), "losses": list(settings.losses), "n": int(y.size), "classes": k,
                          "weak_dim": int(weak.shape[1]), "strong_dim": int(strong.shape[1]),
                          "split_sizes": list(splits[0]["sizes"])}
    return report


REPORT_COLUMNS = [("model", "model"), ("accuracy", "test accuracy"), ("kl_error", "KL error"),
                  ("misfit", "misfit (B)"), ("gain", "gain"), ("pgr", "PGR"),
                  ("gain_ge_misfit", "gain>=misfit"), ("sqrt_bound_holds", "sqrt-bound"),
                  ("sqrt_ratio", "|gain|/sqrt(misfit) (sharp C*)")]


def _pm(mean: float, se: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "inf" if mean == math.inf else ("-inf" if mean == -math.inf else "nan")
    if not math.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def report_rows(report: dict) -> list[dict]:
    """Table rows (strings): the weak teacher, each loss, the strong ceiling."""
    R = report["settings"]["repeats"]
    rows = [{"model": "weak teacher", "accuracy": _pm(report["weak"]["accuracy"], report["weak"]["accuracy_se"]),
             "kl_error": _pm(report["weak"]["kl_error"], report["weak"]["kl_error_se"])}]
    for loss in report["settings"]["losses"]:
        e = report[loss]
        rows.append({"model": loss, "accuracy": _pm(e["accuracy"], e["accuracy_se"]),
                     "kl_error": _pm(e["kl_error"], e["kl_error_se"]), "misfit": _pm(e["misfit"], e["misfit_se"], 4),
                     "gain": _pm(e["gain"], e["gain_se"]), "pgr": _pm(e["pgr"], e["pgr_se"], 2),
                     "gain_ge_misfit": f"{round(e['gain_ge_misfit'] * R)}/{R}",
                     "sqrt_bound_holds": (f"{round(e['sqrt_bound_holds'] * R)}/{R}"
                                          if math.isfinite(e["sqrt_bound_holds"]) else "n/a"),
                     "sqrt_ratio": (f"{e['sqrt_ratio']:.3g} ({e['sharp_constant']:.3g})" if "sharp_constant" in e
                                    else "n/a")})
    rows.append({"model": "strong ceiling",
                 "accuracy": _pm(report["ceiling"]["accuracy"], report["ceiling"]["accuracy_se"]),
                 "kl_error": _pm(report["ceiling"]["kl_error"], report["ceiling"]["kl_error_se"])})
    return rows


def format_report(report: dict, markdown: bool = False) -> str:
    """The loss-comparison table (plain text, or a markdown table) with the guarantee check."""
    rows = report_rows(report)
    if markdown:
        cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731 - a pipe would end the cell
        lines = ["| " + " | ".join(cell(h) for _, h in REPORT_COLUMNS) + " |",
                 "|" + "---|" * len(REPORT_COLUMNS)]
        lines += ["| " + " | ".join(cell(r.get(key, "")) for key, _ in REPORT_COLUMNS) + " |" for r in rows]
        return "\n".join(lines)
    from .io import format_table

    return format_table(rows, REPORT_COLUMNS)


# --------------------------------------------------------------------------------------------------------
# Demos on datasets bundled with scikit-learn (no download)
# --------------------------------------------------------------------------------------------------------

DEMOS = {
    "digits": "scikit-learn's 8x8 handwritten digits (1797 images, 10 classes): weak = the fraction of inked "
              "pixels (intensity >= 8 of 16) in each image quadrant (4 features), strong = the 4x4 thumbnail "
              "(2x2 average pooling, 16 features)",
}


def load_demo(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(weak_features, strong_features, labels)`` of a bundled demo (:data:`DEMOS`); needs scikit-learn
    (``pip install 'w2s-theory[demo]'``)."""
    if name not in DEMOS:
        raise InputError(f"unknown demo {name!r}; choose one of: {', '.join(DEMOS)}")
    try:
        from sklearn import datasets
    except ImportError:
        raise InputError("the demos use datasets bundled with scikit-learn: pip install 'w2s-theory[demo]'") from None
    X, y = datasets.load_digits(return_X_y=True)
    images = X.reshape(-1, 8, 8)
    # The weak features are a thresholded (nonlinear) summary: a weak view that is a linear function of the
    # strong one makes the teacher a member of the student's class, and every student then copies it exactly
    # (tried first with quadrant means and the 64 pixels: misfit 0, gain 0 for every loss).
    weak = (images >= 8).reshape(-1, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(-1, 4)
    # A 4x4 thumbnail rather than the 64 pixels keeps the 10-class softmax students small (16 x 9 parameters
    # instead of 64 x 9): the reverse-CE fit on 64 pixels took about 40 s per split on a 2-core CPU.
    strong = images.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
    return weak, strong, y
