"""The softmax forward certificate's final operations are upper bounds in exact arithmetic: each formula that the
certificate returns as a bound (the self-concordance gap :math:`\\lambda^2\\varphi(\\lambda\\kappa)`, the bounds on
:math:`\\lambda` and :math:`\\kappa`, the shift for the computed logits) is evaluated in floating point and
rounded up, so the returned float is >= the formula's exact value at the same float inputs.

The exact value is computed with mpmath at 60 digits, every float input taken as the exact number it is. Without
the rounding up, about half of these instances come out below their exact value (by up to ~1e-14 relative, the
closed form of :math:`\\varphi` cancelling for :math:`u` near 1e-2).
"""

from __future__ import annotations

import mpmath
import numpy as np
import torch
from mpmath import mp, mpf

from w2s_theory.solvers.conditioning import rounded_up
from w2s_theory.solvers.softmax import _decrement_and_range_bounds, _point_shift, _self_concordance_gap

U = mpf(2) ** -53


def _gamma(count):
    return count * U / (1 - count * U)


def _exact_gap(lam: float, kappa: float):
    u = mpf(lam) * mpf(kappa)
    if u >= 1:
        return None
    if u == 0:
        return mpf(0)
    return (u + (1 - u) * mpmath.log1p(-u)) / mpf(kappa) ** 2


def _products_u(rng, size):
    """Values of u = lambda kappa spanning every branch: 0, tiny, around the series/closed-form switch at 1e-2,
    moderate, and within 1e-12 of 1."""
    return np.concatenate([
        [0.0, 1e-300, 5e-324 * 2**60],
        10.0 ** rng.uniform(-17, -2.5, size),
        10.0 ** rng.uniform(-2.05, -1.95, size),  # both sides of the switch
        rng.uniform(0.01, 0.999, size),
        1 - 10.0 ** rng.uniform(-12, -3, size),
    ])


def test_self_concordance_gap_is_at_least_its_exact_formula_and_close_to_it():
    rng = np.random.default_rng(20240611)
    u = _products_u(rng, 400)
    kappa = 10.0 ** rng.uniform(-4, 4, u.size)
    lam = u / kappa
    gap = _self_concordance_gap(torch.tensor(lam), torch.tensor(kappa)).numpy()
    checked = 0
    with mp.workdps(60):
        for lam_i, kappa_i, gap_i in zip(lam, kappa, gap):
            exact = _exact_gap(float(lam_i), float(kappa_i))
            if exact is None:
                assert gap_i == np.inf
                continue
            assert mpf(float(gap_i)) >= exact, (lam_i, kappa_i, gap_i, mpmath.nstr(exact, 20))
            if mpf(lam_i) * mpf(kappa_i) < 1 - mpf("1e-13"):
                assert np.isfinite(gap_i), (lam_i, kappa_i)
            if mpf(lam_i) * mpf(kappa_i) < mpf("0.999"):
                # an upper bound, not a blanket inflation: within 1e-9 relative where the closed form cancels
                assert mpf(float(gap_i)) <= exact * (1 + mpf("1e-9")) + mpf("1e-300"), (lam_i, kappa_i)
            checked += 1
    assert checked == u.size


def test_decrement_and_range_bounds_are_at_least_their_exact_formulas():
    rng = np.random.default_rng(7)
    B = 600
    w = 10.0 ** rng.uniform(-12, 2, B)
    dg_norm = 10.0 ** rng.uniform(-18, -10, B)
    eta = 10.0 ** rng.uniform(-16, -1, B)
    inverse_bound = 10.0 ** rng.uniform(-3, 8, B)
    rho = np.where(rng.uniform(size=B) < 0.1, 0.5, 10.0 ** rng.uniform(-16, np.log10(0.5), B))
    row2 = 10.0 ** rng.uniform(-1, 3, B)
    kappa_hat = 10.0 ** rng.uniform(-3, 4, B)
    drift = np.where(rng.uniform(size=B) < 0.2, 0.0, 10.0 ** rng.uniform(-16, 0, B))
    p = 12
    t = {name: torch.tensor(v) for name, v in
         dict(w=w, dg=dg_norm, eta=eta, inv=inverse_bound, rho=rho, row2=row2, kh=kappa_hat, drift=drift).items()}
    for exact_kappa in (True, False):
        for with_drift in (True, False):
            lam, kappa = _decrement_and_range_bounds(t["w"], t["dg"], t["eta"], t["inv"], t["rho"], t["row2"], p,
                                                     t["kh"] if exact_kappa else None,
                                                     t["drift"] if with_drift else None)
            with mp.workdps(60):
                for i in range(B):
                    one_minus_rho = 1 - mpf(rho[i])
                    lam_x = ((1 + mpf(eta[i])) * mpf(w[i]) + mpmath.sqrt(mpf(inverse_bound[i])) * mpf(dg_norm[i])) \
                        / mpmath.sqrt(one_minus_rho)
                    if exact_kappa:
                        kappa2 = (mpf(kappa_hat[i]) ** 2 * (1 + _gamma(2 * p + 2))
                                  + (mpf(eta[i]) + _gamma(2 * p + 2)) * mpf(inverse_bound[i]) * 2 * mpf(row2[i]))
                    else:
                        kappa2 = mpf(inverse_bound[i]) * 2 * mpf(row2[i]) * (1 + _gamma(4))
                    kappa_x = mpmath.sqrt(kappa2 / one_minus_rho)
                    if with_drift:
                        widen = mpmath.exp(mpf(drift[i]) / 2) * (1 + _gamma(4))
                        lam_x, kappa_x = lam_x * widen, kappa_x * widen
                    assert mpf(float(lam[i])) >= lam_x, (exact_kappa, with_drift, i)
                    assert mpf(float(kappa[i])) >= kappa_x, (exact_kappa, with_drift, i)
                    assert mpf(float(lam[i])) <= lam_x * (1 + mpf("1e-13"))


def test_point_shift_is_at_least_four_times_the_exact_mean_of_its_terms():
    rng = np.random.default_rng(3)
    for n, k in [(1, 2), (7, 2), (50, 3), (333, 5)]:
        B = 40
        teacher = rng.dirichlet(np.full(k, 0.5), size=(B, n))
        teacher[rng.uniform(size=(B, n)) < 0.2] = np.eye(k)[0]
        error = 10.0 ** rng.uniform(-18, -3, size=(B, n))
        T = torch.tensor(teacher)
        shift = _point_shift(T.sum(dim=-1), torch.tensor(error), k)
        with mp.workdps(60):
            for s in range(B):
                exact = 4 * sum(sum(mpf(q) for q in teacher[s, i]) * mpf(error[s, i]) for i in range(n)) / n
                assert mpf(float(shift[s])) >= exact, (n, k, s)
                assert mpf(float(shift[s])) <= exact * (1 + mpf("1e-12"))


def test_rounded_up_bounds_the_exact_value_of_a_chain_of_positive_operations():
    """``a*b/c + sqrt(d)*e`` carries 3 roundings per term (Higham's count: 2 in each term, 1 in the sum); the
    computed value alone falls below the exact one on some instances, ``rounded_up(., 3)`` never."""
    rng = np.random.default_rng(11)
    a, b, c, d, e = (10.0 ** rng.uniform(-30, 30, 3000) for _ in range(5))
    computed = torch.tensor(a) * torch.tensor(b) / torch.tensor(c) + torch.tensor(d).sqrt() * torch.tensor(e)
    bound = rounded_up(computed, 3)
    below = 0
    with mp.workdps(60):
        for i in range(a.size):
            exact = mpf(a[i]) * mpf(b[i]) / mpf(c[i]) + mpmath.sqrt(mpf(d[i])) * mpf(e[i])
            assert mpf(float(bound[i])) >= exact, i
            below += mpf(float(computed[i])) < exact
    assert below > 100  # the instances do exercise the rounding


def test_positive_definite_bound_rounds_its_inverse_bound_delta_and_rho_up():
    """``inverse_bound`` >= tr(X)/(1 - p eta), delta >= error + gamma_{p+1} ||L||_F^2 and rho >= delta Lambda, for
    the computed X, L, eta taken as exact numbers (sums of p and p(p+1)/2 terms: the old factor 1 + 2u was
    short of their rounding)."""
    from w2s_theory.solvers.conditioning import positive_definite_bound

    rng = np.random.default_rng(5)
    for p in (3, 12, 30):
        A = rng.normal(size=(60, p, p)) * 10.0 ** rng.uniform(-3, 3, size=(60, 1, p))
        M = torch.tensor(A @ np.swapaxes(A, 1, 2) + 1e-3 * np.eye(p))
        error = torch.tensor(10.0 ** rng.uniform(-16, -8, 60))
        bound = positive_definite_bound(M, error)
        with mp.workdps(60):
            for s in range(60):
                L, X = bound.L[s].numpy(), bound.X[s].numpy()
                trace_inverse = mpmath.fsum(mpf(float(X[j, j])) for j in range(p))
                margin = 1 - p * mpf(float(bound.eta[s]))
                if margin <= 0:
                    continue
                assert mpf(float(bound.inverse_bound[s])) >= trace_inverse / margin, (p, s)
                frob2 = mpmath.fsum(mpf(float(v)) ** 2 for v in L.ravel())
                delta = mpf(float(error[s])) + _gamma(p + 1) * frob2
                assert mpf(float(bound.rho[s])) >= delta * mpf(float(bound.inverse_bound[s])), (p, s)
