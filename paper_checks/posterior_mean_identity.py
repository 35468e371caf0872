r"""The posterior-mean identity (Xu, Yao, Wang, Liu 2025, arXiv 2505.24313), for KL with the student first.

For random teachers :math:`Y` (here: weak heads fitted on bootstrap resamples of one labelled sample) let
:math:`\bar p\propto\exp(\mathbb E\log Y)` be their normalised geometric mean. Then for every truth
:math:`F^*`, pointwise in :math:`x` and with no convexity assumption,

.. math:: \mathbb E_Y\,\mathrm{KL}(F^*\|Y) = \mathrm{KL}(F^*\|\bar p) + \mathbb E_Y\,\mathrm{KL}(\bar p\|Y):

expected gain equals expected misfit for the posterior-mean student. Derivation (``docs/checks/field_theorems.md``):
with :math:`Z = \sum_y e^{\mathbb E\log Y_y}`, :math:`\mathbb E\log Y = \log\bar p + \log Z`, so
:math:`\mathbb E\,\mathrm{KL}(F^*\|Y) = \mathrm{KL}(F^*\|\bar p) - \log Z` and
:math:`\mathbb E\,\mathrm{KL}(\bar p\|Y) = -\log Z`. Checked as an equality to within a rounding bound
(:func:`w2s_theory.bregman.rounding_bound`); no solver is involved, so no certificate beyond rounding.

For a student that is one teacher :math:`S = Y_1` instead, the same computation gives
:math:`\mathbb E\,\mathrm{KL}(F^*\|Y) - \mathrm{KL}(F^*\|S) - \mathbb E\,\mathrm{KL}(S\|Y) = \langle F^* - S,
\log(S/\bar p)\rangle`, which can have either sign: the check reports how often gain < misfit for it.
Form: reconstructed here from the abstract's statement (the paper's theorem was not readable here).
Default size: 6 instances x 8 bootstrap teachers (quick), 30 x 16 (full).
"""

import numpy as np

from w2s_theory._backend import to_numpy
from w2s_theory.bregman import NEGATIVE_ENTROPY, rounding_bound, verdict
from w2s_theory.checks import CheckOutcome, PaperCheck
from w2s_theory.divergences import kl
from w2s_theory.instances import random_mixture_problem
from w2s_theory.solvers import fit


def bootstrap_teachers(rng, *, batch: int, R: int, n: int, m: int, k: int, n_labels: int = 60,
                       smoothing: float = 0.05):
    """A realizable truth on a mixture head and ``R`` weak teachers per instance, each a mixture head fitted
    (forward KL on one-hot labels, smoothed towards uniform by ``smoothing``) on a bootstrap resample of
    ``n_labels`` labelled points. Returns ``(truth (batch, n, k), teachers (batch, R, n, k))``."""
    problem = random_mixture_problem(rng, batch=batch, n=n, m=m, k=k)
    idx = rng.integers(0, n, size=(batch, n_labels))
    feats, labels = [], []
    for b in range(batch):
        x = problem.features[idx[b]]
        y = np.array([rng.choice(k, p=p) for p in problem.truth[b, idx[b]]])
        for _ in range(R):
            boot = rng.integers(0, n_labels, size=n_labels)
            feats.append(x[boot])
            labels.append((1 - smoothing) * np.eye(k)[y[boot]] + smoothing / k)
    weak = fit(np.stack(feats), np.stack(labels), loss="forward_kl", head="mixture")
    A = to_numpy(weak.params["A"]).reshape(batch, R, k, m)
    teachers = problem.features @ np.swapaxes(A, -1, -2)
    return problem.truth, teachers


def posterior_mean(Y):
    """The normalised geometric mean over axis 1 (the teachers): p_bar proportional to exp(E log Y)."""
    logY = np.log(Y)
    p_bar = np.exp(logY.mean(1) - logY.mean(1).max(-1, keepdims=True))
    return p_bar / p_bar.sum(-1, keepdims=True)


def run(quick: bool, seed: int):
    rng = np.random.default_rng([seed, 11, 3])
    batch, R = (6, 8) if quick else (30, 16)
    truth, Y = bootstrap_teachers(rng, batch=batch, R=R, n=50, m=5, k=3)
    p_bar = posterior_mean(Y)
    lhs = kl(truth[:, None], Y).mean(1)  # per (instance, x): E_Y KL(F*||Y)
    rhs = kl(truth, p_bar) + kl(p_bar[:, None], Y).mean(1)
    slack = (rhs - lhs).mean(-1)  # an equality: slack should be 0
    n_terms = int(np.prod(truth.shape[-2:])) * (R + 2)
    rnd = rounding_bound(NEGATIVE_ENTROPY, [(truth[:, None], Y), (p_bar[:, None], Y)], n_terms).mean(-1) \
        + rounding_bound(NEGATIVE_ENTROPY, [(truth, p_bar)], n_terms) + 64 * np.finfo(float).eps
    verdicts = np.asarray(verdict(slack, np.zeros_like(slack), rnd, equality=True))
    verdicts = np.where(np.abs(slack) <= rnd, "holds", verdicts)  # an exact identity: rounding is its tolerance
    # One teacher as the student: gain - misfit = <F* - S, log(S / p_bar)>, averaged over x.
    S = Y[:, 0]
    one_gap = (kl(truth[:, None], Y).mean(1) - kl(truth, S) - kl(S[:, None], Y).mean(1)).mean(-1)
    closed_form = ((truth - S) * (np.log(S) - np.log(p_bar))).sum(-1).mean(-1)
    i = int(np.argmax(np.abs(slack) - rnd))
    overall = "holds" if (verdicts == "holds").all() else ("violated" if (verdicts == "violated").any()
                                                            else "inconclusive")
    return CheckOutcome(overall, float(slack[i]), float(rnd[i]), int(slack.size), {
        "holds": int((verdicts == "holds").sum()), "violated": int((verdicts == "violated").sum()),
        "max_abs_identity_defect": float(np.abs(slack).max()),
        "one_teacher_gain_minus_misfit_min": float(one_gap.min()),
        "one_teacher_gain_minus_misfit_max": float(one_gap.max()),
        "one_teacher_fraction_gain_below_misfit": float((one_gap < 0).mean()),
        "one_teacher_closed_form_max_error": float(np.abs(one_gap - closed_form).max()),
        "provenance": "reconstructed", "teachers_per_instance": R})


CHECK = PaperCheck(
    name="posterior_mean_identity",
    claim="E KL(F*||Y) = KL(F*||p_bar) + E KL(p_bar||Y), p_bar the geometric mean of random teachers",
    source="Xu, Yao, Wang, Liu 2025 (arXiv 2505.24313), posterior-mean identity",
    expected="holds",
    run=run,
    statement=__doc__,
)
