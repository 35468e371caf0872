r"""The forward-KL analogue of Theorem 2 is false (docs/theory.md, guarantee table).

.. math::

    \mathbb E\,\mathrm{KL}(F^*\|F_{sw}) \;\le\; \mathbb E\,\mathrm{KL}(F^*\|F_w) - \mathbb E\,\mathrm{KL}(F_w\|F_{sw})
    \quad\text{fails for}\quad F_{sw} = \arg\min_{F\in\mathcal F}\mathbb E\,\mathrm{KL}(F_w\|F).

Search: the constant class (mixture head with m = 1, binary) on three points, where the forward projection
is the arithmetic mean of the teacher (exact, certificate 0), seeded with docs/theory.md's minimal example
(F* = 0.0053, F_w = (0.761, 0.034, 0.016)); then random mixture-head instances fitted by the solver, whose
violations are certified by the strong-convexity bound of :func:`w2s_theory.theorems.forward_kl_pythagorean`.
Expected: a certified counterexample exists.
"""

import numpy as np

from w2s_theory.checks import PaperCheck, outcome_from_results
from w2s_theory.divergences import as_categorical
from w2s_theory.instances import random_mixture_problem
from w2s_theory.solvers import fit
from w2s_theory.theorems import forward_kl_pythagorean


def constant_class_instances(rng, count):
    """Binary, three points: truth constant, teacher arbitrary; first row is docs/theory.md's example."""
    truth_p = np.concatenate([[0.0053], rng.uniform(0.001, 0.999, count - 1)])
    teacher_p = np.concatenate([[[0.761, 0.034, 0.016]], rng.uniform(0.001, 0.999, (count - 1, 3))])
    truth = as_categorical(np.repeat(truth_p[:, None], 3, axis=1))
    teacher = as_categorical(teacher_p)
    student = np.broadcast_to(teacher.mean(axis=1, keepdims=True), teacher.shape)  # exact forward projection
    return truth, teacher, student


def run(quick: bool, seed: int):
    rng = np.random.default_rng([seed, 3])
    truth, teacher, student = constant_class_instances(rng, 200 if quick else 5000)
    exact = forward_kl_pythagorean(truth, teacher, student, 0.0)
    problem = random_mixture_problem(rng, batch=50 if quick else 500, n=30, m=3, k=2, teacher="dirichlet",
                                     teacher_concentration=0.3)
    fitted = fit(problem.features, problem.teacher, loss="forward_kl", head="mixture")
    solved = forward_kl_pythagorean(problem.truth, problem.teacher, fitted.probs, fitted.gap)
    return outcome_from_results([exact, solved], closed_form_violations=exact.count("violated"),
                                solver_violations=solved.count("violated"))


CHECK = PaperCheck(
    name="forward_kl_counterexample",
    claim="forward KL, convex head: the Theorem-2 inequality can fail",
    source="docs/theory.md (constant-class counterexample)",
    expected="counterexample",
    run=run,
    statement=__doc__,
)
