"""Divergences: the properties the theory relies on, on numpy and torch, with boundary cases."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import distributions, interior_distributions
from w2s_theory.divergences import (
    LOSSES, as_categorical, cross_entropy, entropy, generalized_kl, get_loss, kl, reverse, squared,
    total_variation,
)

ROUND = 1e-12


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_kl_is_nonnegative_and_zero_iff_equal(data):
    p = data.draw(distributions())
    q = data.draw(distributions(n=p.shape[0], k=p.shape[1]))
    d = kl(p, q)
    assert np.all(d >= -ROUND)
    assert np.all(np.abs(kl(p, p)) <= ROUND)
    different = np.abs(p - q).max(-1) > 1e-6
    assert np.all(d[different] > 0)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_pinsker_inequality_tv_squared_at_most_half_kl(data):
    p = data.draw(distributions())
    q = data.draw(distributions(n=p.shape[0], k=p.shape[1]))
    # TV(p, q)^2 <= KL(p||q) / 2, in both directions (TV is symmetric)
    tv = total_variation(p, q)
    assert np.all(tv**2 <= kl(p, q) / 2 + ROUND)
    assert np.all(tv**2 <= kl(q, p) / 2 + ROUND)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_three_point_identity_of_kl(data):
    # KL(g||t) - KL(g||p) - KL(p||t) = sum_y (g_y - p_y) log(p_y / t_y), wherever all terms are finite
    p = data.draw(interior_distributions())
    t = data.draw(interior_distributions(n=p.shape[0], k=p.shape[1]))
    g = data.draw(distributions(n=p.shape[0], k=p.shape[1]))
    left = kl(g, t) - kl(g, p) - kl(p, t)
    right = ((g - p) * np.log(p / t)).sum(-1)
    assert np.allclose(left, right, atol=1e-12, rtol=1e-10)


def test_kl_is_infinite_not_nan_where_q_is_zero_below_positive_p():
    p = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    q = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    d = kl(p, q)
    assert d[0] == np.inf and d[1] == 0.0 and np.isclose(d[2], np.log(2))
    assert not np.isnan(d).any()
    assert cross_entropy(p, q)[0] == np.inf


def test_numpy_and_torch_give_the_same_values():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(4), size=20), rng.dirichlet(np.ones(4), size=20)
    p[0] = [1, 0, 0, 0]
    for f in (kl, generalized_kl, cross_entropy, squared, total_variation):
        a = f(p, q)
        b = f(torch.tensor(p), torch.tensor(q))
        assert isinstance(b, torch.Tensor)
        assert np.allclose(a, b.numpy(), atol=1e-14)
    assert np.allclose(entropy(p), entropy(torch.tensor(p)).numpy())


def test_cross_entropy_is_kl_plus_entropy_and_reverse_swaps_arguments():
    rng = np.random.default_rng(1)
    p, q = rng.dirichlet(np.ones(3), size=10), rng.dirichlet(np.ones(3), size=10)
    assert np.allclose(cross_entropy(p, q), kl(p, q) + entropy(p))
    assert np.allclose(reverse(kl)(p, q), kl(q, p))


def test_bernoulli_inputs_become_two_class_rows():
    p = np.array([0.2, 1.0])
    assert np.allclose(as_categorical(p), [[0.2, 0.8], [1.0, 0.0]])


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_derivatives_match_autograd(name):
    # The solvers rely on grad_student / curvature_student: check them against the per-sample loss.
    rng = np.random.default_rng(2)
    loss = get_loss(name)
    q = torch.tensor(rng.dirichlet(np.ones(3), size=7))
    p = torch.tensor(rng.dirichlet(np.ones(3), size=7), requires_grad=True)
    value = loss.per_sample(q, p).sum()
    (autograd,) = torch.autograd.grad(value, p)
    assert torch.allclose(loss.grad_student(q, p.detach()), autograd, atol=1e-10)
    hess_diag = torch.stack([torch.autograd.functional.hessian(lambda x: loss.per_sample(q[i], x), p.detach()[i]).diagonal()
                             for i in range(7)])
    assert torch.allclose(loss.curvature_student(q, p.detach()), hess_diag, atol=1e-8)


def test_unknown_loss_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown loss 'kl'; choose one of"):
        get_loss("kl")
