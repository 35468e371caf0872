"""The guarantee table of docs/theory.md: its contract, its expected patterns, and the certificates behind its rows
(including the branch and bound that certifies the non-convex softmax reverse-KL fit)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from w2s_theory._backend import to_numpy
from w2s_theory.guarantees import (
    EXPECTED_PATTERNS,
    ROWS,
    certified_softmax_reverse_1d,
    guarantee_table,
    pattern_met,
    random_softmax_1d_instances,
    softmax_forward_certificate_terms,
    softmax_reverse_1d_result,
)
from w2s_theory.heads import SoftmaxHead
from w2s_theory.solvers import fit
from w2s_theory.theorems import charikar_squared, softmax_forward_identity, squared_affine_certificate

CONTRACT = ["head", "loss", "error_direction", "inequality", "expected", "instances", "holds", "violated",
            "inconclusive", "fraction_holds"]


@pytest.fixture(scope="module")
def table():
    return guarantee_table(quick=True, seed=0)


def test_guarantee_table_has_the_contract_columns_one_row_per_theory_md_row(table):
    assert list(table.columns[: len(CONTRACT)]) == CONTRACT
    assert len(table) == len(ROWS) == 8
    assert set(table["expected"]) <= set(EXPECTED_PATTERNS)
    assert (table["instances"] == table["holds"] + table["violated"] + table["inconclusive"]).all()
    assert np.allclose(table["fraction_holds"], table["holds"] / table["instances"])


def test_every_row_shows_its_expected_pattern(table):
    assert table["pattern_met"].all(), table[["head", "loss", "expected", "holds", "violated", "inconclusive"]]
    by_row = table.set_index(["head", "loss"])
    assert by_row.loc[("mixture", "reverse_kl"), "fraction_holds"] == 1.0
    assert by_row.loc[("mixture", "forward_kl"), "violated"] >= 1
    assert by_row.loc[("softmax", "forward_kl"), "expected"] == "equality"


def test_theory_md_small_amounts_claim_is_contradicted_only_for_softmax_reverse_kl(table):
    disagreements = table.loc[~table["theory_md_met"], ["head", "loss"]].values.tolist()
    assert disagreements == [["softmax", "reverse_kl"]]
    row = table[(table["head"] == "softmax") & (table["loss"] == "reverse_kl")].iloc[0]
    assert row["theory_md"] == "fails by small amounts" and row["large_violations"] >= 1
    assert row["worst_violation_over_misfit"] > 1


@pytest.mark.parametrize("expected,counts,met", [
    ("holds", (10, 0, 0), True), ("holds", (9, 0, 1), False), ("holds", (9, 1, 0), False),
    ("equality", (5, 0, 0), True), ("may fail", (8, 2, 0), True), ("may fail", (10, 0, 0), False),
    ("may fail", (0, 10, 0), False),
])
def test_pattern_met_reads_the_counts(expected, counts, met):
    assert pattern_met(expected, *counts) is met


def test_fails_by_small_amounts_needs_failures_none_of_them_large():
    assert pattern_met("fails by small amounts", 5, 3, 0, large_violations=0)
    assert not pattern_met("fails by small amounts", 5, 3, 0, large_violations=1)
    assert not pattern_met("fails by small amounts", 5, 0, 0)
    with pytest.raises(ValueError):
        pattern_met("usually", 1, 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# The one-parameter softmax family: a certified global minimiser of a non-convex fit
# ---------------------------------------------------------------------------------------------------------------


def _grid_minimum(z, teacher, radius=25.0, points=400_001):
    theta = np.linspace(-radius, radius, points)
    p = expit(theta[:, None] * z[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.nan_to_num(p * np.log(p / teacher) + (1 - p) * np.log((1 - p) / (1 - teacher)), nan=0.0).mean(-1)
    j = int(np.argmin(phi))
    return theta[j], phi[j]


def test_branch_and_bound_finds_the_global_minimum_of_a_dense_grid():
    rng = np.random.default_rng(2)
    z, ts, w = random_softmax_1d_instances(rng, 12, n=4)
    decided = certified_softmax_reverse_1d(z, ts, w)
    refined = certified_softmax_reverse_1d(z, ts, w, stop_when_decided=False)
    for b in range(12):
        theta_grid, phi_grid = _grid_minimum(z[b], w[b])
        assert refined.objective[b] <= phi_grid + 1e-12  # never worse than a 1.25e-4-spaced grid
        # the intervals of the early-stopped search contain the slack and gain of the refined minimiser
        lo, hi = decided.slack_interval[b]
        assert lo - 1e-9 <= refined.slack[b] <= hi + 1e-9
        lo, hi = decided.gain_interval[b]
        assert lo - 1e-9 <= refined.gain[b] <= hi + 1e-9
    assert decided.decided.mean() >= 0.9


def test_certified_counterexample_student_worse_than_its_teacher():
    # theta* = 4.31 makes the truth confident in class 0; a teacher that says the opposite pulls the reverse-KL
    # student to theta = -5.2, confidently wrong: the gain is about -2 nats, certified for every global minimiser.
    z, ts, w = np.array([[0.456, 1.341]]), np.array([4.31]), np.array([[0.074, 0.061]])
    solved = certified_softmax_reverse_1d(z, ts, w)
    gain = softmax_reverse_1d_result(z, ts, w, solved, quantity="gain")
    slack = softmax_reverse_1d_result(z, ts, w, solved, quantity="slack")
    assert gain.verdict[0] == "violated" and solved.gain_interval[0, 1] < -1.5
    assert slack.verdict[0] == "violated" and -slack.slack[0] > solved.misfit[0]


def test_branch_and_bound_rejects_teachers_at_the_boundary_and_truths_outside_the_class():
    with pytest.raises(ValueError, match="teacher"):
        certified_softmax_reverse_1d([[1.0, 2.0]], [0.5], [[0.0, 0.5]])
    with pytest.raises(ValueError, match="truth_theta"):
        certified_softmax_reverse_1d([[1.0, 2.0]], [30.0], [[0.3, 0.5]])


# ---------------------------------------------------------------------------------------------------------------
# Certificates of the other rows, as property tests
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 30), st.sampled_from([2, 3, 4]), st.sampled_from([1, 2, 3]), st.sampled_from(["corrupt", "arb"]),
       st.integers(0, 10_000))
def test_softmax_forward_projection_satisfies_the_identity(n, k, m, kind, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(1, n, m))
    W, b = rng.normal(size=(1, k, m)), rng.normal(size=(1, k))
    truth = np.asarray(SoftmaxHead.predict(W, b, X))
    teacher = np.exp(np.log(truth) + rng.normal(size=truth.shape)) if kind == "corrupt" else \
        rng.dirichlet(np.ones(k), size=(1, n))
    teacher /= teacher.sum(-1, keepdims=True)
    st_ = fit(X, teacher, loss="forward_kl", head="softmax")
    Wh, bh = to_numpy(st_.params["W"]), to_numpy(st_.params["b"])
    grad, dist = softmax_forward_certificate_terms(X, teacher, Wh, bh, W, b)
    result = softmax_forward_identity(np.asarray(SoftmaxHead.logits(W, b, X)), teacher,
                                      np.asarray(SoftmaxHead.logits(Wh, bh, X)), grad, dist)
    assert result.verdict[0] == "holds", result.summary()


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 5), st.sampled_from([None, 0.5, 3.0]), st.integers(0, 10_000))
def test_least_squares_projection_satisfies_charikar_with_honest_certificates(n, m, radius, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(1, n, m))
    theta = rng.normal(size=m + 1)
    if radius is not None:
        theta *= radius * rng.uniform(0.2, 1) / np.linalg.norm(theta)
    truth = X[0] @ theta[:m] + theta[m]
    weak = truth + rng.normal(size=n) * rng.uniform(0, 2)
    st_ = fit(X, weak[None, :, None], loss="squared", head="squared", radius=radius)
    P = to_numpy(st_.probs)[..., 0]
    gap = to_numpy(st_.gap)  # includes the rounding of its own evaluation
    if radius is None:
        result = charikar_squared(truth[None], weak[None], P, squared_affine_certificate(gap, truth[None], P),
                                  equality=True)
        # An exact equality: the computed slack is rounding noise, so the certificate-aware tolerance is the
        # certificate plus the rounding bound (verdict "holds" needs |slack| <= certificate alone and can be
        # "inconclusive" when the certificate is ~1e-16; it must never be "violated").
        assert abs(result.slack[0]) <= result.certificate[0] + result.rounding[0]
    else:
        result = charikar_squared(truth[None], weak[None], P, gap, equality=False)
        assert result.slack[0] >= -result.certificate[0] - result.rounding[0]
    assert result.verdict[0] != "violated", result.summary()


def test_solver_gaps_include_the_rounding_of_their_own_evaluation():
    # The reported Frank-Wolfe gap is the computed gap plus a rounding bound: strictly above the raw gap, by
    # no more than rounding.
    from w2s_theory.divergences import get_loss
    from w2s_theory.heads import MixtureHead

    rng = np.random.default_rng(1)
    X = rng.dirichlet(np.ones(3), size=10)
    Q = rng.dirichlet(np.ones(2), size=(5, 10))
    for loss in ("reverse_kl", "forward_kl", "squared"):
        st_ = fit(X, Q, loss=loss)
        dphi = get_loss(loss).grad_student(st_.probs.new_tensor(Q), st_.probs)
        G = (dphi.transpose(1, 2) @ st_.probs.new_tensor(X)) / 10
        raw = MixtureHead.frank_wolfe_gap(G, st_.params["A"])
        assert (st_.gap > raw).all() and (st_.gap <= raw + 1e-12).all()


def test_certified_gap_decides_interior_optima_where_theorem_2_is_an_equality():
    # One constant feature: the reverse-KL projection is interior, Theorem 2 holds with equality and the slack
    # is rounding noise of about 1e-16, as the raw Frank-Wolfe gap would be; a raw gap leaves some of these in
    # the rounding band ("inconclusive"), the solver's gap, which includes its own evaluation error, decides all.
    rng = np.random.default_rng(1)
    from w2s_theory.instances import random_mixture_problem
    from w2s_theory.theorems import theorem2_reverse_kl

    problem = random_mixture_problem(rng, batch=500, n=10, m=1, k=2, teacher="dirichlet")
    st_ = fit(problem.features, problem.teacher, loss="reverse_kl")
    probs = to_numpy(st_.probs)
    result = theorem2_reverse_kl(problem.truth, problem.teacher, probs, to_numpy(st_.gap))
    assert result.count("holds") == 500


def test_cell_bounds_are_sound_on_random_cells():
    from w2s_theory.guarantees import _cell_bounds, _kl_model_teacher, _kl_truth_model

    rng = np.random.default_rng(4)
    for _ in range(40):
        n = int(rng.integers(1, 6))
        z = rng.normal(size=n) * 3
        w = rng.uniform(0.01, 0.99, size=n)
        f = expit(rng.normal(size=n) * 3)
        lo = rng.uniform(-20, 20, size=50)
        hi = lo + 10 ** rng.uniform(-3, 1, size=50)
        cb = _cell_bounds(lo, hi, z, w, f)
        t = lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, 2001)[None, :]
        phi = _kl_model_teacher(t[..., None] * z, w).mean(-1)
        k = _kl_truth_model(f, t[..., None] * z).mean(-1)
        tol = 1e-12 * (1 + np.abs(phi).max())
        assert (cb["phi_lb"] <= phi.min(-1) + tol).all() and (cb["phi_ub"] >= phi.max(-1) - tol).all()
        assert (cb["k_lb"] <= k.min(-1) + tol).all() and (cb["k_ub"] >= k.max(-1) - tol).all()
