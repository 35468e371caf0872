r"""Batched, certified least squares for the regression head :math:`f(x) = w\cdot h(x) + b` (Charikar et al. 2024).

Problem, for each of ``B`` students and each output column :math:`o` independently (design
:math:`Z = [h, \mathbf 1]` or :math:`Z = h`, targets :math:`y\in\mathbb R^{n\times k_{\text{out}}}`):

.. math::

    \min_{\theta\in\mathbb R^{d\times k_{\text{out}}}}\ \Phi(\theta) = \frac1n\sum_{i=1}^n\sum_o
    (z_i^\top\theta_{:,o} - y_{io})^2
    \qquad\text{(optionally s.t. } \|\theta_{:,o}\|_2\le r\ \ \forall o).

:math:`\Phi` is quadratic with gradient :math:`g = \tfrac2n Z^\top(Z\theta - y)` and Hessian
:math:`H = \tfrac2n Z^\top Z` (the same for every output).

Every decision about rank is taken on the *scaled* design :math:`Z_s = ZD` (columns divided by powers of two
near their norms, which is exact; exactly redundant columns, i.e. zero, repeated-constant or bitwise
:math:`\pm`-duplicated ones, removed: :mod:`.conditioning`), so rescaling features changes nothing but the
units of :math:`\theta`.

* Unconstrained: the normal equations :math:`Z_s^\top Z_s\theta_s = Z_s^\top y` by Cholesky plus one step of
  iterative refinement, :math:`\theta = D\theta_s`; students whose Gram matrix is ill conditioned (extreme
  diagonal entries of the Cholesky factor more than :math:`10^4` apart, a failed factorisation, or fewer
  samples than columns), or whose estimated gap is not below ``tol``, get the minimum-norm least-squares
  solution from the SVD of :math:`Z_s` instead. Certificate ``normal_equations``:
  :math:`\Phi(\theta) - \min\Phi = \tfrac1n\|Pr\|^2` exactly (:math:`P` the projector onto the column space of
  :math:`Z`), bounded with a *proof* that :math:`Z_s^\top Z_s` is positive definite, rounding included
  (:func:`_normal_equations_certificate`). Where no such proof exists (numerically collinear columns that are
  not exact copies, e.g. ``[a, 3a]`` with ``3a`` rounded, or features in the simplex next to the bias column)
  the exact problem may have directions that a rank cut would drop, with a lower optimum: the student is
  reported uncertified (``gap = inf``, ``converged = False``, ``info["singular"]`` and
  ``info["uncertified_reason"]``).
* Ball :math:`\|\theta_{:,o}\|\le r`: the trust-region subproblem, solved exactly (Moré and Sorensen 1983,
  *Computing a trust region step*): if the minimum-norm unconstrained solution lies in the ball it is optimal;
  otherwise :math:`\theta(\mu) = (Z^\top Z + \mu I)^{-1}Z^\top y` with :math:`\mu > 0` the root of the secular
  equation :math:`1/\|\theta(\mu)\| = 1/r`, found by safeguarded Newton on the eigendecomposition of
  :math:`Z^\top Z` (batched over students and outputs). The "hard case" cannot occur: :math:`Z^\top y` is
  orthogonal to the null space of :math:`Z^\top Z`. Certificate ``frank_wolfe``:
  :math:`\sum_o g_o^\top\theta_o + r\|g_o\|\ \ge\ \Phi(\theta) - \min_{\text{ball}}\Phi` (the linear
  minimisation oracle over the ball is :math:`-r g_o/\|g_o\|`; Jaggi 2013), valid for any feasible point
  whatever the conditioning; every returned column is scaled to lie strictly inside the ball in exact
  arithmetic (:func:`_into_ball`).

Every gap includes a bound on the rounding of its own evaluation and of the reported objective.

Cost. With one feature matrix per student, students are solved in chunks of about 16 MB of design
(:data:`_CHUNK_BYTES`) in two buffers reused from chunk to chunk, so the extra memory is a few chunks whatever
the batch (no copy of the whole feature tensor). Per chunk: the column norms and the scaled copy of the design
(one pass over the features from memory); one product :math:`[Z_s, y]^\top[Z_s, y]`, which gives the Gram
matrix and :math:`Z_s^\top y` together (:math:`n(d+k)^2` multiply-adds, the dominant cost); redundant columns
proposed by the Gram matrix and compared exactly only where proposed; the refinement's two residuals and
:math:`|Z_s||\theta_s|` as thin products over the chunk while it is in cache; the certificate reuses the solve's
Cholesky factor and last residual (:func:`_certify`). Every operation acts on each student separately, so a
student's result does not depend on the other students or on the chunk boundaries (bit-identical alone and in
a batch) when torch runs one thread, as sweeps do: with more, the BLAS may split one student's long sums
between threads differently for a batch of one than for a larger batch (measured at n = 2000 on 2 threads,
every head: last-bit differences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..heads import SquaredHead
from .conditioning import (
    blocked_sum,
    cholesky_ex,
    exactly_redundant_columns,
    positive_definite_bound,
    power_of_two_scales,
    unit_roundoff_gamma,
)
from .result import FitResult, single_student

__all__ = ["fit_squared_batched", "fit_squared_reference"]

#: Per-student designs are solved in chunks of students whose design is about this many bytes.
_CHUNK_BYTES = 16 * 2**20

_SECULAR_ITERATIONS = 100
#: Cholesky is trusted only when min/max of diag(L) is at least this (a cheap lower bound on 1/cond(Z)).
_CONDITION_RATIO = 1e-4


@dataclass
class _ScaledDesign:
    r"""The scale-invariant design :math:`Z_s = ZD` ``(B or 1, n, d)`` of :math:`Z = [h, 1]` (or :math:`h`): columns
    divided by powers of two near their norms (exact), exactly redundant columns zeroed (:mod:`.conditioning`).
    ``scales`` is :math:`D`'s diagonal with 0 on redundant columns, so that :math:`\theta = D\theta_s` and
    :math:`Z\theta = Z_s\theta_s` exactly. ``G`` is the computed :math:`Z_s^\top Z_s` with 1 on the diagonal of
    redundant columns (decoupled, so they stay at 0), ``frob2`` an upper bound on :math:`\|Z_s\|_F^2`, ``rhs``
    :math:`Z_s^\top y` when it came from the same product as ``G`` (else ``None``). :math:`Z` itself is formed
    only when asked for (``Z``)."""

    features: torch.Tensor
    bias: bool
    Zs: torch.Tensor
    scales: torch.Tensor
    redundant: torch.Tensor
    shared: bool
    G: torch.Tensor
    frob2: torch.Tensor
    rhs: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    _Z: torch.Tensor | None = None
    _factor: tuple | None = None

    @property
    def Z(self) -> torch.Tensor:
        if self._Z is None:
            self._Z = SquaredHead(bias=self.bias).design(self.features)
        return self._Z

    def gram(self) -> torch.Tensor:
        return self.G

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``cholesky_ex(G)``, computed once (the solve and the certificate share it)."""
        if self._factor is None:
            self._factor = cholesky_ex(self.G)
        return self._factor


def _scaled_design(features: torch.Tensor, bias: bool, shared: bool = False, targets=None,
                   workspace=None) -> _ScaledDesign:
    r"""The scaled design of ``features`` ``(B, n, m)`` float64 (``B = 1`` and ``shared``: one matrix for all
    students) and its Gram matrix, in one product over the design.

    :math:`Z_s` is written once (``workspace[:B]``, ``(B, n, d + k)``, when given: a buffer reused from chunk to
    chunk, whose pages are already mapped); with ``targets`` ``(B, n, k)`` (per-student designs) the product
    :math:`[Z_s, y]^\top[Z_s, y]` gives :math:`Z_s^\top Z_s` and :math:`Z_s^\top y` in the same pass. Redundant
    columns are found from the Gram matrix (candidates) and the design (exact comparison) by
    :func:`~.conditioning.exactly_redundant_columns`, then zeroed in :math:`Z_s` and decoupled in the Gram
    matrix (its other entries do not involve them, so they are those of the zeroed design).

    ``frob2``: each diagonal entry of the computed Gram matrix is a sum of :math:`n` squares, within
    :math:`\gamma_n` of the exact one; their sum of :math:`d` terms and one product add :math:`\gamma_{d}` and
    :math:`u`, so :math:`(1+\gamma_{2(n+d)})\sum_j\hat G_{jj}\ge\|Z_s\|_F^2`."""
    B, n, m = features.shape
    d = m + int(bias)
    k = 0 if targets is None else targets.shape[-1]
    scales = power_of_two_scales(features)
    if bias:
        ones = torch.ones((1, n, 1), dtype=features.dtype, device=features.device)
        scales = torch.cat([scales, power_of_two_scales(ones).expand(B, 1)], dim=-1)
    W = (torch.empty((B, n, d + k), dtype=features.dtype, device=features.device) if workspace is None
         else workspace[:B])
    torch.mul(features, scales[:, None, :m], out=W[..., :m])
    if bias:
        W[..., m] = scales[:, m, None]
    if k:
        W[..., d:] = targets
    product = W.mT @ W
    Zs, G = W[..., :d], product[..., :d, :d]
    rhs = product[..., :d, d:] if k else None
    redundant = exactly_redundant_columns(Zs, gram=G)
    if bool(redundant.any()):
        Zs.masked_fill_(redundant[..., None, :], 0.0)
        G = G.masked_fill(redundant[..., :, None] | redundant[..., None, :], 0.0)
        rhs = None if rhs is None else rhs.masked_fill(redundant[..., :, None], 0.0)
    else:
        G = G.contiguous()
    frob2 = G.diagonal(dim1=-2, dim2=-1).sum(dim=-1) * (1 + unit_roundoff_gamma(2 * (n + d)))
    G.diagonal(dim1=-2, dim2=-1).add_(redundant.to(G.dtype))
    return _ScaledDesign(features, bias, Zs, scales.masked_fill(redundant, 0.0), redundant, shared, G, frob2,
                         rhs)


def _residual_products(M, targets, theta):
    """Predictions ``M theta``, residual ``M theta - y`` and ``M^T r`` (the gradient times ``n/2``, computed from
    the residual, not from ``M^T M theta - M^T y``, which cancels)."""
    preds = M @ theta
    r = preds - targets
    return preds, r, M.mT @ r


def _normal_equations_gap_cholesky(L, g, n):
    r""":math:`\tfrac12 g^\top H^{-1}g` with :math:`H = \tfrac2n LL^\top`, summed over outputs (an estimate used to
    choose the method; the reported certificate is :func:`_normal_equations_certificate`)."""
    w = torch.linalg.solve_triangular(L, g, upper=False)
    return 0.25 * n * (w**2).sum(dim=(-2, -1))


def _min_norm_least_squares(Z, targets):
    """Minimum-norm solution ``V S^+ U^T y`` (NumPy's rank rule, applied to the scaled design)."""
    n, d = Z.shape[-2], Z.shape[-1]
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    keep = S > max(n, d) * torch.finfo(Z.dtype).eps * S[..., :1]
    inv_s = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    return Vh.mT @ (inv_s[..., :, None] * (U.mT @ targets))


def _expand(x: torch.Tensor, B: int) -> torch.Tensor:
    return x.expand(B, *x.shape[1:]) if x.shape[0] == 1 else x


def _solve_unconstrained(design: _ScaledDesign, targets, tol):
    """Normal equations of the scaled design by Cholesky (+ one refinement step); the SVD minimum-norm solution
    where the Gram matrix is ill conditioned or the estimated gap is not below ``tol``.

    Returns ``theta (B, d, k_out)`` (original units), the number of solves used per student, and
    ``(theta_s, preds, r, c)``: the solution in the scaled coordinates with its predictions, residual and
    :math:`Z_s^\top r` (for :func:`_certify`)."""
    B, n, _ = targets.shape
    Zs = design.Zs
    L, info = design.factor()
    L, info = _expand(L, B), _expand(info, B)
    theta = torch.cholesky_solve(Zs.mT @ targets if design.rhs is None else design.rhs, L)
    _, _, c = _residual_products(Zs, targets, theta)
    # One step of iterative refinement: Newton's step on the quadratic, from the residual.
    theta = theta - torch.cholesky_solve(c, L)
    preds, r, c = _residual_products(Zs, targets, theta)
    # Cholesky of a numerically singular Gram matrix can "succeed" with a pivot of rounding size and return a
    # solution with an arbitrary null-space component. The ratio of extreme diagonal entries of L is a lower
    # bound on 1/cond(Z_s): below 1e-4, or with fewer samples than columns, the student goes to the SVD
    # (minimum-norm) solution instead. On the scaled design this decision does not depend on the units.
    diag = L.diagonal(dim1=-2, dim2=-1).abs()
    ok = (info == 0) & (diag.amin(dim=-1) >= _CONDITION_RATIO * diag.amax(dim=-1)) & (n >= Zs.shape[-1])
    estimate = torch.where(ok, _normal_equations_gap_cholesky(L, 2.0 / n * c, n),
                           torch.full_like(theta[:, 0, 0], float("inf")))
    solves = torch.full((B,), 2, dtype=torch.long, device=targets.device)
    redo = ~(estimate <= tol)  # also catches NaN from a failed factorisation
    if redo.any():
        idx = redo.nonzero()[:, 0]
        Zr = Zs if design.shared else Zs[idx]
        theta[idx] = _min_norm_least_squares(Zr, targets[idx])
        preds[idx], r[idx], c[idx] = _residual_products(Zr, targets[idx], theta[idx])
        solves[idx] += 1
    return theta * _expand(design.scales, B)[..., :, None], solves, (theta, preds, r, c)


def _normal_equations_certificate(design: _ScaledDesign, r: torch.Tensor, c: torch.Tensor):
    r"""Proven bound on :math:`\Phi(\theta) - \min\Phi = \tfrac1n\|P r\|^2` (:math:`P` the projector onto the
    exact column space of :math:`Z`), for the computed residual ``r`` taken as exact numbers; ``inf`` where
    no bound can be proven (the scaled design is numerically singular). Returns ``(gap, singular)``.

    * :math:`n\ge d'` (:math:`d'` kept columns): :math:`\|Pr\|^2 = c^\top G^{-1}c` with :math:`c = Z_s^\top r`,
      :math:`G = Z_s^\top Z_s`. With :func:`~.conditioning.positive_definite_bound` for :math:`G`
      (:math:`\|\hat G - G\|_2\le\gamma_n\|Z_s\|_F^2`), :math:`G\succeq(1-\rho)LL^\top`, so
      :math:`c^\top G^{-1}c\le(\|L^{-1}\hat c\|(1+\eta) + \|L^{-1}\|\,\|\hat c - c\|)^2/(1-\rho)`, and
      :math:`|\hat c - c|\le\gamma_n|Z_s|^\top|r|`, so :math:`\|\hat c - c\|_F\le\gamma_n\|Z_s\|_F\|r\|_F`
      (Cauchy–Schwarz). :math:`\hat c` is ``c``: :math:`Z_s^\top r`, or :math:`Z^\top r` times the powers of
      two (the same numbers, barring underflow). The Cholesky factor of :math:`\hat G` is the solve's.
    * :math:`n < d'`: if :math:`Z_sZ_s^\top` is proven positive definite the columns span
      :math:`\mathbb R^n`, so :math:`\min\Phi = 0` and the gap is :math:`\tfrac1n\|r\|^2` itself.
    """
    B, n, k_out = r.shape
    Zs = design.Zs
    kept = (~design.redundant).sum(dim=-1)
    kept = _expand(kept[:, None], B)[:, 0]
    gap = torch.full((B,), float("inf"), dtype=r.dtype, device=r.device)
    frob2 = design.frob2
    tall = kept <= n
    if bool(tall.any()):
        idx = tall.nonzero()[:, 0]
        pick = (lambda x: x) if design.shared else (lambda x: x[idx])  # noqa: E731
        L, info = design.factor()
        bound = positive_definite_bound(pick(design.G), unit_roundoff_gamma(n) * pick(frob2),
                                        factor=(pick(L), pick(info)))
        c = c[idx]
        dc = unit_roundoff_gamma(n) * pick(frob2).sqrt() * r[idx].norm(dim=(-2, -1))
        L = _expand(bound.L, idx.numel())
        w = torch.linalg.solve_triangular(L, c, upper=False).norm(dim=(-2, -1))
        eta, rho = _expand(bound.eta[:, None], idx.numel())[:, 0], _expand(bound.rho[:, None], idx.numel())[:, 0]
        inv_norm = _expand(bound.inverse_norm()[:, None], idx.numel())[:, 0]
        ok = _expand(bound.ok[:, None], idx.numel())[:, 0]
        value = (w * (1 + eta) + inv_norm * dc) ** 2 / ((1 - rho) * n)
        gap[idx] = torch.where(ok, value, gap[idx])
    wide = ~tall
    if bool(wide.any()):
        idx = wide.nonzero()[:, 0]
        Zw = Zs if design.shared else Zs[idx]
        fw = frob2 if design.shared else frob2[idx]
        bound = positive_definite_bound(Zw @ Zw.mT, unit_roundoff_gamma(Zs.shape[-1]) * fw)
        ok = _expand(bound.ok[:, None], idx.numel())[:, 0]
        rw = r[idx]
        value = (rw**2).sum(dim=(-2, -1)) * (1 + unit_roundoff_gamma(n * k_out + 1)) / n
        gap[idx] = torch.where(ok, value, gap[idx])
    return gap, ~torch.isfinite(gap)


def _trust_region_multiplier(eigenvalues, projected, radius, iterations, active):
    r"""Root :math:`\mu > 0` of :math:`\psi(\mu) = 1/\|\theta(\mu)\| - 1/r` with
    :math:`\|\theta(\mu)\|^2 = \sum_j \tilde c_j^2/(\lambda_j + \mu)^2`, batched over the leading axes.

    :math:`\psi` is concave and increasing (Moré and Sorensen 1983), so Newton steps are kept inside a
    bisection bracket :math:`[\mu_{lo}, \mu_{hi}]` with :math:`\mu_{hi} = \|\tilde c\|/r` (where
    :math:`\|\theta\|\le r`); iteration stops when the bracket or the residual reaches rounding level for
    every ``active`` entry (the others, whose solution is interior, are ignored). Returns :math:`\mu` and the
    number of Newton/bisection steps each entry took, both independent of the other entries."""
    lam = eigenvalues.clamp_min(0)[..., :, None]  # (B, d, 1) against projected (B, d, k_out)
    c2 = projected**2
    lo = torch.zeros_like(projected[..., 0, :])
    hi = projected.norm(dim=-2) / radius
    mu = hi.clone()
    steps = torch.zeros_like(mu, dtype=torch.long)
    for _ in range(iterations):
        denom = lam + mu[..., None, :]
        norm2 = (c2 / denom**2).sum(dim=-2)
        norm = norm2.sqrt()
        dnorm2 = -2 * (c2 / denom**3).sum(dim=-2)  # d/dmu of ||theta||^2
        psi = 1 / norm - 1 / radius
        # psi < 0: ||theta|| > r, mu too small; psi > 0: mu too large.
        lo = torch.where(psi < 0, mu, lo)
        hi = torch.where(psi > 0, mu, hi)
        dpsi = -0.5 * dnorm2 / norm2**1.5
        newton = mu - psi / dpsi
        inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        mu_next = torch.where(inside, newton, 0.5 * (lo + hi))
        settled = ~active | ((hi - lo) <= 4 * torch.finfo(mu.dtype).eps * hi) | (psi.abs() * radius <= 1e-15)
        mu = torch.where(settled, mu, mu_next)
        steps += ~settled
        if bool(settled.all()):
            break
    return mu, steps


def _into_ball(theta, radius):
    r"""Scale each output's coefficients so that the point is inside the ball in exact arithmetic: columns
    whose computed norm exceeds :math:`r(1-2\gamma_{d+2})` are scaled to that norm. The computed norm is within
    a factor :math:`1\pm\gamma_{d+1}` of the exact one and the scaling adds one rounding, so the exact norm
    is then at most :math:`r(1-2\gamma_{d+2})(1+\gamma_{d+1})(1+u) < r` (and so is the computed one)."""
    target = radius * (1 - 2 * unit_roundoff_gamma(theta.shape[-2] + 2))
    norm = theta.norm(dim=-2, keepdim=True)
    return torch.where(norm > target, theta * (target / norm), theta)


def _solve_ball(design: _ScaledDesign, targets, radius, tol):
    """Exact trust-region solution per student and output; returns ``theta`` (inside the ball) and iterations."""
    B, n, k_out = targets.shape
    Z = design.Z
    theta, solves, _ = _solve_unconstrained(design, targets, tol)
    inside = theta.norm(dim=-2) <= radius  # (B, k_out)
    if bool(inside.all()):
        return _into_ball(theta, radius), solves
    G = Z.mT @ Z
    lam, V = torch.linalg.eigh(G)
    if design.shared:
        lam, V = lam.expand(B, -1), V.expand(B, *V.shape[1:])
    projected = V.mT @ (Z.mT @ targets)  # (B, d, k_out)
    # The minimum-norm unconstrained solution in the ball's own (unscaled) coordinates: with exactly redundant
    # columns the scaled solve above is optimal but not of minimum norm, and may lie outside when this one does not.
    cut = lam > max(n, Z.shape[-1]) * torch.finfo(lam.dtype).eps * lam[..., -1:].clamp_min(0)
    safe = torch.where(cut, lam, torch.ones_like(lam))[..., :, None]
    theta_min_norm = V @ torch.where(cut[..., :, None], projected / safe, torch.zeros_like(projected))
    inside_min_norm = ~inside & (theta_min_norm.norm(dim=-2) <= radius)
    active = ~inside & ~inside_min_norm
    mu, used = _trust_region_multiplier(lam, projected, radius, _SECULAR_ITERATIONS, active)
    theta_boundary = V @ (projected / (lam.clamp_min(0)[..., :, None] + mu[..., None, :]))
    theta = torch.where(inside[:, None, :], theta,
                        torch.where(inside_min_norm[:, None, :], theta_min_norm, theta_boundary))
    used = torch.where(active, (used + 1).clamp_max(_SECULAR_ITERATIONS), 0)  # the last step checks settling
    # Rounding can leave ||theta|| a hair above r: scale back (strictly) inside so the point is feasible.
    return _into_ball(theta, radius), solves + used.amax(dim=-1)


def _frank_wolfe_gap_ball(g, theta, radius):
    r""":math:`\sum_o g_o^\top\theta_o + r\|g_o\|` (each term :math:`\ge 0` for a feasible :math:`\theta`)."""
    per_output = (g * theta).sum(dim=-2) + radius * g.norm(dim=-2)
    return per_output.clamp_min(0).sum(dim=-1)


def _rounding_inflation(Z, theta, targets, gap, radius, abs_products=None, residual_gradient=None):
    r"""The computed gap plus a bound on the floating-point error of its own evaluation, so that the reported
    certificate bounds the *exact* suboptimality of the computed :math:`\theta` (Higham, *Accuracy and
    Stability of Numerical Algorithms*, §3.1). Without it an exact equality, with a computed gap of
    :math:`10^{-31}`, could not be told from rounding noise.

    The residual :math:`r = Z\theta - y` is computed with entrywise error at most
    :math:`\rho = \gamma_{d+1}(|Z||\theta| + |y|)`.

    * Unconstrained (gap :math:`\tfrac1n\|U_r^\top r\|^2`): the exact gap is at most
      :math:`(\sqrt{\text{gap}} + \sqrt{\tfrac1n\sum\rho^2})^2`.
    * Ball of radius :math:`R` (gap :math:`\sum_o g_o^\top\theta_o + R\|g_o\|`): the gradient is off by at
      most :math:`\eta = \tfrac2n|Z|^\top(\rho + \gamma_n|r|)` entrywise, so the gap by at most
      :math:`2R\|\eta_o\|` per output, plus the rounding of its own two terms.
    """
    n, d = Z.shape[-2], Z.shape[-1]
    if abs_products is None:
        abs_products = Z.abs() @ theta.abs()
    rho = unit_roundoff_gamma(d + 1) * (abs_products + targets.abs())
    gap = gap.clamp_min(0)
    if radius is None:
        return (gap.sqrt() + (rho**2).sum(dim=-1).mean(dim=-1).sqrt()) ** 2
    if residual_gradient is None:
        _, r, ZTr = _residual_products(Z, targets, theta)
        residual_gradient = r, 2.0 / n * ZTr
    r, g = residual_gradient
    eta = 2.0 / n * (Z.abs().mT @ (rho + unit_roundoff_gamma(n) * r.abs()))
    own = unit_roundoff_gamma(d + 2) * ((g.abs() * theta.abs()).sum(dim=-2) + radius * g.norm(dim=-2)).sum(-1)
    return gap + 2 * radius * eta.norm(dim=-2).sum(dim=-1) + own


def fit_squared_batched(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: bool = True,
    radius: float | None = None,
    tol: float = 1e-12,
    shared: bool | None = None,
) -> FitResult:
    r"""Fit ``B`` regression heads at once by least squares (Charikar et al. 2024, Sec. 3):

    .. math:: \min_\theta \frac1n\sum_i\|\theta^\top z_i - y_i\|_2^2\quad
        \big(\text{s.t. }\|\theta_{:,o}\|_2\le r\big),\qquad z_i = [h(x_i), 1]\ \text{or}\ h(x_i).

    Args:
        features: ``(B, n, m)`` (converted to float64 chunk by chunk; one matrix ``(1, n, m)`` or an
            expanded view of one matrix is shared by all students and factorised once).
        targets: ``(B, n, k_out)`` real targets; each output column is an independent regression.
        bias: append a constant feature (its coefficient is the last row of ``theta``).
        radius: optional Euclidean ball on each output's coefficient vector (bias included).
        tol: target certified gap; ``converged`` is ``gap <= tol``.
        shared: the features are one matrix for every student (``fit`` with 2-D features says so; ``None``:
            inferred from a leading axis of 1 or a stride-0 view with ``B > 1``). A shared design forms
            :math:`Z^\top y` apart from the Gram matrix, a per-student one inside it (the last bits differ), so
            one student of shared features takes the shared path too, to match itself inside a batch.

    Returns:
        :class:`~w2s_theory.solvers.result.FitResult` with ``params = {"theta": (B, d, k_out)}``, ``probs`` the
        predictions ``(B, n, k_out)``, ``objective`` the mean over samples of the squared error summed over
        outputs, ``gap`` the ``normal_equations`` certificate (unconstrained) or the ``frank_wolfe`` gap
        (ball), including a bound on the rounding of its own evaluation (:func:`_rounding_inflation`), and
        ``grad_norm`` the Frobenius norm of the gradient.
    """
    targets = targets.to(device=features.device, dtype=torch.float64)
    if targets.ndim == 2:
        targets = targets[..., None]
    B, n, k_out = targets.shape
    if radius is not None and not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a positive finite number (or None for no constraint), got {radius!r}")
    if radius is None:
        certificate, method = "normal_equations", "normal equations (cholesky + refinement; svd fallback)"
    else:
        certificate, method = "frank_wolfe", "trust-region subproblem (eigendecomposition + secular equation)"
    if shared is None:
        shared = B > 1 and (features.shape[0] == 1 or features.stride(0) == 0)
    if B == 0 or shared:
        # One feature matrix for every student: one design, one factorisation, all targets at once.
        preds, *part = _fit_students(_scaled_design(features[:1].to(torch.float64), bias, shared=True), targets,
                                     radius, tol)
        parts = [part]
    else:
        # One design per student: chunks of about _CHUNK_BYTES of design, so that each chunk's temporaries stay
        # in cache and the peak memory is a few chunks, not copies of the whole feature tensor. Every operation
        # is per student, so a student's result does not depend on the chunk it is solved in. On a GPU the whole
        # batch is one chunk (small chunks would run one after the other without filling it).
        d = features.shape[-1] + int(bias)
        chunk = min(B, max(1, _CHUNK_BYTES // (n * d * 8))) if features.device.type == "cpu" else B
        workspace = torch.empty((chunk, n, d + k_out), dtype=torch.float64, device=features.device)
        scratch = torch.empty((chunk, n, d), dtype=torch.float64, device=features.device)
        parts, preds = [], torch.empty_like(targets)
        for start in range(0, B, chunk):
            Y = targets[start : start + chunk]
            design = _scaled_design(features[start : start + chunk].to(torch.float64), bias, targets=Y,
                                    workspace=workspace)
            design.scratch = scratch
            preds[start : start + chunk], *part = _fit_students(design, Y, radius, tol)
            parts.append(part)
    theta, objective, gap, grad_norm, iterations, singular = (
        torch.cat(column) if len(parts) > 1 else column[0] for column in zip(*parts))
    info = {"bias": bias, "radius": radius, "tol": tol, "singular": singular}
    if bool(singular.any()):
        info["uncertified_reason"] = _SINGULAR_REASON
    return FitResult(
        head="squared", loss="squared", params={"theta": theta}, probs=preds, objective=objective, gap=gap,
        certificate=certificate, grad_norm=grad_norm, iterations=iterations, converged=gap <= tol,
        method=method, info=info,
    )


def _fit_students(design: "_ScaledDesign", targets, radius, tol):
    """Solve and certify the students of one design (a chunk of per-student designs, or one shared design):
    ``(preds, theta, objective, gap, grad_norm, iterations, singular)``."""
    if radius is None:
        theta, iterations, solved = _solve_unconstrained(design, targets, tol)
    else:
        (theta, iterations), solved = _solve_ball(design, targets, radius, tol), None
    preds, objective, gap, g, singular = _certify(design, targets, theta, radius, solved)
    return preds, theta, objective, gap, g.norm(dim=(-2, -1)), iterations, singular


_SINGULAR_REASON = (
    "design numerically singular after scaling its columns (collinear or duplicated columns that are not exact "
    "copies): the dropped directions can lower the objective, so no gap is certified (gap = inf)"
)


def _certify(design: _ScaledDesign, targets, theta, radius, solved=None):
    r"""Predictions, objective, certified gap (with the rounding of its own evaluation), gradient and the mask of
    students whose design could not be proven nonsingular (unconstrained only).

    ``solved``: ``(theta_s, preds, r, c)`` from :func:`_solve_unconstrained`. For a student whose ``theta`` is
    exactly :math:`D\theta_s` (checked: undoing the powers of two gives :math:`\theta_s` back, i.e. nothing
    under- or overflowed), :math:`Z_s\theta_s = Z\theta` as exact numbers, the rounding of the residual computed
    from :math:`Z_s` has the same bound (with :math:`|Z_s||\theta_s| = |Z||\theta|`) and :math:`Z_s^\top r` is
    :math:`\hat c` itself, so nothing is recomputed from :math:`Z`; the gradient in original units is
    :math:`\tfrac2n D^{-1}Z_s^\top r`. The others, and students with redundant columns (whose gradient entries
    :math:`Z_s` does not hold), are evaluated from :math:`Z` and ``theta``.

    The gap bounds both the exact suboptimality of ``theta`` and that of the reported objective: the latter is
    computed from residuals with entrywise error :math:`\rho' = \rho + u|\hat r|` (:func:`_rounding_inflation`),
    so it differs from the exact :math:`\Phi(\theta)` by at most
    :math:`\tfrac1n\sum(2|\hat r|\rho' + \rho'^2) + \gamma_{j+k+2}\hat\Phi` (the objective is summed by
    :func:`~.conditioning.blocked_sum`, whose error count is :math:`j\approx2\sqrt n`), which is added."""
    B, n, _ = targets.shape
    d = design.Zs.shape[-1]
    scales = _expand(design.scales, B)
    if solved is None:
        Z = design.Z
        preds, r, ZTr = _residual_products(Z, targets, theta)
        g, c = 2.0 / n * ZTr, ZTr * scales[..., :, None]
        abs_products = Z.abs() @ theta.abs()
    else:
        theta_s, preds, r, c = solved
        Zs = design.Zs
        absZs = Zs.abs() if design.scratch is None else torch.abs(Zs, out=design.scratch[: Zs.shape[0]])
        abs_products = absZs @ theta_s.abs()
        redundant = _expand(design.redundant, B)
        unscale = torch.where(redundant, torch.zeros_like(scales), 1.0 / scales)
        g = 2.0 / n * c * unscale[..., :, None]
        exact = ((theta * unscale[..., :, None] == theta_s) | redundant[..., :, None]).flatten(1).all(dim=1)
        recompute = ~exact | redundant.any(dim=-1)
        if bool(recompute.any()):
            idx = recompute.nonzero()[:, 0]
            Z = design.Z if design.shared else SquaredHead(bias=design.bias).design(design.features[idx])
            preds[idx], r[idx], ZTr = _residual_products(Z, targets[idx], theta[idx])
            g[idx], c[idx] = 2.0 / n * ZTr, ZTr * scales[idx][..., :, None]
            abs_products[idx] = Z.abs() @ theta[idx].abs()
    if radius is None:
        gap, singular = _normal_equations_certificate(design, r, c)
    else:
        gap, singular = _frank_wolfe_gap_ball(g, theta, radius), torch.zeros_like(r[:, 0, 0], dtype=torch.bool)
    gap = _rounding_inflation(design.Z if radius is not None else design.Zs, theta, targets, gap, radius,
                              abs_products, (r, g))
    per_sample = (r**2).sum(dim=-1)  # = squared(targets, preds)
    total, count = blocked_sum(per_sample)
    objective = total / n
    residual = r.abs()
    rho = unit_roundoff_gamma(d + 1) * (abs_products + targets.abs()) + 2.0**-53 * residual
    evaluation = (2 * residual * rho + rho**2).sum(dim=-1).mean(dim=-1) * (1 + unit_roundoff_gamma(n + 2))
    evaluation = evaluation + unit_roundoff_gamma(count + targets.shape[-1] + 2) * objective
    return preds, objective, gap + evaluation, g, singular


def fit_squared_reference(
    features: np.ndarray, targets: np.ndarray, *, bias: bool = True, radius: float | None = None
) -> FitResult:
    r"""Reference fit of one regression head with cvxpy (Clarabel):
    :math:`\min_\theta \frac1n\|Z\theta - y\|_F^2` (s.t. :math:`\|\theta_{:,o}\|_2\le r`).

    Status other than ``"optimal"`` is a ``RuntimeError``. The returned ``gap`` is this module's certificate
    evaluated at the returned point (after scaling each column back into the ball if the solver left it a
    hair outside), never the solver's own claim.

    Args:
        features: ``(n, m)`` or ``(1, n, m)``; targets: ``(n,)``, ``(n, k_out)`` or ``(1, n, k_out)``.
    """
    import cvxpy as cp

    X = single_student("features", features)
    Y = single_student("targets", targets)
    if Y.ndim == 1:
        Y = Y[:, None]
    Z = SquaredHead(bias=bias).design(X)
    n, d = Z.shape
    k_out = Y.shape[1]
    theta = cp.Variable((d, k_out))
    constraints = [] if radius is None else [cp.norm(theta[:, o], 2) <= radius for o in range(k_out)]
    problem = cp.Problem(cp.Minimize(cp.sum_squares(Z @ theta - Y) / n), constraints)
    problem.solve(solver=cp.CLARABEL)
    if problem.status != "optimal":
        raise RuntimeError(f"cvxpy squared-loss reference ended with status {problem.status!r}")
    th = np.asarray(theta.value, dtype=np.float64)
    if radius is not None:
        th = _into_ball(torch.as_tensor(th, dtype=torch.float64), radius).numpy()
    design = _scaled_design(torch.as_tensor(X, dtype=torch.float64)[None], bias, shared=False)
    Yt = torch.as_tensor(Y, dtype=torch.float64)[None]
    tht = torch.as_tensor(th, dtype=torch.float64)[None]
    preds, objective, gap, g, _ = _certify(design, Yt, tht, radius)
    certificate = "normal_equations" if radius is None else "frank_wolfe"
    return FitResult(
        head="squared", loss="squared", params={"theta": tht}, probs=preds,
        objective=objective, gap=gap, certificate=certificate,
        grad_norm=g.norm(dim=(-2, -1)), iterations=torch.tensor([problem.solver_stats.num_iters or 0]),
        converged=torch.isfinite(gap), method="cvxpy (clarabel)", info={"bias": bias, "radius": radius},
    )
