"""The field's losses: Bregman generators and f-divergences, their batched fits and certificates, checked
against independent references (scipy, cvxpy) on the constant class (m = 1) and small instances."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from scipy.special import softmax

from tests.strategies import distributions, interior_distributions
from w2s_theory._backend import to_numpy
from w2s_theory.bregman import LOSS_GENERATORS, generator_for, three_point_defect
from w2s_theory.cli import main
from w2s_theory.divergences import get_loss
from w2s_theory.fchecks import f_slack, perturbation_bound
from w2s_theory.fdivergences import F_DIVERGENCES, F_LOSSES, extra_loss_names
from w2s_theory.solvers import fit
from w2s_theory.validation import InputError

FIELD_LOSSES = extra_loss_names()


# -- generators: property tests ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(LOSS_GENERATORS), st.data())
def test_every_generator_is_nonnegative_and_zero_exactly_on_the_diagonal(name, data):
    k = data.draw(st.sampled_from([2, 3, 5]))
    n = data.draw(st.integers(1, 5))
    g = generator_for(name, k)
    x = data.draw(distributions(n=n, k=k, allow_zeros=not g.pins_zeros or name != "itakura_saito"))
    y = data.draw(distributions(n=n, k=k))
    d = g.divergence(x, y)
    assert (d >= 0).all()
    assert np.all(g.divergence(x, x) == 0) or np.allclose(g.divergence(x, x), 0, atol=1e-15)
    far = np.abs(x - y).max(-1) > 1e-3
    assert (d[far] > 0).all()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(LOSS_GENERATORS), st.data())
def test_three_point_identity_holds_for_every_loss_generator(name, data):
    k = data.draw(st.sampled_from([2, 3, 5]))
    n = data.draw(st.integers(1, 5))
    g = generator_for(name, k)
    G, T, P = (data.draw(interior_distributions(n=n, k=k)) for _ in range(3))
    scale = np.abs(g.term_magnitude(G, T)) + np.abs(g.term_magnitude(G, P)) + np.abs(g.term_magnitude(P, T))
    assert np.all(np.abs(three_point_defect(g, G, T, P)) <= 1e-12 * (1 + scale))


def test_an_unknown_generator_or_f_is_a_one_line_error():
    for name in ("bregman:nope", "kl_but_wrong", "reverse_js"):
        with pytest.raises(ValueError) as e:
            get_loss(name)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError):
        fit(np.ones((4, 1)), np.full((4, 2), 0.5), loss="bregman:nope", head="mixture")


def test_mahalanobis_rejects_a_matrix_that_is_not_positive_definite():
    from w2s_theory.bregman import mahalanobis

    with pytest.raises(ValueError, match="positive definite"):
        mahalanobis(np.array([[1.0, 2.0], [2.0, 1.0]]))


# -- f-divergences: derivatives as the certificates assume them -------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(set(F_DIVERGENCES) - {"tv"})), st.floats(0.05, 0.95), st.floats(0.05, 0.95))
def test_f_divergence_derivatives_match_finite_differences(name, a, b):
    f = F_DIVERGENCES[name]
    h = 1e-6
    num_a = (f.term(a + h, b) - f.term(a - h, b)) / (2 * h)
    num_b = (f.term(a, b + h) - f.term(a, b - h)) / (2 * h)
    num_aa = (f.d_student(a + h, b) - f.d_student(a - h, b)) / (2 * h)
    assert np.isclose(f.d_student(a, b), num_a, rtol=1e-5, atol=1e-7)
    assert np.isclose(f.d_teacher(a, b), num_b, rtol=1e-5, atol=1e-7)
    assert np.isclose(f.dd_student(a, b), num_aa, rtol=1e-4, atol=1e-6)
    # the perturbation certificate uses: curvature non-increasing in the student's entry
    assert f.dd_student(min(a + 0.04, 1.0), b) <= f.dd_student(a, b) + 1e-12


# -- batched fits against independent optima on the constant class (m = 1) -------------------------------


def _scipy_constant_optimum(loss, teacher):
    """min over constant p in the simplex of mean_i loss(q_i, p), by BFGS on softmax logits (several starts)."""
    k = teacher.shape[-1]
    best = np.inf
    for start in (np.zeros(k), np.log(teacher.mean(0)), np.log(teacher[0])):
        res = minimize(lambda z: float(loss.per_sample(teacher, np.broadcast_to(softmax(z), teacher.shape)).mean()),
                       start, method="Nelder-Mead", options={"xatol": 1e-12, "fatol": 1e-15, "maxiter": 20000})
        best = min(best, res.fun)
    return best


def _cvxpy_tv_constant(teacher):
    import cvxpy as cp

    p = cp.Variable(teacher.shape[-1], nonneg=True)
    obj = cp.Minimize(0.5 * cp.sum(cp.abs(teacher - np.ones((teacher.shape[0], 1)) @ cp.reshape(p, (1, -1), order="C"))) /
                      teacher.shape[0])
    cp.Problem(obj, [cp.sum(p) == 1]).solve(solver=cp.CLARABEL)
    return obj.value


@pytest.mark.parametrize("loss", FIELD_LOSSES)
def test_batched_fit_on_the_constant_class_agrees_with_an_independent_optimum_within_its_certificate(loss):
    rng = np.random.default_rng(7)
    teacher = 0.9 * rng.dirichlet(np.ones(3), size=(2, 12)) + 0.1 / 3
    student = fit(np.ones((12, 1)), teacher, loss=loss, head="mixture")
    for b in range(2):
        reference = _cvxpy_tv_constant(teacher[b]) if loss == "tv" else \
            _scipy_constant_optimum(get_loss(loss), teacher[b])
        objective, gap = float(student.objective[b]), float(student.gap[b])
        assert np.isfinite(gap) and gap < 1e-6
        assert objective - gap <= reference + 1e-9  # the certificate's lower bound is below a feasible value
        assert objective <= reference + 1e-9  # and the batched student is at least as good


def test_frozen_k_head_fit_agrees_with_cvxpy_within_its_certificate():
    import cvxpy as cp

    from w2s_theory.solvers.mixture_of_softmax import fit_mixture_weights

    rng = np.random.default_rng(3)
    S = rng.dirichlet(np.ones(3), size=(1, 20, 4))
    Q = rng.dirichlet(np.ones(3), size=(1, 20))
    res = fit_mixture_weights(torch.as_tensor(S), torch.as_tensor(Q), get_loss("reverse_kl"), tol=1e-10)
    pi = cp.Variable(4, nonneg=True)
    P = sum(pi[j] * S[0, :, j, :] for j in range(4))
    obj = cp.Minimize(cp.sum(cp.rel_entr(P, Q[0])) / 20)
    cp.Problem(obj, [cp.sum(pi) == 1]).solve(solver=cp.CLARABEL)
    assert float(res.objective[0]) - float(res.gap[0]) <= obj.value + 1e-8
    assert float(res.objective[0]) <= obj.value + 1e-8


@pytest.mark.parametrize("loss", ["js", "jeffreys", "hellinger", "chi2", "reverse_chi2"])
def test_perturbation_certificate_bounds_how_far_a_loose_fit_moves_the_slack(loss):
    rng = np.random.default_rng(11)
    X = rng.dirichlet(np.full(4, 0.5), size=40)
    A = rng.dirichlet(np.ones(3), size=4).T
    truth = X @ A.T
    teacher = 0.9 * rng.dirichlet(np.ones(3), size=(3, 40)) + 0.1 / 3
    loose = fit(X, teacher, loss=loss, head="mixture", tol=1e-5, max_iter=3)
    tight = fit(X, teacher, loss=loss, head="mixture", tol=1e-12)
    truth_b = np.broadcast_to(truth, teacher.shape)
    s_loose = f_slack(loss, truth_b, teacher, to_numpy(loose.probs))[2]
    s_tight = f_slack(loss, truth_b, teacher, to_numpy(tight.probs))[2]
    bound = perturbation_bound(loss, truth_b, teacher, to_numpy(loose.probs), to_numpy(loose.gap))
    bound_tight = perturbation_bound(loss, truth_b, teacher, to_numpy(tight.probs), to_numpy(tight.gap))
    assert np.all(np.abs(s_loose - s_tight) <= bound + bound_tight + 1e-12)


# -- other heads and the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["js", "tv", "bregman:itakura_saito"])
def test_softmax_head_fits_field_losses_without_a_certificate(loss):
    rng = np.random.default_rng(0)
    res = fit(rng.normal(size=(30, 3)), rng.dirichlet(np.ones(3), size=30), loss=loss, head="softmax")
    assert res.certificate == "none" and np.isnan(float(res.gap[0]))
    assert np.isfinite(float(res.objective[0]))


def test_joint_k_head_fit_is_reported_uncertified_and_beats_one_head():
    rng = np.random.default_rng(1)
    X, Q = rng.normal(size=(40, 3)), rng.dirichlet(np.ones(3), size=(2, 40))
    one = fit(X, Q, loss="reverse_kl", head="mixture_of_softmax", heads=1, restarts=1)
    four = fit(X, Q, loss="reverse_kl", head="mixture_of_softmax", heads=4, restarts=2)
    assert four.certificate == "none" and not bool(four.converged.any())
    assert torch.all(four.objective <= one.objective + 1e-6)


@pytest.mark.parametrize("loss", FIELD_LOSSES)
def test_cli_fit_accepts_every_field_loss(loss, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "F.npy", rng.dirichlet(np.ones(3), size=15))
    np.save(tmp_path / "Q.npy", 0.9 * rng.dirichlet(np.ones(3), size=15) + 0.1 / 3)
    assert main(["fit", "--features", str(tmp_path / "F.npy"), "--teacher", str(tmp_path / "Q.npy"),
                 "--loss", loss, "--head", "mixture", "--out", str(tmp_path / "o.npz")]) == 0


def test_cli_fit_accepts_mahalanobis_on_the_linear_head(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "F.npy", rng.normal(size=(30, 3)))
    np.save(tmp_path / "Q.npy", rng.dirichlet(np.ones(3), size=30))
    assert main(["fit", "--features", str(tmp_path / "F.npy"), "--teacher", str(tmp_path / "Q.npy"),
                 "--loss", "bregman:mahalanobis", "--head", "linear", "--out", str(tmp_path / "o.npz")]) == 0
    assert float(np.load(tmp_path / "o.npz")["gap"].max()) <= 1e-9


@pytest.mark.parametrize("loss", ["bregman:nope", "reverse_js"])
def test_cli_fit_rejects_an_unknown_generator_or_f_with_exit_2(loss, tmp_path, capsys):
    np.save(tmp_path / "F.npy", np.ones((4, 1)))
    np.save(tmp_path / "Q.npy", np.full((4, 2), 0.5))
    code = main(["fit", "--features", str(tmp_path / "F.npy"), "--teacher", str(tmp_path / "Q.npy"),
                 "--loss", loss, "--out", str(tmp_path / "o.npz")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2s-theory fit: error:") and "\n" not in err


@pytest.mark.parametrize("loss", ["js", "jeffreys", "hellinger", "chi2", "reverse_chi2", "bregman:itakura_saito",
                                  "bregman:generalized_kl", "bregman:squared_norm", "bregman:mahalanobis"])
def test_linear_head_fit_on_the_constant_class_agrees_with_an_independent_optimum_within_its_certificate(loss):
    """The linear head's batched barrier solver takes the separable field losses; on the constant class its
    certified student agrees with scipy's optimum (an independent solver)."""
    rng = np.random.default_rng(7)
    teacher = 0.9 * rng.dirichlet(np.ones(3), size=(2, 12)) + 0.1 / 3
    student = fit(np.full((12, 1), 2.5), teacher, loss=loss, head="linear")
    for b in range(2):
        reference = _scipy_constant_optimum(get_loss(loss), teacher[b])
        objective, gap = float(student.objective[b]), float(student.gap[b])
        assert np.isfinite(gap) and gap <= 1e-9
        assert objective - gap <= reference + 1e-9
        assert objective <= reference + 1e-9


def _cvxpy_mahalanobis_linear(features, teacher, M):
    """min over the linear head of mean_i (p_i - q_i)^T M (p_i - q_i), by cvxpy (quad_form per sample)."""
    import cvxpy as cp

    n, m = features.shape
    k = teacher.shape[1]
    W, b = cp.Variable((m, k)), cp.Variable(k)
    P = features @ W + np.ones((n, 1)) @ cp.reshape(b, (1, k), order="C")
    objective = sum(cp.quad_form(P[i] - teacher[i], M) for i in range(n)) / n
    problem = cp.Problem(cp.Minimize(objective), [P >= 0, cp.sum(P, axis=1) == 1])
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == "optimal"
    return problem.value


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mahalanobis_on_the_linear_head_agrees_with_cvxpy_within_its_certificate(k):
    """The non-separable Mahalanobis loss on the linear head (m > 1, constraints active): the batched barrier
    solver's certified student matches cvxpy's quad_form optimum, and its bound lies below it."""
    from w2s_theory.bregman import kms_matrix

    rng = np.random.default_rng(11 + k)
    B, n, m = 3, 25, 3
    features = rng.normal(size=(B, n, m))
    # Sharp teachers that follow the features: the unconstrained least-squares head leaves the simplex.
    teacher = softmax(4 * features @ rng.normal(size=(B, m, k)), axis=-1)
    student = fit(features, teacher, loss="bregman:mahalanobis", head="linear")
    early = fit(features, teacher, loss="bregman:mahalanobis", head="linear", max_iter=3)  # far from optimal
    assert (student.probs.min() >= 0) and torch.allclose(student.probs.sum(-1), torch.ones(B, n, dtype=torch.float64))
    active = 0
    for b in range(B):
        reference = _cvxpy_mahalanobis_linear(features[b], teacher[b], kms_matrix(k))
        objective, gap = float(student.objective[b]), float(student.gap[b])
        assert np.isfinite(gap) and gap <= 1e-9
        assert objective - gap <= reference + 1e-8  # cvxpy's value is feasible to its own tolerance only
        assert objective <= reference + 1e-8
        active += int((student.probs[b] < 1e-6).any())
        # A certificate is a bound wherever the solver stopped, not only at its optimum.
        assert float(early.objective[b]) - float(early.gap[b]) <= reference + 1e-8 < float(early.objective[b])
    assert active  # the floor binds on some student: the certificate's multipliers are exercised


def test_linear_head_with_teacher_zeros_under_a_support_pinning_field_loss_is_a_one_line_error():
    teacher = np.array([[0.0, 1.0], [0.5, 0.5], [0.3, 0.7]])
    with pytest.raises(InputError, match="teacher zeros on the linear head"):
        fit(np.array([[0.1], [0.5], [0.9]]), teacher, loss="chi2", head="linear")


def test_tv_on_the_linear_head_is_certified_through_its_smoothing_against_cvxpy():
    """TV is not smooth: the linear head minimises a smoothing whose error is paid in the certificate
    (gap = smoothed gap + k mu / 2); the bound must hold against cvxpy's exact TV optimum on the constant class."""
    rng = np.random.default_rng(5)
    teacher = rng.dirichlet(np.ones(3), size=(2, 15))
    student = fit(np.ones((15, 1)), teacher, loss="tv", head="linear")
    for b in range(2):
        reference = _cvxpy_tv_constant(teacher[b])
        objective, gap = float(student.objective[b]), float(student.gap[b])
        assert np.isfinite(gap) and gap < 1e-6
        assert objective - gap <= reference + 1e-9 <= objective + 1e-9 + 2e-9  # a bound, and attained to rounding
