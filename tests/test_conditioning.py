"""Claims about the exact column handling shared by the squared and softmax certificates
(w2s_theory.solvers.conditioning)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from w2s_theory.solvers import conditioning
from w2s_theory.solvers.conditioning import cholesky_ex, exactly_redundant_columns, power_of_two_scales

# What a column of the design can be, relative to the columns before it.
KINDS = ("random", "zero", "constant", "duplicate", "negated", "scaled_by_4", "times_3", "tiny", "one_entry")


def _column(kind, rng, n, earlier):
    if kind == "zero":
        return np.zeros(n)
    if kind == "constant":
        return np.full(n, rng.normal())
    if kind == "tiny":  # squares underflow: a zero diagonal entry of the Gram matrix, but not a zero column
        return rng.normal(size=n) * 1e-170
    if kind == "one_entry":
        column = np.zeros(n)
        column[rng.integers(n)] = rng.normal()
        return column
    if earlier and kind in ("duplicate", "negated", "scaled_by_4", "times_3"):
        base = earlier[rng.integers(len(earlier))]
        factor = {"duplicate": 1.0, "negated": -1.0, "scaled_by_4": 4.0, "times_3": 3.0}[kind]
        return factor * base  # x4 is exact (equal after scaling), x3 is rounded (not an exact copy)
    return rng.normal(size=n)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.lists(st.sampled_from(KINDS), min_size=1, max_size=7),
       st.integers(1, 3))
def test_redundant_columns_found_from_the_gram_matrix_are_those_found_from_the_design(seed, n, kinds, batch):
    """The Gram matrix only proposes candidates; every zero, constant (but the last) and +-duplicated column
    is still found, and nothing else (n = 1, where every column is constant, included)."""
    rng = np.random.default_rng(seed)
    students = []
    for _ in range(batch):
        columns = []
        for kind in kinds:
            columns.append(_column(kind, rng, n, columns))
        students.append(np.stack(columns, axis=-1))
    Z = torch.as_tensor(np.stack(students))
    Zs = Z * power_of_two_scales(Z)[..., None, :]
    expected = exactly_redundant_columns(Zs)
    assert torch.equal(exactly_redundant_columns(Zs, gram=Zs.mT @ Zs), expected)
    for b in range(batch):  # and per student, as the squared solver's chunks see them
        alone = Zs[b : b + 1]
        assert torch.equal(exactly_redundant_columns(alone, gram=alone.mT @ alone)[0], expected[b])


def test_exact_copies_are_redundant_and_rounded_multiples_are_not():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    Z = torch.as_tensor(np.stack([a, 4 * a, -a, 3 * a, np.zeros(50), np.full(50, 2.0), b, np.ones(50)], -1))[None]
    Zs = Z * power_of_two_scales(Z)[..., None, :]
    found = exactly_redundant_columns(Zs, gram=Zs.mT @ Zs)[0].tolist()
    assert found == [False, True, True, False, True, True, False, False]


def test_cholesky_ex_reports_a_factor_that_is_not_finite_as_a_failure(monkeypatch):
    rng = np.random.default_rng(0)
    R = torch.as_tensor(rng.normal(size=(3, 4, 4)))
    M = R @ R.mT + 4 * torch.eye(4, dtype=torch.float64)
    M[2, 3, 3] = -10.0  # not positive definite
    L, info = cholesky_ex(M)
    expected_L, expected_info = torch.linalg.cholesky_ex(M)
    assert torch.equal(info, expected_info) and torch.equal(L, expected_L)  # the same factorisation
    assert info.tolist()[:2] == [0, 0] and info[2] > 0
    # On CUDA, torch.linalg.cholesky_ex returns info = 0 with a NaN factor for a matrix with NaN entries; the
    # CPU's LAPACK reports the failure. Mimic the GPU's answer: the wrapper must report a failure all the same.
    M[0, 1, 2] = M[0, 2, 1] = float("nan")

    real = torch.linalg.cholesky_ex

    def gpu_like(A):
        L, info = real(A)
        return L, torch.where(torch.isnan(L).flatten(-2).any(-1), torch.zeros_like(info), info)

    monkeypatch.setattr(conditioning.torch.linalg, "cholesky_ex", gpu_like)
    assert torch.linalg.cholesky_ex(M)[1][0] == 0  # the mimicked GPU answer claims success
    L, info = cholesky_ex(M)
    assert info[0] == 4 and info[1] == 0 and info[2] > 0
