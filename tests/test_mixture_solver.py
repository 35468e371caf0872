"""The batched mixture-head solver: closed forms, certificates that are true bounds, boundary cases."""

import mpmath
import numpy as np
import pytest
import torch

from w2s_theory.divergences import get_loss
from w2s_theory.solvers import fit
from w2s_theory.solvers.mixture import STRONG_CONVEXITY_LOSSES, _project_columns_to_simplex, fit_mixture_batched
from tests.exact_optima import mixture_objective, two_class_mixture_optimum


def geometric_mean(q):
    g = np.exp(np.log(q).mean(axis=-2))
    return g / g.sum(-1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_constant_class_projections_are_geometric_and_arithmetic_means(k):
    rng = np.random.default_rng(k)
    teacher = rng.dirichlet(np.ones(k), size=(5, 9))
    features = np.ones((9, 1))
    reverse = fit(features, teacher, loss="reverse_kl")
    forward = fit(features, teacher, loss="forward_kl")
    assert np.allclose(reverse.params["A"][..., 0].numpy(), geometric_mean(teacher), atol=1e-9)
    assert np.allclose(forward.params["A"][..., 0].numpy(), teacher.mean(axis=-2), atol=1e-9)
    assert (reverse.gap <= 1e-10).all() and (forward.gap <= 1e-10).all()


def cluster_instance(rng, B, n, c, k, rare, zero_frac):
    """One-hot features over ``c`` clusters; teachers with exact zeros (class 0 always keeps mass, so the
    reverse problems stay feasible) and a rare last class scaled by ``rare``."""
    labels = rng.integers(0, c, size=(B, n))
    X = np.eye(c)[labels]
    Q = rng.dirichlet(np.ones(k), size=(B, n))
    Q[..., -1] *= rare
    zero = rng.random((B, n, k)) < zero_frac
    zero[..., 0] = False
    Q = np.where(zero, 0.0, Q)
    return X, Q / Q.sum(-1, keepdims=True)


def cluster_closed_form(X, Q, loss):
    """Optimum on one-hot features, cluster by cluster (columns of empty clusters do not matter): the mean of
    the teacher (forward KL/CE, squared), its normalised geometric mean (reverse KL, zero where any sample of
    the cluster has a zero), the best vertex (reverse CE)."""
    B, n, c = X.shape
    k = Q.shape[-1]
    A = np.full((B, k, c), 1.0 / k)
    for b in range(B):
        for j in range(c):
            S = Q[b][X[b][:, j] == 1]
            if len(S) == 0:
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                if loss in ("forward_kl", "forward_ce", "squared"):
                    A[b, :, j] = S.mean(0)
                elif loss == "reverse_kl":
                    g = np.exp(np.log(S).mean(0))
                    A[b, :, j] = g / g.sum()
                else:
                    A[b, :, j] = np.eye(k)[np.argmin(-np.log(S).sum(0))]
    return A


@pytest.mark.parametrize("mm_start,strong_convexity", [(0, False), (1, False), (0, True)])
@pytest.mark.parametrize("loss", ["forward_kl", "forward_ce", "reverse_kl", "reverse_ce", "squared"])
def test_cluster_features_with_teacher_zeros_and_a_rare_class_converge_to_the_closed_form(loss, mm_start,
                                                                                          strong_convexity):
    # Issue 8.3: such instances used to stall (an entry with optimum 0.0033 pinned at 1.5e-13, gap 4.7e9).
    rng = np.random.default_rng(83)
    L = get_loss(loss)
    for _ in range(4):
        k, c = int(rng.integers(2, 5)), int(rng.integers(2, 9))
        X, Q = cluster_instance(rng, 8, int(rng.integers(20, 300)), c, k, rare=float(rng.choice([1e-2, 1e-3, 1e-5])),
                                zero_frac=float(rng.choice([0.3, 0.6])))
        # the strong-convexity certificate where it applies (two classes, KL losses; refused elsewhere)
        sc = strong_convexity and k == 2 and loss in STRONG_CONVEXITY_LOSSES
        res = fit_mixture_batched(torch.tensor(X), torch.tensor(Q), L, tol=1e-10, mm_start=mm_start,
                                  strong_convexity=sc)
        assert res.certificate == ("frank_wolfe_or_strong_convexity" if sc else "frank_wolfe")
        A = torch.tensor(cluster_closed_form(X, Q, loss))
        optimum = L.per_sample(torch.tensor(Q), torch.tensor(X) @ A.transpose(1, 2)).mean(-1)
        assert (res.gap <= 1e-9).all() and res.converged.all()
        assert ((res.objective - optimum).abs() <= 1e-12).all()
        # objective - optimum <= gap; where the float objectives' rounding exceeds the gap (the strong-convexity
        # certificate reaches 1e-24), evaluated exactly, with the closed form made exactly feasible as the reference
        for b in (res.objective - optimum > res.gap).nonzero()[:, 0].tolist():
            exact = mixture_objective(X[b], Q[b], res.params["A"][b].numpy(), loss)
            reference = mixture_objective(X[b], Q[b], A[b].numpy(), loss, feasible=True)  # >= the optimum
            assert exact - reference <= float(res.gap[b]), (b, float(exact - reference), float(res.gap[b]))


def test_the_issue_8_3_instance_shape_converges_with_newton_alone():
    # Without majorise-minimise help at the start, Newton's own safeguards (relative Hessian reuse, barrier
    # floor) and the rescue steps must still reach the closed form: features one-hot over 6 clusters, a
    # teacher with exact zeros and a rare class, forward KL.
    rng = np.random.default_rng(0)
    X, Q = cluster_instance(rng, 16, 200, 6, 4, rare=1e-2, zero_frac=0.5)
    L = get_loss("forward_kl")
    res = fit_mixture_batched(torch.tensor(X), torch.tensor(Q), L, tol=1e-10, mm_start=0)
    A = torch.tensor(cluster_closed_form(X, Q, "forward_kl"))
    optimum = L.per_sample(torch.tensor(Q), torch.tensor(X) @ A.transpose(1, 2)).mean(-1)
    assert (res.gap <= 1e-9).all()
    assert ((res.objective - optimum).abs() <= 1e-12).all()


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "squared"])
def test_certified_gap_bounds_the_distance_to_the_closed_form_optimum(loss):
    # Stop early, then compare with the optimum from the closed form on cluster features (never from the
    # solver under test): objective - optimum <= reported gap at every stage.
    rng = np.random.default_rng(3)
    X, Q = cluster_instance(rng, 20, 80, 6, 3, rare=0.1, zero_frac=0.0)
    X = torch.tensor(X)
    Q = torch.tensor(Q)
    L = get_loss(loss)
    A = torch.tensor(cluster_closed_form(X.numpy(), Q.numpy(), loss))
    optimum = L.per_sample(Q, X @ A.transpose(1, 2)).mean(-1)
    for max_iter in (0, 1, 2, 200):
        res = fit_mixture_batched(X, Q, L, tol=1e-13, max_iter=max_iter)
        excess = res.objective - optimum
        assert (excess <= res.gap).all(), (max_iter, (excess - res.gap).max())
        assert (excess >= -1e-15).all()  # the optimum is a lower bound (up to its own rounding)


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_certified_gap_bounds_the_distance_to_the_cvxpy_optimum_on_mixed_features(loss):
    # Overlapping (not one-hot) features: cvxpy's head is feasible, so its objective is at least the optimum
    # and obj - obj_cvxpy <= obj - optimum <= gap must hold at every stage.
    from w2s_theory.solvers.reference import fit_reference

    rng = np.random.default_rng(4)
    X = rng.dirichlet(np.full(5, 0.5), size=60)
    Q = rng.dirichlet(np.ones(3), size=60)
    ref = fit_reference(X, Q, loss)
    for max_iter in (0, 1, 2, 3):
        res = fit_mixture_batched(torch.tensor(X), torch.tensor(Q)[None], get_loss(loss), tol=1e-13,
                                  max_iter=max_iter)
        assert res.objective.item() - ref.objective.item() <= res.gap.item()


def test_shared_and_per_student_features_give_the_same_students():
    rng = np.random.default_rng(4)
    X = rng.dirichlet(np.ones(5), size=60)
    Q = rng.dirichlet(np.ones(2), size=(7, 60))
    shared = fit(X, Q, loss="reverse_kl")
    per_student = fit(np.broadcast_to(X, (7, 60, 5)).copy(), Q, loss="reverse_kl")
    assert np.allclose(shared.objective.numpy(), per_student.objective.numpy(), atol=1e-10)
    assert (shared.gap <= 1e-10).all() and (per_student.gap <= 1e-10).all()


def test_reverse_kl_keeps_student_at_zero_where_the_teacher_is_zero():
    teacher = np.array([[1.0, 0.0], [0.3, 0.7], [0.6, 0.4]])
    features = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    result = fit(features, teacher, loss="reverse_kl")
    A = result.params["A"][0].numpy()
    assert A[1, 0] == 0.0  # feature 0 only meets a sample whose teacher puts no mass on class 1
    assert torch.isfinite(result.objective).all() and (result.gap <= 1e-10).all()


def test_contradicting_teacher_zeros_make_the_reverse_problem_infeasible():
    teacher = np.array([[1.0, 0.0], [0.0, 1.0]])
    result = fit(np.ones((2, 1)), teacher, loss="reverse_kl")
    assert result.objective.item() == np.inf and result.gap.item() == np.inf
    assert not result.converged.item()


def test_reverse_cross_entropy_is_solved_by_one_oracle_call():
    rng = np.random.default_rng(5)
    X = rng.dirichlet(np.ones(4), size=30)
    Q = rng.dirichlet(np.ones(3), size=(3, 30))
    result = fit(X, Q, loss="reverse_ce")
    A = result.params["A"].numpy()
    assert set(np.unique(A)) <= {0.0, 1.0}  # a vertex of the product of simplices
    assert (result.gap <= 1e-12).all()
    # no other vertex does better: compare with random vertices
    for _ in range(50):
        V = np.eye(3)[rng.integers(0, 3, size=(3, 4))].transpose(0, 2, 1)
        value = -(np.einsum("nm,bkm->bnk", X, V) * np.log(Q)).sum(-1).mean(-1)
        assert (value >= result.objective.numpy() - 1e-12).all()


def test_unused_features_and_single_sample_are_fine():
    X = np.array([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [1.0, 0.0, 0.0]])
    Q = np.array([[0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    for loss in ("reverse_kl", "forward_kl", "squared"):
        assert fit(X, Q, loss=loss).gap.item() <= 1e-10
    single = fit(np.array([[0.3, 0.7]]), np.array([[0.2, 0.8]]), loss="reverse_kl")
    assert abs(single.objective.item()) <= 1e-12  # the teacher itself is in the class


def test_simplex_projection_is_exact_and_respects_forbidden_entries():
    rng = np.random.default_rng(6)
    V = torch.tensor(rng.normal(size=(50, 4, 7)))
    allowed = torch.tensor(rng.random((50, 4, 7)) > 0.3)
    allowed[:, 0] = True
    P = _project_columns_to_simplex(V, allowed)
    assert torch.allclose(P.sum(1), torch.ones(50, 7, dtype=P.dtype))
    assert (P >= 0).all() and (P[~allowed] == 0).all()
    # KKT: P = max(V - theta, 0) on allowed entries for one theta per column
    theta = (V - P)[(P > 0)]
    assert theta.numel() > 0
    for b in range(3):
        for j in range(7):
            pos = (P[b, :, j] > 0)
            t = (V[b, :, j] - P[b, :, j])[pos]
            assert torch.allclose(t, t[0].expand_as(t), atol=1e-12)
            assert (V[b, :, j][allowed[b, :, j] & ~pos] <= t[0] + 1e-12).all()


def _sort_based_projection(V, allowed):
    """The general projection's own formula (Duchi et al. 2008: sort, prefix sums, last index where
    ``u_r - (sum_{s<=r} u_s - 1)/r > 0``), evaluated here for any ``k`` as the reference of the ``k = 2`` path."""
    col_max = torch.where(allowed, V, torch.full_like(V, -float("inf"))).amax(dim=1, keepdim=True)
    V = torch.where(allowed, V, col_max - 2)
    u, _ = torch.sort(V, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    j = torch.arange(1, V.shape[1] + 1, dtype=V.dtype)[None, :, None]
    rho = (u - css / j > 0).to(V.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)
    theta = torch.gather(css, 1, rho) / (rho + 1).to(V.dtype)
    return torch.where(allowed, (V - theta).clamp_min(0), torch.zeros_like(V))


def test_two_class_projection_is_bit_identical_to_the_sort_based_formula():
    """The ``k = 2`` path replaces sort, prefix sums and arg-max by a max, a min and a comparison: the same
    floating-point operations on each entry, so the students of earlier runs are reproduced bit for bit.
    Inputs: scales 1e-20..1e20, ties, one entry at 1e300 and a subnormal, forbidden entries."""
    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        scale = 10.0 ** (trial % 41 - 20)
        V = torch.randn(40, 2, 16, generator=g, dtype=torch.float64) * scale
        V[:, :, 0] = 0.5
        V[:, 1, 1:4] = V[:, 0, 1:4]
        V[:, 0, 4], V[:, 1, 5] = 1e300, 5e-324
        allowed = torch.rand(40, 2, 16, generator=g) < 0.8
        fast, reference = _project_columns_to_simplex(V, allowed), _sort_based_projection(V, allowed)
        assert torch.equal(fast.isnan(), reference.isnan()), trial
        assert torch.equal(fast.nan_to_num(-7.0), reference.nan_to_num(-7.0)), trial
        assert (fast[~allowed] == 0).all()


def test_sub_batches_give_bit_identical_students():
    # The per-student layout's arithmetic for one student does not depend on the rest of the batch; the
    # sweep's reproducibility (rows independent of chunking) and the CPU sub-batching rely on it.
    rng = np.random.default_rng(7)
    X = torch.tensor(rng.dirichlet(np.ones(8), size=(30, 100)))
    Q = torch.tensor(rng.dirichlet(np.ones(3), size=(30, 100)))
    L = get_loss("reverse_kl")
    whole = fit_mixture_batched(X, Q, L, sub_batch_bytes=None)
    pieces = fit_mixture_batched(X, Q, L, sub_batch_bytes=7 * X[0].numel() * 8)  # sub-batches of 7
    alone = fit_mixture_batched(X[11:12], Q[11:12], L)
    assert pieces.batch_size == 30
    assert torch.equal(whole.params["A"], pieces.params["A"]) and torch.equal(whole.gap, pieces.gap)
    assert torch.equal(whole.params["A"][11:12], alone.params["A"])


def _kl_terms_inputs(k, seed):
    rng = np.random.default_rng(seed)
    Q = torch.tensor(rng.dirichlet(np.ones(k), size=(4, 50))).transpose(1, 2).contiguous()  # (B, k, n)
    P = torch.tensor(rng.dirichlet(np.ones(k), size=(4, 50))).transpose(1, 2).contiguous()
    Q[1, 0, :10] = 0  # teacher zeros: pinned entries (student 0 there) and free ones (student > 0)
    Q[1] /= Q[1].sum(0)
    P[1, 0, :5] = 0
    P[1] /= P[1].sum(0)
    P[2, 1, 3] = 0  # a student 0 where the teacher has mass: infinite forward loss, finite reverse loss
    P[2] /= P[2].sum(0)
    return Q, P


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "forward_ce"])
@pytest.mark.parametrize("k", [2, 3])
def test_kl_terms_agree_with_the_loss_definitions(loss, k):
    # The solver's fused KL terms (teacher logarithms taken once, no xlogy) against the Loss's own value,
    # derivative and curvature, with teacher zeros and student zeros; with and without zeros in the batch.
    from w2s_theory.solvers.mixture import _KLTerms, _LossTerms

    L = get_loss(loss)
    Q, P = _kl_terms_inputs(k, 11)
    for rows in (torch.arange(4), torch.tensor([0, 3])):  # with zeros in the batch, and without
        q, p = Q[rows], P[rows]
        fast, slow = _KLTerms(L, q, q), _LossTerms(L, q, q)
        assert fast.zeros == bool(len(rows) == 4)
        assert torch.allclose(fast.value(p), slow.value(p), rtol=1e-13, atol=0, equal_nan=False) or (
            torch.equal(torch.isinf(fast.value(p)), torch.isinf(slow.value(p)))
            and torch.allclose(*(v.value(p)[torch.isfinite(slow.value(p))] for v in (fast, slow)), rtol=1e-13))
        finite = torch.isfinite(slow.derivative(p))
        both = fast.derivative_and_magnitude(p)
        assert torch.equal(torch.isfinite(both[:, :k]), finite)
        assert torch.allclose(both[:, :k][finite], slow.derivative(p)[finite], rtol=1e-13, atol=1e-15)
        ok = finite & (p > 0)
        d = slow.derivative(p)
        assert torch.allclose(fast.curvature(p, both[:, :k], False)[ok], slow.curvature(p, d, False)[ok], rtol=1e-13)


def test_reverse_kl_rounding_allowance_covers_tiny_probabilities():
    # The derivative log p - (log q - 1) at p ~ q ~ 1e-300 is O(1) but its logarithms are -690: their
    # rounding must be paid for. Checked against mpmath on the exact float inputs (so gamma_4, not m + 4);
    # the former allowance |l'| + 2 is too small on some of these inputs.
    import mpmath

    from w2s_theory.solvers.conditioning import unit_roundoff_gamma as _gamma
    from w2s_theory.solvers.mixture import _KLTerms

    rng = np.random.default_rng(5)
    p = torch.tensor(10.0 ** rng.uniform(-305, -250, size=200))
    q = p * torch.tensor(rng.uniform(0.5, 2.0, size=200))
    P, Q = torch.stack([p, 1 - p])[None], torch.stack([q, 1 - q])[None]  # (1, 2, 200)
    both = _KLTerms(get_loss("reverse_kl"), Q, Q).derivative_and_magnitude(P)
    dphi, M = both[0, 0], both[0, 2]
    with mpmath.workdps(60):
        err = torch.tensor([float(abs(mpmath.mpf(d) - (mpmath.log(mpmath.mpf(a)) - mpmath.log(mpmath.mpf(b)) + 1)))
                            for d, a, b in zip(dphi.tolist(), p.tolist(), q.tolist())], dtype=torch.float64)
    assert (err <= _gamma(4, torch.float64) * M).all()
    assert (err > _gamma(4, torch.float64) * (dphi.abs() + 2)).any()


@pytest.mark.parametrize("loss, kinds", [("reverse_kl", ("dense", "near_one_hot", "dirichlet")),
                                         ("forward_kl", ("dense", "teacher_zeros"))])
def test_students_are_bit_identical_alone_and_in_a_batch_of_mixed_workloads(loss, kinds):
    # At the benchmark's sizes the Hessians and gradients are formed a few students at a time, near one-hot
    # students start with a majorise-minimise step, and teacher zeros switch on masks for the whole batch:
    # none of it may change a student's numbers.
    from w2s_theory.bench import workload

    parts = [workload(2, n=600, m=64, seed=3, kind=kind) for kind in kinds]
    X = torch.cat([f for f, _ in parts])
    Q = torch.cat([t for _, t in parts])
    L = get_loss(loss)
    whole = fit_mixture_batched(X, Q, L, tol=1e-9)
    assert whole.converged.all()
    for b in range(X.shape[0]):
        alone = fit_mixture_batched(X[b : b + 1], Q[b : b + 1], L, tol=1e-9)
        assert torch.equal(alone.params["A"][0], whole.params["A"][b]), b
        assert torch.equal(alone.gap[0], whole.gap[b]) and alone.iterations[0] == whole.iterations[b]


_EXACT_DERIVATIVES = {  # d/dp of the per-class loss term, student p, teacher q (mpmath)
    "bregman:negative_entropy": lambda p, q: mpmath.log(p) - mpmath.log(q),
    "bregman:generalized_kl": lambda p, q: mpmath.log(p) - mpmath.log(q),
    "bregman:itakura_saito": lambda p, q: 1 / q - 1 / p,
    "bregman:squared_norm": lambda p, q: 2 * p - 2 * q,
    "js": lambda p, q: (mpmath.log(p) - mpmath.log((p + q) / 2)) / 2,
    "jeffreys": lambda p, q: mpmath.log(p) - mpmath.log(q) + 1 - q / p,
    "hellinger": lambda p, q: 1 - mpmath.sqrt(q / p),
    "chi2": lambda p, q: 2 * (p - q) / q,
    "reverse_chi2": lambda p, q: 1 - (q / p) ** 2,
    "squared": lambda p, q: 2 * (p - q),
}


@pytest.mark.parametrize("name", sorted(_EXACT_DERIVATIVES))
@pytest.mark.parametrize("scale", [(-305, -250), (-12, -2), (-1, 0)])
def test_the_rounding_allowance_covers_each_field_losss_derivative_at_a_perturbed_prediction(name, scale):
    # The mixture's Frank-Wolfe gap pays gamma_{m+4} M per derivative: the formula's own rounding and the
    # prediction's relative error gamma_m. Derivatives that cancel (log p - log q, 1/q - 1/p at p ~ q) broke
    # the former allowance |l'| + 2 by factors up to 2e7 (an itakura_saito gap 1% below its exact value).
    from w2s_theory.solvers.conditioning import unit_roundoff_gamma as _gamma
    from w2s_theory.solvers.mixture import _loss_terms

    m = 8
    rng = np.random.default_rng(11)
    p = torch.tensor(10.0 ** rng.uniform(*scale, size=300))
    q = p * torch.tensor(rng.uniform(0.5, 2.0, size=300))
    delta = _gamma(m, torch.float64) * torch.tensor(rng.choice([-1.0, 1.0], size=300))
    P = torch.stack([p * (1 + delta), 1 - p])[None]  # the computed prediction, off by gamma_m
    Q = torch.stack([q, 1 - q])[None]
    terms = _loss_terms(get_loss(name), Q, Q)
    both = terms.derivative_and_magnitude(P)
    dphi, M = both[0, 0], both[0, 2]
    f = _EXACT_DERIVATIVES[name]
    with mpmath.workdps(60):
        err = [abs(mpmath.mpf(d) - f(mpmath.mpf(a), mpmath.mpf(b))) for d, a, b in zip(dphi.tolist(), p.tolist(),
                                                                                      q.tolist())]
    err = torch.tensor([float(e) for e in err], dtype=torch.float64)
    assert torch.isfinite(dphi).all()
    assert (err <= _gamma(m + 4, torch.float64) * M).all(), float((err / M).max() / _gamma(m + 4, torch.float64))


def _tiny_class_instance(seed: int, n: int = 40):
    """Simplex features (m = 3) and a teacher from a truth whose first class has mass about 1e-9, perturbed by
    0.1%: derivatives cancel there and the iteration reaches its rounding floor."""
    rng = np.random.default_rng(seed)
    X = rng.dirichlet(np.ones(3), size=n)
    truth = np.array([[1e-9, 2e-9, 0.5e-9], [0.3, 0.6, 0.2], [0.0, 0.0, 0.0]])
    truth[2] = 1 - truth[0] - truth[1]
    Q = X @ truth.T * (1 + 1e-3 * rng.standard_normal((n, 3)))
    return X, Q / Q.sum(1, keepdims=True)


def test_an_itakura_saito_students_gap_bounds_its_exact_frank_wolfe_gap():
    # One class with mass about 1e-9: the computed derivative 1/q - 1/p cancels to a tiny fraction of 1/p
    # (found in review: the reported gap was 1.32682e-6 against an exact 1.33941e-6)
    X, Q = _tiny_class_instance(3)
    n, m, k = X.shape[0], X.shape[1], Q.shape[1]
    result = fit_mixture_batched(torch.tensor(X)[None], torch.tensor(Q)[None], get_loss("bregman:itakura_saito"),
                                 tol=1e-13)
    A = result.params["A"][0].tolist()
    with mpmath.workdps(80):
        G = [[mpmath.mpf(0)] * m for _ in range(k)]
        for i in range(n):
            for y in range(k):
                p = mpmath.fsum(mpmath.mpf(A[y][j]) * mpmath.mpf(X[i, j]) for j in range(m))
                d = 1 / mpmath.mpf(Q[i, y]) - 1 / p
                for j in range(m):
                    G[y][j] += d * mpmath.mpf(X[i, j]) / n
        exact = mpmath.fsum(mpmath.fsum(mpmath.mpf(A[y][j]) * G[y][j] for y in range(k)) - min(G[y][j] for y in range(k))
                            for j in range(m))
    assert float(exact) <= float(result.gap[0])


def test_the_gap_pays_for_columns_that_sum_to_one_only_within_rounding():
    # frank_wolfe_gap sums A (G - Gmin) per column, which is <G, A> - min G only where the column sums to 1;
    # with columns off by 1e-9 (far more than rounding, to make the term visible) the certified gap must still
    # bound the exact <G, A - S> over the vertices S
    from w2s_theory.solvers.mixture import _StudentFeatures, _allowed_entries, _certified_gradient, _loss_terms

    rng = np.random.default_rng(5)
    n, m, k = 30, 4, 3
    X = torch.tensor(rng.dirichlet(np.ones(m), size=(1, n)))
    Q = torch.tensor(rng.dirichlet(np.ones(k), size=(1, n)))
    A = torch.tensor(rng.dirichlet(np.ones(k), size=(1, m))).transpose(1, 2) * (1 - 1e-9)
    loss = get_loss("forward_kl")
    design = _StudentFeatures(X, torch.float64)
    probs = design.predict(A)
    terms = _loss_terms(loss, Q.transpose(1, 2), Q.transpose(1, 2))
    G, gap, _, _, _ = _certified_gradient(design, terms, A, probs, _allowed_entries(design, Q.transpose(1, 2), loss))
    with mpmath.workdps(50):
        exact = mpmath.fsum(mpmath.fsum(mpmath.mpf(a) * mpmath.mpf(g) for a, g in zip(A[0, :, j].tolist(),
                                                                                    G[0, :, j].tolist()))
                            - min(mpmath.mpf(g) for g in G[0, :, j].tolist()) for j in range(m))
    assert float(exact) <= float(gap[0])


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_a_student_returns_the_best_certified_point_it_visited(loss):
    # A class with mass about 1e-9 and a tol below the rounding floor: the iteration runs to max_iter and
    # wanders off points it had certified (found in review: reverse KL returned gap 2.2e-3 after visiting one
    # of 4.6e-13; forward KL 3.5e-5 to 2e-3)
    X, Q = _tiny_class_instance(1)
    result = fit_mixture_batched(torch.tensor(X)[None], torch.tensor(Q)[None], get_loss(loss), tol=1e-13)
    assert float(result.gap[0]) <= 1e-8
    # the returned gap is the certificate of the returned point
    from w2s_theory.solvers.mixture import _StudentFeatures, _allowed_entries, _certified_gradient, _loss_terms

    design = _StudentFeatures(torch.tensor(X)[None], torch.float64)
    A = result.params["A"]
    teacher = torch.tensor(Q)[None].transpose(1, 2)
    terms = _loss_terms(get_loss(loss), teacher, teacher)
    _, gap, _, _, _ = _certified_gradient(design, terms, A, design.predict(A),
                                          _allowed_entries(design, teacher, get_loss(loss)),
                                          modulus=result.info.get("modulus"))
    assert torch.equal(gap, result.gap)


def test_the_work_counters_count_each_pass_over_the_features_and_add_up_over_sub_batches():
    """``info["work"]``: at ``max_iter = 0`` a student costs its start's prediction, one gradient sweep and the
    Hessian formed in that sweep (k = 2, one block); sub-batches sum to the counts of the whole batch."""
    g = torch.Generator().manual_seed(5)
    X = torch.softmax(torch.randn(6, 40, 5, generator=g, dtype=torch.float64), -1)
    Q = torch.softmax(torch.randn(6, 40, 2, generator=g, dtype=torch.float64), -1)
    loss = get_loss("reverse_kl")
    start = fit_mixture_batched(X, Q, loss, tol=1e-9, max_iter=0)
    assert start.info["work"] == {"feature_reads": 2 * 6, "hessians": 6}
    parts = fit_mixture_batched(X, Q, loss, tol=1e-9, sub_batch_bytes=2 * 40 * 5 * 8)  # 2 students a part
    alone = [fit_mixture_batched(X[s : s + 2], Q[s : s + 2], loss, tol=1e-9, sub_batch_bytes=None) for s in (0, 2, 4)]
    assert parts.info["work"] == {key: sum(a.info["work"][key] for a in alone) for key in ("feature_reads", "hessians")}
    # every Newton iteration reads the features at least twice (a trial's prediction, the next gradient)
    assert parts.info["work"]["feature_reads"] >= 2 * int(parts.iterations.sum()) + 6


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_the_strong_convexity_gap_bounds_the_exact_suboptimality_at_every_iterate(loss):
    """Two classes: the returned gap (the smaller of the Frank-Wolfe gap and ||v||^2 / 2 mu) is at least the
    exact objective minus the exact optimum (mpmath Newton at 60 digits, first-order condition to 1e-40), at
    the points after 1, 2 and 3 iterations and at the end; most of those gaps come from the modulus."""
    rng = np.random.default_rng(12)
    n, m, B = 20, 3, 10
    X = rng.dirichlet(np.full(m, 2.0), size=(B, n))
    heads = rng.dirichlet(np.ones(2), size=(B, m))  # (B, m, 2): interior columns
    Q = np.clip(X @ heads + rng.normal(scale=0.05, size=(B, n, 2)), 0.05, None)
    Q /= Q.sum(-1, keepdims=True)
    L = get_loss(loss)
    optima = [two_class_mixture_optimum(X[b], Q[b], loss) for b in range(B)]
    checked, by_modulus = 0, 0
    for max_iter in (1, 2, 3, 50):
        res = fit_mixture_batched(torch.tensor(X), torch.tensor(Q), L, tol=1e-30, max_iter=max_iter,
                                  strong_convexity=True)
        assert res.certificate == "frank_wolfe_or_strong_convexity"
        for b in range(B):
            if optima[b] is None:
                continue
            exact = mixture_objective(X[b], Q[b], res.params["A"][b].numpy(), loss)
            assert exact - optima[b] <= float(res.gap[b]), (max_iter, b, float(exact - optima[b]), float(res.gap[b]))
            checked += 1
            by_modulus += bool(res.info["strong_convexity"][b])
    assert checked >= 4 * 6 and by_modulus >= checked // 2  # at least 6 students with an interior optimum
    assert float(res.gap.max()) < 1e-20  # quadratic: far below the Frank-Wolfe gap's rounding floor


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_the_strong_convexity_modulus_is_below_the_curvature_at_every_feasible_point_tried(loss):
    """mu <= lambda_min of the exact two-class Hessian at feasible points where the curvature is smallest:
    the uniform start (reverse KL's minimum, 4/s per sample) and the corners a = 0, a = 1 (forward KL with
    one-hot teachers: q0/p0^2 at p0 = s, a quarter of the start's curvature), plus random points; and mu is
    within the shift's factor of the bound it certifies (not vacuous)."""
    rng = np.random.default_rng(21)
    n, m, B = 60, 5, 8
    X = rng.dirichlet(np.full(m, 1.5), size=(B, n))
    Q = rng.dirichlet(np.ones(2), size=(B, n))
    if loss == "forward_kl":  # half the students with one-hot teachers (no pinning for forward losses)
        Q[: B // 2] = np.eye(2)[np.zeros((B // 2, n), dtype=int)]
    res = fit_mixture_batched(torch.tensor(X), torch.tensor(Q), get_loss(loss), tol=1e-9, strong_convexity=True)
    modulus = res.info["modulus"].numpy()
    assert (modulus > 0).all()
    for b in range(B):
        s = X[b].sum(1)
        points = [np.full(m, 0.5), np.zeros(m), np.ones(m)] + [rng.random(m) for _ in range(5)]
        smallest = []
        for a in points:
            p0, p1 = X[b] @ a, X[b] @ (1 - a)
            with np.errstate(divide="ignore", invalid="ignore"):
                w = 1 / p0 + 1 / p1 if loss == "reverse_kl" else np.where(Q[b, :, 0] > 0, Q[b, :, 0] / p0**2, 0) + \
                    np.where(Q[b, :, 1] > 0, Q[b, :, 1] / p1**2, 0)
            if np.isfinite(w).all():
                smallest.append(np.linalg.eigvalsh((X[b] * w[:, None]).T @ X[b] / n)[0])
        assert modulus[b] <= min(smallest) * (1 + 1e-9), (b, modulus[b], min(smallest))
        share = 1.0 if loss == "reverse_kl" else 0.25
        start = np.linalg.eigvalsh((X[b] * (4 / s if loss == "reverse_kl" else 4 * Q[b].sum(1) / s**2)[:, None]).T
                                   @ X[b] / n)[0]
        assert modulus[b] >= 0.5 * share * start


def test_a_proved_shift_is_below_the_exact_smallest_eigenvalue():
    """shift_is_below_the_spectrum: one Cholesky factorisation of M - (t + c)I proves lambda_min(M) >= t. On
    random 8 x 8 matrices (entries scaled 1e-8..1e8, lambda_min down to 1e-12 of the largest, some with
    near-duplicate columns) with exact eigenvalues from mpmath: no shift above lambda_min is proved (a plain
    Cholesky of M - tI succeeds at t = lambda_min (1 + 1e-6) on such matrices), and 0.99 lambda_min is."""
    from w2s_theory.solvers.conditioning import shift_is_below_the_spectrum as _shift_is_below_the_spectrum

    rng = np.random.default_rng(31)
    for trial in range(40):
        p = 8
        Z = rng.normal(size=(p, p)) * 10.0 ** rng.integers(-8, 9)
        Z[:, 0] = Z[:, 1] * (1 + 10.0 ** -rng.integers(3, 9)) if trial % 4 == 0 else Z[:, 0]
        M = Z @ Z.T + np.eye(p) * abs(Z).max() ** 2 * 10.0 ** -rng.integers(4, 13)
        with mpmath.workdps(60):
            exact = min(mpmath.eigsy(mpmath.matrix(M.tolist()))[0])
        lam = float(exact)
        shifts = torch.tensor([0.99 * lam, lam * (1 + 1e-6), lam * 1.01, 2 * lam])
        proved = _shift_is_below_the_spectrum(torch.tensor(M)[None].expand(4, p, p).clone(), shifts.double())
        if 0.01 * lam > 1e-13 * np.trace(M):  # a margin above the rounding of the factorisation: provable
            assert bool(proved[0]), (trial, lam)
        for t, ok in zip(shifts.tolist(), proved.tolist()):
            assert not ok or mpmath.mpf(t) <= exact, (trial, t, lam)
    # Nearly singular: lambda_min at the level of the factorisation's rounding, where a plain Cholesky of
    # M - tI decides by chance; none of these shifts above lambda_min may be proved
    wrong = 0
    for trial in range(60):
        Qo, _ = np.linalg.qr(rng.normal(size=(8, 8)))
        M = (Qo * np.r_[10.0 ** -rng.uniform(14, 18), rng.uniform(0.5, 2, 7)]) @ Qo.T
        M = (M + M.T) / 2
        with mpmath.workdps(60):
            lam = min(mpmath.eigsy(mpmath.matrix(M.tolist()))[0])
        if lam <= 0:
            continue
        shifts = torch.tensor([float(lam) * 1.5, float(lam) * 3], dtype=torch.float64)
        proved = _shift_is_below_the_spectrum(torch.tensor(M)[None].expand(2, 8, 8).clone(), shifts)
        wrong += int(proved.sum())
    assert wrong == 0


def test_the_strong_convexity_certificate_is_refused_where_it_has_no_modulus():
    # three classes, a loss without a start curvature share, a warm start: no modulus is proved there, so the
    # gap would be the Frank-Wolfe one under the other certificate's name
    rng = np.random.default_rng(5)
    X = torch.tensor(rng.dirichlet(np.ones(4), size=(2, 30)))
    Q2, Q3 = (torch.tensor(rng.dirichlet(np.ones(k), size=(2, 30))) for k in (2, 3))
    with pytest.raises(ValueError, match="k = 3"):
        fit_mixture_batched(X, Q3, get_loss("reverse_kl"), strong_convexity=True)
    with pytest.raises(ValueError, match="squared"):
        fit_mixture_batched(X, Q2, get_loss("squared"), strong_convexity=True)
    A0 = torch.full((2, 2, 4), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="warm start"):
        fit_mixture_batched(X, Q2, get_loss("reverse_kl"), A0=A0, strong_convexity=True)
    assert fit_mixture_batched(X, Q2, get_loss("reverse_kl"), strong_convexity=True).certificate == \
        "frank_wolfe_or_strong_convexity"
