r"""Shared machinery of the four :math:`\sqrt\cdot`-bound checks (upper/lower x forward/reverse :math:`d`).

Instances (all with teacher and student probabilities at least a floor, the lemma's hypothesis):

* **random**: features in the simplex, arbitrary truths (the bound needs no realizability), teachers
  floored at :math:`\gamma_0 = 0.02`; students = the linear head with floor :math:`\gamma_0` (cvxpy reference,
  Frank–Wolfe certified) trained with the KL and the CE loss of the direction, and softmax students (forward:
  self-concordance certified; reverse: uncertified, which does not matter for this bound);
* **synthetic pipeline**: a small world (:mod:`w2s_theory.synthetic`), its weak teacher on split B floored at
  :math:`\gamma_0`, linear-head students with the same floor on the strong features;
* **sharp path**: :func:`w2s_theory.bounds.sharp_limit_instance` at :math:`\gamma \in \{10^{-3}, 10^{-2}, 0.1\}`,
  the instances that bring the ratio close to the sharp constant, so that the reported tightness shows how
  much of :math:`1/(\sqrt2\gamma)` can ever be used.

Each student is checked with the loss it was trained with (KL or CE) and the floor of its own instance.
Tightness = (left side) / :math:`C\sqrt d`; ``ratio_over_sharp`` = empirical constant / :math:`C^*(\gamma)`.
"""

from __future__ import annotations

import numpy as np

from w2s_theory._backend import to_numpy
from w2s_theory.bounds import sharp_limit_instance, sqrt_bound
from w2s_theory.checks import outcome_from_results
from w2s_theory.instances import random_simplex_rows
from w2s_theory.pipeline import RunSpec, prepare_world
from w2s_theory.solvers import fit
from w2s_theory.synthetic import WorldConfig

FLOOR = 0.02
#: Instances per student kind (random family) and worlds (pipeline family), by mode.
SIZES = {"quick": {"random": 6, "worlds": 1, "n_train": 40}, "full": {"random": 40, "worlds": 4, "n_train": 80}}


def floored(rows: np.ndarray, gamma: float) -> np.ndarray:
    """Rows mixed with the uniform distribution so that every entry is at least ``gamma`` (a legitimate
    teacher: ``(1 - k gamma) q + gamma``)."""
    k = rows.shape[-1]
    return (1 - k * gamma) * rows + gamma


def _largest_gap(gap) -> float:
    """Largest certified gap of a batch; NaN when the student has no certificate (softmax, reverse loss)."""
    gap = np.asarray(gap, dtype=float)
    return float(np.max(gap)) if np.isfinite(gap).any() else float("nan")


def _students(features, teacher, direction):
    """(loss name, 'kl'/'ce', student probs, gap) for the linear head with floor and the softmax head."""
    losses = ("forward_kl", "forward_ce") if direction == "forward" else ("reverse_kl", "reverse_ce")
    out = []
    for loss in losses:
        st = fit(features, teacher, loss=loss, head="linear", gamma=FLOOR)
        out.append((f"linear/{loss}", loss.split("_")[1], to_numpy(st.probs), to_numpy(st.gap)))
    # Softmax students: reverse CE has no minimiser (its infimum is a vertex) and would leave the floor, so
    # the softmax head is trained with the KL loss of the direction only.
    kl_loss = losses[0]
    st = fit(features, teacher, loss=kl_loss, head="softmax")
    out.append((f"softmax/{kl_loss}", "kl", to_numpy(st.probs), to_numpy(st.gap)))
    return out


def run_sqrt_bound(side: str, direction: str, quick: bool, seed: int):
    rng = np.random.default_rng([seed, 41, ["upper", "lower"].index(side), ["forward", "reverse"].index(direction)])
    results, student_gaps = [], []  # student_gaps: the largest certified gap of each batch (NaN: none)
    size = SIZES["quick" if quick else "full"]
    batch = size["random"]
    k, m, n = 3, 3, 12
    features = random_simplex_rows(rng, (n,), m, 0.7)
    truth = random_simplex_rows(rng, (batch, n), k, 0.5, zero_fraction=0.2)
    teacher = floored(random_simplex_rows(rng, (batch, n), k, 0.5), FLOOR)
    for label, loss, probs, gap in _students(features, teacher, direction):
        results.append(sqrt_bound(truth, teacher, probs, side=side, direction=direction, loss=loss,
                                  name=f"random {label}"))
        student_gaps.append(_largest_gap(gap))

    world = WorldConfig(k=3, strong_dim=8, weak_dim=4)
    for world_seed in range(size["worlds"]):
        spec = RunSpec(world=world, seed=seed * 100 + world_seed, n_weak=200, n_train=size["n_train"],
                       n_test=10)
        data = prepare_world(spec)
        teacher_b = floored(data.teacher_train, FLOOR)
        for label, loss, probs, gap in _students(data.strong_train, teacher_b, direction):
            results.append(sqrt_bound(data.truth_train[None], teacher_b[None], probs, side=side,
                                      direction=direction, loss=loss, name=f"pipeline {label}"))
            student_gaps.append(_largest_gap(gap))

    for gamma in (1e-3, 1e-2, 0.1):
        tau = np.logspace(-1, -4, 4)
        sign = 1 if side == "lower" else -1  # the lower bound is stressed by gain > 0, the upper by gain < 0
        truth_s, teacher_s, student_s = sharp_limit_instance(gamma, tau, sign=sign)
        results.append(sqrt_bound(truth_s, teacher_s, student_s, side=side, direction=direction,
                                  name=f"sharp path gamma={gamma:g}"))
        student_gaps.append(0.0)  # explicit instances, nothing fitted

    applicable = np.concatenate([np.ravel(r.details["applicable"]) for r in results])
    tight = np.concatenate([np.ravel(r.details["tightness"]) for r in results])
    over_sharp = np.concatenate([np.ravel(np.abs(r.details["ratio"]) / r.details["sharp_constant"])
                                 for r in results])
    per_family = {
        r.name: {"max_tightness": float(np.max(r.details["tightness"])),
                 "median_tightness": float(np.median(r.details["tightness"])),
                 "max_ratio_over_sharp": float(np.max(np.abs(r.details["ratio"]) / r.details["sharp_constant"])),
                 "min_floor": float(np.min(r.details["floor"])), "student_gap": gap}
        for r, gap in zip(results, student_gaps)
    }
    return outcome_from_results(
        results, not_applicable=int((~applicable).sum()),
        max_tightness=float(np.max(tight[applicable])), median_tightness=float(np.median(tight[applicable])),
        max_ratio_over_sharp=float(np.max(over_sharp[applicable])), families=per_family,
    )
