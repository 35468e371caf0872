"""Claims about the softmax-head solver (w2s_theory.solvers.softmax), each checked with its certificate."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpmath import mpf

from tests.exact_optima import softmax_forward_objective, softmax_forward_optimum
from w2s_theory.divergences import entropy, get_loss, kl
from w2s_theory.heads import SoftmaxHead
from w2s_theory.solvers.softmax import (
    _ReverseDivergence,
    fit_softmax_batched,
    fit_softmax_reference,
    softmax_forward_certificate,
)

FORWARD_KL = get_loss("forward_kl")
FORWARD_CE = get_loss("forward_ce")
REVERSE_KL = get_loss("reverse_kl")
REVERSE_CE = get_loss("reverse_ce")
ROUNDING = 1e-12


def _instance(seed: int, B: int, n: int, m: int, k: int, *, simplex: bool, noise: float = 0.5):
    """Features (Gaussian or in the simplex) and an interior teacher: a random softmax head mixed with a
    Dirichlet draw, so that the forward optimum is attained and not trivially at the teacher."""
    rng = np.random.default_rng(seed)
    if simplex:
        X = rng.dirichlet(np.full(m, 0.7), size=(B, n))
    else:
        X = rng.normal(size=(B, n, m))
    W = rng.normal(size=(B, k, m)) * 1.5
    logits = X @ np.swapaxes(W, -1, -2)
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    Q = (1 - noise) * soft + noise * rng.dirichlet(np.ones(k), size=(B, n))
    return torch.as_tensor(X), torch.as_tensor(Q / Q.sum(-1, keepdims=True))


def _design(X):
    return torch.cat([X, torch.ones_like(X[..., :1])], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Forward KL: certified, matches the cvxpy reference
# ---------------------------------------------------------------------------------------------------------

REFERENCE_CASES = [
    # (seed, n, m, k, simplex)
    (0, 40, 3, 2, False),
    (1, 60, 4, 2, True),
    (2, 50, 2, 3, False),
    (3, 45, 3, 3, True),
    (4, 30, 5, 2, False),
    (5, 80, 2, 3, True),
    (6, 25, 3, 4, False),
    (7, 70, 4, 2, True),
    (8, 35, 3, 3, False),
    (9, 50, 5, 3, True),
]


@pytest.mark.parametrize("seed,n,m,k,simplex", REFERENCE_CASES)
def test_forward_kl_batched_fit_matches_cvxpy_reference_within_certificates(seed, n, m, k, simplex):
    """Gaussian features: certified, and within the certificates of the cvxpy reference. Features in the simplex
    next to the bias column are numerically collinear (rows sum to 1 only up to rounding): the exact problem
    has one more direction, so the student is reported uncertified, with its reason, while its objective still
    matches the reference's on the intended (reduced) problem."""
    X, Q = _instance(seed, 1, n, m, k, simplex=simplex)
    tol = 1e-10
    fit = fit_softmax_batched(X, Q, FORWARD_KL, tol=tol)
    ref = fit_softmax_reference(X[0].numpy(), Q[0].numpy(), "forward_kl")
    assert fit.certificate == ref.certificate == "self_concordance"
    difference = float(fit.objective[0] - ref.objective[0])
    if simplex:
        assert math.isinf(float(fit.gap[0])) and not bool(fit.converged[0])
        assert bool(fit.info["singular"][0]) and "collinear" in fit.info["uncertified_reason"]
        assert abs(difference) <= 1e-7
        return
    assert bool(fit.converged.all()) and float(fit.gap[0]) <= tol
    assert math.isfinite(float(ref.gap[0])), "the certificate at the cvxpy point should be finite here"
    # Both objectives are within their own certified gap of the same optimum.
    assert abs(difference) <= float(fit.gap[0] + ref.gap[0])
    # And the batched certificate is a true upper bound against the reference point (which is >= optimum).
    assert difference <= float(fit.gap[0])


def test_forward_kl_and_forward_ce_have_the_same_minimiser_and_differ_by_teacher_entropy():
    X, Q = _instance(11, 3, 40, 3, 3, simplex=False)
    fkl = fit_softmax_batched(X, Q, FORWARD_KL)
    fce = fit_softmax_batched(X, Q, FORWARD_CE)
    assert torch.allclose(fkl.probs, fce.probs, atol=1e-9)
    assert torch.allclose(fce.objective - fkl.objective, entropy(Q).mean(-1), atol=1e-12)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 8),
    m=st.integers(1, 2),
    k=st.integers(2, 3),
    scale=st.sampled_from([1e-3, 1e-2, 1e-1, 0.5]),
)
def test_self_concordance_gap_upper_bounds_true_suboptimality_away_from_the_optimum(seed, n, m, k, scale):
    """At perturbed points the certified gap is >= the true suboptimality against the exact optimum (mpmath
    Newton at 60 digits, not this solver) with no slack, and, for small perturbations, finite and within a
    small factor of it (not vacuous)."""
    X, Q = _instance(seed, 1, n, m, k, simplex=False)
    best = fit_softmax_batched(X, Q, FORWARD_KL, tol=1e-15)
    rng = torch.Generator().manual_seed(seed)
    W = best.params["W"] + scale * torch.randn(best.params["W"].shape, generator=rng, dtype=torch.float64)
    b = best.params["b"] + scale * torch.randn(best.params["b"].shape, generator=rng, dtype=torch.float64)
    gap, decrement = softmax_forward_certificate(X, Q, W, b)
    optimum = softmax_forward_optimum(X[0].numpy(), Q[0].numpy(), "forward_kl")
    true = softmax_forward_objective(X[0].numpy(), Q[0].numpy(), W[0].numpy(), b[0].numpy(), "forward_kl") - optimum
    assert true <= mpf(float(gap[0])), (true, gap)
    # The decrement is inf where the Hessian is singular (n < m + 1: the logits of every sample are free and
    # the gap comes from the closed form instead); elsewhere the gap is at least the decrement estimate.
    finite = torch.isfinite(decrement)
    assert bool((gap[finite] >= 0.5 * decrement[finite] ** 2 * (1 - 1e-12)).all())
    if scale <= 1e-2 and n >= 3 * m:
        assert bool(torch.isfinite(gap).all())
        assert float(gap[0]) <= 2 * float(true) + 1e-10, (gap, true)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 12),
    m=st.integers(1, 3),
    k=st.integers(2, 4),
    hard=st.floats(0.0, 1.0),
)
def test_forward_fit_at_the_boundary_is_finite_and_its_certificate_is_honest(seed, n, m, k, hard):
    """Teachers with exact 0 and 1 entries, n = 1 and tiny samples: no NaN, converged iff gap <= tol, and the
    returned objective is no worse than the uniform start (theta = 0)."""
    rng = np.random.default_rng(seed)
    X = torch.as_tensor(rng.normal(size=(2, n, m)))
    Q = rng.dirichlet(np.full(k, 0.3), size=(2, n))
    hard_rows = rng.uniform(size=(2, n)) < hard
    Q[hard_rows] = np.eye(k)[rng.integers(0, k, size=int(hard_rows.sum()))]
    Q = torch.as_tensor(Q)
    tol = 1e-10
    fit = fit_softmax_batched(X, Q, FORWARD_KL, tol=tol, max_iter=60)
    assert not bool(torch.isnan(fit.gap).any()) and bool((fit.gap >= 0).all())
    assert torch.equal(fit.converged, fit.gap <= tol)
    assert bool(torch.isfinite(fit.objective).all()) and bool(torch.isfinite(fit.params["W"]).all())
    uniform = FORWARD_KL.per_sample(Q, torch.full_like(Q, 1.0 / k)).mean(-1)
    assert bool((fit.objective <= uniform + ROUNDING).all())


def test_self_concordance_gap_is_valid_and_not_vacuous_after_one_newton_iteration():
    """Against the exact optimum (mpmath), with no slack."""
    X, Q = _instance(21, 2, 24, 2, 3, simplex=False, noise=0.2)
    early = fit_softmax_batched(X, Q, FORWARD_KL, max_iter=2)
    assert bool((early.iterations == 2).all()) and not bool(early.converged.any())
    for i in range(2):
        optimum = softmax_forward_optimum(X[i].numpy(), Q[i].numpy(), "forward_kl")
        true = mpf(float(early.objective[i])) - optimum
        assert true > 1e-8, "the early points should be visibly suboptimal"
        assert true <= mpf(float(early.gap[i]))
        assert math.isfinite(float(early.gap[i])) and float(early.gap[i]) <= 5 * float(true), (early.gap, true)


def test_forward_kl_optimum_matches_the_teachers_moments():
    r"""M-projection: at the forward optimum :math:`\frac1n\sum_i z_i(s_i - q_i)^\top = 0` for :math:`z = [h, 1]`.

    Bound from the certificate: in whitened coordinates :math:`\|g\|\le\lambda\le\sqrt{2\,\mathrm{gap}}`, and the
    raw moments are :math:`V S g/\sqrt n` (plus the reference class, minus the sum of the others)."""
    for simplex in (False, True):
        X, Q = _instance(31, 5, 60, 3, 3, simplex=simplex)
        fit = fit_softmax_batched(X, Q, FORWARD_KL, tol=1e-14)
        Z = _design(X)
        moments = Z.mT @ (fit.probs - Q) / Z.shape[-2]
        s_max = torch.linalg.svdvals(Z)[:, 0]
        k = Q.shape[-1]
        bound = math.sqrt(k) * s_max / math.sqrt(Z.shape[-2]) * torch.sqrt(2 * fit.gap) + ROUNDING
        assert bool((moments.norm(dim=(-2, -1)) <= bound).all()), (moments.norm(dim=(-2, -1)), bound)
        assert float(moments.abs().max()) < 1e-7


def test_forward_kl_projection_satisfies_the_pythagorean_equality_for_a_realizable_truth():
    r"""docs/theory.md, softmax row: :math:`E\,KL(F_{sw}\|F^*) = E\,KL(F_w\|F^*) - E\,KL(F_w\|F_{sw})` when
    :math:`F^*` is a softmax head on the same features; the defect is :math:`\langle M, \Theta_{sw}-\Theta^*\rangle`
    with :math:`M` the moment residual, which the certificate makes tiny."""
    X, _ = _instance(41, 4, 80, 3, 3, simplex=False)
    rng = np.random.default_rng(41)
    W_star = torch.as_tensor(rng.normal(size=(4, 3, 3)))
    b_star = torch.as_tensor(rng.normal(size=(4, 3)))
    truth = SoftmaxHead.predict(W_star, b_star, X)
    teacher = 0.6 * truth + 0.4 * torch.as_tensor(rng.dirichlet(np.ones(3), size=(4, 80)))
    fit = fit_softmax_batched(X, teacher, FORWARD_KL, tol=1e-14)
    lhs = kl(fit.probs, truth).mean(-1)
    rhs = kl(teacher, truth).mean(-1) - kl(teacher, fit.probs).mean(-1)
    assert bool(torch.isfinite(fit.gap).all())
    assert torch.allclose(lhs, rhs, atol=1e-9, rtol=0), (lhs - rhs)


@pytest.mark.parametrize("condition", [1e5, 1e8, 1e12])
def test_forward_fit_depends_only_on_the_span_of_the_features_even_when_ill_conditioned(condition):
    """The head class is {softmax(W h + b)}: an invertible map of the features changes nothing. With condition
    numbers up to 1e12 the fit is either certified and within its gap of the exact optimum (mpmath, the mixed
    features taken exactly), or uncertified; at 1e5 it is certified. (The certificate proves the Hessian
    positive definite from the Gram matrix of the scaled features, which squares their condition number:
    beyond about 1e7 it declines to certify rather than guess.)"""
    X, _ = _instance(13, 1, 12, 3, 3, simplex=False)
    rng = np.random.default_rng(13)
    A = torch.as_tensor(rng.normal(size=(3, 3)))
    U, _, Vh = torch.linalg.svd(A)
    A = U @ torch.diag(torch.tensor([1.0, 1e-2, 1.0 / condition], dtype=torch.float64)) @ Vh
    X_ill = X @ A
    W = torch.as_tensor(rng.normal(size=(1, 3, 3)))
    teacher = SoftmaxHead.predict(W, torch.zeros(1, 3, dtype=torch.float64), X)  # realizable in span(X)
    teacher = 0.7 * teacher + 0.3 / 3
    tol = 1e-9
    fit_ill = fit_softmax_batched(X_ill, teacher, FORWARD_KL, tol=tol)
    gap = float(fit_ill.gap[0])
    if condition <= 1e5:
        assert bool(fit_ill.converged[0]), gap
    if math.isfinite(gap):
        optimum = softmax_forward_optimum(X_ill[0].numpy(), teacher[0].numpy(), "forward_kl")
        assert mpf(float(fit_ill.objective[0])) - optimum <= mpf(gap)
        exact = softmax_forward_objective(X_ill[0].numpy(), teacher[0].numpy(), fit_ill.params["W"][0].numpy(),
                                          fit_ill.params["b"][0].numpy(), "forward_kl")
        assert exact - optimum <= mpf(gap)


def test_forward_projection_onto_constants_is_the_arithmetic_mean():
    """docs/theory.md closed form: with constant features the softmax head is every interior constant distribution,
    and the forward-KL projection is the mean teacher."""
    rng = np.random.default_rng(5)
    Q = torch.as_tensor(rng.dirichlet(np.ones(3), size=(2, 25)))
    X = torch.ones((2, 25, 1), dtype=torch.float64)
    fit = fit_softmax_batched(X, Q, FORWARD_KL)
    assert int(fit.info["rank"][0]) == 1  # [h, 1] has two equal columns
    assert torch.allclose(fit.probs, Q.mean(1, keepdim=True).expand_as(Q), atol=1e-10)


def test_forward_kl_with_unattained_infimum_reports_no_certificate_and_stays_finite():
    """One-hot teacher on separable data: the infimum 0 is not attained, the gap stays inf, converged is
    False, and nothing becomes NaN."""
    rng = np.random.default_rng(2)
    X = torch.as_tensor(rng.normal(size=(3, 30, 2)))
    labels = (X[..., 0] > 0).long()
    Q = torch.nn.functional.one_hot(labels, 2).to(torch.float64)
    fit = fit_softmax_batched(X, Q, FORWARD_KL, max_iter=60)
    assert not bool(fit.converged.any())
    assert bool(torch.isinf(fit.gap).all())
    assert bool(torch.isfinite(fit.objective).all()) and float(fit.objective.max()) < 1e-6
    assert bool(torch.isfinite(fit.params["W"]).all())


def test_forward_kl_accepts_teachers_with_exact_zeros_and_ones_in_an_attained_problem():
    """Scattered zeros and ones (labels on some points, soft elsewhere, classes overlapping) keep the optimum
    attained: the solver certifies it."""
    X, Q = _instance(51, 2, 60, 2, 3, simplex=False, noise=0.5)
    Q = Q.clone()
    Q[:, :10] = torch.nn.functional.one_hot(torch.arange(10) % 3, 3).to(torch.float64)
    fit = fit_softmax_batched(X, Q, FORWARD_KL)
    assert bool(fit.converged.all()), fit.gap
    ref = fit_softmax_reference(X[0].numpy(), Q[0].numpy(), "forward_kl")
    assert abs(float(fit.objective[0] - ref.objective[0])) <= float(fit.gap[0] + ref.gap[0]) + ROUNDING


def test_shared_expanded_features_give_the_per_student_fit_and_are_not_written():
    X, Q = _instance(61, 4, 50, 3, 3, simplex=False)
    shared = X[0].clone()
    view = shared.expand(4, *shared.shape)
    before = shared.clone()
    fit_view = fit_softmax_batched(view, Q, FORWARD_KL)
    fit_full = fit_softmax_batched(view.contiguous(), Q, FORWARD_KL)
    assert torch.equal(shared, before)
    assert torch.allclose(fit_view.probs, fit_full.probs, atol=1e-10)
    assert bool(fit_view.converged.all())


def test_k_equals_one_is_the_constant_head():
    X = torch.randn(2, 5, 3, dtype=torch.float64)
    Q = torch.ones(2, 5, 1, dtype=torch.float64)
    fit = fit_softmax_batched(X, Q, FORWARD_KL)
    assert torch.equal(fit.probs, Q) and bool((fit.objective == 0).all())


# ---------------------------------------------------------------------------------------------------------
# Reverse losses: no certificate, stationary points that improve on the forward start
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [REVERSE_KL, REVERSE_CE], ids=lambda l: l.name)
@pytest.mark.parametrize("simplex", [False, True])
def test_reverse_fit_is_uncertified_stationary_and_improves_on_the_forward_start(loss, simplex):
    X, Q = _instance(71, 4, 60, 3, 3, simplex=simplex, noise=0.6)
    tol = 1e-10
    fit = fit_softmax_batched(X, Q, loss, tol=tol)
    assert fit.certificate == "none"
    assert bool(torch.isnan(fit.gap).all())
    assert bool((fit.grad_norm <= math.sqrt(tol)).all()) and bool(fit.converged.all()), fit.grad_norm
    start = fit.info["start_objective"]
    assert bool((fit.objective <= start + 1e-12).all())
    assert bool((fit.objective < start - 1e-6).any()), "reverse and forward optima should differ here"
    # The reported objective is the reverse loss of the returned parameters, evaluated independently (mpmath,
    # from the parameters, not from the solver's own expression).
    for i in range(2):
        exact = _reverse_objective_exact(X[i].numpy(), Q[i].numpy(), fit.params["W"][i].numpy(),
                                         fit.params["b"][i].numpy(), loss.name)
        assert abs(mpf(float(fit.objective[i])) - exact) <= 1e-12 * (1 + abs(exact))


def _reverse_objective_exact(X, Q, W, b, loss):
    with mpmath.workdps(40):
        total = mpf(0)
        for i in range(len(X)):
            eta = [sum(mpf(float(X[i][j])) * mpf(float(W[c][j])) for j in range(len(X[i]))) + mpf(float(b[c]))
                   for c in range(len(Q[i]))]
            lse = mpmath.log(sum(mpmath.exp(e) for e in eta))
            for c, e in enumerate(eta):
                s = mpmath.exp(e - lse)
                total += s * ((e - lse) if loss == "reverse_kl" else 0) - s * mpmath.log(mpf(float(Q[i][c])))
        return total / len(X)


def test_reverse_converged_flag_means_a_small_gradient():
    X, Q = _instance(72, 3, 60, 3, 3, simplex=False, noise=0.6)
    tol = 1e-10
    early = fit_softmax_batched(X, Q, REVERSE_KL, tol=tol, max_iter=1)
    assert torch.equal(early.converged, early.grad_norm <= early.info["grad_tol"])
    assert early.info["grad_tol"] == math.sqrt(tol)
    assert not bool(early.converged.any()), early.grad_norm


def test_reverse_kl_projection_onto_constants_is_the_normalised_geometric_mean():
    """docs/theory.md closed form: reverse-KL projection onto constants is p proportional to exp(mean log q)."""
    rng = np.random.default_rng(8)
    Q = torch.as_tensor(rng.dirichlet(np.ones(4), size=(3, 30)))
    X = torch.as_tensor(rng.normal(size=(3, 1, 2))).expand(3, 30, 2)  # the same h(x) for every sample
    fit = fit_softmax_batched(X, Q, REVERSE_KL, tol=1e-14)
    geometric = torch.softmax(torch.log(Q).mean(1, keepdim=True), dim=-1).expand_as(Q)
    assert torch.allclose(fit.probs, geometric, atol=1e-9)
    assert bool(fit.info["hessian_pd"].all())


def test_reverse_loss_logit_derivatives_match_autograd():
    """The analytic gradient and Hessian in logit space (used by Newton) agree with autograd."""
    rng = np.random.default_rng(9)
    eta = torch.as_tensor(rng.normal(size=(2, 5, 4)))
    eta[..., -1] = 0
    log_q = torch.log(torch.as_tensor(rng.dirichlet(np.ones(4), size=(2, 5))))
    for with_entropy in (True, False):
        model = _ReverseDivergence(log_q, with_entropy)
        _, grad, hess = model.derivatives(eta)

        def per_sample(free, b, i):
            full = torch.cat([free, torch.zeros(1, dtype=free.dtype)])
            s = torch.softmax(full, -1)
            a = (torch.log_softmax(full, -1) - log_q[b, i]) if with_entropy else -log_q[b, i]
            return (s * a).sum()

        for b in range(2):
            for i in range(5):
                free = eta[b, i, :-1].clone()
                g_auto = torch.autograd.functional.jacobian(lambda v: per_sample(v, b, i), free)
                h_auto = torch.autograd.functional.hessian(lambda v: per_sample(v, b, i), free)
                assert torch.allclose(grad[b, i], g_auto, atol=1e-12)
                assert torch.allclose(hess[b, i], h_auto, atol=1e-12)


@pytest.mark.parametrize("loss", [REVERSE_KL, REVERSE_CE], ids=lambda l: l.name)
def test_reverse_losses_reject_teachers_with_zero_probabilities(loss):
    X, Q = _instance(81, 2, 10, 2, 3, simplex=False)
    Q = Q.clone()
    Q[1, 3] = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="probability of 0"):
        fit_softmax_batched(X, Q, loss)


# ---------------------------------------------------------------------------------------------------------
# Reference: status is checked, reverse losses refused
# ---------------------------------------------------------------------------------------------------------


def test_reference_treats_any_status_but_optimal_as_failure(monkeypatch):
    import cvxpy as cp

    original = cp.Problem.solve

    def inaccurate(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        self._status = "optimal_inaccurate"
        return value

    monkeypatch.setattr(cp.Problem, "solve", inaccurate)
    X, Q = _instance(91, 1, 20, 2, 2, simplex=False)
    with pytest.raises(RuntimeError, match="optimal_inaccurate"):
        fit_softmax_reference(X[0].numpy(), Q[0].numpy(), "forward_kl")


def test_reference_refuses_reverse_losses():
    X, Q = _instance(92, 1, 20, 2, 2, simplex=False)
    with pytest.raises(ValueError, match="forward losses only"):
        fit_softmax_reference(X[0].numpy(), Q[0].numpy(), "reverse_kl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_matches_cpu():
    X, Q = _instance(101, 8, 200, 5, 3, simplex=False)
    for loss in (FORWARD_KL, REVERSE_KL):
        cpu = fit_softmax_batched(X, Q, loss)
        gpu = fit_softmax_batched(X.cuda(), Q.cuda(), loss)
        assert gpu.probs.device.type == "cuda"
        assert torch.allclose(gpu.probs.cpu(), cpu.probs, atol=1e-8)
        assert bool(gpu.converged.all())


# ---------------------------------------------------------------------------------------------------------
# The direct path (coordinates of [h, 1]) and the SVD-basis path: batch independence and hand-over
# ---------------------------------------------------------------------------------------------------------


def test_a_students_forward_fit_is_bit_identical_alone_inside_a_batch_and_across_chunks(monkeypatch):
    # Sweeps chunk students arbitrarily; a student's numbers must not depend on its neighbours, on either path.
    from w2s_theory.solvers import softmax

    X, Q = _instance(91, 12, 80, 4, 3, simplex=False)
    X[3, :, 1] = 3.0 * X[3, :, 0]  # collinear in other units: the direct path cannot prove it, the SVD path solves it
    whole = fit_softmax_batched(X, Q, FORWARD_KL)
    assert not bool(whole.info["direct"][3]) and bool(whole.info["direct"][[0, 1, 2, 4, 5, 6, 7]].all())
    monkeypatch.setattr(softmax, "_DIRECT_CHUNK_BYTES", 5 * 80 * 5 * 8)  # chunks of 5 students
    pieces = fit_softmax_batched(X, Q, FORWARD_KL)
    for b in (3, 7):
        alone = fit_softmax_batched(X[b : b + 1], Q[b : b + 1], FORWARD_KL)
        for result in (whole, pieces):
            for name in ("W", "b"):
                assert torch.equal(result.params[name][b : b + 1], alone.params[name])
            for name in ("objective", "gap", "grad_norm", "iterations"):
                assert torch.equal(getattr(result, name)[b : b + 1], getattr(alone, name)), name
            assert torch.equal(result.probs[b : b + 1], alone.probs)



@pytest.mark.parametrize("loss", [FORWARD_KL, REVERSE_KL, REVERSE_CE])
def test_two_class_students_are_bit_identical_alone_and_inside_a_batch(loss):
    # With k = 2 every logit product is a matrix-vector one, which BLAS computes with another kernel for a
    # batch of one than for a larger batch (found through a sweep whose rows moved with its chunking)
    X, Q = _instance(93, 4, 200, 6, 2, simplex=False)
    whole = fit_softmax_batched(X, Q, loss)
    for b in range(4):
        alone = fit_softmax_batched(X[b : b + 1], Q[b : b + 1], loss)
        for name in ("W", "b"):
            assert torch.equal(whole.params[name][b : b + 1], alone.params[name]), name
        assert torch.equal(whole.probs[b : b + 1], alone.probs) and torch.equal(whole.objective[b], alone.objective[0])
        assert torch.equal(whole.gap[b : b + 1], alone.gap) or (whole.gap[b].isnan() and alone.gap[0].isnan())

def test_direct_path_agrees_with_the_svd_basis_path_within_their_certificates(monkeypatch):
    from w2s_theory.solvers import softmax

    X, Q = _instance(92, 6, 120, 5, 3, simplex=False)
    direct = fit_softmax_batched(X, Q, FORWARD_KL, tol=1e-11)
    assert bool(direct.info["direct"].all()) and bool(direct.converged.all())
    monkeypatch.setattr(softmax, "_DIRECT_MAX_ITER", -1)  # every student handed to the SVD basis
    basis = fit_softmax_batched(X, Q, FORWARD_KL, tol=1e-11)
    assert not bool(basis.info["direct"].any()) and bool(basis.converged.all())
    assert bool(((direct.objective - basis.objective).abs() <= direct.gap + basis.gap + ROUNDING).all())


def test_a_huge_logit_range_makes_the_certificate_infinite_not_small():
    # The rounding count grows with the logits' range; gamma_c = cu/(1 - cu) turned negative past cu = 1 and a
    # non-optimal point got a finite gap (found in review: gap 0.18 at range 6e15, inf at range 0)
    from w2s_theory.solvers import softmax
    from w2s_theory.solvers.conditioning import unit_roundoff_gamma

    assert unit_roundoff_gamma(2.0**54) == float("inf") and unit_roundoff_gamma(torch.tensor([2.0**54]))[0] == float("inf")
    rng = np.random.default_rng(0)
    n, m, k = 50, 2, 2
    X = torch.tensor(rng.standard_normal((1, n, m)))
    Z = torch.cat([X, torch.ones(1, n, 1, dtype=X.dtype)], -1)
    q = torch.tensor(rng.dirichlet(np.ones(k), size=n))[None]
    eta = Z @ torch.tensor(rng.standard_normal((1, m + 1, k - 1)))  # far from optimal
    s = torch.softmax(torch.cat([eta, torch.zeros_like(eta)], -1), -1)
    qsum = q.sum(-1)
    for logit_range in (0.0, 6e15):
        gap, _, _ = softmax._tall_certificate(Z, None, q, qsum, s, (qsum[..., None] * s - q)[..., :-1],
                                              exact_kappa=False, logit_range=torch.tensor([logit_range],
                                                                                        dtype=torch.float64))
        assert gap[0] == float("inf"), logit_range
