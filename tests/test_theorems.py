"""Theorem checks: property tests of the guarantee table rows available on the certified core."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import distributions
from w2s_theory.bregman import verdict
from w2s_theory.divergences import as_categorical
from w2s_theory.solvers import fit
from w2s_theory.theorems import forward_kl_pythagorean, theorem2_reverse_kl


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_reverse_kl_projection_satisfies_pythagorean_inequality(data):
    # Theorem 2 on random realizable instances, with teachers and features at 0/1 and k = 2 or k > 2.
    k = data.draw(st.sampled_from([2, 3, 4]))
    m = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(1, 15))
    features = data.draw(distributions(n=n, k=m))
    teacher = data.draw(distributions(n=n, k=k))
    head = data.draw(distributions(n=m, k=k)).T  # (k, m) column-stochastic
    truth = features @ head.T
    student = fit(features, teacher, loss="reverse_kl")
    result = theorem2_reverse_kl(truth[None], teacher[None], student.probs, student.gap)
    assert result.verdict[0] == "holds", result.summary()
    assert result.slack[0] >= -result.certificate[0]


def test_theory_md_forward_counterexample_is_certified():
    truth = as_categorical(np.full((1, 3), 0.0053))
    teacher = as_categorical(np.array([[0.761, 0.034, 0.016]]))
    student = np.broadcast_to(teacher.mean(1, keepdims=True), teacher.shape)
    result = forward_kl_pythagorean(truth, teacher, student, 0.0)
    assert result.verdict[0] == "violated"
    assert np.isclose(result.rhs[0] - result.lhs[0], -0.1388, atol=1e-4)
    # The solver-based student gives the same verdict with a certificate
    fitted = fit(np.ones((3, 1)), teacher[0], loss="forward_kl")
    solved = forward_kl_pythagorean(truth, teacher, fitted.probs, fitted.gap)
    assert solved.verdict[0] == "violated" and solved.certificate[0] < 1e-4


def test_reverse_projection_attains_equality_on_the_constant_class():
    truth = as_categorical(np.full((1, 3), 0.0053))
    teacher = as_categorical(np.array([[0.761, 0.034, 0.016]]))
    student = fit(np.ones((3, 1)), teacher[0], loss="reverse_kl")
    result = theorem2_reverse_kl(truth, teacher, student.probs, student.gap)
    assert result.verdict[0] == "holds" and abs(result.slack[0]) < 1e-9


def test_verdict_rules_follow_design():
    assert verdict(-1e-3, 1e-2, 1e-12) == "holds"
    assert verdict(-1e-3, 1e-4, 1e-12) == "violated"
    assert verdict(-1e-4 - 5e-13, 1e-4, 1e-12) == "inconclusive"
    assert verdict(-1.0, np.nan, 0.0) == "inconclusive"
    assert verdict(np.inf, np.nan, 0.0) == "holds"
    assert verdict(1e-3, 1e-4, 1e-12, equality=True) == "violated"
    assert verdict(1e-5, 1e-4, 1e-12, equality=True) == "holds"
