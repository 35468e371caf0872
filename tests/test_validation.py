"""Input checks: the same verdict and the same one-line message for numpy arrays and torch tensors (whose
checks run on the tensor's own device, and only a failing check looks at the entries on the host)."""

import numpy as np
import pytest
import torch

from w2s_theory.validation import InputError, check_distributions, check_finite


def _both(a):
    return [a, torch.as_tensor(a)]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_bad_entries_give_the_same_message_for_numpy_and_torch(kind):
    pick = (lambda a: a) if kind == "numpy" else torch.as_tensor
    q = np.array([[0.2, 0.8], [0.5, 0.5], [0.3, 0.7]])
    cases = [
        (np.where(np.arange(6).reshape(3, 2) == 3, np.nan, q), "1 entries are NaN or infinite (first at index (1, 1))"),
        (np.where(np.arange(6).reshape(3, 2) == 4, np.inf, q), "first at index (2, 0)"),
        (np.array([[0.2, 0.8], [-0.1, 1.1], [0.3, 0.7]]), "1 negative probabilities (first at index (1, 0)"),
        (np.array([[0.2, 0.8], [0.5, 0.5], [0.3, 0.6]]), "1 rows do not sum to 1 (first at row (2,), sum 0.9)"),
    ]
    for array, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_distributions("teacher", pick(array))
    with pytest.raises(InputError, match="expected numbers"):
        check_finite("features", pick(np.array([True, False])))


def test_valid_rows_are_renormalised_in_their_own_type():
    q = np.array([[0.2, 0.8 + 1e-9], [0.5, 0.5]])
    for a in _both(q):
        out = check_distributions("teacher", a)
        assert type(out) is type(a)
        np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, rtol=0, atol=1e-15)
        np.testing.assert_allclose(np.asarray(out), q / q.sum(-1, keepdims=True), rtol=0, atol=0)
    check_finite("features", torch.arange(4))  # integers are finite


def test_finite_entries_whose_sum_overflows_pass_and_opposite_infinities_fail():
    for a in _both(np.array([[1e308, 1e308], [1e308, 0.5]])):  # any order of their sum overflows: exact check
        check_finite("features", a)
    for a in _both(np.array([[np.inf, -np.inf], [0.0, 1.0]])):  # their sum is NaN, each entry is not finite
        with pytest.raises(InputError, match="2 entries are NaN or infinite"):
            check_finite("features", a)
