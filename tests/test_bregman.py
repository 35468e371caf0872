"""One theorem, many instances: the Bregman projection inequality, its non-realizable correction and the
certificate for the exact minimiser, each instantiated for KL (negative entropy) and squared loss."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import distributions, interior_distributions
from w2s_theory._backend import to_numpy
from w2s_theory.bregman import (
    GENERATORS,
    LOG_PARTITION,
    NEGATIVE_ENTROPY,
    SQUARED_NORM,
    misspecification_bound,
    misspecification_term,
    nonrealizable_projection_inequality,
)
from w2s_theory.instances import random_mixture_problem, random_simplex_rows
from w2s_theory.solvers import fit
from w2s_theory.synthetic import corrupt_truth
from w2s_theory.theorems import (
    charikar_nonrealizable,
    charikar_squared_at_minimiser,
    reverse_kl_nonrealizable,
    reverse_kl_pythagorean_at_minimiser,
    squared_affine_certificate,
)


def assert_not_refuted(result):
    """The certificate-aware tolerance of a theorem: the computed slack is at least minus the certificate, up to
    the rounding bound of its evaluation. (At eps = 0 with an affine class the inequality is an equality and the
    slack is rounding noise; there the verdict may be "inconclusive", never "violated".)"""
    assert result.verdict[0] != "violated", result.summary()
    assert result.slack[0] >= -result.certificate[0] - result.rounding[0]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(GENERATORS)), st.data())
def test_three_point_identity_holds_for_every_generator(name, data):
    generator = GENERATORS[name]
    n, k = data.draw(st.integers(1, 6)), data.draw(st.sampled_from([2, 3, 5]))
    G, T, P = (data.draw(interior_distributions(n=n, k=k)) for _ in range(3))
    if name == "log_partition":  # points are logits
        G, T, P = np.log(G), np.log(T), np.log(P)
    D = generator.divergence
    lhs = D(G, T).mean(-1) - D(G, P).mean(-1) - D(P, T).mean(-1)
    rhs = (generator.gradient_difference(P, T) * (G - P)).sum(-1).mean(-1)
    assert np.isclose(lhs, rhs, atol=1e-12, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["negative_entropy", "squared_norm"]), st.data())
def test_holder_bound_dominates_the_misspecification_term(name, data):
    generator = GENERATORS[name]
    n, k = data.draw(st.integers(1, 6)), data.draw(st.sampled_from([2, 3]))
    A = data.draw(distributions(n=n, k=k))
    G, T, P = (data.draw(interior_distributions(n=n, k=k)) for _ in range(3))
    exact = misspecification_term(generator, A, G, T, P)
    assert abs(exact) <= misspecification_bound(generator, A, G, T, P) * (1 + 1e-12) + 1e-15


def test_generators_without_a_part_say_so():
    with pytest.raises(NotImplementedError, match="holder_bound"):
        misspecification_bound(LOG_PARTITION, *(np.zeros((1, 2, 2)),) * 4)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_reverse_kl_correction_holds_for_truths_outside_the_class(data):
    k = data.draw(st.sampled_from([2, 3]))
    m = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(2, 15))
    features = data.draw(distributions(n=n, k=m))
    head = data.draw(distributions(n=m, k=k)).T
    G = features @ head.T
    eps = data.draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    truth = (1 - eps) * G + eps * data.draw(distributions(n=n, k=k))
    teacher = data.draw(interior_distributions(n=n, k=k))
    st_ = fit(features, teacher, loss="reverse_kl")
    P = to_numpy(st_.probs)
    gap = to_numpy(st_.gap)
    result = reverse_kl_nonrealizable(truth[None], teacher[None], P, gap, G[None])
    assert_not_refuted(result)
    assert result.details["correction"][0] >= abs(result.details["misspecification"][0]) * (1 - 1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 30), st.integers(1, 4), st.sampled_from([None, 1.0]), st.sampled_from([0.0, 0.3, 2.0]),
       st.integers(0, 10_000))
def test_charikar_correction_holds_for_truths_outside_the_class(n, m, radius, eps, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(1, n, m))
    truth = X[..., 0] * rng.normal() + eps * np.cos(3 * X[..., -1])
    weak = truth + rng.normal(size=truth.shape)
    st_ = fit(X, weak[..., None], loss="squared", head="squared", radius=radius)
    ref = fit(X, truth[..., None], loss="squared", head="squared", radius=radius)
    P, G = to_numpy(st_.probs)[..., 0], to_numpy(ref.probs)[..., 0]
    gap = to_numpy(st_.gap)
    cert = squared_affine_certificate(gap, G, P) if radius is None else gap
    result = charikar_nonrealizable(truth, weak, P, G, cert)
    assert_not_refuted(result)


def test_plain_inequality_fails_with_a_certificate_once_the_truth_leaves_the_class():
    rng = np.random.default_rng(3)
    problem = random_mixture_problem(rng, batch=20, n=30, m=3, k=3)
    truth = 0.7 * problem.truth + 0.3 * random_simplex_rows(rng, (20, 30), 3)
    teacher = np.stack([corrupt_truth(t, 0.2, rng) for t in truth])
    st_ = fit(problem.features, teacher, loss="reverse_kl")
    plain = reverse_kl_pythagorean_at_minimiser(truth, teacher, st_.probs, st_.gap)
    assert plain.count("violated") >= 15
    corrected = reverse_kl_nonrealizable(truth, teacher, st_.probs, st_.gap, problem.truth)
    assert corrected.count("holds") == 20


@pytest.mark.parametrize("generator", ["negative_entropy", "squared_norm"])
def test_minimiser_certificate_covers_the_distance_between_a_rough_and_a_fine_solution(generator):
    # The certificate of projection_inequality_at_minimiser bounds |slack(rough) - slack(exact)|: a fine solve
    # stands in for the exact minimiser (its own certificate is added).
    rng = np.random.default_rng(5)
    if generator == "negative_entropy":
        problem = random_mixture_problem(rng, batch=30, n=25, m=4, k=3, teacher="corrupt")
        truth = 0.6 * problem.truth + 0.4 * random_simplex_rows(rng, (30, 25), 3)
        rough = fit(problem.features, problem.teacher, loss="reverse_kl", tol=1e-5, max_iter=3)
        fine = fit(problem.features, problem.teacher, loss="reverse_kl", tol=1e-13)
        a = reverse_kl_pythagorean_at_minimiser(truth, problem.teacher, rough.probs, rough.gap)
        b = reverse_kl_pythagorean_at_minimiser(truth, problem.teacher, fine.probs, fine.gap)
    else:
        X = rng.normal(size=(30, 25, 3))
        truth = X[..., 0] + np.sin(X[..., 1])
        weak = truth + rng.normal(size=truth.shape)
        fine = fit(X, weak[..., None], loss="squared", head="squared", radius=0.5)
        P = to_numpy(fine.probs)[..., 0]
        gap = to_numpy(fine.gap)
        # a rough point: the fine one moved a little inside the ball, with its (larger) exact gap bound
        rough_theta = 0.97 * to_numpy(fine.params["theta"])
        Z = np.concatenate([X, np.ones((*X.shape[:-1], 1))], -1)
        rough_P = (Z @ rough_theta)[..., 0]
        g = 2 / 25 * np.swapaxes(Z, -1, -2) @ (rough_P - weak)[..., None]
        rough_gap = (g * rough_theta).sum((-1, -2)) + 0.5 * np.linalg.norm(g, axis=(-1, -2))
        a = charikar_squared_at_minimiser(truth, weak, rough_P, rough_gap)
        b = charikar_squared_at_minimiser(truth, weak, P, gap)
    assert (a.certificate > 1e-10).all()  # the rough solutions are genuinely rough
    assert np.all(np.abs(a.slack - b.slack) <= a.certificate + b.certificate + a.rounding + b.rounding)


def test_projection_check_records_its_terms():
    rng = np.random.default_rng(0)
    A, G, T, P = (random_simplex_rows(rng, (2, 4), 3) for _ in range(4))
    check = nonrealizable_projection_inequality(NEGATIVE_ENTROPY, A, G, T, P, np.zeros(2))
    assert set(check.terms) == {"plain_slack", "correction", "misspecification", "misfit"}
    assert np.allclose(check.slack - check.terms["plain_slack"], check.terms["correction"])
    sq = nonrealizable_projection_inequality(SQUARED_NORM, A, G, T, P, np.zeros(2))
    assert np.allclose(sq.terms["correction"], 2 * np.sqrt(((P - T) ** 2).sum(-1).mean(-1)
                                                           * ((A - G) ** 2).sum(-1).mean(-1)))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["negative_entropy", "squared_norm"]), st.sampled_from([1e-6, 1e-3, 1e-1]), st.data())
def test_truth_term_perturbation_bounds_the_change_of_the_truth_term(name, scale, data):
    # For any P, P0 with E D(P, P0) <= eps the bound covers |E D(A, P) - E D(A, P0)|.
    generator = GENERATORS[name]
    n, k = data.draw(st.integers(1, 8)), data.draw(st.sampled_from([2, 3]))
    A = data.draw(distributions(n=n, k=k))
    P = data.draw(interior_distributions(n=n, k=k))
    P0 = (1 - scale) * P + scale * data.draw(interior_distributions(n=n, k=k))
    eps = generator.divergence(P, P0).mean(-1)
    change = abs(generator.divergence(A, P).mean(-1) - generator.divergence(A, P0).mean(-1))
    assert change <= generator.truth_term_perturbation(A[None], P[None], np.array([eps]))[0] * (1 + 1e-9) + 1e-15


def test_truth_term_perturbation_reads_a_slightly_negative_divergence_as_zero():
    # E KL(P, P0) computed for P0 == P can come out at -7e-18 (found by hypothesis); the bound is then 0, not NaN
    A, P = np.array([[[1.0, 0.0]]]), np.array([[[0.03931632275609002, 0.96068367724391]]])
    for name in ("negative_entropy", "squared_norm"):
        bound = GENERATORS[name].truth_term_perturbation(A, P, np.array([-6.938893903907228e-18]))
        assert np.array_equal(bound, [0.0])
