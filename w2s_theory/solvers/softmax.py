r"""Batched fit of the softmax (log-linear) head :math:`F(x) = \mathrm{softmax}(W h(x) + b)` on CPU or GPU.

Problem, for each of ``B`` students independently (features :math:`h_i\in\mathbb R^m`, teacher
:math:`q_i\in\Delta^k`):

.. math::

    \min_{W\in\mathbb R^{k\times m},\ b\in\mathbb R^k}\ \Phi(W, b)
    = \frac1n\sum_{i=1}^n \ell\big(q_i,\ \mathrm{softmax}(W h_i + b)\big).

**Forward losses** (``forward_kl``, ``forward_ce``; they differ by the constant :math:`\frac1n\sum_i H(q_i)`)
make :math:`\Phi` the convex function :math:`\frac1n\sum_i \mathrm{lse}(\eta_i) - q_i^\top\eta_i` of the logits
:math:`\eta_i = W h_i + b`, which are linear in the parameters: the fit is an M-projection onto an exponential
family and is solved by Newton's method with a certificate (:func:`softmax_forward_certificate`).

**Reverse losses** (``reverse_kl``, ``reverse_ce``) are not convex in the logits. They are fitted by a
modified Newton method whose step matrix is made positive definite (Hessian eigenvalues replaced by their
absolute values, "saddle-free Newton"), started from the forward-KL solution; no certificate exists
(``gap = NaN``, ``certificate = "none"``) and ``converged`` means a small gradient.

**Two paths for the forward losses.** Every student is first solved in the coordinates of its own design
:math:`Z = [h, 1]` (:func:`_direct_chunk`: logits :math:`Z\beta_c`, so the returned head *is* :math:`\beta` and
no decomposition is needed): Newton with backtracking, one Hessian :math:`Z^\top\mathrm{diag}(w)Z` per
iteration (the first fused with the gradient), the certificate evaluated at the stopping point from that
iteration's own factorisation, or from the previous one widened by the logits' drift. A student it cannot
prove (collinear, badly scaled or wide design, a Hessian that does not factor, no certified gap within 40
iterations) is solved again from scratch in the whitened SVD basis below, which handles every design;
``info["direct"]`` says which path certified each student. Students are processed in chunks of about
16 MB of design, and nothing a student computes depends on its neighbours (bit-identical alone, in a batch
or in other chunks) when torch runs one thread, as sweeps do (with more, the BLAS may split a long sum between
threads differently for a batch of one: last-bit differences at n = 2000).

Reduced parametrisation of the SVD-basis path (why): the logits only depend on :math:`(W, b)` through the design
:math:`Z = [h, \mathbf 1]` (``n x (m+1)``), which is often rank deficient, and on the differences between
classes (adding a vector to every class's logits changes nothing). So each student is solved in coordinates
:math:`\theta\in\mathbb R^{r\times(k-1)}` with logits :math:`\eta_{i,c} = \tilde u_i^\top\theta_c` for
:math:`c < k-1` and :math:`\eta_{i,k-1} = 0` (the last class is the reference), where
:math:`\tilde U = \sqrt n\,U_r` is the whitened orthonormal basis of the column space of the *scaled* design
:math:`Z_s = ZD` from a thin SVD :math:`Z_s = U S V^\top` (:math:`\tilde U^\top\tilde U/n = I_r`). :math:`D`
divides each column by a power of two near its norm (exact), and exactly redundant columns (zero, repeated
constants, bitwise duplicates up to sign and a power of two) are removed first (:mod:`.conditioning`), so the
rank decision (singular values below :math:`\max(n, m+1)\,\varepsilon\,s_{\max}` dropped) does not depend on
the features' units. The parameters are recovered as :math:`[W_c, b_c]^\top = \sqrt n\,DV_r S_r^{-1}\theta_c`,
:math:`W_{k-1} = 0`, :math:`b_{k-1} = 0`.

The certificate is *not* taken in these coordinates: it is proven in the basis :math:`Z_s` itself, for the
exact column space of :math:`[h, 1]` and the exact logits of the returned :math:`(W, b)`, with every rounding
bounded (:func:`_forward_certificate`). Where the scaled design is numerically collinear (columns duplicated
in other units, near-duplicates, rows in the simplex next to the bias column) the exact problem has
directions the rank cut dropped, which can lower the objective; the student is then reported uncertified
(``gap = inf``, ``converged = False``, ``info["singular"]``, ``info["uncertified_reason"]``). Objectives are
computed from the logits (log-sum-exp), so they stay finite where probabilities underflow.

References: F. Bach, *Self-concordant analysis for logistic regression*, EJS 2010 (the certificate);
J. Nocedal and S. Wright, *Numerical Optimization*, 2nd ed., ch. 3 (Newton with backtracking, modified
Newton); Y. Dauphin et al., *Identifying and attacking the saddle point problem*, NeurIPS 2014.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..divergences import Loss, get_loss
from ..heads import SoftmaxHead
from ..divergences import LOSSES_FROM_LOGITS
from .conditioning import (
    blocked_sum,
    cholesky_ex,
    exactly_redundant_columns,
    frobenius_norm_squared,
    positive_definite_bound,
    power_of_two_scales,
    rounded_up,
    unit_roundoff_gamma,
)
from .result import FitResult, single_student

__all__ = ["fit_softmax_batched", "softmax_forward_certificate", "fit_softmax_reference"]

_ARMIJO = 1e-4
_MAX_BACKTRACK = 50


# --------------------------------------------------------------------------------------------------------
# Reduced coordinates
# --------------------------------------------------------------------------------------------------------


@dataclass
class _LogitBasis:
    r"""Whitened orthonormal basis of the design's column space, shared by all students when the features are.

    ``U`` is ``(B or 1, n, D)`` with ``D = min(n, m+1)``; columns beyond the numerical rank are exactly 0.
    ``coef`` maps reduced coordinates to ``[W_c, b_c]``: ``(B or 1, m+1, D)``. ``fill`` is ``(B or 1, D*(k-1))``
    with 1 on the dropped coordinates (the Hessian gets an identity there, so they never move).
    ``Zs`` is the scaled design :math:`[h, 1]D` (powers of two, exact) with exactly redundant columns zeroed
    (``redundant``), the basis in which the certificate is proven.
    """

    U: torch.Tensor
    coef: torch.Tensor
    fill: torch.Tensor
    rank: torch.Tensor
    Zs: torch.Tensor
    redundant: torch.Tensor

    def take(self, index: torch.Tensor) -> "_LogitBasis":
        if self.U.shape[0] == 1:  # shared by every student: nothing to copy
            return self
        return _LogitBasis(self.U[index], self.coef[index], self.fill[index], self.rank[index], self.Zs[index],
                           self.redundant[index])


def _scaled_design(X: torch.Tensor):
    r"""The scaled design :math:`Z_s = [h, 1]D` (:mod:`.conditioning`: columns divided by powers of two near their
    norms, exactly redundant columns zeroed). Returns ``(Z, Zs, scales, redundant)``; ``scales`` is 0 on
    redundant columns."""
    ones = torch.ones((*X.shape[:-1], 1), dtype=X.dtype, device=X.device)
    Z = torch.cat([X, ones], dim=-1)
    scales = power_of_two_scales(Z)
    Zs = Z * scales[..., None, :]
    redundant = exactly_redundant_columns(Zs)
    return Z, Zs, scales, redundant


def _logit_basis(features: torch.Tensor, k: int) -> _LogitBasis:
    """Thin SVD of the scaled design ``Z_s = [h, 1] D`` (:mod:`.conditioning`: columns divided by powers of two
    near their norms, exactly redundant columns zeroed), so that the rank decision does not depend on the
    features' units; computed once when every student shares one feature matrix (an expanded view has batch
    stride 0), so that a sweep over teachers pays for one decomposition."""
    B, n, m = features.shape
    shared = B == 1 or features.stride(0) == 0
    X = features[:1] if shared else features
    Z, Zs, scales, redundant = _scaled_design(X)
    Zs = Zs.masked_fill(redundant[..., None, :], 0.0)
    scales = scales.masked_fill(redundant, 0.0)
    U, S, Vh = torch.linalg.svd(Zs, full_matrices=False)
    rtol = max(n, m + 1) * torch.finfo(Z.dtype).eps
    keep = S > rtol * S[..., :1]
    root_n = math.sqrt(n)
    U = U * (keep.to(Z.dtype) * root_n)[..., None, :]
    coef = scales[..., :, None] * Vh.mT * torch.where(keep, root_n / S, torch.zeros_like(S))[..., None, :]
    fill = (~keep).to(Z.dtype)[..., :, None].expand(*keep.shape, k - 1).reshape(keep.shape[0], -1)
    return _LogitBasis(U=U, coef=coef, fill=fill.contiguous(), rank=keep.sum(dim=-1), Zs=Zs, redundant=redundant)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, with a last axis of ``b`` of size 1 (k = 2 makes every logit product one) padded by a zero
    column: a batched matrix-vector product of one matrix goes to another BLAS kernel than that of two or more,
    which rounds differently, so a student's bits would depend on whether it was fitted alone, in a batch, or
    last in a shrinking working set (and a sweep's rows on its chunking). Padded, every product is the same
    GEMM per student whatever the batch."""
    if b.shape[-1] != 1:
        return a @ b
    return (a @ torch.cat([b, torch.zeros_like(b)], dim=-1))[..., :1]


def _logits(U: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, n, k)`` from reduced coordinates ``(B, D, k-1)``; the reference class has logit 0."""
    free = _matmul(U, theta)
    return torch.cat([free, torch.zeros_like(free[..., :1])], dim=-1)


def _head_parameters(basis: _LogitBasis, theta: torch.Tensor, m: int):
    """``(W, b)`` with the gauge ``W[k-1] = 0``, ``b[k-1] = 0``, from reduced coordinates."""
    coeffs = _matmul(basis.coef, theta)  # (B, m+1, k-1)
    B, _, kc = coeffs.shape
    W = torch.zeros((B, kc + 1, m), dtype=theta.dtype, device=theta.device)
    b = torch.zeros((B, kc + 1), dtype=theta.dtype, device=theta.device)
    W[:, :kc] = coeffs[:, :m].mT
    b[:, :kc] = coeffs[:, m]
    return W, b


def _parameter_gradient(U: torch.Tensor, logit_grad: torch.Tensor) -> torch.Tensor:
    r""":math:`g_{(j,c)} = \frac1n\sum_i \tilde U_{ij}\,\partial_{\eta_{ic}}\phi_i`, flattened ``(B, D*(k-1))``."""
    n = logit_grad.shape[-2]
    g = _matmul(U.mT, logit_grad) / n
    return g.reshape(g.shape[0], -1)


def _parameter_hessian(U: torch.Tensor, logit_hessian: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    r""":math:`H = \frac1n\sum_i A_i\otimes\tilde u_i\tilde u_i^\top` (``B, D(k-1), D(k-1)``), with :math:`A_i` the
    ``(k-1) x (k-1)`` Hessian of the per-sample loss in the free logits, plus an identity on dropped coordinates."""
    B, n, kc, _ = logit_hessian.shape
    D = U.shape[-1]
    H = torch.empty((B, D, kc, D, kc), dtype=U.dtype, device=U.device)
    for c in range(kc):
        for c2 in range(c, kc):
            block = U.mT @ (logit_hessian[..., c, c2, None] * U) / n
            H[:, :, c, :, c2] = block
            if c2 != c:
                H[:, :, c2, :, c] = block.mT
    H = H.reshape(B, D * kc, D * kc)
    H.diagonal(dim1=-2, dim2=-1).add_(fill)
    return H


def _softmax_curvature(probs: torch.Tensor) -> torch.Tensor:
    r""":math:`(\mathrm{diag}(s) - s s^\top)` restricted to the free classes: ``(B, n, k-1, k-1)``."""
    s = probs[..., :-1]
    return torch.diag_embed(s) - s[..., :, None] * s[..., None, :]


# --------------------------------------------------------------------------------------------------------
# Per-sample losses in logit space (stable: log-probabilities come from log_softmax, never log(exp(.)))
# --------------------------------------------------------------------------------------------------------


class _ForwardCrossEntropy:
    r""":math:`\phi_i(\eta) = \mathrm{lse}(\eta) - q_i^\top\eta = \mathrm{CE}(q_i, \mathrm{softmax}(\eta))`."""

    convex = True

    def __init__(self, teacher: torch.Tensor):
        self.teacher = teacher

    def take(self, index):
        return _ForwardCrossEntropy(self.teacher[index])

    def objective(self, eta):
        return (torch.logsumexp(eta, dim=-1) - (self.teacher * eta).sum(dim=-1)).mean(dim=-1)

    def derivatives(self, eta):
        probs = torch.softmax(eta, dim=-1)
        return probs, (probs - self.teacher)[..., :-1], _softmax_curvature(probs)


class _ReverseDivergence:
    r"""Reverse KL :math:`\phi_i = \sum_y s_y(\log s_y - \log q_{iy})` or reverse CE
    :math:`\phi_i = -\sum_y s_y\log q_{iy}`, with :math:`s = \mathrm{softmax}(\eta)`.

    With :math:`a = \partial\phi/\partial s` up to a constant (:math:`a = \log s - \log q` for KL,
    :math:`a = -\log q` for CE) and :math:`\bar a = s^\top a`:
    :math:`\nabla_\eta\phi = s\odot(a - \bar a)` and
    :math:`\nabla^2_\eta\phi = \mathrm{diag}(s\odot(a-\bar a)) - s s^\top\odot[(a-\bar a)\mathbf 1^\top
    + \mathbf 1(a-\bar a)^\top] + [\mathrm{diag}(s) - s s^\top]_{\text{KL only}}`.
    """

    convex = False

    def __init__(self, log_teacher: torch.Tensor, with_entropy: bool):
        self.log_teacher = log_teacher
        self.with_entropy = with_entropy

    def take(self, index):
        return _ReverseDivergence(self.log_teacher[index], self.with_entropy)

    def _direction(self, eta):
        log_s = torch.log_softmax(eta, dim=-1)
        s = log_s.exp()
        a = (log_s - self.log_teacher) if self.with_entropy else -self.log_teacher
        return s, a

    def objective(self, eta):
        s, a = self._direction(eta)
        return (s * a).sum(dim=-1).mean(dim=-1)

    def derivatives(self, eta):
        s, a = self._direction(eta)
        centred = a - (s * a).sum(dim=-1, keepdim=True)
        grad = s * centred
        hess = torch.diag_embed(grad) - s[..., :, None] * s[..., None, :] * (
            centred[..., :, None] + centred[..., None, :]
        )
        if self.with_entropy:
            hess = hess + torch.diag_embed(s) - s[..., :, None] * s[..., None, :]
        return s, grad[..., :-1], hess[..., :-1, :-1]


# --------------------------------------------------------------------------------------------------------
# The certificate
# --------------------------------------------------------------------------------------------------------


def _logit_range_constant(U: torch.Tensor, H_inv: torch.Tensor, kc: int) -> torch.Tensor:
    r""":math:`\kappa = \max_i\max_{y\ne y'}\|H^{-1/2}J_i^\top(e_y - e_{y'})\|` (``B``).

    With :math:`M_i[c,c'] = \tilde u_i^\top (H^{-1})_{c,c'}\tilde u_i` (the ``(c, c')`` block of :math:`H^{-1}`),
    the squared norm is :math:`M_i[y,y] + M_i[y',y'] - 2M_i[y,y']` for two free classes and :math:`M_i[y,y]`
    against the reference class (whose logit is fixed at 0)."""
    B = H_inv.shape[0]
    n, D = U.shape[-2], U.shape[-1]
    H5 = H_inv.reshape(B, D, kc, D, kc)
    M = torch.empty((B, n, kc, kc), dtype=U.dtype, device=U.device)
    for c in range(kc):
        for c2 in range(c, kc):
            value = ((U @ H5[:, :, c, :, c2]) * U).sum(dim=-1)
            M[..., c, c2] = value
            M[..., c2, c] = value
    diag = M.diagonal(dim1=-2, dim2=-1)
    pairs = diag[..., :, None] + diag[..., None, :] - 2 * M
    kappa2 = torch.maximum(diag.amax(dim=(1, 2)), pairs.amax(dim=(1, 2, 3)))
    return kappa2.clamp_min(0).sqrt()


def _self_concordance_gap(decrement: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    r"""Upper bound on :math:`(u + (1-u)\log(1-u))/\kappa^2 = \lambda^2\varphi(u)`, :math:`u = \lambda\kappa < 1`, for
    the floats ``decrement`` :math:`\lambda` and ``kappa`` taken as exact numbers; :math:`+\infty` where
    :math:`u \ge 1` cannot be excluded.

    :math:`\varphi(u) = \sum_{j\ge2}u^{j-2}/(j(j-1))` is increasing, so it is evaluated at
    :math:`\bar u = ` :func:`~.conditioning.rounded_up` of :math:`\mathrm{fl}(\lambda\kappa)` (one rounding),
    and every evaluation below is an upper bound on :math:`\varphi(\bar u)`:

    * :math:`\bar u < 10^{-2}`: the series to :math:`u^7` by Horner plus the tail
      :math:`\sum_{j\ge10}u^{j-2}/(j(j-1)) \le u^8/(90(1-u))`. All terms are positive, so the computed value is
      :math:`\varphi(1+\theta)` with :math:`|\theta|\le\gamma_{17}` (Horner of degree 7 with rounded
      coefficients: :math:`\gamma_{16}`, Higham §5.1; the tail: :math:`u^8` by three squarings and the
      quotient, :math:`\gamma_{10}`; the final sum: one more), rounded up with that count.
    * :math:`10^{-2} \le \bar u < 1`: the closed form :math:`N/u^2`, :math:`N = u + P`,
      :math:`P = (1-u)\log(1-u) < 0`, cancels (:math:`|P|/N \approx 2/u \le 200`). The computed
      :math:`\hat P = P(1+\theta)` with :math:`|\theta| \le 10u` (:math:`1-u` and the product: one rounding
      each; ``log1p`` within 4 ulp, :math:`8u`: the libraries torch calls are within 1 ulp), and
      :math:`\hat N = (u + \hat P)(1+\delta)`, so :math:`N \le \hat N/(1-u) + \gamma_{11}|\hat P|`; the
      expression :math:`(\hat N + \gamma_{11}|\hat P|)/u^2` of positive terms (:math:`\hat N > 0`: :math:`N \ge u^2/2`
      dwarfs the error) is evaluated with at most 6 roundings (counting the :math:`1/(1-u)` as one) and
      rounded up.

    The gap :math:`\lambda^2\bar\varphi` (two roundings) is rounded up in turn."""
    prod = decrement * kappa
    u_bar = rounded_up(prod, 1)
    small = u_bar < 1e-2
    us = torch.where(small, u_bar, torch.zeros_like(u_bar))
    series = torch.zeros_like(u_bar)
    for j in range(9, 1, -1):  # Horner: phi = 1/2 + u/6 + u^2/12 + ... + u^7/72
        series = series * us + 1.0 / (j * (j - 1))
    u2 = us * us
    u4 = u2 * u2
    series = rounded_up(series + (u4 * u4) / (90 * (1 - us)), 17)
    ul = torch.where(small | (u_bar >= 1), torch.full_like(u_bar, 0.5), u_bar)
    P = (1 - ul) * torch.log1p(-ul)
    closed = rounded_up((ul + P + unit_roundoff_gamma(11) * P.abs()) / (ul * ul), 6)
    phi = torch.where(small, series, closed)
    gap = rounded_up(decrement * decrement * phi, 2)
    ok = (u_bar < 1) & torch.isfinite(u_bar)
    return torch.where(ok, gap, torch.full_like(gap, float("inf")))


def _logits_with_error(W, b, features):
    r"""Logits :math:`\hat\eta = hW^\top + b` ``(B, n, k)`` and a bound on :math:`|\hat\eta - \eta|` entrywise for the
    exact logits of ``(W, b)``: :math:`\gamma_{m+1}(|h||W|^\top + |b|)` (Higham §3.1), itself a computed sum of
    :math:`m+1` nonnegative terms times :math:`\gamma`, rounded up (:func:`~.conditioning.rounded_up`, count
    :math:`m+4`)."""
    logits = SoftmaxHead.logits(W, b, features)
    m = features.shape[-1]
    error = rounded_up(unit_roundoff_gamma(m + 1) * SoftmaxHead.logits(W.abs(), b.abs(), features.abs()), m + 4)
    return logits, error


def _objective_from_logits(loss_name: str, teacher, logits):
    r"""Mean training loss from the logits (log-sum-exp; finite for any finite logits), summed by
    :func:`~.conditioning.blocked_sum`; returns ``(objective, per_sample, count)``."""
    per_sample = LOSSES_FROM_LOGITS[loss_name](teacher, logits)
    total, count = blocked_sum(per_sample)
    return total / per_sample.shape[-1], per_sample, count


def _forward_evaluation_error(teacher, differences, per_sample, count):
    r"""Bound on the rounding of the reported forward objective, computed from the logit differences
    :math:`d` through :math:`\log s = d - \max d - \log\sum e^{d - \max d}`:
    :math:`|\widehat{\log s_y} - \log s_y| \le \gamma_{k+4}(|d_y| + |\max d| + \log k + 1)`, each product and sum
    over classes adds :math:`\gamma_{k+4}` of the magnitudes, the mean over samples :math:`\gamma_{j+2}` of the
    mean magnitude (:func:`~.conditioning.blocked_sum`). Doubled, which also covers the rounding of this
    formula's own evaluation (positive terms, relative :math:`\gamma_{n+k+8} \ll 1`)."""
    k = teacher.shape[-1]
    g = unit_roundoff_gamma(k + 4)
    top = differences.amax(dim=-1, keepdim=True).abs()
    log_s = torch.log_softmax(differences, dim=-1)
    terms = teacher * (differences.abs() + top + math.log(k) + 1) + teacher * log_s.abs()
    terms = terms + torch.special.xlogy(teacher, teacher).abs()
    per = g * terms.sum(dim=-1)
    return 2 * (per.mean(dim=-1) + unit_roundoff_gamma(count + 2) * per_sample.abs().mean(dim=-1))


def _design_hessian(Z: torch.Tensor, curvature: torch.Tensor, redundant: torch.Tensor) -> torch.Tensor:
    r""":math:`H = \frac1n\sum_i A_i\otimes z_iz_i^\top` in the coordinates of the scaled design's columns, with the
    largest kept diagonal entry put on the diagonal of the (zero) redundant columns' coordinates, which are
    decoupled from the rest: ``(B, p(k-1), p(k-1))``."""
    kc = curvature.shape[-1]
    H = _parameter_hessian(Z, curvature, torch.zeros(1, dtype=Z.dtype, device=Z.device))
    if redundant is None:
        return H
    fill = redundant.to(Z.dtype)[..., :, None].expand(*redundant.shape, kc).reshape(redundant.shape[0], -1)
    diag = H.diagonal(dim1=-2, dim2=-1)
    scale = (diag * (1 - fill)).abs().amax(dim=-1).clamp_min(1e-300)
    diag.add_(fill * scale[:, None])
    return H


def _decrement_and_range_bounds(w, dg_norm, eta, inverse_bound, rho, row2, p: int, kappa_hat=None, drift=None):
    r"""Upper bounds on :math:`\lambda` and :math:`\kappa` of :func:`_tall_certificate` from the floats computed
    there (``(B,)`` each; :math:`w = \|L^{-1}\hat g\|` computed, whose rounding is inside :math:`\eta`):

    .. math::

        \lambda \le \frac{(1+\eta)w + \sqrt\Lambda\,\|\delta g\|}{\sqrt{1-\rho}},\qquad
        \kappa^2 \le \frac{\hat\kappa^2(1+\gamma_{2p+2}) + (\eta+\gamma_{2p+2})\Lambda\,2\max_i\|z_i\|^2}{1-\rho}
        \ \text{or}\ \frac{\Lambda\,2\max_i\|z_i\|^2(1+\gamma_4)}{1-\rho}\ \text{(without}\ \hat\kappa),

    both times :math:`e^{R/2}(1+\gamma_4)` for a drift :math:`R`. Each right-hand side is a formula of the given
    floats whose evaluation has positive terms only (:math:`1-\rho \ge 1/2` does not cancel), so the computed
    value is rounded up (:func:`~.conditioning.rounded_up`) by its count of roundings, a constant
    :math:`1+\gamma` counting one: :math:`\lambda`: a term of the numerator 2, the sum 1, :math:`\sqrt{1-\rho}`
    2, the quotient 1 (6; 8 allowed); :math:`\kappa^2`: a term 5, the sum 1, :math:`1-\rho` and the quotient 2
    (8), halved by the square root, plus its own rounding (5; 6 allowed); the widening: ``exp`` within 1 ulp
    (2), the constant (1), the product (1)."""
    one_minus_rho = 1 - rho.clamp(max=0.5)
    lam = ((1 + eta) * w + inverse_bound.sqrt() * dg_norm) / one_minus_rho.sqrt()
    if kappa_hat is not None:
        kappa2 = (kappa_hat**2 * (1 + unit_roundoff_gamma(2 * p + 2))
                  + (eta + unit_roundoff_gamma(2 * p + 2)) * inverse_bound * 2 * row2)
    else:
        kappa2 = inverse_bound * 2 * row2 * (1 + unit_roundoff_gamma(4))
    kappa = (kappa2 / one_minus_rho).sqrt()
    count_lam, count_kappa = 8, 6
    if drift is not None:
        widen = torch.exp(drift / 2) * (1 + unit_roundoff_gamma(4))
        lam, kappa = lam * widen, kappa * widen
        count_lam, count_kappa = count_lam + 4, count_kappa + 4
    return rounded_up(lam, count_lam), rounded_up(kappa, count_kappa)


def _tall_certificate(Zs, redundant, teacher, qsum, s, logit_grad, *, exact_kappa: bool, H=None, norms=None,
                      dg_norm=None, drift=None, g=None, factor=None, logit_range=None):
    r"""Step 2 of :func:`_forward_certificate` (tall design, :math:`n \ge` kept columns) for the computed
    probabilities ``s`` of the point, in the basis ``Zs`` ``(B or 1, n, p)`` (``redundant``: its zeroed columns,
    or None): ``(gap, decrement bound, proved)``.

    Optional inputs the caller may have already: ``H``, the computed Hessian :func:`_design_hessian` of
    ``qsum * curvature(s)`` in that basis; ``norms = (frob2, row2)``, upper bounds on :math:`\|Z_s\|_F^2` and
    :math:`\max_i\|z_i\|^2`; ``dg_norm``, an upper bound on :math:`\|\delta g\|` (the gradient's rounding).
    ``drift`` :math:`R\ge0` (per student): ``H`` was computed at an earlier point whose logits differ from
    this point's by a range of at most :math:`R` per sample; by the self-concordance of log-sum-exp
    (:math:`D^3\mathrm{lse}(\eta)[v,w,w] \ge -\mathrm{range}(v)\,D^2\mathrm{lse}(\eta)[w,w]`, Bach 2010),
    :math:`H_{\text{here}} \succeq e^{-R}H`, so :math:`\lambda` and :math:`\kappa` are multiplied by
    :math:`e^{R/2}`.

    :math:`\kappa` (the logit-range constant of Bach's bound) is bounded either from the computed inverse
    (``exact_kappa``: :math:`\hat\kappa^2 = \max_i\max_{y\ne y'} v^\top Xv` plus its rounding) or, without a
    pass over the sample, by
    :math:`\kappa^2 \le \|H^{-1}\|_2\max_{i,y,y'}\|v_{iyy'}\|^2 \le \Lambda\cdot 2\max_i\|z_i\|^2/(1-\rho)`
    (:math:`v_{iyy'} = J_i^\top(e_y-e_{y'})` has squared norm :math:`\|z_i\|^2` or :math:`2\|z_i\|^2`, and
    :math:`H\succeq(1-\rho)LL^\top`, :math:`\|(LL^\top)^{-1}\|_2\le\Lambda`, from
    :func:`~.conditioning.positive_definite_bound`). Both are upper bounds, and the gap is increasing in
    :math:`\kappa`; the second is looser (it only matters once :math:`\lambda\kappa` is not small)."""
    n, k = teacher.shape[-2], teacher.shape[-1]
    kc = k - 1
    # Rounding count of the gradient and Hessian entries: the inner product over the sample (n), and the
    # computed probabilities' relative error, at most (2 x + k + 3) u for logits whose range is x (the
    # exponent's argument carries an absolute error u x), plus the products and differences around them.
    c = n + 2 * k + 12
    if logit_range is not None:
        c = c + 2 * torch.ceil(logit_range)
    if g is None:
        g = _parameter_gradient(Zs, logit_grad)
    if dg_norm is None:
        # Rounded up: the entries (2), the product with |Z_s| and the division (n + 1), the norm of p(k-1)
        # of them (p(k-1) + 1), gamma and its product (3).
        dg = _parameter_gradient(Zs.abs(), (qsum[..., None] * s + teacher)[..., :-1])
        dg_norm = rounded_up(unit_roundoff_gamma(c) * dg.norm(dim=-1), n + dg.shape[-1] + 7)
    if H is None:
        H = _design_hessian(Zs, qsum[..., None, None] * _softmax_curvature(s), redundant)
    p = H.shape[-1]
    if norms is None:
        frob2 = frobenius_norm_squared(Zs)
        row2 = rounded_up((Zs**2).sum(dim=-1).amax(dim=-1), Zs.shape[-1])
    else:
        frob2, row2 = norms
    # Rounded up: the computed sum over classes in qsum (k), gamma (2), the products and the quotient (3).
    H_error = rounded_up(4 * unit_roundoff_gamma(c) * qsum.amax(dim=-1) * frob2 / n, k + 5)
    bound = positive_definite_bound(H, H_error, factor)
    w = torch.linalg.solve_triangular(bound.L, g[..., None], upper=False)[..., 0].norm(dim=-1)
    kappa_hat = _logit_range_constant(Zs, bound.X, kc) if exact_kappa else None
    lam, kappa = _decrement_and_range_bounds(w, dg_norm, bound.eta, bound.inverse_bound, bound.rho, row2, p,
                                             kappa_hat, drift)
    value = _self_concordance_gap(lam, kappa)
    inf = torch.full_like(value, float("inf"))
    return torch.where(bound.ok, value, inf), torch.where(bound.ok, lam, inf), bound.ok


def _point_shift(qsum: torch.Tensor, error: torch.Tensor, k: int) -> torch.Tensor:
    r"""Step 1 of :func:`_forward_certificate`: :math:`4\,\mathrm{mean}_i(\sum_y q_{iy})\epsilon_i` for the per-sample
    bounds ``error`` :math:`\epsilon_i \ge \max_y|\hat d_{iy} - d_{iy}|` ``(B, n)`` and the computed class sums
    ``qsum``, rounded up (:func:`~.conditioning.rounded_up`): the computed qsum carries :math:`k-1` roundings,
    :math:`\epsilon_i` at most 4 (its sum of three terms and :math:`u|\hat d|` for the :math:`u|d|/(1-u)` of a
    subtraction), the product 1, the mean :math:`n` (sum and quotient); all terms are nonnegative."""
    n = error.shape[-1]
    return rounded_up(4 * (qsum * error).mean(dim=-1), n + k + 4)


def _forward_certificate(basis: _LogitBasis, teacher: torch.Tensor, logits: torch.Tensor, logit_error: torch.Tensor):
    r"""Proven bound on :math:`\Phi(W, b) - \inf\Phi` for the forward losses, for the problem as stated: the exact
    column space of :math:`[h, 1]`, the exact logits of the returned parameters, rounding included. Returns
    ``(gap, decrement, grad_norm, singular)``; ``gap = inf`` where nothing can be proven.

    1. **Point.** The computed logit differences :math:`\hat d = \hat\eta - \hat\eta_{k-1}` are taken as exact
       numbers; they differ from the exact ones by at most :math:`\epsilon_{iy}` (``logit_error`` of both classes
       plus the subtraction). The per-sample loss :math:`-\sum_y q_y\log\mathrm{softmax}(d)_y` has gradient
       :math:`(\sum q)s - q` in :math:`d`, of 1-norm :math:`\le 2\sum_y q_y`, so moving the point (and, in the
       infimum, every point of the affine set) by :math:`\epsilon` changes the objective by at most
       :math:`2\sum q\,\max_y\epsilon_{iy}` per sample: :math:`4\,\mathrm{mean}_i\sum q_i\max_y\epsilon_{iy}` is added.
    2. **Tall design** (:math:`n \ge d'` kept columns): the self-concordance bound
       (:func:`softmax_forward_certificate`) in the basis :math:`Z_s` itself (not an SVD of it, whose span is
       only approximately the column space). The computed gradient and Hessian err by at most
       :math:`\delta g = \gamma_c\frac1n|Z_s|^\top(\sum q\,\hat s + q)` entrywise and
       :math:`\|\delta H\|_2 \le 4\gamma_c\max_i\sum q_i\|Z_s\|_F^2/n` (:math:`c = n + 2k + 12`, the softmax's own
       relative error included); :func:`~.conditioning.positive_definite_bound` then gives
       :math:`H \succeq (1-\rho)LL^\top`, and :math:`\lambda \le ((1+\eta)\|L^{-1}\hat g\| + \|L^{-1}\|\|\delta g\|)
       /\sqrt{1-\rho}`, :math:`\kappa^2 \le (\hat\kappa^2 + (\eta + \gamma_{2p+2})\,\mathrm{tr}(X)\,2\max_i\|z_i\|^2)
       /(1-\rho)`. The bound is increasing in both, so these give an upper bound.
    3. **Wide design** (:math:`n < d'`): if :math:`Z_sZ_s^\top` is proven positive definite, the logits can take
       any value, :math:`\inf\Phi` is the teacher's own value, and the gap is the mean
       :math:`\mathrm{KL}(q_i\|s_i)` (plus :math:`|\sum q - 1|` for rows not summing to 1 exactly).
    4. Not provable (numerically singular design or Hessian): ``inf``, ``singular`` True.

    Each formula above is a bound in exact arithmetic on the floats it is computed from; its own evaluation in
    floating point rounds to nearest and could land below it (by up to ~1e-14 relative, the closed form of
    :math:`\varphi` cancelling), so every final combination (:func:`_point_shift`,
    :func:`_decrement_and_range_bounds`, :func:`_self_concordance_gap`, the wide design's sum and the returned
    ``gap + shift``) is rounded up by its count of roundings (:func:`~.conditioning.rounded_up`: a relative
    :math:`\gamma_{2c+2}`, O(B) work).
    """
    B, n, k = teacher.shape
    kc = k - 1
    dev, dt = teacher.device, teacher.dtype
    u = 2.0**-53
    differences = logits - logits[..., -1:]
    diff_error = logit_error + logit_error[..., -1:] + u * differences.abs()
    qsum = teacher.sum(dim=-1)
    shift = _point_shift(qsum, diff_error.amax(dim=-1), k)
    log_s = torch.log_softmax(differences, dim=-1)
    s = log_s.exp()
    logit_grad = (qsum[..., None] * s - teacher)[..., :-1]
    Zs = basis.Zs
    grad_norm = _parameter_gradient(Zs, logit_grad).norm(dim=-1) * math.sqrt(n)
    shared = Zs.shape[0] == 1 and B > 1
    kept = (~basis.redundant).sum(dim=-1).expand(B)
    frob2 = frobenius_norm_squared(Zs).expand(B)
    gap = torch.full((B,), float("inf"), dtype=dt, device=dev)
    decrement = torch.full((B,), float("inf"), dtype=dt, device=dev)
    singular = torch.zeros(B, dtype=torch.bool, device=dev)
    tall = kept <= n
    if bool(tall.any()):
        idx = tall.nonzero()[:, 0]
        Zt = Zs if shared else Zs[idx]
        red = basis.redundant if shared else basis.redundant[idx]
        # The logits' range (its subtraction rounded up: it sets a rounding count).
        spread = rounded_up((differences[idx].amax(dim=-1) - differences[idx].amin(dim=-1)).amax(dim=-1), 1)
        value, lam, ok = _tall_certificate(Zt, red, teacher[idx], qsum[idx], s[idx], logit_grad[idx],
                                           exact_kappa=True, logit_range=spread)
        gap[idx] = value
        decrement[idx] = lam
        singular[idx] = ~ok
    wide = ~tall
    if bool(wide.any()):
        idx = wide.nonzero()[:, 0]
        Zw = Zs if shared else Zs[idx]
        gram_error = rounded_up(unit_roundoff_gamma(Zs.shape[-1]) * (frob2[:1] if shared else frob2[idx]), 3)
        bound = positive_definite_bound(Zw @ Zw.mT, gram_error)
        ok = bound.ok.expand(idx.numel())
        divergence, per_sample, count = _objective_from_logits("forward_kl", teacher[idx], differences[idx])
        divergence = divergence + _forward_evaluation_error(teacher[idx], differences[idx], per_sample, count)
        # |sum q - 1| from the computed qsum, which errs by gamma_{k-1} sum q; the terms are nonnegative
        # (divergence + its doubled error >= half that error > 0), so the sum is rounded up: count 2k + 6 covers
        # the difference (1 + k), the products, the mean (n is counted in the mean's own rounding below).
        mismatch = ((qsum[idx] - 1).abs() + unit_roundoff_gamma(k) * qsum[idx]).mean(dim=-1) * 1.01
        value = rounded_up(divergence.clamp_min(0) + mismatch, n + 2 * k + 6)
        gap[idx] = torch.where(ok, value, gap[idx])
        singular[idx] = ~ok
    return rounded_up(gap + shift, 1), decrement, grad_norm, singular


def softmax_forward_certificate(features, teacher, W, b) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Certified bound on the forward-loss suboptimality of softmax heads ``(W, b)``, and the Newton decrement.

    For :math:`f(\theta) = \frac1n\sum_i \mathrm{lse}(\eta_i(\theta)) - q_i^\top\eta_i(\theta)` in the reduced
    coordinates of this module (logits :math:`\eta_i = J_i\theta`, the reference class at 0), with gradient
    :math:`g` and Hessian :math:`H` at :math:`\theta`:

    .. math::

        \lambda = \sqrt{g^\top H^{-1}g},\qquad
        \kappa = \max_i\max_{y\ne y'}\big\|H^{-1/2}J_i^\top(e_y - e_{y'})\big\|,\qquad u = \lambda\kappa,

        f(\theta) - \inf f \;\le\; \mathrm{gap} = \frac{u + (1-u)\log(1-u)}{\kappa^2}
        \ \ (u < 1),\qquad \mathrm{gap} = +\infty\ \ (u\ge 1).

    For small :math:`u` the gap is :math:`\approx\lambda^2/2`, the classical Newton-decrement estimate.

    Why it is valid (generalized self-concordance, Bach 2010, Prop. 1 and Sec. 2): fix a direction
    :math:`\Delta` and let :math:`\varphi(t) = f(\theta + t\Delta)`; the logit change of sample :math:`i` is
    :math:`v_i = J_i\Delta` (linear in :math:`t`). The third derivative of log-sum-exp is the third central
    moment under :math:`s = \mathrm{softmax}(\eta)`:
    :math:`D^3\mathrm{lse}(\eta)[v,v,v] = \mathbb E_s[(v - \bar v)^3]`, and
    :math:`|\mathbb E_s[(v-\bar v)^3]| \le \mathrm{range}(v)\,\mathrm{Var}_s(v)`. The linear term
    :math:`-q_i^\top\eta_i` has no curvature, so :math:`|\varphi'''(t)| \le R\,\varphi''(t)` with
    :math:`R = \max_i(\max_y v_{iy} - \min_y v_{iy})`. Hence :math:`\varphi''(t) \ge \varphi''(0)e^{-Rt}`, and
    integrating twice,

    .. math::

        f(\theta+\Delta) \ge f(\theta) + g^\top\Delta + \psi(R)\,\|\Delta\|_H^2,\qquad
        \psi(r) = \frac{e^{-r} + r - 1}{r^2}\ \text{(decreasing)}.

    By Cauchy–Schwarz each logit difference is :math:`(e_y - e_{y'})^\top J_i\Delta \le
    \|H^{-1/2}J_i^\top(e_y - e_{y'})\|\,\|\Delta\|_H`, so :math:`R \le \kappa\|\Delta\|_H`; and
    :math:`g^\top\Delta \ge -\lambda\|\Delta\|_H`. Writing :math:`t = \|\Delta\|_H`,
    :math:`f(\theta+\Delta) \ge f(\theta) - \lambda t + (e^{-\kappa t} + \kappa t - 1)/\kappa^2`, whose minimum
    over :math:`t\ge0` (at :math:`e^{-\kappa t} = 1 - u`) is :math:`f(\theta) - \mathrm{gap}`; for
    :math:`u\ge1` the bound is unbounded below or not informative, so no certificate is given.

    The bound is evaluated in the basis of the scaled design's columns (which span the exact column space of
    ``[h, 1]``), with upper bounds on :math:`\lambda` and :math:`\kappa` that include the rounding of their own
    evaluation, plus the distance between the computed and the exact logits of ``(W, b)`` and the rounding of
    the objective (:func:`_forward_certificate`): it bounds :math:`\Phi(W,b) - \inf\Phi` over all heads for the
    problem as stated, or is ``inf`` where the design is numerically collinear. When the infimum is not
    attained (for example a one-hot teacher on separable data) :math:`u\ge1` persists and the gap stays ``inf``.

    Args:
        features: ``(B, n, m)``; teacher: ``(B, n, k)``; W: ``(B, k, m)``; b: ``(B, k)``.

    Returns:
        ``(gap, newton_decrement)``, each ``(B,)``; ``inf`` where the Hessian is numerically singular.
    """
    features = torch.as_tensor(features, dtype=torch.float64)
    dev = features.device
    teacher = torch.as_tensor(teacher, dtype=torch.float64, device=dev)
    W = torch.as_tensor(W, dtype=torch.float64, device=dev)
    b = torch.as_tensor(b, dtype=torch.float64, device=dev)
    if features.ndim == 2:
        features, teacher, W, b = features[None], teacher[None], W[None], b[None]
    basis = _logit_basis(features, teacher.shape[-1])
    logits, logit_error = _logits_with_error(W, b, features)
    gap, decrement, _, _ = _forward_certificate(basis, teacher, logits, logit_error)
    return gap, decrement


# --------------------------------------------------------------------------------------------------------
# Batched Newton
# --------------------------------------------------------------------------------------------------------


def _curvature_scale(H, fill):
    """Largest diagonal entry of the Hessian over the kept coordinates (the identity on dropped ones is not
    curvature, and must not set the scale when the real curvature is tiny, e.g. saturated probabilities)."""
    return (H.diagonal(dim1=-2, dim2=-1) * (1 - fill)).abs().amax(dim=-1).clamp_min(1e-300)


def _damped_newton_direction(H, g, fill):
    r"""Solve :math:`(H + \mu\,\sigma I)\Delta = -g` per student with the smallest :math:`\mu` of a ladder for which
    the matrix is positive definite (Cholesky succeeds); :math:`\sigma` is the largest diagonal entry.

    For the convex (forward) problem :math:`\mu = 0` (pure Newton) except where the Hessian is numerically
    singular. The last rung is Gershgorin's bound :math:`\mu\sigma > \max_r\sum_c |H_{rc}|`, which makes
    every symmetric matrix positive definite, so every student gets a descent direction. Returns the
    direction, the damping used (0 = pure Newton) and :math:`g^\top(H+\mu\sigma I)^{-1}g` (the squared
    decrement of the step)."""
    B, p, _ = H.shape
    scale = _curvature_scale(H, fill)
    gershgorin = H.abs().sum(dim=-1).amax(dim=-1)
    rungs = (0.0, 1e-12, 1e-9, 1e-6, 1e-3, 1.0)
    direction = torch.zeros_like(g)
    damping = torch.full_like(scale, float("nan"))
    todo = torch.arange(B, device=H.device)
    for i in range(len(rungs) + 1):
        if todo.numel() == 0:
            break
        shift = rungs[i] * scale[todo] if i < len(rungs) else 2 * gershgorin[todo] + scale[todo]
        M = H[todo].clone()
        M.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
        L, info = cholesky_ex(M)
        ok = info == 0
        done = todo[ok]
        direction[done] = -torch.cholesky_solve(g[done][..., None], L[ok])[..., 0]
        damping[done] = shift[ok]
        todo = todo[~ok]
    direction = direction * (1 - fill)  # dropped coordinates never move
    return direction, damping, -(g * direction).sum(dim=-1)


def _saddle_free_newton_direction(H, g, fill):
    r"""Modified Newton step for a non-convex objective: :math:`\Delta = -V|\Lambda|_\delta^{-1}V^\top g` with
    :math:`H = V\Lambda V^\top` and eigenvalues replaced by :math:`\max(|\lambda|, \delta)`,
    :math:`\delta = 10^{-8}\sigma` (Dauphin et al. 2014, "Identifying and attacking the saddle point problem";
    Nocedal and Wright, Sec. 3.4). The step matrix is positive definite, so :math:`\Delta` is a descent
    direction; at a local minimum with positive definite Hessian it is the Newton step (quadratic
    convergence). Unlike a Levenberg–Marquardt shift :math:`H + \mu I`, which must exceed the most negative
    eigenvalue and then shortens the step in *every* direction, it moves along negative curvature at full
    length: near saddles (common for reverse CE, whose infimum is often at infinity) the shift made
    progress stall for hundreds of iterations. Returns the direction and :math:`g^\top|H|_\delta^{-1}g`."""
    scale = _curvature_scale(H, fill)
    eigenvalues, V = torch.linalg.eigh(H)
    modulus = torch.maximum(eigenvalues.abs(), 1e-8 * scale[:, None])
    coefficients = _matmul(V.mT, g[..., None])[..., 0] / modulus
    direction = -_matmul(V, coefficients[..., None])[..., 0] * (1 - fill)
    return direction, -(g * direction).sum(dim=-1)


@dataclass
class _NewtonRun:
    theta: torch.Tensor
    iterations: torch.Tensor


def _newton(basis: _LogitBasis, model, theta0: torch.Tensor, *, tol: float, max_iter: int) -> _NewtonRun:
    r"""Batched Newton with Armijo backtracking on :math:`\theta\mapsto\frac1n\sum_i\phi_i(J_i\theta)`:
    :func:`_damped_newton_direction` for a convex ``model``, :func:`_saddle_free_newton_direction` otherwise.

    Stops a student when: (convex ``model``) the self-concordance gap is at most ``tol``; (non-convex) the
    modified Newton decrement satisfies :math:`\lambda^2/2\le` ``tol`` and the gradient norm is at
    most :math:`\sqrt{\text{tol}}`; or when :math:`\lambda^2/2` is below :math:`10^{-3}` of the objective's
    rounding level :math:`16\varepsilon(|f|+1)` (no measurable progress is left: an unattained infimum ends
    here, before probabilities become subnormal); (non-convex) when the gradient norm is at most
    :math:`\sqrt{\text{tol}}` and two steps in a row decreased the objective by no more than that rounding
    level (one such step is normal just before Newton's last, quadratically convergent step); or when
    no step passes the line search; or after ``max_iter`` steps.
    Students that stop are removed from the working set (one copy when it has thinned out)."""
    B = theta0.shape[0]
    kc = theta0.shape[-1]
    dev = theta0.device
    theta = theta0.clone()
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    ws = torch.arange(B, device=dev)
    bs, md, th = basis, model, theta.clone()
    f = md.objective(_logits(bs.U, th))
    running = torch.ones(B, dtype=torch.bool, device=dev)
    flat_steps = torch.zeros(B, dtype=torch.long, device=dev)
    grad_tol = math.sqrt(tol)
    for it in range(max_iter + 1):
        if not running.any():
            break
        if running.sum() < 0.75 * running.numel():
            theta[ws] = th
            keep = running.nonzero()[:, 0]
            ws, bs, md, th, f, running = ws[keep], bs.take(keep), md.take(keep), th[keep], f[keep], running[keep]
            flat_steps = flat_steps[keep]
        eta = _logits(bs.U, th)
        _, logit_grad, logit_hess = md.derivatives(eta)
        g = _parameter_gradient(bs.U, logit_grad)
        H = _parameter_hessian(bs.U, logit_hess, bs.fill)
        if md.convex:
            direction, damping, dec2 = _damped_newton_direction(H, g, bs.fill)
        else:
            direction, dec2 = _saddle_free_newton_direction(H, g, bs.fill)
        # The Newton model predicts a decrease far below the objective's rounding level: nothing measurable is
        # left to gain (this is where an unattained infimum ends, before probabilities become subnormal).
        slack = 16 * torch.finfo(f.dtype).eps * (f.abs() + 1)
        running = running & ~(dec2 / 2 <= 1e-3 * slack)
        if md.convex:
            # Undamped decrement small enough to possibly certify `tol`: pay for kappa (gap >= lambda^2/2).
            cand = running & (damping == 0) & (dec2 / 2 <= tol)
            if cand.any():
                idx = cand.nonzero()[:, 0]
                L, info = cholesky_ex(H[idx])  # a failed factorisation (possible on a GPU) stops no student
                idx, L = idx[info == 0], L[info == 0]
                kappa = _logit_range_constant(bs.take(idx).U, torch.cholesky_inverse(L), kc)
                gap = _self_concordance_gap(dec2[idx].clamp_min(0).sqrt(), kappa)
                running[idx[gap <= tol]] = False
        else:
            stationary = g.norm(dim=-1) <= grad_tol
            running = running & ~((dec2 / 2 <= tol) & stationary)
        if not running.any() or it == max_iter:
            break
        # Armijo backtracking; a rounding allowance lets the last, tiny decreases through.
        alpha = torch.ones_like(f)
        pending = running.clone()
        f_before = f.clone()
        slope = (g * direction).sum(dim=-1)
        step = direction.reshape(th.shape)
        for _bt in range(_MAX_BACKTRACK):
            if not pending.any():
                break
            trial = th + alpha[:, None, None] * step
            ft = md.objective(_logits(bs.U, trial))
            ok = pending & torch.isfinite(ft) & (ft <= f + _ARMIJO * alpha * slope + slack)
            th = torch.where(ok[:, None, None], trial, th)
            f = torch.where(ok, ft, f)
            pending = pending & ~ok
            alpha = torch.where(pending, alpha * 0.5, alpha)
        iterations[ws[running]] += 1
        running = running & ~pending  # no acceptable step: stop, the point reached is kept
        if not md.convex:
            # Stationary and the objective no longer moves measurably: where the infimum is not attained
            # (reverse CE pushes towards a vertex) the logits would otherwise grow until probabilities are
            # subnormal, for no gain.
            flat = stationary & (f_before - f <= slack)
            flat_steps = torch.where(flat, flat_steps + 1, torch.zeros_like(flat_steps))
            running = running & ~(flat_steps >= 2)
    theta[ws] = th
    return _NewtonRun(theta=theta, iterations=iterations)


# --------------------------------------------------------------------------------------------------------
# Forward losses in the scaled design's own coordinates (the fast path)
# --------------------------------------------------------------------------------------------------------

#: Students are solved in chunks whose design copy is about this size, so that the per-iteration temporaries
#: (as large as the design) are reused from the allocator's cache instead of being faulted in each time.
_DIRECT_CHUNK_BYTES = 16 * 2**20
#: Newton iterations the direct path tries before handing a student to the SVD-basis solver.
_DIRECT_MAX_ITER = 40
_TINY = torch.finfo(torch.float64).tiny


@dataclass
class _DirectFit:
    certified: torch.Tensor  # (B,) bool: solved and proven here (gap <= tol)
    W: torch.Tensor
    b: torch.Tensor
    probs: torch.Tensor
    objective: torch.Tensor
    gap: torch.Tensor
    grad_norm: torch.Tensor
    iterations: torch.Tensor
    rank: torch.Tensor


def _class_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the (small) last axis; a loop over its columns, because a reduction over a last axis of two
    or three entries is a slow kernel (about 20 times slower than the additions)."""
    if x.shape[-1] > 8:
        return x.sum(dim=-1)
    total = x[..., 0]
    for y in range(1, x.shape[-1]):
        total = total + x[..., y]
    return total


def _class_max(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] > 8:
        return x.amax(dim=-1)
    top = x[..., 0]
    for y in range(1, x.shape[-1]):
        top = torch.maximum(top, x[..., y])
    return top


def _free_softmax(t: torch.Tensor):
    r"""For free logits ``t`` ``(B, n, k-1)`` (the reference class at 0): :math:`\mathrm{lse}` ``(B, n)`` and the
    probabilities of the free classes ``(B, n, k-1)``, computed as :math:`e^{t - \max}/\sum e^{t-\max}` with
    the maximum including the reference's 0."""
    top = _class_max(t).clamp_min(0.0)
    e = torch.exp(t - top[..., None])
    total = _class_sum(e) + torch.exp(-top)
    return top + torch.log(total), e / total[..., None]


def _free_curvature(s: torch.Tensor, qsum: torch.Tensor) -> torch.Tensor:
    r""":math:`(\sum_y q_y)(\mathrm{diag}(s) - ss^\top)` on the free classes, ``(B, n, k-1, k-1)``."""
    if s.shape[-1] == 1:
        return (qsum[..., None] * s * (1 - s))[..., None]
    return qsum[..., None, None] * (torch.diag_embed(s) - s[..., :, None] * s[..., None, :])


def _direct_objective(t, teacher, qsum):
    r""":math:`\frac1n\sum_i (\textstyle\sum_y q_{iy})\,\mathrm{lse}(\eta_i) - q_i^\top\eta_i` from the free logits
    (forward CE, up to rows that do not sum to 1 exactly; its gradient and Hessian are the certificate's)."""
    lse, _ = _free_softmax(t)
    return (qsum * lse - _class_sum(teacher[..., :-1] * t)).mean(dim=-1)


def _with_reference(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, torch.zeros_like(t[..., :1])], dim=-1)


def _logit_drift(t, t_before):
    r"""Upper bound on :math:`\max_i\mathrm{range}_y(\eta_{iy} - \eta'_{iy})` for two computed free-logit arrays
    ``(B, n, k-1)`` (the reference class moves by 0; the subtraction's rounding included)."""
    v = t - t_before
    spread = _class_max(v).clamp_min(0) + _class_max(-v).clamp_min(0) + 4 * 2.0**-53 * _class_max(v.abs())
    return rounded_up(spread.amax(dim=-1), 2)  # two additions (4u|v| is exact: a power of two)


def _direct_chunk(X, teacher, loss_name: str, tol: float, max_iter: int):
    r"""Newton on the forward loss in the coordinates :math:`\beta = [W_c, b_c]^\top` of the design
    :math:`Z = [h, 1]` itself (logits :math:`Z\beta_c`, reference class 0), for one chunk of students; the
    certificate is evaluated where a student stops.

    Why this is the certificate of :func:`_forward_certificate` for the problem as stated: the returned head
    *is* :math:`\beta` and the basis *is* :math:`[h, 1]`, so the exact logits of the returned :math:`(W, b)` are
    :math:`Z\beta` and the computed :math:`\hat\eta = \mathrm{fl}(Z\beta)` differ from them by at most
    :math:`\gamma_p|z_i|^\top|\beta_c| \le \gamma_p\|z_i\|\|\beta_c\|` (:math:`p = m+1`); the gradient's rounding
    :math:`\gamma_c\frac1n|Z|^\top a` is bounded by :math:`\gamma_c\frac1n\|Z\|_F\|a\|_F`
    (Cauchy–Schwarz), and the rest is :func:`_tall_certificate` (:math:`\kappa` from the inverse's norm).
    After a step, the previous iteration's Hessian is tried first, widened by the logits' drift
    (``drift`` of :func:`_tall_certificate`): a student whose last step was short is certified without
    forming a new Hessian. Students this path cannot prove (wide, collinear or badly scaled designs, a Hessian
    whose factorisation fails, a certified gap not reached within ``min(max_iter, 40)`` iterations) are left
    to the SVD-basis solver (``certified`` False). Nothing here depends on the other students of the chunk."""
    c, n, k = teacher.shape
    kc = k - 1
    dt, dev = teacher.dtype, teacher.device
    Z = torch.cat([X, torch.ones((*X.shape[:-1], 1), dtype=dt, device=dev)], dim=-1)
    p = Z.shape[-1]
    shared = Z.shape[0] == 1
    # Upper bounds on ||z_i|| (a norm of p terms errs by less than gamma_{p+2} relative), max ||z_i||^2, ||Z||_F^2.
    # (rounded_up by their counts: a norm of p terms p/2 + 1; a square 1; a sum of n squares n; a square root 1.)
    row_norm = rounded_up(torch.linalg.vector_norm(Z, dim=-1), p // 2 + 2)  # (c|1, n)
    row2 = rounded_up(row_norm.amax(dim=-1) ** 2, 1)
    frob2 = rounded_up((row_norm**2).sum(dim=-1), n)
    frob = rounded_up(frob2.sqrt(), 1)
    qsum = _class_sum(teacher)
    eligible = torch.full((c,), p * kc <= n * kc and p <= n, dtype=torch.bool, device=dev)
    eligible &= torch.isfinite(frob2).expand(c)

    beta = torch.zeros((c, p, kc), dtype=dt, device=dev)
    certified = torch.zeros(c, dtype=torch.bool, device=dev)
    gap_out = torch.full((c,), float("inf"), dtype=dt, device=dev)
    grad_out = torch.full((c,), float("nan"), dtype=dt, device=dev)
    objective = torch.full((c,), float("nan"), dtype=dt, device=dev)
    logits = torch.zeros((c, n, k), dtype=dt, device=dev)
    iterations = torch.zeros(c, dtype=torch.long, device=dev)
    u = 2.0**-53
    gamma_p = unit_roundoff_gamma(p) * (1 + 2.0**-50)


    ws = eligible.nonzero()[:, 0]
    everyone = ws.numel() == c

    def rows(t):  # per-student design quantities of the working set (shared: one copy)
        return t if shared or everyone else t[ws]

    Z_w, frob_w, rn_w, norms_w = rows(Z), rows(frob), rows(row_norm), (rows(frob2), rows(row2))
    q_w, qs_w, th = teacher[ws], qsum[ws], beta[ws]
    eta = torch.zeros((ws.numel(), n, kc), dtype=dt, device=dev)  # free logits Z beta at beta = 0
    f = _direct_objective(eta, q_w, qs_w)
    H_prev = eta_prev = None
    limit = min(max_iter, _DIRECT_MAX_ITER)

    def certify(idx, s, g, logit_grad, H, factor, drift, it):
        """Certificate at the current point of working-set rows ``idx``; records the proven ones. Returns
        (proved, provable) over ``idx``."""
        pick = (lambda t: t) if shared else (lambda t: t[idx])
        a = qs_w[idx, :, None] * s[idx] + q_w[idx, :, :-1]
        spread = rounded_up((_class_max(eta[idx]).clamp_min(0) + _class_max(-eta[idx]).clamp_min(0))
                            .amax(dim=-1), 1)
        gamma_c = unit_roundoff_gamma(n + 2 * k + 12 + 2 * torch.ceil(spread))
        # Rounded up: a's entries against the exact sum of q (k + 1), their norm (n(k-1)/2 + 1), gamma (2), the
        # products and the quotient (3).
        dg_norm = rounded_up(gamma_c * pick(frob_w) * a.flatten(1).norm(dim=-1) / n, n * kc // 2 + k + 8)
        value, _, ok = _tall_certificate(None, None, q_w[idx], qs_w[idx], s[idx], logit_grad[idx],
                                         exact_kappa=False, H=H, norms=tuple(pick(v) for v in norms_w),
                                         dg_norm=dg_norm, drift=drift, g=g[idx], factor=factor,
                                         logit_range=spread)
        # The point: computed logits against the exact logits Z beta of the returned head.
        # gamma_p ||z_i|| ||beta_c||, rounded up: the norm of p entries (p + 1), gamma (2), the products (2).
        logit_error = rounded_up(gamma_p * pick(rn_w)[..., None] * th[idx].norm(dim=-2)[:, None, :], p + 5)
        diff_error = logit_error + u * eta[idx].abs()
        shift = _point_shift(qs_w[idx], _class_max(diff_error), k)
        full = _with_reference(eta[idx])
        value_at, per_sample, count = _objective_from_logits(loss_name, q_w[idx], full)
        # The three bounds' sum (two roundings), rounded up.
        total = rounded_up(value + shift + _forward_evaluation_error(q_w[idx], full, per_sample, count), 2)
        proved = ok & (total <= tol)
        done_rows, local = ws[idx[proved]], idx[proved]
        certified[done_rows] = True
        gap_out[done_rows] = total[proved]
        grad_out[done_rows] = g[local].norm(dim=-1) * math.sqrt(n)
        beta[done_rows] = th[local]
        logits[done_rows] = full[proved]
        objective[done_rows] = value_at[proved]
        iterations[done_rows] = it
        return proved, ok

    for it in range(limit + 1):
        if ws.numel() == 0:
            break
        _, s = _free_softmax(eta)
        logit_grad = qs_w[..., None] * s - q_w[..., :-1]
        g = None
        if H_prev is not None:
            g = _parameter_gradient(Z_w, logit_grad)
            # The previous Hessian, widened by the drift of the logits since it was formed.
            drift = _logit_drift(eta, eta_prev)
            dec2 = (g * torch.cholesky_solve(g[..., None], L_prev)[..., 0]).sum(dim=-1) * torch.exp(drift)
            cand = (info_prev == 0) & (dec2 / 2 <= tol)
            if bool(cand.any()):
                idx = cand.nonzero()[:, 0]
                proved, _ = certify(idx, s, g, logit_grad, H_prev[idx], (L_prev[idx], info_prev[idx]), drift[idx],
                                    it)
                stay = torch.ones(ws.numel(), dtype=torch.bool, device=dev)
                stay[idx[proved]] = False
                if not bool(stay.all()):
                    keep = stay.nonzero()[:, 0]
                    s, logit_grad, g = s[keep], logit_grad[keep], g[keep]
                    ws, th, eta, f, q_w, qs_w = ws[keep], th[keep], eta[keep], f[keep], q_w[keep], qs_w[keep]
                    if not shared:
                        Z_w, frob_w, rn_w = Z_w[keep], frob_w[keep], rn_w[keep]
                        norms_w = tuple(v[keep] for v in norms_w)
                    if ws.numel() == 0:
                        break
        if g is None and kc == 1:
            # Hessian and gradient from one product Z^T [w Z, r] (one pass over the design instead of two).
            wide = torch.empty((*s.shape[:-1], p + 1), dtype=dt, device=dev)
            torch.mul(_free_curvature(s, qs_w)[..., 0], Z_w, out=wide[..., :p])
            wide[..., p:] = logit_grad
            both = Z_w.mT @ wide / n
            H, g = both[..., :p].contiguous(), both[..., p].contiguous()
        else:
            if g is None:
                g = _parameter_gradient(Z_w, logit_grad)
            H = _design_hessian(Z_w, _free_curvature(s, qs_w), None)
        L, info = cholesky_ex(H)
        direction = -torch.cholesky_solve(g[..., None], L)[..., 0]
        dec2 = -(g * direction).sum(dim=-1)
        alive = (info == 0) & torch.isfinite(dec2)
        done = torch.zeros_like(alive)
        cand = alive & (dec2 / 2 <= tol)
        if bool(cand.any()):
            idx = cand.nonzero()[:, 0]
            proved, ok = certify(idx, s, g, logit_grad, H[idx], (L[idx], info[idx]), None, it)
            done[idx] = proved | ~ok  # not provable here (ill-conditioned): the SVD-basis solver takes it
        slack = 16 * torch.finfo(dt).eps * (f.abs() + 1)
        go = alive & ~done & ~(dec2 / 2 <= 1e-3 * slack)
        if it == limit or not bool(go.any()):
            break
        # Armijo backtracking on the same objective, trial logits fl(Z beta) (never updated incrementally).
        alpha = torch.ones_like(f)
        pending = go.clone()
        slope = (g * direction).sum(dim=-1)
        step = direction.reshape(th.shape)
        eta_before = eta
        for _bt in range(_MAX_BACKTRACK):
            if not bool(pending.any()):
                break
            trial = th + alpha[:, None, None] * step
            eta_t = _matmul(Z_w, trial)
            ft = _direct_objective(eta_t, q_w, qs_w)
            ok_ls = pending & torch.isfinite(ft) & (ft <= f + _ARMIJO * alpha * slope + slack)
            th = torch.where(ok_ls[:, None, None], trial, th)
            eta = torch.where(ok_ls[:, None, None], eta_t, eta)
            f = torch.where(ok_ls, ft, f)
            pending = pending & ~ok_ls
            alpha = torch.where(pending, alpha * 0.5, alpha)
        go = go & ~pending
        H_prev, L_prev, info_prev, eta_prev = H, L, info, eta_before
        if not bool(go.all()):
            keep = go.nonzero()[:, 0]
            ws, th, eta, f, q_w, qs_w = ws[keep], th[keep], eta[keep], f[keep], q_w[keep], qs_w[keep]
            H_prev, L_prev, info_prev, eta_prev = H_prev[keep], L_prev[keep], info_prev[keep], eta_prev[keep]
            if not shared:
                Z_w, frob_w, rn_w = Z_w[keep], frob_w[keep], rn_w[keep]
                norms_w = tuple(v[keep] for v in norms_w)

    W = torch.zeros((c, k, p - 1), dtype=dt, device=dev)
    b = torch.zeros((c, k), dtype=dt, device=dev)
    W[:, :kc] = beta[:, : p - 1].mT
    b[:, :kc] = beta[:, p - 1]
    top = _class_max(logits)
    e = torch.exp(logits - top[..., None])
    probs = e / _class_sum(e)[..., None]
    return _DirectFit(certified=certified, W=W, b=b, probs=probs, objective=objective, gap=gap_out,
                      grad_norm=grad_out, iterations=iterations, rank=torch.full((c,), p, device=dev))


def _forward_direct(features, teacher, loss_name: str, tol: float, max_iter: int) -> _DirectFit:
    """:func:`_direct_chunk` over chunks of about :data:`_DIRECT_CHUNK_BYTES` of design each on the CPU (cache-sized
    temporaries), the whole batch at once on a GPU (chunks there would run one after the other, each too small to
    fill it); one shared design when the features are an expanded view."""
    B, n, m = features.shape
    shared = B == 1 or features.stride(0) == 0
    chunk = max(1, _DIRECT_CHUNK_BYTES // (n * (m + 1) * 8)) if features.device.type == "cpu" else B
    parts = []
    for start in range(0, B, chunk):
        stop = min(B, start + chunk)
        X = features[:1] if shared else features[start:stop]
        parts.append(_direct_chunk(X, teacher[start:stop], loss_name, tol, max_iter))
    if len(parts) == 1:
        return parts[0]
    return _DirectFit(**{name: torch.cat([getattr(part, name) for part in parts])
                         for name in _DirectFit.__dataclass_fields__})


_SINGULAR_REASON = (
    "features numerically collinear after scaling their columns (with the bias column; e.g. duplicated in other "
    "units, near-duplicates, or rows in the simplex): the exact problem has directions a rank cut would drop, "
    "which can lower the objective, so no gap is certified (gap = inf)"
)


def _certified_forward(basis, teacher, W, b, features, loss_name):
    """Objective (from logits) and its certificate, with the rounding of both evaluations:
    ``(objective, gap, grad_norm, singular)``."""
    logits, logit_error = _logits_with_error(W, b, features)
    gap, _, grad_norm, singular = _forward_certificate(basis, teacher, logits, logit_error)
    objective, per_sample, count = _objective_from_logits(loss_name, teacher, logits)
    differences = logits - logits[..., -1:]
    gap = gap + _forward_evaluation_error(teacher, differences, per_sample, count)
    return objective, gap, grad_norm, singular


_FORWARD_METHOD = ("newton with backtracking in the scaled design's coordinates (the whitened SVD basis for "
                   "students that path cannot certify), self-concordance certificate")


def _fit_forward_basis(features, teacher, loss_name: str, tol: float, max_iter: int):
    """Forward loss through the whitened SVD basis (any design, collinear included):
    ``(W, b, probs, objective, gap, grad_norm, iterations, rank, singular)``."""
    k = teacher.shape[-1]
    B, _, m = features.shape
    basis = _logit_basis(features, k)
    theta0 = torch.zeros((B, basis.U.shape[-1], k - 1), dtype=torch.float64, device=features.device)
    forward = _newton(basis, _ForwardCrossEntropy(teacher), theta0, tol=tol, max_iter=max_iter)
    W, b = _head_parameters(basis, forward.theta, m)
    probs = SoftmaxHead.predict(W, b, features)
    objective, gap, grad_norm, singular = _certified_forward(basis, teacher, W, b, features, loss_name)
    return W, b, probs, objective, gap, grad_norm, forward.iterations, basis.rank.expand(B), singular


def _fit_forward(features, teacher, loss_name: str, tol: float, max_iter: int) -> FitResult:
    """Forward losses: the direct path (:func:`_forward_direct`) for every student, then the whitened SVD basis
    (:func:`_fit_forward_basis`) for those it did not certify; each student's numbers depend on it alone."""
    B, n, m = features.shape
    direct = _forward_direct(features, teacher, loss_name, tol, max_iter)
    W, b, probs, objective = direct.W, direct.b, direct.probs, direct.objective
    gap, grad_norm, iterations, rank = direct.gap, direct.grad_norm, direct.iterations, direct.rank.clone()
    singular = torch.zeros(B, dtype=torch.bool, device=features.device)
    rest = (~direct.certified).nonzero()[:, 0]
    if rest.numel():
        shared = B == 1 or features.stride(0) == 0
        X = features[:1].expand(rest.numel(), n, m) if shared else features[rest]
        values = _fit_forward_basis(X, teacher[rest], loss_name, tol, max_iter)
        for target, value in zip((W, b, probs, objective, gap, grad_norm, iterations, rank, singular), values):
            target[rest] = value
    info = {"rank": rank, "tol": tol, "singular": singular, "direct": direct.certified}
    if bool(singular.any()):
        info["uncertified_reason"] = _SINGULAR_REASON
    return FitResult(
        head="softmax", loss=loss_name, params={"W": W, "b": b}, probs=probs, objective=objective, gap=gap,
        certificate="self_concordance", grad_norm=grad_norm, iterations=iterations, converged=gap <= tol,
        method=_FORWARD_METHOD, info=info,
    )


def fit_softmax_batched(
    features: torch.Tensor, teacher: torch.Tensor, loss: Loss, *, tol: float = 1e-10, max_iter: int = 200
) -> FitResult:
    r"""Fit ``B`` softmax-head students at once: :math:`\min_{W,b}\frac1n\sum_i\ell(q_i,\mathrm{softmax}(Wh_i+b))`.

    Forward losses: Newton's method with backtracking in the reduced coordinates of this module, stopped
    once the self-concordance certificate (:func:`softmax_forward_certificate`, Bach 2010) is at most ``tol``;
    ``gap`` is that certificate recomputed at the returned ``(W, b)``. When the infimum is not attained
    (e.g. a one-hot teacher on separable data) the gap stays ``inf`` and ``converged`` is False (the
    iteration stops once no measurable progress is left, or after ``max_iter``): that is the correct answer,
    not an error.

    Reverse losses: non-convex in the logits. Modified Newton with Armijo backtracking, the Hessian's
    eigenvalues replaced by their absolute values (floored at :math:`10^{-8}` of the largest curvature) so
    that the step matrix is positive definite (:func:`_saddle_free_newton_direction`; a Levenberg–Marquardt
    shift was tried first and stalled near saddles), started from the forward-KL solution.
    ``certificate = "none"``, ``gap = NaN``; ``converged`` means ``grad_norm <= sqrt(tol)``, and the
    iteration continues until also :math:`\lambda^2/2 \le` ``tol`` for the modified Newton decrement. The
    result is a stationary point, a local minimum when the Hessian is positive definite there
    (``info["hessian_pd"]``). Reverse losses need a teacher with every probability
    > 0: a softmax student has every probability > 0, so :math:`\mathrm{KL}(F\|F_w)` and
    :math:`\mathrm{CE}(F, F_w)` are :math:`+\infty` for every head wherever the teacher has a 0. Such input
    is a ``ValueError`` (no floor is applied silently: floor the teacher yourself if that is what you mean).
    Reverse CE often has no minimiser (it is linear in the student's probabilities, so its infimum pushes
    mass towards vertices); the solver then follows the logits outwards and stops once the gradient is below
    ``sqrt(tol)`` and the objective no longer moves measurably, or after ``max_iter``.

    ``grad_norm`` is the Euclidean norm of the gradient in the whitened coordinates (a unit step there changes
    the logits by one in root-mean-square over the sample).

    Args:
        features: ``(B, n, m)`` float64 (an expanded view of one ``(n, m)`` matrix is decomposed once).
        teacher: ``(B, n, k)`` rows in the simplex (exact 0 and 1 allowed for forward losses).
        loss: a :class:`~w2s_theory.divergences.Loss`.
        tol: target certified gap (forward) / squared-gradient tolerance (reverse).
        max_iter: Newton iterations per phase.

    Returns:
        :class:`~w2s_theory.solvers.result.FitResult` with ``params = {"W": (B,k,m), "b": (B,k)}`` (gauge:
        last class 0) and ``info`` holding ``rank`` (of ``[h, 1]``) and, for reverse losses,
        ``start_objective`` (the reverse loss at the forward-KL start), ``forward_iterations`` and ``grad_tol``.
    """
    features = features.to(torch.float64)
    teacher = teacher.to(device=features.device, dtype=torch.float64)
    B, n, m = features.shape
    k = teacher.shape[-1]
    reverse_loss = not loss.teacher_first
    if loss.name not in ("forward_kl", "forward_ce", "reverse_kl", "reverse_ce"):
        raise ValueError(f"loss {loss.name!r} is not available for the softmax head; use a KL or CE loss")
    if reverse_loss and bool((teacher <= 0).any()):
        bad = int((teacher <= 0).any(dim=-1).sum())
        raise ValueError(
            f"teacher: {bad} rows have a probability of 0, so {loss.name} is +inf for every softmax student "
            "(its probabilities are all > 0); floor the teacher (clip to gamma > 0 and renormalise) or use a "
            "forward loss"
        )
    dev = features.device
    if k == 1:  # one class: the head is the constant 1, nothing to fit
        W = torch.zeros((B, 1, m), dtype=torch.float64, device=dev)
        b = torch.zeros((B, 1), dtype=torch.float64, device=dev)
        probs = torch.ones_like(teacher)
        zeros = torch.zeros(B, dtype=torch.float64, device=dev)
        return FitResult(
            head="softmax", loss=loss.name, params={"W": W, "b": b}, probs=probs,
            objective=loss.per_sample(teacher, probs).mean(dim=-1),
            gap=zeros if not reverse_loss else torch.full_like(zeros, float("nan")),
            certificate="self_concordance" if not reverse_loss else "none", grad_norm=zeros,
            iterations=torch.zeros(B, dtype=torch.long, device=dev),
            converged=torch.ones(B, dtype=torch.bool, device=dev),
            method="trivial (k = 1)",
        )

    if not reverse_loss:
        return _fit_forward(features, teacher, loss.name, tol, max_iter)

    basis = _logit_basis(features, k)
    D = basis.U.shape[-1]
    theta0 = torch.zeros((B, D, k - 1), dtype=torch.float64, device=dev)
    forward = _newton(basis, _ForwardCrossEntropy(teacher), theta0, tol=tol, max_iter=max_iter)
    info = {"rank": basis.rank.expand(B).clone(), "tol": tol}

    model = _ReverseDivergence(torch.log(teacher), with_entropy=loss.name == "reverse_kl")
    start_objective = _objective_from_logits(loss.name, teacher, _logits(basis.U, forward.theta))[0]
    rev = _newton(basis, model, forward.theta, tol=tol, max_iter=max_iter)
    W, b = _head_parameters(basis, rev.theta, m)
    probs = SoftmaxHead.predict(W, b, features)
    # Gradient and Hessian at the returned (W, b), through the same coordinates.
    eta = SoftmaxHead.logits(W, b, features)
    eta = eta - eta[..., -1:]
    _, logit_grad, logit_hess = model.derivatives(eta)
    g = _parameter_gradient(basis.U, logit_grad)
    H = _parameter_hessian(basis.U, logit_hess, basis.fill)
    grad_norm = g.norm(dim=-1)
    grad_tol = math.sqrt(tol)
    info.update(
        start_objective=start_objective, forward_iterations=forward.iterations, grad_tol=grad_tol,
        hessian_pd=cholesky_ex(H)[1] == 0,
    )
    return FitResult(
        head="softmax", loss=loss.name, params={"W": W, "b": b}, probs=probs,
        objective=_objective_from_logits(loss.name, teacher, SoftmaxHead.logits(W, b, features))[0],
        gap=torch.full_like(grad_norm, float("nan")), certificate="none", grad_norm=grad_norm,
        iterations=rev.iterations, converged=grad_norm <= grad_tol,
        method="saddle-free newton from the forward-KL solution (whitened logit basis, backtracking)", info=info,
    )


# --------------------------------------------------------------------------------------------------------
# Exact reference (cvxpy)
# --------------------------------------------------------------------------------------------------------


def fit_softmax_reference(features: np.ndarray, teacher: np.ndarray, loss: str) -> FitResult:
    r"""Reference fit of one softmax student with cvxpy (Clarabel), forward losses only:

    .. math:: \min_{W, b}\ \frac1n\sum_i \mathrm{lse}(W h_i + b) - q_i^\top(W h_i + b)\quad(+\text{const}),

    with the gauge :math:`W_{k-1} = 0, b_{k-1} = 0`. Any status other than ``"optimal"`` is a
    ``RuntimeError``. The returned ``gap`` is :func:`softmax_forward_certificate` evaluated at the returned
    point, never the solver's own claim.

    Args:
        features: ``(n, m)`` or ``(1, n, m)``; teacher: ``(n, k)`` or ``(1, n, k)``; loss: ``forward_kl`` or
            ``forward_ce``.
    """
    import cvxpy as cp

    loss_obj = get_loss(loss)
    if loss not in ("forward_kl", "forward_ce"):
        raise ValueError(f"the cvxpy softmax reference handles forward losses only (convex); got {loss!r}")
    X = single_student("features", features)
    Q = single_student("teacher", teacher)
    n, m = X.shape
    k = Q.shape[1]
    W_free = cp.Variable((k - 1, m))
    b_free = cp.Variable(k - 1)
    free_logits = X @ W_free.T + np.ones((n, 1)) @ cp.reshape(b_free, (1, k - 1), order="C")
    logits = cp.hstack([free_logits, np.zeros((n, 1))])
    objective = (cp.sum(cp.log_sum_exp(logits, axis=1)) - cp.sum(cp.multiply(Q, logits))) / n
    problem = cp.Problem(cp.Minimize(objective))
    problem.solve(solver=cp.CLARABEL)
    if problem.status != "optimal":
        raise RuntimeError(f"cvxpy softmax reference ({loss}) ended with status {problem.status!r}")
    W = np.zeros((k, m))
    b = np.zeros(k)
    W[: k - 1] = W_free.value
    b[: k - 1] = b_free.value
    Wt = torch.as_tensor(W, dtype=torch.float64)[None]
    bt = torch.as_tensor(b, dtype=torch.float64)[None]
    Xt = torch.as_tensor(X, dtype=torch.float64)[None]
    Qt = torch.as_tensor(Q, dtype=torch.float64)[None]
    probs = SoftmaxHead.predict(Wt, bt, Xt)
    basis = _logit_basis(Xt, k)
    objective, gap, grad_norm, _ = _certified_forward(basis, Qt, Wt, bt, Xt, loss)
    return FitResult(
        head="softmax", loss=loss, params={"W": Wt, "b": bt}, probs=probs,
        objective=objective, gap=gap, certificate="self_concordance",
        grad_norm=grad_norm, iterations=torch.tensor([problem.solver_stats.num_iters or 0]),
        converged=torch.isfinite(gap), method="cvxpy (clarabel)",
    )
