"""Claims about the squared-loss regression-head solver (w2s_theory.solvers.squared)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpmath import mpf

from tests.exact_optima import least_squares_objective, least_squares_optimum
from w2s_theory.solvers.squared import _residual_products, fit_squared_batched, fit_squared_reference

ROUNDING = 1e-12


def _instance(seed: int, B: int, n: int, m: int, k_out: int, *, simplex: bool = False, offset: float = 2.0):
    rng = np.random.default_rng(seed)
    X = rng.dirichlet(np.full(m, 0.7), size=(B, n)) if simplex else rng.normal(size=(B, n, m))
    Y = rng.normal(size=(B, n, k_out)) + offset
    return torch.as_tensor(X), torch.as_tensor(Y)


def _design(X, bias):
    return torch.cat([X, torch.ones_like(X[..., :1])], dim=-1) if bias else X


def _objective(Z, Y, theta):
    return ((Z @ theta - Y) ** 2).sum(-1).mean(-1)


shapes = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 30),  # n (n = 1 and n < d are underdetermined: minimum-norm solution)
    st.integers(1, 5),  # m
    st.integers(1, 3),  # k_out
    st.booleans(),  # bias
    st.booleans(),  # features in the simplex (rank deficient with bias)
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes)
def test_unconstrained_fit_is_within_its_gap_of_the_exact_least_squares_optimum(shape):
    """Against the exact optimum (mpmath Gram–Schmidt at 80 digits, every float taken exactly), not an SVD with the
    same rank cut: a finite gap is a bound with no slack; features in the simplex next to the bias column are
    numerically collinear, and the student is then uncertified (the exact problem is a different one)."""
    seed, n, m, k_out, bias, simplex = shape
    X, Y = _instance(seed, 2, min(n, 12), m, k_out, simplex=simplex)
    tol = 1e-12
    fit = fit_squared_batched(X, Y, bias=bias, tol=tol)
    assert fit.certificate == "normal_equations"
    assert torch.equal(fit.converged, fit.gap <= tol)
    for i in range(2):
        Z = _design(X[i], bias).numpy()
        optimum = least_squares_optimum(Z, Y[i].numpy())
        gap = float(fit.gap[i])
        if math.isinf(gap):
            assert bool(fit.info["singular"][i]) and fit.info["uncertified_reason"]
            assert simplex and bias, "only the collinear (simplex + bias) designs may be uncertified here"
            continue
        assert gap <= tol, gap
        assert mpf(float(fit.objective[i])) - optimum <= mpf(gap)
        assert least_squares_objective(Z, Y[i].numpy(), fit.params["theta"][i].numpy()) - optimum <= mpf(gap)
    assert torch.allclose(fit.probs, _design(X, bias) @ fit.params["theta"], atol=1e-12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes, st.floats(-3, 3), st.integers(0, 2**31 - 1))
def test_unconstrained_linear_head_satisfies_the_pythagorean_identity(shape, spread, seed2):
    r"""Charikar et al. 2024 (equality case): for any :math:`\theta'`,
    :math:`\frac1n\|Z\theta'-y\|^2 = \frac1n\|Z\theta-y\|^2 + \frac1n\|Z\theta'-Z\theta\|^2` at the least-squares
    :math:`\theta` (the residual is orthogonal to the column space)."""
    seed, n, m, k_out, bias, simplex = shape
    X, Y = _instance(seed, 2, n, m, k_out, simplex=simplex)
    fit = fit_squared_batched(X, Y, bias=bias)
    Z = _design(X, bias)
    rng = np.random.default_rng(seed2)
    other = torch.as_tensor(rng.normal(size=fit.params["theta"].shape) * 10**spread)
    lhs = _objective(Z, Y, other)
    rhs = fit.objective + ((Z @ other - fit.probs) ** 2).sum(-1).mean(-1)
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10), (lhs - rhs)


def test_normal_equations_gap_bounds_the_exact_suboptimality_of_a_perturbed_point_tightly():
    """The certificate is nearly exact for a quadratic: at theta* + delta the gap is >= the exact suboptimality
    (mpmath) and within 1e-8 relative of it."""
    from w2s_theory.solvers.squared import _certify, _scaled_design

    X, Y = _instance(3, 2, 25, 3, 2)
    rng = torch.Generator().manual_seed(0)
    design = _scaled_design(X, True)
    fit = fit_squared_batched(X, Y)
    delta = 0.1 * torch.randn(fit.params["theta"].shape, generator=rng, dtype=torch.float64)
    theta = fit.params["theta"] + delta
    _, objective, gap, _, singular = _certify(design, Y, theta, None)
    assert not bool(singular.any())
    for i in range(2):
        Z = _design(X[i], True).numpy()
        true = least_squares_objective(Z, Y[i].numpy(), theta[i].numpy()) - least_squares_optimum(Z, Y[i].numpy())
        assert mpf(float(gap[i])) >= true
        assert float(gap[i]) <= float(true) * (1 + 1e-8)


def test_well_conditioned_students_are_solved_by_cholesky_without_fallback():
    """Documented method: Cholesky plus one refinement step (2 solves) solves well-conditioned problems;
    numerically rank-deficient ones (features in the simplex with a bias) go to the SVD (a third solve)."""
    X, Y = _instance(12, 4, 40, 3, 2)
    assert bool((fit_squared_batched(X, Y).iterations == 2).all())
    Xs, Ys = _instance(12, 4, 40, 3, 2, simplex=True)
    assert bool((fit_squared_batched(Xs, Ys).iterations == 3).all())


def test_unconstrained_fit_matches_cvxpy_reference():
    X, Y = _instance(4, 1, 40, 4, 2)
    fit = fit_squared_batched(X, Y)
    ref = fit_squared_reference(X[0].numpy(), Y[0].numpy())
    assert ref.certificate == "normal_equations"
    assert abs(float(fit.objective[0] - ref.objective[0])) <= float(fit.gap[0] + ref.gap[0]) + ROUNDING


# ---------------------------------------------------------------------------------------------------------
# Ball constraint: exact trust-region solution, Frank–Wolfe certificate
# ---------------------------------------------------------------------------------------------------------

BALL_CASES = [
    # (seed, n, m, k_out, bias, simplex, radius as a fraction of the unconstrained norm)
    (0, 40, 3, 1, True, False, 0.3),
    (1, 30, 4, 2, True, True, 0.5),
    (2, 25, 2, 3, False, False, 0.8),
    (3, 60, 5, 1, True, False, 0.05),
    (4, 8, 6, 2, True, False, 0.5),  # n < d: underdetermined
    (5, 50, 3, 2, False, True, 0.9),
]


@pytest.mark.parametrize("seed,n,m,k_out,bias,simplex,fraction", BALL_CASES)
def test_ball_constrained_fit_is_feasible_certified_and_matches_cvxpy(seed, n, m, k_out, bias, simplex, fraction):
    X, Y = _instance(seed, 1, n, m, k_out, simplex=simplex)
    unconstrained = fit_squared_batched(X, Y, bias=bias)
    radius = fraction * float(unconstrained.params["theta"].norm(dim=-2).min())
    tol = 1e-12
    fit = fit_squared_batched(X, Y, bias=bias, radius=radius, tol=tol)
    ref = fit_squared_reference(X[0].numpy(), Y[0].numpy(), bias=bias, radius=radius)
    assert fit.certificate == ref.certificate == "frank_wolfe"
    assert float(fit.params["theta"].norm(dim=-2).max()) <= radius
    assert bool(fit.converged.all()) and float(fit.gap[0]) <= tol, fit.gap
    difference = float(fit.objective[0] - ref.objective[0])
    assert abs(difference) <= float(fit.gap[0] + ref.gap[0]) + ROUNDING
    assert difference <= float(fit.gap[0]) + 1e-9
    # The constraint is active: the constrained optimum is worse than the unconstrained one.
    assert float(fit.objective[0]) > float(unconstrained.objective[0])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes, st.floats(0.01, 0.99))
def test_ball_solution_is_on_the_sphere_and_frank_wolfe_gap_certifies_it(shape, fraction):
    """Gaussian features (full rank): the minimum-norm unconstrained solution (used only to choose a radius that
    makes the constraint active) is unique. The returned point is inside the ball with no tolerance."""
    seed, n, m, k_out, bias, _ = shape
    X, Y = _instance(seed, 3, n, m, k_out)
    min_norm = np.linalg.pinv(_design(X, bias).numpy()) @ Y.numpy()
    radius = fraction * float(np.linalg.norm(min_norm, axis=-2).min())
    fit = fit_squared_batched(X, Y, bias=bias, radius=radius)
    norms = fit.params["theta"].norm(dim=-2)
    assert float(norms.max()) <= radius
    assert torch.allclose(norms, torch.full_like(norms, radius), rtol=1e-9)
    assert float(fit.gap.max()) <= 1e-12 * (1 + float(fit.objective.max())), fit.gap
    # Any other feasible point is no better than objective - gap (the FW gap is a valid bound).
    Z = _design(X, bias)
    rng = np.random.default_rng(seed)
    other = torch.as_tensor(rng.normal(size=fit.params["theta"].shape))
    other = other * (radius * rng.uniform() / other.norm(dim=-2, keepdim=True))
    assert bool((_objective(Z, Y, other) >= fit.objective - fit.gap - ROUNDING).all())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes, st.floats(0.05, 0.95), st.floats(0.0, 1.0))
def test_frank_wolfe_gap_bounds_the_suboptimality_of_any_feasible_point(shape, fraction, shrink):
    """At arbitrary feasible points (not only at the solver's output) the ball certificate is >= the true gap."""
    from w2s_theory.solvers.squared import _frank_wolfe_gap_ball

    seed, n, m, k_out, bias, simplex = shape
    X, Y = _instance(seed, 2, n, m, k_out, simplex=simplex)
    unconstrained = fit_squared_batched(X, Y, bias=bias)
    radius = fraction * float(unconstrained.params["theta"].norm(dim=-2).min())
    best = fit_squared_batched(X, Y, bias=bias, radius=radius)
    Z = _design(X, bias)
    rng = np.random.default_rng(seed + 1)
    point = torch.as_tensor(rng.normal(size=best.params["theta"].shape))
    point = point * (radius * shrink / point.norm(dim=-2, keepdim=True))
    g = 2.0 / Z.shape[-2] * _residual_products(Z, Y, point)[2]
    gap = _frank_wolfe_gap_ball(g, point, radius)
    true = _objective(Z, Y, point) - best.objective
    assert bool((true <= gap + best.gap + 1e-10 * (1 + gap)).all()), (true, gap)
    assert bool((gap >= 0).all())


def test_radius_larger_than_the_unconstrained_norm_gives_the_unconstrained_solution():
    X, Y = _instance(6, 4, 50, 3, 2)
    unconstrained = fit_squared_batched(X, Y)
    radius = 1.5 * float(unconstrained.params["theta"].norm(dim=-2).max())
    fit = fit_squared_batched(X, Y, radius=radius)
    assert torch.allclose(fit.params["theta"], unconstrained.params["theta"], atol=1e-12, rtol=0)
    assert torch.equal(fit.iterations, unconstrained.iterations), "an interior solution needs no secular solve"
    assert bool(fit.converged.all()), fit.gap


def test_shared_expanded_features_give_the_per_student_fit_and_are_not_written():
    X, Y = _instance(7, 3, 30, 3, 2)
    shared = X[0].clone()
    before = shared.clone()
    view = shared.expand(3, *shared.shape)
    for radius in (None, 0.5):
        a = fit_squared_batched(view, Y, radius=radius)
        b = fit_squared_batched(view.contiguous(), Y, radius=radius)
        assert torch.allclose(a.params["theta"], b.params["theta"], atol=1e-10)
    assert torch.equal(shared, before)


def test_invalid_radius_is_an_error():
    X, Y = _instance(8, 1, 5, 2, 1)
    with pytest.raises(ValueError, match="radius"):
        fit_squared_batched(X, Y, radius=-1.0)


def test_reference_treats_any_status_but_optimal_as_failure(monkeypatch):
    import cvxpy as cp

    original = cp.Problem.solve

    def inaccurate(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        self._status = "optimal_inaccurate"
        return value

    monkeypatch.setattr(cp.Problem, "solve", inaccurate)
    X, Y = _instance(9, 1, 10, 2, 1)
    with pytest.raises(RuntimeError, match="optimal_inaccurate"):
        fit_squared_reference(X[0].numpy(), Y[0].numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_matches_cpu():
    X, Y = _instance(10, 8, 100, 5, 2)
    for radius in (None, 0.5):
        cpu = fit_squared_batched(X, Y, radius=radius)
        gpu = fit_squared_batched(X.cuda(), Y.cuda(), radius=radius)
        assert gpu.probs.device.type == "cuda"
        assert torch.allclose(gpu.params["theta"].cpu(), cpu.params["theta"], atol=1e-9)
        assert bool(gpu.converged.all())
    # Simplex rows beside the bias column: the unconstrained problem is singular, on the GPU as on the CPU
    X, Y = _instance(10, 8, 100, 5, 2, simplex=True)
    cpu, gpu = fit_squared_batched(X, Y), fit_squared_batched(X.cuda(), Y.cuda())
    assert not bool(cpu.converged.any()) and torch.equal(gpu.converged.cpu(), cpu.converged)


# ---------------------------------------------------------------------------------------------------------
# Batch independence: students are solved in chunks; nothing of a student depends on the others
# ---------------------------------------------------------------------------------------------------------


def _mixed_students():
    """Well-conditioned students, one with an exactly duplicated column (removed as redundant), one in the
    simplex (collinear with the bias: SVD fallback, uncertified), and n*d above torch's parallel grain size
    (32768), so that a reduction over one student's design could be split across threads when it is alone."""
    X, Y = _instance(21, 6, 600, 60, 2)
    X[2, :, 5] = X[2, :, 7]
    Xs, _ = _instance(22, 1, 600, 60, 2, simplex=True)
    X[4] = Xs[0]
    Y[1] *= 1e-3  # inside the ball of the test below: no secular solve, unlike its neighbours
    Y[3] *= 0.03  # just outside it: more secular steps than its neighbours
    return X, Y


@pytest.mark.parametrize("radius", [None, 0.05])
def test_a_student_is_bit_identical_alone_in_a_batch_and_across_chunk_boundaries(monkeypatch, radius):
    import w2s_theory.solvers.squared as squared

    X, Y = _mixed_students()
    whole = fit_squared_batched(X, Y, radius=radius)  # one chunk
    monkeypatch.setattr(squared, "_CHUNK_BYTES", 2 * 600 * 61 * 8)  # chunks of 2 students: boundaries inside
    chunked = fit_squared_batched(X, Y, radius=radius)
    singular = whole.info["singular"]
    assert bool(singular[4]) == (radius is None) and not bool(singular[:4].any())
    for b in range(X.shape[0]):
        alone = fit_squared_batched(X[b : b + 1], Y[b : b + 1], radius=radius)
        for other, i in ((whole, b), (chunked, b), (alone, 0)):
            assert torch.equal(other.params["theta"][i], whole.params["theta"][b]), b
            assert torch.equal(other.probs[i], whole.probs[b]), b
            for name in ("objective", "gap", "grad_norm", "iterations", "converged"):
                assert torch.equal(getattr(other, name)[i], getattr(whole, name)[b]), (name, b)
            assert bool(other.info["singular"][i]) == bool(singular[b])


@pytest.mark.parametrize("radius", [None, 0.5])
@pytest.mark.parametrize("k_out", [1, 2])
def test_a_student_of_shared_features_is_bit_identical_alone_and_in_a_batch(radius, k_out):
    """``fit`` with one 2-D feature matrix: a student alone (``B = 1``) and inside a batch of 8 sharing the
    features take the same (shared-design) path; before, one student went through the per-student path, which
    forms Z^T y inside the Gram product, and its last bits differed from the batch's."""
    from w2s_theory.solvers import fit

    rng = np.random.default_rng(41)
    n, m, B = 40, 3, 8
    X = rng.normal(size=(n, m))
    Y = rng.normal(size=(B, n, k_out))
    options = dict(loss="squared", head="squared", radius=radius)
    together = fit(X, Y, **options)
    for b in range(B):
        alone = fit(X, Y[b : b + 1], **options)
        assert torch.equal(alone.params["theta"][0], together.params["theta"][b]), b
        assert torch.equal(alone.probs[0], together.probs[b]), b
        for name in ("objective", "gap", "grad_norm", "iterations"):
            assert torch.equal(getattr(alone, name)[0], getattr(together, name)[b]), (name, b)


def _certificate_from_the_design(X, Y, theta, bias=True):
    """The certificate evaluated from Z and theta as reported (no state of the solve reused)."""
    from w2s_theory.solvers.squared import _certify, _scaled_design

    return _certify(_scaled_design(X, bias), Y, theta, None)


def test_reusing_the_solve_gives_the_certificate_evaluated_from_the_design():
    """The certificate reuses the solve's residual on the scaled design; it must be the one computed from Z and
    theta: on plain students, on a student with a duplicated column (whose gradient entries the scaled design
    does not hold) and on one whose coefficients are subnormal (theta = D theta_s is then rounded)."""
    X, Y = _instance(30, 3, 40, 4, 2)
    X[1, :, 2] = X[1, :, 0]
    Y[2] *= 1e-307
    fit = fit_squared_batched(X, Y)
    theta = fit.params["theta"]
    tiny = theta[2].abs()
    assert bool(((tiny < torch.finfo(torch.float64).tiny) & (tiny > 0)).any()), "the instance needs subnormals"
    preds, objective, gap, g, singular = _certificate_from_the_design(X, Y, theta)
    assert not bool(singular.any()) and not bool(fit.info["singular"].any())
    assert torch.allclose(fit.grad_norm, g.norm(dim=(-2, -1)), rtol=1e-6, atol=0)
    assert torch.equal(fit.probs[2], preds[2]) and torch.equal(fit.objective[2], objective[2])
    assert torch.allclose(fit.gap, gap, rtol=1e-12, atol=0) and torch.equal(fit.gap[2], gap[2])
    # Away from the optimum the duplicated column's gradient entry is as large as its twin's.
    from w2s_theory.solvers.squared import _certify, _scaled_design, _solve_unconstrained

    design = _scaled_design(X[1:2], True, targets=Y[1:2])
    _, _, (theta_s, _, _, _) = _solve_unconstrained(design, Y[1:2], 1e-12)
    theta_s = theta_s + 0.1
    solved = (theta_s, *_residual_products(design.Zs, Y[1:2], theta_s))
    moved = theta_s * design.scales[..., :, None]
    _, _, _, g_reused, _ = _certify(design, Y[1:2], moved, None, solved)
    _, _, _, g_direct, _ = _certificate_from_the_design(X[1:2], Y[1:2], moved)
    assert float(g_direct[0, 2].abs().min()) > 1e-3
    assert torch.allclose(g_reused, g_direct, rtol=1e-10, atol=1e-14)
