"""Hypothesis strategies shared by the property tests: distributions with edge cases (exact 0 and 1,
k = 2 and k > 2, n = 1)."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

ks = st.sampled_from([2, 2, 3, 5])


@st.composite
def distributions(draw, n=None, k=None, allow_zeros=True):
    """An (n, k) array of rows in the simplex; some rows one-hot or with zeros when ``allow_zeros``."""
    n = draw(st.integers(1, 12)) if n is None else n
    k = draw(ks) if k is None else k
    weights = draw(arrays(np.float64, (n, k), elements=st.floats(0.0, 1.0, allow_nan=False, width=64)))
    if allow_zeros:
        mask = draw(arrays(np.bool_, (n, k)))
        weights = np.where(mask, 0.0, weights)
        hot = draw(arrays(np.bool_, (n,)))
        weights[hot] = np.eye(k)[np.arange(n)[hot] % k]
    weights = weights + (weights.sum(-1, keepdims=True) == 0)  # an all-zero row becomes uniform
    return weights / weights.sum(-1, keepdims=True)


@st.composite
def interior_distributions(draw, n=None, k=None):
    rows = draw(distributions(n=n, k=k, allow_zeros=False))
    rows = 0.98 * rows + 0.02 / rows.shape[-1]
    return rows / rows.sum(-1, keepdims=True)
