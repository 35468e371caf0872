r"""Batched, certified fit of the linear head :math:`F(x) = W h(x) + b` on CPU or GPU.

Problem, for each of ``B`` students independently (features :math:`h_i\in\mathbb R^m`, teacher
:math:`q_i\in\Delta^k`, a loss :math:`\ell` convex and either separable over classes or quadratic, floor
:math:`0\le\gamma<1/k`):

.. math::

    \min_{P}\ \Phi(P) = \frac1n\sum_{i=1}^n \ell(q_i, P_i)
    \quad\text{s.t.}\quad P = Z\Theta,\ \ Z = [H, \mathbf 1],\ \ P\ge\gamma,\ \ P\mathbf 1 = \mathbf 1,

a convex program over a polytope in prediction space (:class:`~w2s_theory.heads.LinearHead`).

Method: a log-barrier interior-point method (Boyd & Vandenberghe 2004, §11.3). With an orthonormal basis
:math:`U` of the column space of :math:`Z` (columns first rescaled by powers of two, which is exact; :math:`U`
from the eigenvectors of the Gram matrix where the rescaled design's condition number is below 1000, so that
:math:`U` is orthonormal to about :math:`10^{-10}`, from its SVD elsewhere: :func:`_basis`) and an
orthonormal basis :math:`V` of :math:`\mathbf 1^\perp\subset\mathbb R^k`, every prediction with unit row sums
is :math:`P = \mathbf 1\mathbf 1^\top/k + U D V^\top`, and the centring problems

.. math:: \min_D\ t\,\Phi(P) - \textstyle\sum_{e}\log(P_e - \gamma)

are solved by Newton steps (the Hessian is :math:`\sum_y V_{ya}V_{yb}\,U^\top\mathrm{diag}(w_y)U` with
:math:`w = t\ell''/n + (P-\gamma)^{-2}`; for a quadratic loss that is not separable, ``bregman:mahalanobis``
with per-sample Hessian :math:`2M`, :math:`w = (P-\gamma)^{-2}` plus the constant block
:math:`(t/n)\,I\otimes V^\top 2M V`, since :math:`U^\top U = I` (to rounding: only the Newton direction
depends on it); Armijo backtracking, full steps once the
decrement is small, never more than 99% of the way to the floor), with :math:`t` raised :math:`10^6`-fold once a
student is centred, from the lowest rung of that ladder with :math:`t \ge 100nk` up to
:math:`t = 4nk/\mathrm{tol}`. About 5 Newton steps per student at :math:`n = 2000, m = 16, k = 2`. Students stop once a one-pass estimate of the certificate below
(:meth:`_Barrier.gap_estimate`) is at most ``tol / 2``; the reported gap is the certificate itself.

Certificate (weak LP duality for the Frank–Wolfe gap, Jaggi 2013): for convex :math:`\Phi` and any point
:math:`\hat P`, :math:`\Phi(\hat P) - \Phi^\star \le \langle G, \hat P\rangle - \min_{S}\langle G, S\rangle`
with :math:`G = \nabla\Phi(\hat P)` and :math:`S` over the feasible set. For multipliers :math:`Y\ge0`,
:math:`\nu\in\mathbb R^n` and the residual :math:`R = G - Y - \nu\mathbf 1^\top`, every feasible :math:`S`
has :math:`\langle G, S\rangle \ge \gamma\sum Y + \sum\nu - \sqrt n\,\|\Pi R\|_F` (:math:`\Pi` the orthogonal
projector onto the class's column space; :math:`\|S\|_F\le\sqrt n` since its rows lie in the simplex), so

.. math:: \mathrm{gap} = \langle R, \hat P\rangle + \langle Y, \hat P - \gamma\rangle
    + \langle \nu, \hat P\mathbf 1 - \mathbf 1\rangle + \sqrt n\,\|\Pi R\|_F

bounds :math:`\Phi(\hat P) - \Phi^\star` (for any such multipliers: their choice decides only how tight it
is). The multipliers are the barrier's, corrected by the Newton step :math:`\Delta P` at :math:`\hat P` (the
primal–dual estimate :math:`Y = (1 - \Delta P/s)_+/(ts)`, :math:`s = \hat P - \gamma`, whose residual is second
order even along nearly active directions) or, where :math:`\hat P` is the full Newton step from the previous
iterate :math:`P` and its estimate already met ``tol / 2``, the same estimate formed at :math:`P` with its step
(the linearisation of :math:`1/(t\hat s)`; no Newton step at :math:`\hat P` is then computed), and :math:`\nu = U a` with :math:`a` the class mean of :math:`U^\top(G - Y)` (the projection that
removes all of :math:`R`'s column-space part except the centring residual). :math:`\|\Pi R\|_F` is bounded
without trusting :math:`U`: with a matrix :math:`M` whose columns span the class exactly and a proven lower bound
:math:`\sigma` on its smallest singular value, :math:`\|\Pi R\|_F\le\|M^\top R\|_F/\sigma`; the bound on
:math:`\sigma` comes from the eigenvalues of :math:`M^\top M` minus a bound on their rounding (Weyl), and
:math:`M^\top R` carries its own rounding bound. Every term is increased by a bound on the rounding of its
evaluation (Higham, *Accuracy and Stability*, §3.1), so the certificate bounds the exact gap of ``probs``;
it is further widened by the first- and second-order effect of the rounding of ``probs = X W^T + b`` itself, so
that it also bounds the exact predictions of the returned ``(W, b)``. Where that rounding exceeds ``1e-13``
(near-collinear features need huge coefficients) the student is not certified (gap ``inf``, reason in
``info["reasons"]``).

Which column space: :math:`M` is the column-rescaled :math:`Z` with exactly duplicated and constant columns
removed (both leave the span unchanged), and the certificate is for the problem as stated. Where that
:math:`M` is numerically rank-deficient (rank rule below, or smallest singular value not provably positive — e.g. features
on the simplex, whose row sums equal the bias column up to rounding, or near-collinear features), the span of
:math:`Z` contains directions that exist only through the rounding of the features. Then :math:`M = U_r`, the
singular vectors with :math:`\sigma > \tau\sigma_{\max}` (:math:`\tau = \max(n, m+1)\,\varepsilon`, numpy's
rank rule, the same class as the cvxpy reference), and the certificate is proven for that numerical column
space. That is not a proof for the problem as stated (its span also holds the rounding directions), so those
students are reported **uncertified** (gap NaN, reason in ``info["reasons"]``; ``info["numerical_span"]``
marks them); the bound proven for the numerical span is not returned as a certificate. For features on the
simplex, :func:`w2s_theory.heads.LinearHead.affine_coordinates` (drop the last coordinate: the same class in
exact arithmetic) states a well-posed problem instead.

Reverse losses with teacher zeros pin predictions to 0 (a face of the polytope, found by linear programs);
those students are sent to the exact reference (:func:`.reference.fit_reference`) and reported uncertified
(its predictions are feasible only to the interior-point tolerance, not reproduced by the head to rounding), and with
:math:`\gamma > 0` they are infeasible (objective and gap :math:`+\infty`).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..divergences import Loss, get_loss
from ..heads import LinearHead
from .conditioning import cholesky_ex, derivative_term_magnitude, unit_roundoff_gamma
from .result import FitResult

__all__ = ["fit_linear_batched", "fit_tv_linear", "bench_linear"]

_ARMIJO = 1e-4
_MAX_BACKTRACK = 50
#: The barrier parameter starts at the lowest rung of its ladder at or above this times the number of floor
#: constraints (below t_final).
_T_START = 100.0
#: The barrier parameter grows by this factor each time a student is centred (a long step: two or three
#: centring stages in all; measured at n = 1000-2000, m = 16, k = 2-3 over dense, sparse and teacher-zero
#: workloads and five losses, 10-45% fewer Newton passes than a factor of 1000, every student certified).
_T_GROWTH = 1e6
#: The working set is compacted (indexing copies the basis of the students left) once at most this fraction of it
#: is still iterating: a finished student carried along costs a Newton pass, compaction about one pass over U.
_COMPACT = 0.5
#: A student counts as centred once half its squared Newton decrement is below this.
_CENTRED = 0.05
#: Fraction of the step to the floor that a Newton step may take.
_TO_BOUNDARY = 0.99
#: Below this half squared Newton decrement a full step is taken without the Armijo test.
_QUADRATIC = 0.05
#: Largest rounding bound on the returned head's predictions for which it is certified.
_REPRODUCIBLE = 1e-13
#: dtype of the Hessian products on CPU (the dominant cost). The gradient, the iterates and the certificate stay
#: in float64; only the Newton direction is approximate.
_HESSIAN_DTYPE = torch.float64
#: Bytes per thread of the scaled basis sqrt(w) U formed at once on CPU (kept in the core's cache).
_CACHE_BYTES = 2**20
#: CPU sub-batch size, in bytes of the orthonormal basis U.
_SUB_BATCH_BYTES = 2**23


def unit_roundoff_gamma(count, dtype=torch.float64) -> float:
    """Higham's :math:`\\gamma_c = cu/(1-cu)`: the relative error bound of a sum or product of ``c`` terms."""
    u = torch.finfo(dtype).eps / 2
    return count * u / (1 - count * u)


def _simplex_complement_basis(k: int, dtype, device) -> torch.Tensor:
    """Orthonormal basis ``(k, k-1)`` of the vectors with zero sum (Helmert's columns)."""
    V = torch.zeros((k, k - 1), dtype=dtype, device=device)
    for a in range(k - 1):
        norm = math.sqrt((a + 1) * (a + 2))
        V[: a + 1, a] = 1.0 / norm
        V[a + 1, a] = -(a + 1) / norm
    return V


def _scaled_design(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Z = [X, 1]`` with each column multiplied by a power of two (exact) so that its max-abs lies in
    ``[1/2, 1)``; returns ``(Zs, exponent)`` with ``Z = Zs * 2**exponent`` column-wise."""
    B, n, m = X.shape
    low, high = torch.aminmax(X, dim=1)
    col_max = torch.cat([torch.maximum(high, -low), torch.ones_like(high[:, :1])], dim=1)  # the bias column: 1
    _, exponent = torch.frexp(torch.where(col_max > 0, col_max, torch.ones_like(col_max)))
    scale = torch.ldexp(torch.ones_like(col_max), -exponent.to(X.dtype))  # 2**-e, exact
    Zs = torch.empty((B, n, m + 1), dtype=X.dtype, device=X.device)
    torch.mul(X, scale[:, None, :m], out=Zs[..., :m])  # what ldexp computes, without a copy of [X, 1]
    Zs[..., m] = scale[:, m:]
    return Zs, exponent


def _smallest_singular_value_lower_bound(M: torch.Tensor, gram=None, eig=None) -> torch.Tensor:
    r"""A proven lower bound on :math:`\sigma_{\min}(M)` for each ``(n, c)`` matrix of the batch (0 where none).

    :math:`\lambda_{\min}(M^\top M) \ge \hat\lambda_{\min}(\widehat{M^\top M}) - \|E_{\text{gram}}\|_F
    - \|E_{\text{eig}}\|`, with :math:`|E_{\text{gram}}|\le\gamma_n |M|^\top|M|` (the Gram product's rounding)
    and the symmetric eigensolver's backward error bounded by :math:`8c\,\varepsilon\|\widehat{M^\top M}\|_F`
    (Golub & Van Loan, §8.3; a generous constant). Weyl's inequality turns both into eigenvalue shifts.
    """
    n, c = M.shape[-2], M.shape[-1]
    gram = M.transpose(-1, -2) @ M if gram is None else gram
    # || |M|^T |M| ||_F <= ||M||_F^2 (Cauchy-Schwarz entrywise).
    gram_error = unit_roundoff_gamma(n + 2) * M.flatten(-2).norm(dim=-1).square() * (1 + unit_roundoff_gamma(n * c + 2))
    eig = torch.linalg.eigvalsh(gram)[..., 0] if eig is None else eig
    eig_error = 8 * c * torch.finfo(M.dtype).eps * gram.flatten(-2).norm(dim=-1)
    lower = eig - gram_error * (1 + unit_roundoff_gamma(c * c + 2)) - eig_error
    return torch.where(lower > 0, lower.clamp_min(0).sqrt() * (1 - 4 * torch.finfo(M.dtype).eps),
                       torch.zeros_like(lower))


def _exact_span_matrix(Zs_b: torch.Tensor) -> torch.Tensor:
    """Columns of one student's rescaled design with the same span: constant columns (multiples of the bias
    column), zero columns and exact duplicates (up to sign) removed."""
    n = Zs_b.shape[0]
    keep = []
    seen: list[torch.Tensor] = []
    last = Zs_b.shape[1] - 1
    for j in range(Zs_b.shape[1]):
        col = Zs_b[:, j]
        if j != last and (bool((col == col[0]).all()) or n == 1):
            continue  # constant (or a single sample): a multiple of the bias column, or zero
        nz = col[col != 0]
        if nz.numel() == 0:
            continue
        col = col if nz[0] > 0 else -col
        if any(torch.equal(col, other) for other in seen):
            continue
        seen.append(col)
        keep.append(j)
    return Zs_b[:, keep]


class _Certifier:
    """Per student: the matrix ``M`` that spans the class, a lower bound on its smallest singular value, and
    whether that span is the exact one (``True``) or the numerical one (singular vectors above the rank rule)."""

    def __init__(self, Zs: torch.Tensor, U: torch.Tensor, keep: torch.Tensor, gram=None, eig_min=None):
        B, n, c = Zs.shape
        full_rank = keep.all(dim=1)
        sigma = torch.zeros(B, dtype=Zs.dtype, device=Zs.device)
        if gram is None:
            gram = Zs.transpose(1, 2) @ Zs
        if eig_min is None or bool(torch.isnan(eig_min[full_rank]).any()):
            eig_min = torch.linalg.eigvalsh(gram)[:, 0]
        if full_rank.all():
            sigma = _smallest_singular_value_lower_bound(Zs, gram, eig_min)
        elif full_rank.any():
            sigma[full_rank] = _smallest_singular_value_lower_bound(Zs[full_rank], gram[full_rank], eig_min[full_rank])
        self.design = full_rank & (sigma > 0)  # M is the student's rescaled design itself
        self.exact = self.design.clone()
        self.M = [None] * B
        for b in (~self.design).nonzero()[:, 0].tolist():
            Md = _exact_span_matrix(Zs[b])
            s = _smallest_singular_value_lower_bound(Md[None])[0] if Md.shape[1] <= n else Md.new_zeros(())
            if s > 0 and Md.shape[1] == int(keep[b].sum()):
                self.M[b], sigma[b], self.exact[b] = Md, s, True
            else:
                Ur = U[b][:, keep[b]]
                self.M[b] = Ur
                sigma[b] = _smallest_singular_value_lower_bound(Ur[None])[0] if Ur.shape[1] else 0.0
        self.sigma, self.Zs = sigma, Zs
        # A student's numbers must not depend on its batch: products and norms are taken on its own M (batched
        # over the students whose M is their design, one at a time for the others), and the rounding constants
        # use the widest possible M (c columns) for every student.
        norms = Zs.flatten(1).norm(dim=1) if bool(self.design.all()) else torch.zeros_like(sigma)
        if not bool(self.design.all()):
            if self.design.any():
                norms[self.design] = Zs[self.design].flatten(1).norm(dim=1)
            for b in (~self.design).nonzero()[:, 0].tolist():
                norms[b] = self.M[b].reshape(1, -1).norm(dim=1)[0]
        self.M_norm = norms * (1 + unit_roundoff_gamma(n * c + 2))

    def projected_residual_bound(self, R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        r"""Upper bound on :math:`\|\Pi R\|_F \le (\|\mathrm{fl}(M^\top R)\|_F + \gamma_n\||M|^\top|R|\|_F)/\sigma`."""
        full = rows.numel() == self.Zs.shape[0] and bool((rows == torch.arange(rows.numel(), device=rows.device)).all())
        n, c = self.Zs.shape[1], self.Zs.shape[2]
        design = self.design[rows]
        if bool(design.all()):
            Zs = self.Zs if full else self.Zs[rows]
            MR_norm = (Zs.transpose(1, 2) @ R).flatten(1).norm(dim=1)
        else:
            MR_norm = torch.zeros(rows.numel(), dtype=R.dtype, device=R.device)
            here = design.nonzero()[:, 0]
            if here.numel():
                MR_norm[here] = (self.Zs[rows[here]].transpose(1, 2) @ R[here]).flatten(1).norm(dim=1)
            for j in (~design).nonzero()[:, 0].tolist():
                M = self.M[int(rows[j])]
                MR_norm[j] = (M.T @ R[j]).reshape(1, -1).norm(dim=1)[0]
        # ||(|M|^T |R|)||_F <= ||M||_F ||R||_F (Cauchy-Schwarz entrywise): no pass over |M|.
        err = unit_roundoff_gamma(n + 2) * self.M_norm[rows] * R.flatten(1).norm(dim=1)
        num = (MR_norm + err) * (1 + unit_roundoff_gamma(2 * c * R.shape[2] + 4))
        sigma = self.sigma[rows]
        return torch.where(sigma > 0, num / sigma.clamp_min(1e-300), torch.full_like(num, float("inf")))


#: Losses that are not separable over the classes but quadratic in the student: their per-sample Hessian is a
#: constant ``k x k`` matrix (read off the gradient, :func:`_quadratic_loss_hessian`).
QUADRATIC_LOSSES = ("bregman:mahalanobis",)


def _quadratic_loss_hessian(loss: Loss, k: int, dtype, device) -> torch.Tensor | None:
    r"""The constant per-sample Hessian :math:`\nabla^2_p\ell = 2M` of a loss in :data:`QUADRATIC_LOSSES`
    (``None`` for the others), read off its gradient: :math:`\ell'(q, p) = 2M(p - q)` at :math:`q = 0`,
    :math:`p = e_j` is the column :math:`2Me_j`, computed without rounding (products with 0 and 1)."""
    if loss.name not in QUADRATIC_LOSSES:
        return None
    eye = torch.eye(k, dtype=dtype, device=device)
    H = loss.grad_student(torch.zeros_like(eye), eye)
    if not torch.equal(H, H.T) or torch.linalg.eigvalsh(H)[0] <= 0:
        raise ValueError(f"loss {loss.name!r}: its Hessian is not symmetric positive definite")
    return H


def _derivative_error(teacher, probs, dphi, n, loss_name: str, hessian=None):
    r"""Entrywise bound on the rounding of :math:`G = \ell'(q, \hat P)/n` at the (exactly given) ``probs``:
    each derivative :math:`-q/p`, :math:`\log p - \log q + 1`, :math:`-\log q`, :math:`2(p - q)` is a few
    correctly rounded operations on its inputs, so :math:`|\hat G - G| \le \gamma_8(|\ell'| + |\log p| +
    |\log q| + T + 2)/n` (the logs enter only where they are finite), with :math:`T` the magnitudes of the
    terms the derivative is computed from (:func:`~.conditioning.derivative_term_magnitude`: e.g.
    :math:`1/p + 1/q` for Itakura–Saito's :math:`1/q - 1/p`, which cancels where :math:`p \approx q`). For a quadratic loss
    :math:`\ell' = Hp - Hq` (``hessian`` :math:`H = 2M`, two ``k``-term products and a difference):
    :math:`|\hat G - G| \le (\gamma_k(|p| + |q|)|H| + \gamma_2|\ell'|)(1 + \gamma_2)/n`."""
    if hessian is not None:
        k = probs.shape[-1]
        spread = (probs.abs() + teacher.abs()) @ hessian.abs()
        return (unit_roundoff_gamma(k + 1) * spread + unit_roundoff_gamma(2) * dphi.abs()) * (1 + unit_roundoff_gamma(k + 4)) / n
    finite = lambda x: torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0)  # noqa: E731  |x| where finite, else 0
    terms = derivative_term_magnitude(loss_name, teacher, probs)
    if terms is None:  # no stated formula for this loss's derivative: no allowance covers it
        return torch.full_like(dphi, float("inf"))
    mag = finite(dphi) + finite(torch.log(probs.clamp_min(0))) + finite(torch.log(teacher)) + finite(terms) + 2
    return unit_roundoff_gamma(8) * mag / n


def _multipliers(slack, dP, t):
    r"""The primal–dual estimate of the floor's multipliers, :math:`Y = (1 - \Delta P/s)_+/(t s)` with
    :math:`s = P - \gamma` and :math:`\Delta P` the barrier's Newton step at :math:`P` (0 where :math:`s \le 0`):
    the linearisation of the centred :math:`1/(t(s + \Delta P))`, whose residual is second order in the step
    even along stiff (nearly active) directions, where :math:`1/(ts)` alone is not."""
    return torch.where(slack > 0, (1.0 - dP / slack).clamp_min(0) / (t[:, None, None] * slack), torch.zeros_like(slack))


def _certificate(cert, rows, teacher, probs, t, gamma, U, loss, n, Y, allowances=True, hessian=None):
    r"""The dual Frank–Wolfe bound at ``probs`` (see the module docstring), with every rounding allowance.

    ``Y >= 0`` are the floor's multipliers (any give a valid bound; :func:`_multipliers` of the Newton step at
    ``probs``, or at the iterate whose full Newton step ``probs`` is, give a tight one).
    ``allowances=False`` leaves out the rounding allowances (a cheaper estimate, used only to decide when to
    stop iterating; the reported gap always includes them).
    """
    dphi = loss.grad_student(teacher, probs)
    G = dphi / n
    slack = probs - gamma
    # One product gives U^T G (for the reported gradient norm) and U^T Y: a = class mean of U^T (G - Y).
    k = probs.shape[2]
    CG, CY = (U.transpose(1, 2) @ torch.cat([G, Y], dim=2)).split(k, dim=2)  # (b, r, k) each
    a = _class_sum(CG - CY) / k  # (b, r)
    # (b, n); a product and a row sum, not a batched matrix-vector product, whose kernel (and so its last bits)
    # changes with the batch size
    nu = (U * a[:, None, :]).sum(dim=2)
    R = (G - Y).sub_(nu[..., None])
    rowsum_minus_one = _class_sum(probs) - 1
    nk = probs.shape[1] * probs.shape[2]
    RP, YS = R * probs, Y * slack
    terms = (RP.sum(dim=(1, 2)), YS.sum(dim=(1, 2)), (nu * rowsum_minus_one).sum(dim=1))
    residual = math.sqrt(n) * cert.projected_residual_bound(R, rows)
    if not allowances:
        return terms[0] + terms[1] + terms[2] + residual, G, CG
    # Rounding: G_eff = Y + nu 1^T + R differs from the computed G by E (the derivative's own error plus the
    # subtraction's); moving G to G_eff changes <G, P> - min_S <G, S> by at most 2 sum_i max_y |E_iy|.
    E = _derivative_error(teacher, probs, dphi, n, loss.name, hessian) + unit_roundoff_gamma(3) * (G.abs() + Y.abs() + nu.abs()[..., None])
    magnitudes = (RP.abs().sum(dim=(1, 2)), YS.abs().sum(dim=(1, 2)),
                  (nu.abs() * (rowsum_minus_one.abs() + unit_roundoff_gamma(probs.shape[2] + 1) * (_class_sum(probs.abs()) + 1)))
                  .sum(dim=1))
    # <Y, P - gamma>: the computed slack has relative error <= u; its sum gamma_nk.
    value = terms[0] + terms[1] + terms[2]
    rounding = unit_roundoff_gamma(nk + 4) * (magnitudes[0] + magnitudes[1]) + magnitudes[2] + unit_roundoff_gamma(2) * magnitudes[1]
    edge = 2 * _class_max(E).sum(dim=1) * (1 + rowsum_minus_one.abs().amax(dim=1) + 1e-15)
    gap = (value + rounding + residual + edge) * (1 + unit_roundoff_gamma(8))
    gap = torch.where(torch.isnan(gap), torch.full_like(gap, float("inf")), gap.clamp_min(0))
    return gap, G, CG


class _Barrier:
    """The centring problem's pieces for a working set of students (all tensors batched on axis 0)."""

    def __init__(self, U, V, Q, gamma, loss, k):
        self.U, self.V, self.Q, self.gamma, self.loss, self.k = U, V, Q, gamma, loss, k
        self.n = U.shape[1]
        self._buffer = None
        self._U_sum = None
        self.hessian_dtype = _HESSIAN_DTYPE if U.device.type == "cpu" else U.dtype
        self.logQ = torch.log(Q) if loss.name in ("reverse_kl", "reverse_ce") else None
        # Quadratic non-separable loss: its Hessian in D is (t/n) (U^T U) kron (V^T H V) = (t/n) I kron V^T H V
        # (U orthonormal), added to the barrier's separable part in :meth:`newton`.
        H = _quadratic_loss_hessian(loss, k, U.dtype, U.device)
        self.loss_hessian_D = None if H is None else V.T @ H @ V  # (k-1, k-1)

    def probs(self, D):
        return 1.0 / self.k + self.U @ _times(D, self.V.T)

    def multipliers(self, P, t, dP):
        """:func:`_multipliers` for iterates (strictly above the floor), without the mask."""
        slack = P - self.gamma if self.gamma else P
        return (dP / slack).neg_().add_(1.0).clamp_min_(0).div_(slack).div_(t[:, None, None])

    def gap_estimate(self, P, Y, kappa):
        r"""The bound of :func:`_certificate` without its rounding allowances and with :math:`\|\Pi R\|_F` taken as
        :math:`\|U^\top R\|_F` (exact for an orthonormal :math:`U`): with :math:`C = U^\top(G - Y)` and
        :math:`a` its class mean, :math:`U^\top R = C - a\mathbf 1^\top` and
        :math:`\langle R, P\rangle + \langle\nu, P\mathbf 1 - \mathbf 1\rangle = \langle G - Y, P\rangle
        - \langle U^\top\mathbf 1, a\rangle`. The residual term is multiplied by ``kappa``
        :math:`=\|M\|_F/\sigma` (:class:`_Certifier`), the most by which the certificate's bound
        :math:`\|M^\top R\|_F/\sigma` can exceed :math:`\|U^\top R\|_F`, so that a student is not stopped
        before its certificate can be met. One pass over :math:`U`; an estimate used only to decide when to
        stop (the reported gap is always :func:`_certificate`'s)."""
        if self.loss.name in ("forward_kl", "forward_ce"):  # -q/p (iterates are > 0), without a where
            G = self.Q / P
            G.mul_(-1.0 / self.n)
        else:
            G = self.loss.grad_student(self.Q, P) / self.n
        slack = P - self.gamma if self.gamma else P
        GY = G.sub_(Y)
        C = self.U.transpose(1, 2) @ GY  # (b, r, k)
        a = C.mean(dim=2)
        if self._U_sum is None:
            self._U_sum = (self.U.transpose(1, 2) @ torch.ones_like(self.U[:, :, :1]))[..., 0]
        value = (GY * P).sum(dim=(1, 2)) + (Y * slack).sum(dim=(1, 2)) - (self._U_sum * a).sum(dim=1)
        return value + math.sqrt(self.n) * kappa * (C - a[..., None]).flatten(1).norm(dim=1)

    def value(self, P, t):
        """``t Phi(P) - sum log(P - gamma)`` per student, up to a constant (``inf`` outside the domain)."""
        slack = P - self.gamma if self.gamma else P
        name = self.loss.name
        log_slack = torch.log(slack)
        log_P = log_slack if self.gamma == 0 else None  # slack = P exactly: one pass of log serves both
        if name in ("forward_kl", "forward_ce"):
            phi = -(self.Q * (torch.log(P) if log_P is None else log_P)).sum(dim=(1, 2))  # + a constant
        elif name == "reverse_kl":
            phi = (P * (torch.log(P) - self.logQ)).sum(dim=(1, 2))
        elif name == "reverse_ce":
            phi = -(P * self.logQ).sum(dim=(1, 2))
        else:
            phi = self.loss.per_sample(self.Q, P).sum(dim=1)
        out = t * phi / self.n - log_slack.sum(dim=(1, 2))
        # Finite exactly where every slack is positive: a slack <= 0 makes its log -inf or NaN, and the sum of
        # finitely many finite logs is finite.
        return torch.where(torch.isfinite(out), out, torch.full_like(out, float("inf")))

    def derivatives(self, P, t):
        r"""Gradient ``t l'/n - 1/(P - gamma)`` and diagonal curvature ``t l''/n + (P - gamma)^{-2}`` of the
        centring objective in ``P``, written out per loss with few passes over ``(b, n, k)`` (they dominate
        the cost). Iterates are strictly above the floor, so ``P > 0`` and ``-q/p`` is 0 where ``q = 0``."""
        c = (t / self.n)[:, None, None]
        inv_s = (P - self.gamma).reciprocal_() if self.gamma else P.reciprocal()
        name = self.loss.name
        if name in ("forward_kl", "forward_ce"):
            ratio = self.Q / P
            gP = torch.addcmul(-inv_s, ratio, c, value=-1.0)
            w = ratio.div_(P).mul_(c).addcmul_(inv_s, inv_s)
        elif name == "reverse_kl":
            gP = (torch.log(P).sub_(self.logQ).add_(1)).mul_(c).sub_(inv_s)
            w = P.reciprocal().mul_(c).addcmul_(inv_s, inv_s)
        elif name == "reverse_ce":
            gP = (-self.logQ * c).sub_(inv_s)
            w = inv_s * inv_s
        elif self.loss_hessian_D is not None:  # quadratic: its Hessian enters the Newton system as a constant block
            gP = c * self.loss.grad_student(self.Q, P) - inv_s
            w = inv_s * inv_s
        else:  # generic: the loss's own derivatives
            gP = c * self.loss.grad_student(self.Q, P) - inv_s
            w = (c * self.loss.curvature_student(self.Q, P)).addcmul_(inv_s, inv_s)
        return gP, w

    def newton(self, P, t, keep):
        """Newton direction ``(b, r, k-1)``, the gradient and half the squared decrement."""
        b, n, k = P.shape
        r = self.U.shape[2]
        gP, w = self.derivatives(P, t)
        fused = k == 2 and self.hessian_dtype == P.dtype
        if self._buffer is None:  # sqrt(w) U, allocated once (fresh pages every iteration cost more than the product)
            self._U_h = self.U.to(self.hessian_dtype)
            # On CPU the scaled basis is formed a few students at a time, so that it is read back from the
            # core's cache rather than from memory (one pass over U per Hessian instead of three).
            per_student = 8 * n * (r + fused)
            cpu = self.U.device.type == "cpu"
            self._chunk = max(1, min(b, torch.get_num_threads() * _CACHE_BYTES // per_student)) if cpu else b
            self._buffer = self._U_h.new_empty((self._chunk, n, r + fused))
        Uh, chunk = self._U_h, self._chunk
        if fused:
            # V = (1, -1)/sqrt 2: the Hessian is U^T diag(w') U with w' = (w_0 + w_1)/2, and the gradient is
            # U^T z with z = g V; one product [sqrt(w') U, z/sqrt(w')]^T (sqrt(w') U) gives both (one pass over U).
            root = (w[..., 0:1] + w[..., 1:2]).mul_(0.5).sqrt_()
            z = (gP[..., 0:1] * self.V[0, 0]).add_(gP[..., 1:2] * self.V[1, 0]).div_(root)  # (b, n, 1)
            HG = P.new_empty((b, r + 1, r))
            for start in range(0, b, chunk):
                stop = min(b, start + chunk)
                buffer = self._buffer[: stop - start]
                torch.mul(Uh[start:stop], root[start:stop], out=buffer[..., :r])
                buffer[..., r:] = z[start:stop]
                torch.matmul(buffer.transpose(1, 2), buffer[..., :r], out=HG[start:stop])  # (c, r + 1, r)
            H, grad = HG[:, :r].contiguous(), HG[:, r, :, None]
        else:
            grad = _times(self.U.transpose(1, 2) @ gP, self.V)  # (b, r, k-1)
            roots = ((w[..., 0:1] + w[..., 1:2]).mul_(0.5) if k == 2 else w).sqrt().to(Uh.dtype)
            classes = 1 if k == 2 else k  # k = 2: (w_0 + w_1)/2 as above
            Hy = P.new_empty((b, classes, r, r))
            for start in range(0, b, chunk):
                stop = min(b, start + chunk)
                Y = self._buffer[: stop - start, :, :r]
                for y in range(classes):
                    torch.mul(Uh[start:stop], roots[start:stop, :, y : y + 1], out=Y)
                    Hy[start:stop, y] = Y.transpose(1, 2) @ Y
        if not fused and k == 2:
            H = Hy[:, 0]
        elif not fused:
            H = sum(Hy[:, y, :, None, :, None] * (self.V[y, :, None] * self.V[y, None, :])[None, None, :, None, :]
                    for y in range(k)).reshape(b, r * (k - 1), r * (k - 1))
        if self.loss_hessian_D is not None:
            # + (t/n) I_r kron V^T H V: block diagonal in the (r, k-1) ordering of the unknowns.
            blocks = H.view(b, r, k - 1, r, k - 1).diagonal(dim1=1, dim2=3)  # (b, k-1, k-1, r), a view
            blocks += (t / self.n)[:, None, None, None] * self.loss_hessian_D[None, :, :, None]
        g = grad.reshape(b, -1)
        free = keep[:, :, None].expand(b, r, k - 1).reshape(b, -1)
        step = _solve_spd(H, -g, free)
        decrement = -(g * step).sum(dim=1) / 2
        step = step.reshape(b, r, k - 1)
        return step, decrement, self.U @ _times(step, self.V.T)


def _class_sum(x, keepdim=False):
    """Sum over the last (class) axis as explicit adds of its slices: torch's reduction over a short last axis
    costs about 20 times an elementwise pass (measured: 1.4 ms against 66 us for (32, 2000, 2) float64)."""
    out = x[..., 0] + x[..., 1] if x.shape[-1] > 1 else x[..., 0].clone()
    for y in range(2, x.shape[-1]):
        out += x[..., y]
    return out[..., None] if keepdim else out


def _class_max(x):
    """Max over the last (class) axis as elementwise maxima of its slices (see :func:`_class_sum`)."""
    out = x[..., 0]
    for y in range(1, x.shape[-1]):
        out = torch.maximum(out, x[..., y])
    return out


def _times(A, M):
    """``A @ M`` for a small matrix ``M`` ``(p, q)`` as explicit sums of products: the result for one student
    is then the same whatever the batch (a broadcast matmul folds the batch into one GEMM, whose blocking,
    and so its last bits, depend on the batch size)."""
    return sum(A[..., j, None] * M[j] for j in range(M.shape[0]))


def _solve_spd(H, rhs, free):
    """Solve ``H d = rhs`` on ``free`` coordinates (``d = 0`` elsewhere) with a Jacobi-scaled Cholesky; a
    relative ridge is added only where the factorisation fails."""
    diag = torch.diagonal(H, dim1=1, dim2=2)
    if bool((free & (diag > 0)).all()):  # the usual case, without masks (the same numbers as below)
        s = diag.rsqrt()
        L, info = cholesky_ex(H * s[:, :, None] * s[:, None, :])
        if not bool(info.any()):
            return torch.cholesky_solve((rhs * s)[..., None], L)[..., 0] * s
    f = free.to(H.dtype)
    s = torch.where(free & (diag > 0), diag, torch.ones_like(diag)).rsqrt()
    Hs = H * (s * f)[:, :, None] * (s * f)[:, None, :]
    hd = torch.diagonal(Hs, dim1=1, dim2=2)
    hd.copy_(torch.where(free & (diag > 0), hd, torch.ones_like(hd)))
    rs = rhs * s * f
    d = rs.clone()
    todo = torch.arange(H.shape[0], device=H.device)
    for ridge in (0.0, 1e-14, 1e-10, 1e-6, 1e-2):
        M = Hs[todo]
        if ridge:
            M = M + ridge * torch.eye(M.shape[1], dtype=M.dtype, device=M.device)
        L, info = cholesky_ex(M)
        ok = info == 0
        if ok.any():
            d[todo[ok]] = torch.cholesky_solve(rs[todo[ok]][..., None], L[ok])[..., 0]
        todo = todo[~ok]
        if todo.numel() == 0:
            break
    return d * s * f


#: Students whose rescaled design has condition number below this get their basis from the Gram matrix (its
#: orthonormality error is about this squared times the unit roundoff); the others from an SVD.
_GRAM_CONDITION = 1e3


def _basis(Zs):
    r"""A basis of the column space of ``Zs`` ``(B, n, c)``: ``(U, S, Vh, gram, eig_min)`` with ``U = Zs Vh^T
    S^{-1}`` (``Vh`` orthogonal, ``S`` descending), ``gram = Zs^T Zs`` and its smallest computed eigenvalue
    (``NaN`` where not computed).

    Where the Gram matrix's eigenvalues :math:`\lambda` show a condition number :math:`\sqrt{\lambda_{\max}/
    \lambda_{\min}}` below :data:`_GRAM_CONDITION`, ``U = Zs Q \Lambda^{-1/2}`` from :math:`Z_s^\top Z_s = Q
    \Lambda Q^\top` (two passes over the design instead of an SVD's many; ``U`` is orthonormal to about
    :math:`\kappa^2\varepsilon`); elsewhere the thin SVD, whose singular values decide the numerical rank. ``U``
    only parametrises the iterates (Newton is exact in any basis) and the multipliers; the certificate does not
    trust it (:class:`_Certifier`)."""
    B, n, c = Zs.shape
    gram = Zs.transpose(1, 2) @ Zs
    eig_min = torch.full((B,), float("nan"), dtype=Zs.dtype, device=Zs.device)
    if n < c:
        U, S, Vh = torch.linalg.svd(Zs, full_matrices=False)
        return U, S, Vh, gram, eig_min
    lam, vecs = torch.linalg.eigh(gram)
    eig_min = lam[:, 0]
    well = lam[:, 0] > lam[:, -1] / _GRAM_CONDITION**2
    S = lam.flip(-1).clamp_min(0).sqrt()
    Vh = vecs.flip(-1).transpose(1, 2)
    if bool(well.all()):
        U = Zs @ (vecs.flip(-1) / S[:, None, :])
        return U, S, Vh, gram, eig_min
    U = torch.empty_like(Zs)
    good, bad = well.nonzero()[:, 0], (~well).nonzero()[:, 0]
    if good.numel():
        U[good] = Zs[good] @ (vecs[good].flip(-1) / S[good, None, :])
    U[bad], S[bad], Vh[bad] = torch.linalg.svd(Zs[bad], full_matrices=False)
    return U, S, Vh, gram, eig_min


def _to_parameters(D, Vh, S, keep, exponent, V, k):
    """``(W, b)`` with ``[X, 1] [W^T; b^T] = 1 1^T / k + U D V^T`` (``U = Zs Vh^T S^{-1}`` on kept directions)."""
    inv = torch.where(keep, 1.0 / S, torch.zeros_like(S))
    theta_s = Vh.transpose(1, 2) @ _times(inv[..., None] * D, V.T)  # (B, m+1, k) on the rescaled columns
    # The bias column of Zs is 2**-e_bias; the constant 1/k needs theta = 2**e_bias / k on it.
    theta_s[:, -1, :] += torch.ldexp(torch.full_like(theta_s[:, -1, :], 1.0 / k),
                                      exponent[:, -1:].to(theta_s.dtype))
    theta = torch.ldexp(theta_s, -exponent[:, :, None].to(theta_s.dtype))  # Z theta = Zs theta_s
    return theta[:, :-1, :].transpose(1, 2).contiguous(), theta[:, -1, :].contiguous()


def _predict_with_error(X, W, b):
    """``probs = X W^T + b`` and an entrywise bound on its rounding, :math:`\\gamma_{m+2}(|X||W|^\\top + |b|)`."""
    probs = LinearHead.predict(W, b, X)
    # (|X||W|^T)_iy <= ||x_i|| ||w_y|| (Cauchy-Schwarz): no pass that materialises |X|.
    err = unit_roundoff_gamma(X.shape[-1] + 2) * (X.norm(dim=2)[:, :, None] * W.norm(dim=2)[:, None, :]
                                       * (1 + unit_roundoff_gamma(X.shape[-1] + 2)) + b.abs()[:, None, :])
    return probs, err


def fit_linear_batched(
    features: torch.Tensor,
    teacher: torch.Tensor,
    loss: Loss,
    *,
    gamma: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 200,
) -> FitResult:
    r"""Fit ``B`` linear-head students at once and certify each (see the module docstring).

    Args:
        features: ``(B, n, m)`` (any real features; ``(n, m)`` is broadcast).
        teacher: ``(B, n, k)`` rows in :math:`\Delta^k`.
        loss: a :class:`~w2s_theory.divergences.Loss` convex in the student's probabilities.
        gamma: the floor, ``0 <= gamma < 1/k``.
        tol: stop a student once its certified gap is at most ``tol``.
        max_iter: Newton steps per student at most.

    Returns:
        A :class:`FitResult` with ``params = {"W": (B, k, m), "b": (B, k)}``, ``probs = X W^T + b``, the
        certified ``gap`` (``inf`` where infeasible or not provable, with the reason in ``info["reasons"]``).
    """
    if not loss.convex_in_probabilities:
        raise ValueError(f"loss {loss.name!r} is not convex in the student's probabilities")
    B, n, k = teacher.shape
    if not 0 <= gamma < 1 / k:
        raise ValueError(f"gamma = {gamma} for the linear head: the floor must satisfy 0 <= gamma < 1/k = {1 / k:.4g}")
    X = features if features.ndim == 3 else features.expand(B, *features.shape)
    m = X.shape[2]
    dev, dtype = teacher.device, torch.float64
    X, Q = X.to(dtype), teacher.to(dtype)

    pinned = loss.pins_student_to_teacher_support & (Q == 0).flatten(1).any(dim=1)
    face = pinned.nonzero()[:, 0]
    inner = (~pinned).nonzero()[:, 0]
    parts = {}
    if inner.numel():
        # On CPU, sub-batches of about 64 MiB of basis: a student's arithmetic does not depend on its batch (on
        # one thread, as in sweeps; with more, the BLAS may split a long sum differently for a batch of one),
        # and one huge batch pays for fresh memory pages every iteration.
        size = inner.numel() if dev.type != "cpu" else max(1, _SUB_BATCH_BYTES // (8 * n * (m + 1)))
        if inner.numel() == B:  # every student: chunks are views of the features, not copies
            chunks = [slice(s, s + size) for s in range(0, B, size)]
        else:
            chunks = [inner[s : s + size] for s in range(0, inner.numel(), size)]
        parts["inner"] = _concat([_fit_interior(X[c], Q[c], loss, gamma, tol, max_iter) for c in chunks])
    if face.numel():
        parts["face"] = _fit_face(X[face], Q[face], loss, gamma)
    if len(parts) == 1:
        return next(iter(parts.values()))
    joined = _concat([parts["inner"], parts["face"]])
    inverse = torch.empty(B, dtype=torch.long, device=dev)
    inverse[torch.cat([inner, face])] = torch.arange(B, device=dev)
    take = lambda x: x[inverse]  # noqa: E731
    info = dict(joined.info, numerical_span=take(joined.info["numerical_span"]),
                reasons=[joined.info["reasons"][int(i)] for i in inverse], reference_students=face)
    return FitResult(
        head="linear", loss=loss.name, params={name: take(v) for name, v in joined.params.items()},
        probs=take(joined.probs), objective=take(joined.objective), gap=take(joined.gap),
        certificate="frank_wolfe", grad_norm=take(joined.grad_norm), iterations=take(joined.iterations),
        converged=take(joined.converged), method=parts["inner"].method, info=info,
    )


def _concat(parts: list[FitResult]) -> FitResult:
    """:meth:`FitResult.concat` that also joins the per-student entries of ``info``."""
    if len(parts) == 1:
        return parts[0]
    out = FitResult.concat(parts)
    out.info["numerical_span"] = torch.cat([p.info["numerical_span"] for p in parts])
    out.info["reasons"] = [r for p in parts for r in p.info["reasons"]]
    return out


def _fit_face(X, Q, loss, gamma) -> FitResult:
    """Reverse losses with teacher zeros: the feasible set is a face of the polytope (pinned zeros); the exact
    reference finds it by linear programs. With ``gamma > 0`` no member has a finite loss."""
    from .reference import fit_reference

    B, n, k = Q.shape
    results = []
    for b in range(B):
        if gamma > 0:
            res = _infeasible(X.shape[2], n, k, loss, X.device)
        else:
            if loss.name not in ("forward_kl", "forward_ce", "reverse_kl", "reverse_ce", "squared"):
                raise ValueError(f"loss {loss.name!r} with teacher zeros on the linear head: the feasible set is a "
                                 "face that only the cvxpy reference finds, and it has no formulation of this loss; "
                                 "use the mixture head, or floor the teacher")
            res = fit_reference(X[b].cpu().numpy(), Q[b].cpu().numpy(), loss.name, "linear", gamma=0.0)
            # The reference's predictions are feasible only to its interior-point tolerance: the returned head
            # does not reproduce them to rounding (seen: 4.6e-13 off), so its gap is not a proof for the head.
            infeasible = torch.isinf(res.objective)  # every member has infinite loss: gap inf, as stated
            nan = torch.where(infeasible, res.gap, torch.full_like(res.gap, float("nan"))).to(X.device)
            res = FitResult(head="linear", loss=loss.name, params={n_: v.to(X.device) for n_, v in res.params.items()},
                            probs=res.probs.to(X.device), objective=res.objective.to(X.device),
                            gap=nan, certificate="frank_wolfe",
                            grad_norm=res.grad_norm.to(X.device), iterations=res.iterations.to(X.device),
                            converged=torch.zeros_like(res.converged).to(X.device), method="log-barrier-newton",
                            info={"numerical_span": torch.ones(1, dtype=torch.bool, device=X.device),
                                  "reasons": ["uncertified: teacher zeros under a reverse loss; solved on the face "
                                              "by the cvxpy reference, whose predictions are feasible only to its "
                                              "tolerance"]})
        results.append(res)
    return _concat(results)


def _infeasible(m, n, k, loss, device) -> FitResult:
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=torch.float64, device=device)  # noqa: E731
    inf = torch.full((1,), float("inf"), dtype=torch.float64, device=device)
    return FitResult(head="linear", loss=loss.name, params={"W": nan(1, k, m), "b": nan(1, k)}, probs=nan(1, n, k),
                     objective=inf, gap=inf.clone(), certificate="frank_wolfe", grad_norm=nan(1),
                     iterations=torch.zeros(1, dtype=torch.long, device=device),
                     converged=torch.zeros(1, dtype=torch.bool, device=device), method="log-barrier-newton",
                     info={"numerical_span": torch.zeros(1, dtype=torch.bool, device=device),
                           "reasons": ["infeasible: teacher zeros pin predictions to 0 below the floor gamma > 0"]})


def _fit_interior(X, Q, loss: Loss, gamma, tol, max_iter) -> FitResult:
    B, n, k = Q.shape
    m = X.shape[2]
    dev, dtype = Q.device, Q.dtype
    Zs, exponent = _scaled_design(X)
    U, S, Vh, gram, eig_min = _basis(Zs)
    rank_tol = max(n, m + 1) * torch.finfo(dtype).eps * S[:, :1]
    keep = S > rank_tol
    if not keep.all():
        U = U * keep[:, None, :]
    cert = _Certifier(Zs, U, keep, gram, eig_min)
    V = _simplex_complement_basis(k, dtype, dev)
    nk = n * k

    D = torch.zeros((B, U.shape[2], k - 1), dtype=dtype, device=dev)  # U has min(n, m + 1) columns
    t_final = 4.0 * nk / tol  # the barrier's own term N/t is then a quarter of the target
    # Start on the geometric ladder that ends exactly at t_final, at its lowest rung with N/t <= 1/_T_START
    # (objectives are O(1)), but below t_final. A rung below that would cost a Newton step that only confirms
    # the uniform start is centred there (at D = 0 the barrier's gradient vanishes, the loss's is O(t)):
    # one to two steps fewer on every workload and loss measured, at tol 1e-8 to 1e-10.
    stages = max(1, math.floor(math.log(t_final / (_T_START * nk)) / math.log(_T_GROWTH)))
    t = torch.full((B,), t_final / _T_GROWTH**stages, dtype=dtype, device=dev)
    iterations = torch.zeros(B, dtype=torch.long, device=dev)
    all_rows = torch.arange(B, device=dev)
    # Working set: students still iterating, plus finished ones until compaction (indexing copies U, so the
    # set is compacted only once it has thinned out; finished students are carried along unchanged).
    ws = all_rows
    bar = _Barrier(U, V, Q, gamma, loss, k)
    Dw, tw, keepw = D.clone(), t.clone(), keep
    P = torch.full_like(Q, 1.0 / k)  # bar.probs(D) at D = 0, exactly
    run = torch.ones(B, dtype=torch.bool, device=dev)
    best = torch.full((B,), float("inf"), dtype=dtype, device=dev)
    stale = torch.zeros(B, dtype=torch.long, device=dev)
    Y_final, P_final = torch.zeros_like(Q), torch.ones_like(Q)
    kappa = torch.where(cert.sigma > 0, cert.M_norm / cert.sigma.clamp_min(1e-300), torch.full_like(cert.sigma, math.inf))
    by_certificate = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_iter):
        if not run.any():
            break
        if run.sum() <= _COMPACT * run.numel():
            D[ws], t[ws] = Dw, tw
            sel = run.nonzero()[:, 0]
            ws, Dw, tw, keepw, run, P, best, stale = (x[sel] for x in (ws, Dw, tw, keepw, run, P, best, stale))
            bar = _Barrier(U[ws], V, Q[ws], gamma, loss, k)
        step, decrement, dP = bar.newton(P, tw, keepw)
        # Certificate at the current point, once it can be met: it is at least about N/t (the multipliers'
        # complementarity), so before t reaches t_final it is not computed.
        done = ~run
        near = ((tw >= t_final) & run).nonzero()[:, 0]
        Y_now = None
        if near.numel():
            Y_now = bar.multipliers(P, tw, dP)
            g_now = bar.gap_estimate(P, Y_now, kappa[ws])[near]  # every row: indexing would copy U
            done[near] = g_now <= 0.5 * tol  # the allowances are far below tol / 2 on O(1) data
            # Students finished by their certificate keep P (step 0 below): their Newton step at P gives the
            # final certificate's multipliers without another Newton pass.
            newly = done & run
            Y_final[ws[newly]], P_final[ws[newly]] = Y_now[newly], P[newly]
            by_certificate[ws[newly]] = True
            # At t_final a student whose certificate stopped improving is finished (rounding-limited).
            improved = g_now < 0.5 * best[near]
            best[near] = torch.minimum(best[near], g_now)
            # Only a centred student can be rounding-limited; one still far from the path (a long step in t)
            # is making Newton progress even where its certificate improves slowly.
            stuck = ~improved & (decrement[near] <= _CENTRED)
            stale[near] = torch.where(stuck, stale[near] + 1, torch.zeros_like(stale[near]))
        # Fraction to the boundary, then Armijo backtracking on t Phi - sum log(P - gamma). Once the decrement
        # is small the full Newton step is taken (its quadratic region), because at large t the decrease
        # drowns in the rounding of t Phi; the certificate, not the descent, decides when to stop.
        slack = P - gamma if gamma else P
        shrink = (dP / slack).flatten(1).amin(dim=1)  # the floor is reached at step -1/shrink when shrink < 0
        alpha = torch.where(shrink < 0, _TO_BOUNDARY / (-shrink), torch.ones_like(shrink)).clamp(max=1.0)
        alpha = torch.where(done | ((decrement < _QUADRATIC) & (alpha >= 1)), alpha, -alpha)  # < 0: to test
        pending = alpha < 0
        alpha = alpha.abs()
        if pending.any():
            f0 = bar.value(P, tw)
            slope = -2 * decrement
            tolerance = 64 * torch.finfo(dtype).eps * (f0.abs() + 1)
        for _ in range(_MAX_BACKTRACK):
            if not pending.any():
                break
            f1 = bar.value(P + alpha[:, None, None] * dP, tw)
            ok = f1 <= f0 + _ARMIJO * alpha * slope + tolerance
            pending = pending & ~ok
            alpha = torch.where(pending, alpha / 2, alpha)
        alpha = torch.where(done | pending, torch.zeros_like(alpha), alpha)  # pending: no acceptable step
        Dw = Dw + alpha[:, None, None] * step
        P_before, P = P, P + alpha[:, None, None] * dP
        # After a full Newton step at t_final near the path, the new point is certified with the step's own
        # multipliers (their linearisation at the new point): where that estimate already meets tol / 2 the
        # student stops here, without the Newton step at the new point that would only confirm it.
        ahead = (run & ~done & (tw >= t_final) & (alpha == 1) & (decrement < _QUADRATIC)).nonzero()[:, 0]
        if ahead.numel():
            if Y_now is None:
                Y_now = bar.multipliers(P_before, tw, dP)
            finished = ahead[bar.gap_estimate(P, Y_now, kappa[ws])[ahead] <= 0.5 * tol]
            Y_final[ws[finished]], P_final[ws[finished]] = Y_now[finished], P[finished]
            by_certificate[ws[finished]] = True
            run[finished] = False
        centred = decrement <= _CENTRED
        tw = torch.where(centred & ~done, torch.clamp(tw * _T_GROWTH, max=t_final), tw)
        iterations[ws[~done]] += 1
        run = run & ~done & ~(stale >= 4) & ~(pending & (tw >= t_final))
    D[ws], t[ws] = Dw, tw
    W, b = _to_parameters(D, Vh, S, keep, exponent, V, k)
    probs, err = _predict_with_error(X, W, b)
    reasons = [""] * B
    # The returned head must satisfy the floor exactly despite rounding: pull it toward the uniform head
    # (in the class, strictly above the floor) where it does not.
    low = ((probs - err) < gamma).flatten(1).any(dim=1)
    moved = low.clone()
    for lam in (1e-12, 1e-9, 1e-6, 1e-3):
        if not low.any():
            break
        W = torch.where(low[:, None, None], (1 - lam) * W, W)
        b = torch.where(low[:, None], (1 - lam) * b + lam / k, b)
        probs, err = _predict_with_error(X, W, b)
        low = ((probs - err) < gamma).flatten(1).any(dim=1)
    # The final multipliers come from the Newton step at the returned predictions. Students that stopped by
    # their certificate were not moved after it, so where probs equal that P to a relative 1e-11 of the slack
    # (the multipliers Y ~ 1/(t (P - gamma)) then move by as little), the step computed there serves; any
    # multipliers give a valid bound, so this choice affects only how tight it is.
    drift = ((probs - P_final).abs() / (P_final - gamma)).flatten(1).amax(dim=1)
    redo = (~by_certificate | moved | ~(drift <= 1e-11)).nonzero()[:, 0]
    # Students redone for drift alone keep their stopping multipliers as a second candidate: where a floor is
    # active with a zero multiplier (a degenerate optimum) the slack is ~sqrt(1/t), the rounding of probs
    # exceeds 1e-11 of it, and the Newton step at probs gives multipliers whose bound can be 1000x looser
    # (measured: 2.4e-8 against 2.5e-11). Any multipliers give a valid bound: the smaller gap is kept.
    second = (by_certificate & ~moved & ~(drift <= 1e-11)).nonzero()[:, 0]
    Y_stop = Y_final[second].clone() if second.numel() else None
    Y = Y_final
    if redo.numel():
        whole = redo.numel() == B
        pick = (lambda x: x) if whole else (lambda x: x[redo])  # noqa: E731
        bar = _Barrier(pick(U), V, pick(Q), gamma, loss, k)
        Y[redo] = _multipliers(pick(probs) - gamma, bar.newton(pick(probs), pick(t), pick(keep))[2], pick(t))
    hessian = _quadratic_loss_hessian(loss, k, dtype, dev)
    final_gap, G, UG = _certificate(cert, all_rows, Q, probs, t, gamma, U, loss, n, Y, hessian=hessian)
    if second.numel():
        other = _certificate(cert, second, Q[second], probs[second], t[second], gamma, U[second], loss, n, Y_stop,
                             hessian=hessian)[0]
        final_gap[second] = torch.minimum(final_gap[second], other)
    # The head's exact predictions Z theta differ from probs by at most err: the gap is widened so that it
    # bounds the exact head's suboptimality too (first order plus the curvature on [P - err, P + err], where
    # these losses' curvature is largest at the lower end), and a head whose predictions are reproducible
    # only to more than _REPRODUCIBLE (huge coefficients on near-collinear features) is not certified.
    lower_end = (probs - err).clamp_min(torch.finfo(dtype).tiny)
    if hessian is None:
        with torch.no_grad():
            curvature = loss.curvature_student(Q, lower_end) / n
    else:  # d^T H d <= lambda_max(H) |d|^2 <= (max row sum of |H|) |d|^2 (Gershgorin), rounding included
        curvature = (hessian.abs().sum(dim=1).amax() * (1 + unit_roundoff_gamma(k + 2)) / n).expand_as(probs)
    final_gap = final_gap + ((G.abs() * err).sum(dim=(1, 2)) + 0.5 * (curvature * err * err).sum(dim=(1, 2))) * 2
    unreproducible = err.flatten(1).amax(dim=1) > _REPRODUCIBLE
    final_gap = torch.where(low | unreproducible, torch.full_like(final_gap, float("inf")), final_gap)
    for i in (unreproducible & ~low).nonzero()[:, 0].tolist():
        reasons[i] = (f"uncertified: the head's predictions are reproducible only to +-{float(err[i].max()):.1e} "
                      "(near-collinear features need huge coefficients)")
    for i in low.nonzero()[:, 0].tolist():
        reasons[i] = "uncertified: the head's outputs are within rounding of the floor gamma"
    for i in (~torch.isfinite(final_gap) & ~low & ~unreproducible).nonzero()[:, 0].tolist():
        reasons[i] = "uncertified: no lower bound on the feature matrix's smallest singular value"
    # A bound proven for the numerical column space is not a bound for the problem as stated, whose span also
    # holds the directions that exist only through rounding (they can lower the optimum with huge
    # coefficients): such students are reported uncertified. Simplex features state a well-posed problem
    # without their last coordinate (:func:`w2s_theory.heads.LinearHead.affine_coordinates`).
    numerical = ~cert.exact & torch.isfinite(final_gap)
    final_gap = torch.where(numerical, torch.full_like(final_gap, float("nan")), final_gap)
    for i in numerical.nonzero()[:, 0].tolist():
        reasons[i] = ("uncertified: the features' span is numerically rank-deficient (e.g. simplex rows beside the "
                      "bias); drop a redundant column, e.g. LinearHead.affine_coordinates(features)")
    objective = loss.per_sample(Q, probs).mean(dim=1)
    grad_norm = (UG - _class_sum(UG, keepdim=True) / k).flatten(1).norm(dim=1)  # U^T G, centred over classes
    return FitResult(
        head="linear", loss=loss.name, params={"W": W, "b": b}, probs=probs, objective=objective, gap=final_gap,
        certificate="frank_wolfe", grad_norm=grad_norm, iterations=iterations, converged=final_gap <= tol,
        method="log-barrier-newton",
        info={"numerical_span": ~cert.exact, "reasons": reasons, "tol": tol, "gamma": gamma,
              "max_row_sum_error": float((probs.sum(dim=2) - 1).abs().max()) if B else 0.0},
    )


#: Smoothing of TV on the linear head: the certificate pays k * TV_SMOOTHING / 2 for it (about 1e-7 for k = 2).
TV_SMOOTHING = 1e-7


def fit_tv_linear(features: torch.Tensor, teacher: torch.Tensor, *, gamma: float = 0.0, tol: float = 1e-10,
                  max_iter: int = 200) -> FitResult:
    r"""Total variation :math:`\frac1n\sum_i \tfrac12\|F(x_i) - q_i\|_1` on the linear head, with a valid certificate.

    TV is not smooth, so the barrier solver minimises its smoothing
    :math:`S_\mu = \frac1n\sum_i\tfrac12\sum_y(\sqrt{(p_{iy}-q_{iy})^2+\mu^2}-\mu)`, which satisfies
    :math:`\mathrm{TV} - k\mu/2 \le S_\mu \le \mathrm{TV}` (:func:`w2s_theory.fdivergences.smoothed_tv_loss`).
    If the returned head has :math:`S_\mu(\hat p) - \min S_\mu \le g`, then
    :math:`\mathrm{TV}(\hat p) - \min\mathrm{TV} \le S_\mu(\hat p) + k\mu/2 - \min S_\mu \le g + k\mu/2`: that is the
    reported gap (plus the rounding of the TV evaluation), about 1e-7 for :math:`\mu = 10^{-7}`, so these students are
    certified but not ``converged`` at the default tolerance."""
    from ..fdivergences import smoothed_tv_loss

    res = fit_linear_batched(features, teacher, smoothed_tv_loss(TV_SMOOTHING), gamma=gamma, tol=tol, max_iter=max_iter)
    tv = get_loss("tv")
    k = teacher.shape[-1]
    objective = tv.per_sample(teacher, res.probs).mean(dim=1)
    gap = res.gap + k * TV_SMOOTHING / 2 + 4 * k * torch.finfo(torch.float64).eps * (1 + objective)
    return FitResult(head="linear", loss="tv", params=res.params, probs=res.probs, objective=objective, gap=gap,
                     certificate=res.certificate, grad_norm=res.grad_norm, iterations=res.iterations,
                     converged=gap <= tol, method=res.method + f" (TV smoothed, mu = {TV_SMOOTHING:g})",
                     info=dict(res.info))


def bench_linear(B: int = 1000, *, n: int = 2000, m: int = 16, k: int = 2, loss: str = "forward_kl",
                 gamma: float = 0.0, cvxpy_students: int = 3, seed: int = 0, device: str = "cpu",
                 threads: int | None = None) -> dict:
    """Time the batched linear-head solver on ``B`` random students against cvxpy on ``cvxpy_students`` of them.

    Features are Gaussian ``(B, n, m)``, teachers Dirichlet(1). Returns seconds per student for both, the
    ratio, the worst certified gap and the worst objective difference to cvxpy on the shared students.
    ``threads`` sets torch's CPU threads for the run (on a loaded machine one thread avoids OpenMP
    contention: measured 41x with 2 threads vs 177x with 1 at load 11 on 2 cores).
    """
    from .reference import fit_reference

    if threads is not None:
        torch.set_num_threads(threads)

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(B, n, m))
    Q = rng.dirichlet(np.ones(k), size=(B, n))
    lo = get_loss(loss)
    Xt, Qt = torch.as_tensor(X, device=device), torch.as_tensor(Q, device=device)
    on_gpu = Xt.device.type == "cuda"  # also for torch.device("cuda") and "cuda:1"
    if on_gpu:
        torch.cuda.synchronize(Xt.device)
    start = time.perf_counter()
    res = fit_linear_batched(Xt, Qt, lo, gamma=gamma)
    if on_gpu:
        torch.cuda.synchronize(Xt.device)
    batched = (time.perf_counter() - start) / B
    ref_time, diffs = [], []
    for b in range(min(cvxpy_students, B)):
        start = time.perf_counter()
        ref = fit_reference(X[b], Q[b], loss, "linear", gamma=gamma)
        ref_time.append(time.perf_counter() - start)
        diffs.append(abs(float(ref.objective[0]) - float(res.objective[b])))
    cvxpy = float(np.mean(ref_time)) if ref_time else float("nan")
    return {"B": B, "n": n, "m": m, "k": k, "loss": loss, "device": device,
            "s_per_student": batched, "cvxpy_s_per_student": cvxpy, "ratio_vs_cvxpy": cvxpy / batched,
            "worst_gap": float(res.gap.max()), "converged": int(res.converged.sum()),
            "max_objective_difference_vs_cvxpy": max(diffs) if diffs else float("nan"),
            "median_iterations": float(res.iterations.double().median()), "threads": torch.get_num_threads()}
