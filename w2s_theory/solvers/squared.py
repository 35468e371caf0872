r"""Batched, certified least squares for the regression head :math:`f(x) = w\cdot h(x) + b` (Charikar et al. 2024).

Problem, for each of ``B`` students and each output column :math:`o` independently (design
:math:`Z = [h, \mathbf 1]` or :math:`Z = h`, targets :math:`y\in\mathbb R^{n\times k_{\text{out}}}`):

.. math::

    \min_{\theta\in\mathbb R^{d\times k_{\text{out}}}}\ \Phi(\theta) = \frac1n\sum_{i=1}^n\sum_o
    (z_i^\top\theta_{:,o} - y_{io})^2
    \qquad\text{(optionally s.t. } \|\theta_{:,o}\|_2\le r\ \ \forall o).

:math:`\Phi` is quadratic with gradient :math:`g = \tfrac2n Z^\top(Z\theta - y)` and Hessian
:math:`H = \tfrac2n Z^\top Z` (the same for every output).

* Unconstrained: the normal equations :math:`Z^\top Z\theta = Z^\top y` by Cholesky plus one step of iterative
  refinement; students whose Gram matrix is ill conditioned (extreme diagonal entries of the Cholesky factor
  more than :math:`10^4` apart, a failed factorisation, or fewer samples than columns), or whose
  certificate is not below ``tol``, get
  the minimum-norm least-squares solution from the SVD of :math:`Z` instead (NumPy's rank rule: singular
  values below :math:`\max(n,d)\,\varepsilon\,s_{\max}` count as 0). Certificate
  ``normal_equations``: :math:`\Phi(\theta) - \min\Phi = \tfrac12 g^\top H^{+}g` exactly (a quadratic whose
  gradient lies in the range of its Hessian, which :math:`g = \tfrac2n Z^\top r` always does).
* Ball :math:`\|\theta_{:,o}\|\le r`: the trust-region subproblem, solved exactly (Moré and Sorensen 1983,
  *Computing a trust region step*): if the minimum-norm unconstrained solution lies in the ball it is optimal;
  otherwise :math:`\theta(\mu) = (Z^\top Z + \mu I)^{-1}Z^\top y` with :math:`\mu > 0` the root of the secular
  equation :math:`1/\|\theta(\mu)\| = 1/r`, found by safeguarded Newton on the eigendecomposition of
  :math:`Z^\top Z` (batched over students and outputs). The "hard case" cannot occur: :math:`Z^\top y` is
  orthogonal to the null space of :math:`Z^\top Z`. Certificate ``frank_wolfe``:
  :math:`\sum_o g_o^\top\theta_o + r\|g_o\|\ \ge\ \Phi(\theta) - \min_{\text{ball}}\Phi` (the linear
  minimisation oracle over the ball is :math:`-r g_o/\|g_o\|`; Jaggi 2013).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..divergences import squared
from ..heads import SquaredHead
from .result import FitResult, single_student

__all__ = ["fit_squared_batched", "fit_squared_reference"]

_SECULAR_ITERATIONS = 100
#: Cholesky is trusted only when min/max of diag(L) is at least this (a cheap lower bound on 1/cond(Z)).
_CONDITION_RATIO = 1e-4


def _design(features: torch.Tensor, bias: bool) -> tuple[torch.Tensor, bool]:
    """Design matrix ``(B or 1, n, d)``; built once when all students share one feature matrix (batch stride 0)."""
    shared = features.shape[0] == 1 or features.stride(0) == 0
    X = features[:1] if shared else features
    return SquaredHead(bias=bias).design(X), shared


def _residual_gradient(Z, targets, theta):
    """Residual ``Z theta - y`` and gradient ``(2/n) Z^T r`` (computed from the residual, not from
    ``Z^T Z theta - Z^T y``, which cancels)."""
    n = targets.shape[-2]
    r = Z @ theta - targets
    return r, 2.0 / n * (Z.mT @ r)


def _normal_equations_gap_cholesky(L, g, n):
    r""":math:`\tfrac12 g^\top H^{-1}g` with :math:`H = \tfrac2n LL^\top`, summed over outputs."""
    w = torch.linalg.solve_triangular(L, g, upper=False)
    return 0.25 * n * (w**2).sum(dim=(-2, -1))


def _normal_equations_gap_svd(U_kept, r, n):
    r""":math:`\tfrac12 g^\top H^{+}g = \tfrac1n\|U_r^\top r\|^2` for :math:`Z = USV^\top` (kept singular values):
    with :math:`g = \tfrac2n VSU^\top r` and :math:`H^+ = \tfrac n2 VS^{-2}V^\top` the :math:`S` factors cancel,
    so no small singular value is ever divided by."""
    return ((U_kept.mT @ r) ** 2).sum(dim=(-2, -1)) / n


def _min_norm_least_squares(Z, targets):
    """Minimum-norm solution ``V S^+ U^T y`` and the basis ``U`` of kept directions (NumPy's rank rule)."""
    n, d = Z.shape[-2], Z.shape[-1]
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    keep = S > max(n, d) * torch.finfo(Z.dtype).eps * S[..., :1]
    inv_s = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    theta = Vh.mT @ (inv_s[..., :, None] * (U.mT @ targets))
    return theta, U * keep[..., None, :].to(U.dtype)


def _solve_unconstrained(Z, shared, targets, tol):
    """Normal equations by Cholesky (+ one refinement step), SVD fallback where that does not certify ``tol``.

    Returns ``theta (B, d, k_out)``, ``gap (B,)`` and the number of solves used per student."""
    B, n, _ = targets.shape
    G = Z.mT @ Z
    L, info = torch.linalg.cholesky_ex(G)
    if shared:
        L, info = L.expand(B, *L.shape[1:]), info.expand(B)
    c = Z.mT @ targets
    theta = torch.cholesky_solve(c, L)
    r, g = _residual_gradient(Z, targets, theta)
    # One step of iterative refinement: Newton's step on the quadratic, from the residual.
    theta = theta - torch.cholesky_solve(Z.mT @ r, L)
    r, g = _residual_gradient(Z, targets, theta)
    # Cholesky of a numerically singular Gram matrix can "succeed" with a pivot of rounding size (about
    # sqrt(eps) relative, sometimes 1e-6) and return a solution with an arbitrary null-space component. The
    # ratio of extreme diagonal entries of L is a lower bound on 1/cond(Z): below 1e-4, or with fewer samples
    # than columns, the student goes to the SVD (minimum-norm) solution instead.
    diag = L.diagonal(dim1=-2, dim2=-1).abs()
    ok = (info == 0) & (diag.amin(dim=-1) >= _CONDITION_RATIO * diag.amax(dim=-1)) & (n >= Z.shape[-1])
    gap = torch.where(ok, _normal_equations_gap_cholesky(L, g, n), torch.full_like(theta[:, 0, 0], float("inf")))
    solves = torch.full((B,), 2, dtype=torch.long, device=targets.device)
    redo = ~(gap <= tol)  # also catches NaN from a failed factorisation
    if redo.any():
        idx = redo.nonzero()[:, 0]
        Zr = Z if shared else Z[idx]
        theta_r, U_kept = _min_norm_least_squares(Zr, targets[idx])
        r_r, _ = _residual_gradient(Zr, targets[idx], theta_r)
        theta[idx] = theta_r
        gap[idx] = _normal_equations_gap_svd(U_kept, r_r, n)
        solves[idx] += 1
    return theta, gap, solves


def _trust_region_multiplier(eigenvalues, projected, radius, iterations, active):
    r"""Root :math:`\mu > 0` of :math:`\psi(\mu) = 1/\|\theta(\mu)\| - 1/r` with
    :math:`\|\theta(\mu)\|^2 = \sum_j \tilde c_j^2/(\lambda_j + \mu)^2`, batched over the leading axes.

    :math:`\psi` is concave and increasing (Moré and Sorensen 1983), so Newton steps are kept inside a
    bisection bracket :math:`[\mu_{lo}, \mu_{hi}]` with :math:`\mu_{hi} = \|\tilde c\|/r` (where
    :math:`\|\theta\|\le r`); iteration stops when the bracket or the residual reaches rounding level for
    every ``active`` entry (the others, whose solution is interior, are ignored)."""
    lam = eigenvalues.clamp_min(0)[..., :, None]  # (B, d, 1) against projected (B, d, k_out)
    c2 = projected**2
    lo = torch.zeros_like(projected[..., 0, :])
    hi = projected.norm(dim=-2) / radius
    mu = hi.clone()
    for it in range(iterations):
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
        if bool(settled.all()):
            return mu, it + 1
    return mu, iterations


def _solve_ball(Z, shared, targets, radius, tol):
    """Exact trust-region solution per student and output; returns ``theta``, iterations, boundary mask."""
    B, n, k_out = targets.shape
    theta, _, solves = _solve_unconstrained(Z, shared, targets, tol)
    inside = theta.norm(dim=-2) <= radius  # (B, k_out)
    if bool(inside.all()):
        return theta, solves
    G = Z.mT @ Z
    lam, V = torch.linalg.eigh(G)
    if shared:
        lam, V = lam.expand(B, -1), V.expand(B, *V.shape[1:])
    projected = V.mT @ (Z.mT @ targets)  # (B, d, k_out)
    mu, used = _trust_region_multiplier(lam, projected, radius, _SECULAR_ITERATIONS, ~inside)
    theta_boundary = V @ (projected / (lam.clamp_min(0)[..., :, None] + mu[..., None, :]))
    # Rounding can leave ||theta|| a hair above r: scale back onto the sphere so the point is feasible.
    norm = theta_boundary.norm(dim=-2, keepdim=True)
    theta_boundary = theta_boundary * torch.clamp(radius / norm, max=1.0)
    theta = torch.where(inside[:, None, :], theta, theta_boundary)
    return theta, solves + used * (~inside).any(dim=-1)


def _frank_wolfe_gap_ball(g, theta, radius):
    r""":math:`\sum_o g_o^\top\theta_o + r\|g_o\|` (each term :math:`\ge 0` for a feasible :math:`\theta`)."""
    per_output = (g * theta).sum(dim=-2) + radius * g.norm(dim=-2)
    return per_output.clamp_min(0).sum(dim=-1)


def _unit_roundoff_gamma(count: int) -> float:
    u = torch.finfo(torch.float64).eps / 2
    return count * u / (1 - count * u)


def _rounding_inflation(Z, theta, targets, gap, radius):
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
    absZ = Z.abs()
    rho = _unit_roundoff_gamma(d + 1) * (absZ @ theta.abs() + targets.abs())
    gap = gap.clamp_min(0)
    if radius is None:
        return (gap.sqrt() + (rho**2).sum(dim=-1).mean(dim=-1).sqrt()) ** 2
    r, g = _residual_gradient(Z, targets, theta)
    eta = 2.0 / n * (absZ.mT @ (rho + _unit_roundoff_gamma(n) * r.abs()))
    own = _unit_roundoff_gamma(d + 2) * ((g.abs() * theta.abs()).sum(dim=-2) + radius * g.norm(dim=-2)).sum(-1)
    return gap + 2 * radius * eta.norm(dim=-2).sum(dim=-1) + own


def fit_squared_batched(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: bool = True,
    radius: float | None = None,
    tol: float = 1e-12,
) -> FitResult:
    r"""Fit ``B`` regression heads at once by least squares (Charikar et al. 2024, Sec. 3):

    .. math:: \min_\theta \frac1n\sum_i\|\theta^\top z_i - y_i\|_2^2\quad
        \big(\text{s.t. }\|\theta_{:,o}\|_2\le r\big),\qquad z_i = [h(x_i), 1]\ \text{or}\ h(x_i).

    Args:
        features: ``(B, n, m)`` float64 (an expanded view of one matrix is factorised once).
        targets: ``(B, n, k_out)`` real targets; each output column is an independent regression.
        bias: append a constant feature (its coefficient is the last row of ``theta``).
        radius: optional Euclidean ball on each output's coefficient vector (bias included).
        tol: target certified gap; ``converged`` is ``gap <= tol``.

    Returns:
        :class:`~w2s_theory.solvers.result.FitResult` with ``params = {"theta": (B, d, k_out)}``, ``probs`` the
        predictions ``(B, n, k_out)``, ``objective`` the mean over samples of the squared error summed over
        outputs, ``gap`` the ``normal_equations`` certificate (unconstrained) or the ``frank_wolfe`` gap
        (ball), including a bound on the rounding of its own evaluation (:func:`_rounding_inflation`), and
        ``grad_norm`` the Frobenius norm of the gradient.
    """
    features = features.to(torch.float64)
    targets = targets.to(device=features.device, dtype=torch.float64)
    if targets.ndim == 2:
        targets = targets[..., None]
    B, n, _ = targets.shape
    if radius is not None and not (radius > 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be a positive finite number (or None for no constraint), got {radius!r}")
    Z, shared = _design(features, bias)
    if radius is None:
        theta, gap, iterations = _solve_unconstrained(Z, shared, targets, tol)
        certificate, method = "normal_equations", "normal equations (cholesky + refinement; svd fallback)"
    else:
        theta, iterations = _solve_ball(Z, shared, targets, radius, tol)
        certificate, method = "frank_wolfe", "trust-region subproblem (eigendecomposition + secular equation)"
    preds = Z @ theta
    r, g = _residual_gradient(Z, targets, theta)
    if radius is not None:
        gap = _frank_wolfe_gap_ball(g, theta, radius)
    gap = _rounding_inflation(Z, theta, targets, gap, radius)
    return FitResult(
        head="squared", loss="squared", params={"theta": theta}, probs=preds,
        objective=squared(targets, preds).mean(dim=-1), gap=gap, certificate=certificate,
        grad_norm=g.norm(dim=(-2, -1)), iterations=iterations, converged=gap <= tol, method=method,
        info={"bias": bias, "radius": radius, "tol": tol},
    )


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
        th = th * np.minimum(1.0, radius / np.maximum(np.linalg.norm(th, axis=0), 1e-300))
    Zt = torch.as_tensor(Z, dtype=torch.float64)[None]
    Yt = torch.as_tensor(Y, dtype=torch.float64)[None]
    tht = torch.as_tensor(th, dtype=torch.float64)[None]
    preds = Zt @ tht
    r, g = _residual_gradient(Zt, Yt, tht)
    if radius is None:
        _, U_kept = _min_norm_least_squares(Zt, Yt)
        gap, certificate = _normal_equations_gap_svd(U_kept, r, n), "normal_equations"
    else:
        gap, certificate = _frank_wolfe_gap_ball(g, tht, radius), "frank_wolfe"
    return FitResult(
        head="squared", loss="squared", params={"theta": tht}, probs=preds,
        objective=squared(Yt, preds).mean(dim=-1), gap=gap, certificate=certificate,
        grad_norm=g.norm(dim=(-2, -1)), iterations=torch.tensor([problem.solver_stats.num_iters or 0]),
        converged=torch.isfinite(gap), method="cvxpy (clarabel)", info={"bias": bias, "radius": radius},
    )
