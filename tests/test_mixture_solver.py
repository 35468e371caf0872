"""The batched mixture-head solver: closed forms, certificates that are true bounds, boundary cases."""

import numpy as np
import pytest
import torch

from w2s_theory.divergences import get_loss
from w2s_theory.solvers import fit
from w2s_theory.solvers.mixture import _project_columns_to_simplex, fit_mixture_batched


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


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "squared"])
def test_certified_gap_bounds_the_distance_to_a_tightly_solved_optimum(loss):
    # Stop early (loose tol), then compare with a tight solve: objective - optimum <= reported gap.
    rng = np.random.default_rng(3)
    X = torch.tensor(rng.dirichlet(np.full(6, 0.5), size=80))
    Q = torch.tensor(rng.dirichlet(np.ones(3), size=(20, 80)))
    L = get_loss(loss)
    tight = fit_mixture_batched(X, Q, L, tol=1e-13)
    for max_iter in (0, 1, 2):
        loose = fit_mixture_batched(X, Q, L, tol=1e-13, max_iter=max_iter)
        excess = loose.objective - tight.objective
        assert (excess <= loose.gap + 1e-12).all()
        assert (excess >= -tight.gap - 1e-12).all()
    assert (tight.gap <= 1e-10).all()


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
