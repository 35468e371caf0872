r"""Batched fits over products of simplices for losses the projected-Newton mixture solver does not take:
non-separable ones (``bregman:mahalanobis``), the non-smooth ``tv``, and heads whose parameters are mixing
weights (:mod:`w2s_theory.solvers.mixture_of_softmax`).

**Generic solver** (:func:`fit_simplex_product`). Parameters :math:`\theta` of shape ``(B, r, s)`` with every
column in :math:`\Delta^r`, predictions :math:`P = \mathcal L(\theta)` linear in :math:`\theta` (``apply``)
and a convex loss :math:`\Phi(\theta) = \frac1n\sum_i\ell(q_i, P_i)`. Accelerated projected gradient (FISTA
with backtracking and a monotone restart: Beck & Teboulle 2009; O'Donoghue & Candès 2015), columns projected
onto the simplex by sorting (Duchi et al. 2008). Certificate: the Frank–Wolfe gap
:math:`\max_S\langle\nabla\Phi(\theta), \theta - S\rangle\ge\Phi(\theta) - \Phi^*` (Jaggi 2013), inflated by
a bound on the rounding of its own evaluation.

**Total variation on the mixture head** (:func:`fit_tv_mixture`). :math:`\min_A\frac1{2n}\sum_i\|Ah_i -
q_i\|_1` over column-stochastic :math:`A` is a linear programme, solved per student by HiGHS (an exact LP
solver; TV is not differentiable, so the batched first-order and Newton solvers do not certify it). The
certificate does not trust the LP solver: by duality, for every :math:`U` with :math:`|u_{iy}|\le 1`,

.. math::

    \Phi^* \ge L(U) = -\frac1{2n}\sum_i\langle u_i, q_i\rangle + \frac1{2n}\sum_j\min_y\sum_i u_{iy}h_{ij},

(:math:`\|r\|_1 = \max_{|u|\le1}\langle u, r\rangle` and :math:`\min\max\ge\max\min`), so
:math:`\Phi(A) - L(U)` bounds the gap of the returned :math:`A`; :math:`U` is read off the LP's duals and
clipped to the box, and the bound is evaluated in float64 with its rounding added.
"""

from __future__ import annotations

import numpy as np
import torch

from ..divergences import Loss
from ..heads import MixtureHead
from .conditioning import unit_roundoff_gamma
from .result import FitResult

__all__ = ["project_columns_to_simplex", "simplex_product_gap", "fit_simplex_product", "fit_mixture_generic",
           "fit_tv_mixture", "tv_dual_bound"]


def project_columns_to_simplex(V: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every column (axis -2) of ``V`` onto the simplex (Duchi et al. 2008)."""
    r = V.shape[-2]
    U, _ = torch.sort(V, dim=-2, descending=True)
    css = U.cumsum(dim=-2) - 1
    idx = torch.arange(1, r + 1, dtype=V.dtype, device=V.device).view(*([1] * (V.ndim - 2)), r, 1)
    cond = U - css / idx > 0
    rho = cond.to(V.dtype).cumsum(dim=-2).argmax(dim=-2, keepdim=True)  # last index where cond holds
    tau = css.gather(-2, rho) / (rho + 1).to(V.dtype)
    return (V - tau).clamp_min(0)




def simplex_product_gap(G: torch.Tensor, theta: torch.Tensor, count: int, magnitude: torch.Tensor | None = None
                        ) -> torch.Tensor:
    r"""Frank–Wolfe gap :math:`\sum_j(\sum_y G_{yj}\theta_{yj} - \min_y G_{yj})` per student, plus a bound on
    its rounding: each entry of ``G`` is off by at most :math:`\gamma_{count}` times ``magnitude`` (the sum of the
    absolute values of what was summed into it; ``|G|`` if not given), which moves the gap by at most
    :math:`2\sum_j\max_y\gamma\,\mathrm{magnitude}_{yj}`."""
    gap = MixtureHead.frank_wolfe_gap(G, theta)
    finite = torch.isfinite(G).all(dim=-1).all(dim=-1)
    mag = G.abs() if magnitude is None else magnitude
    rnd = 2 * unit_roundoff_gamma(count, G.dtype) * torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag)).amax(dim=-2).sum(-1)
    gap = gap + rnd + unit_roundoff_gamma(theta.shape[-2] + theta.shape[-1], G.dtype) * gap
    return torch.where(finite & ~torch.isnan(gap), gap, torch.full_like(gap, float("inf")))


def fit_simplex_product(apply, adjoint, teacher: torch.Tensor, loss: Loss, theta0: torch.Tensor, *,
                        tol: float = 1e-10, max_iter: int = 5000, check_every: int = 10, count: int = 64):
    r"""Minimise :math:`\frac1n\sum_i\ell(q_i, P_i)`, :math:`P = ` ``apply(theta)``, over columns of
    ``theta`` in the simplex; ``adjoint`` is the transpose of ``apply``. Returns
    ``(theta, probs, objective, gap, iterations)``, ``gap`` the certified Frank–Wolfe gap (``inf`` where
    the objective or its gradient is not finite at the returned point)."""
    threads = torch.get_num_threads()
    if teacher.numel() < 2**20 and teacher.device.type == "cpu":
        torch.set_num_threads(1)  # tiny products: thread start-up costs 1000x the arithmetic on a busy CPU
    try:
        return _fit_simplex_product(apply, adjoint, teacher, loss, theta0, tol, max_iter, check_every, count)
    finally:
        torch.set_num_threads(threads)


def _fit_simplex_product(apply, adjoint, teacher, loss, theta0, tol, max_iter, check_every, count):
    n = teacher.shape[-2]

    def value(th):
        return loss.per_sample(teacher, apply(th)).mean(-1)

    def gradient(th):
        return adjoint(loss.grad_student(teacher, apply(th))) / n

    def certified_gap(th):
        # Magnitude of what the gradient sums: the derivative's own terms are bounded by |l'| + |log p| + |log q|
        # + 2k (log-type and Mahalanobis-type derivatives with |M| <= 1; every loss this solver is given).
        P = apply(th)
        d = loss.grad_student(teacher, P)
        logs = torch.where(P > 0, P.log().abs(), torch.zeros_like(P)) + torch.where(teacher > 0, teacher.log().abs(),
                                                                                     torch.zeros_like(P))
        mag = adjoint(d.abs() + logs + 2 * P.shape[-1]) / n
        return simplex_product_gap(adjoint(d) / n, th, count, mag)

    B = theta0.shape[0]
    theta = theta0.clone()
    prev = theta.clone()
    f = value(theta)
    L = torch.ones(B, dtype=theta.dtype, device=theta.device)
    t = torch.ones(B, dtype=theta.dtype, device=theta.device)
    active = torch.ones(B, dtype=torch.bool, device=theta.device)
    iterations = torch.zeros(B, dtype=torch.long, device=theta.device)
    gap = torch.full((B,), float("inf"), dtype=theta.dtype, device=theta.device)
    view = (B,) + (1,) * (theta.ndim - 1)
    for it in range(max_iter):
        if it % check_every == 0:
            gap = certified_gap(theta)
            active = active & ~(gap <= tol)
            if not bool(active.any()):
                break
        t_next = (1 + torch.sqrt(1 + 4 * t**2)) / 2
        beta = ((t - 1) / t_next).view(view)
        y = theta + beta * (theta - prev)
        fy = value(y)
        bad = ~torch.isfinite(fy)
        y = torch.where(bad.view(view), theta, y)
        fy = torch.where(bad, f, fy)
        gy = gradient(y)
        gy = torch.where(torch.isfinite(gy), gy, torch.zeros_like(gy))
        Lk = L.clone()
        accepted = torch.zeros(B, dtype=torch.bool, device=theta.device)
        z = y
        for _ in range(60):
            z_try = project_columns_to_simplex(y - gy / Lk.view(view))
            fz = value(z_try)
            d = z_try - y
            bound = fy + (gy * d).flatten(1).sum(-1) + Lk / 2 * (d * d).flatten(1).sum(-1)
            ok = torch.isfinite(fz) & (fz <= bound + 1e-12 * (fy.abs() + 1e-12))
            ok = ok | ~active
            newly = ok & ~accepted
            z = torch.where(newly.view(view), z_try, z)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            Lk = torch.where(accepted, Lk, Lk * 2)
        fz = value(z)
        improve = active & accepted & (fz <= f)
        restart = active & ~improve
        prev = torch.where(improve.view(view), theta, prev)
        theta = torch.where(improve.view(view), z, theta)
        f = torch.where(improve, fz, f)
        t = torch.where(improve, t_next, torch.ones_like(t))
        prev = torch.where(restart.view(view), theta, prev)
        L = torch.where(active, Lk * 0.9, L)
        iterations = iterations + active.long()
    gap = certified_gap(theta)
    return theta, apply(theta), value(theta), gap, iterations


def fit_mixture_generic(X: torch.Tensor, Q: torch.Tensor, loss: Loss, *, tol: float = 1e-10,
                        max_iter: int = 5000) -> FitResult:
    """The mixture head :math:`F(x) = A h(x)` by :func:`fit_simplex_product` (for non-separable losses)."""
    B, n, k = Q.shape
    m = X.shape[-1]
    Xb = X.expand(B, n, m).contiguous() if X.ndim == 2 else X.contiguous()  # stride-0 matmul is slow

    def apply(A):
        return Xb @ A.transpose(-1, -2)

    def adjoint(D):
        return D.transpose(-1, -2) @ Xb

    A0 = torch.full((B, k, m), 1.0 / k, dtype=Q.dtype, device=Q.device)
    A, probs, obj, gap, iters = fit_simplex_product(apply, adjoint, Q, loss, A0, tol=tol, max_iter=max_iter,
                                                    count=4 * (n + m + k))
    grad = adjoint(loss.grad_student(Q, probs)) / n
    return FitResult(head="mixture", loss=loss.name, params={"A": A}, probs=probs, objective=obj, gap=gap,
                     certificate="frank_wolfe", grad_norm=grad.flatten(1).norm(dim=1), iterations=iters,
                     converged=gap <= tol, method="accelerated-projected-gradient", info={"tol": tol})


def tv_dual_bound(U: np.ndarray, features: np.ndarray, teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""The dual lower bound :math:`L(U)` on the optimal mean TV (module docstring) for ``U`` clipped to
    :math:`[-1, 1]`, with a bound on its rounding; arrays ``(B, n, k)`` and features ``(B, n, m)``."""
    U = np.clip(U, -1.0, 1.0)
    n, m, k = features.shape[-2], features.shape[-1], teacher.shape[-1]
    C = np.swapaxes(U, -1, -2) @ features  # (B, k, m): sum_i u_iy h_ij
    L = (-(U * teacher).sum(axis=(-1, -2)) + C.min(axis=-2).sum(-1)) / (2 * n)
    g = unit_roundoff_gamma(n + m + k + 4)
    magnitude = (np.abs(U) * teacher).sum(axis=(-1, -2)) + (np.abs(U).swapaxes(-1, -2) @ features).max(-2).sum(-1)
    return L, 2 * g * magnitude / (2 * n)


def _tv_lp_one(h: np.ndarray, q: np.ndarray):
    """One student's TV fit by HiGHS: variables A (k*m, row-major), t (n*k); returns A and the dual box point U."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix, hstack, identity, kron, vstack

    n, m = h.shape
    k = q.shape[1]
    # prediction P = h A^T: vec_{(i,y)} = sum_j h_ij A_yj -> matrix (n*k) x (k*m) = kron(h, I_k) with A col-major
    # Use A flattened as a[y*m + j]: P_iy = sum_j h_ij a[y*m+j] -> kron(I? ) built explicitly:
    Pmat = kron(csr_matrix(h), identity(k, format="csr"), format="csr")  # index (i*k + y, j*k + y)
    # reorder A's columns from (j*k + y) to (y*m + j): keep the (j, y) layout instead
    I_t = identity(n * k, format="csr")
    A_ub = vstack([hstack([Pmat, -I_t]), hstack([-Pmat, -I_t])], format="csr")
    b_ub = np.concatenate([q.ravel(), -q.ravel()])
    A_eq = hstack([kron(identity(m, format="csr"), csr_matrix(np.ones((1, k)))), csr_matrix((m, n * k))],
                  format="csr")
    b_eq = np.ones(m)
    c = np.concatenate([np.zeros(m * k), np.full(n * k, 1.0 / (2 * n))])
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on a TV fit: {res.message}")
    A = res.x[: m * k].reshape(m, k).T  # (k, m), entry (y, j) was at j*k + y
    lam = -res.ineqlin.marginals  # >= 0
    lam_plus, lam_minus = lam[: n * k].reshape(n, k), lam[n * k:].reshape(n, k)
    U = 2 * n * (lam_plus - lam_minus)
    return A, U


def fit_tv_mixture(X: torch.Tensor, Q: torch.Tensor, *, tol: float = 1e-10) -> FitResult:
    """TV on the mixture head: one HiGHS LP per student, certified by the dual bound (module docstring)."""
    B, n, k = Q.shape
    Xn = X.detach().cpu().numpy()
    Qn = Q.detach().cpu().numpy()
    Xb = np.broadcast_to(Xn, (B, n, Xn.shape[-1])) if Xn.ndim == 2 else Xn
    As, Us = [], []
    for b in range(B):
        A, U = _tv_lp_one(Xb[b], Qn[b])
        As.append(MixtureHead.project_to_class(A))
        Us.append(U)
    A = np.stack(As)
    probs = Xb @ np.swapaxes(A, -1, -2)
    objective = 0.5 * np.abs(probs - Qn).sum(-1).mean(-1)
    lower, rnd = tv_dual_bound(np.stack(Us), Xb, Qn)
    u = np.finfo(float).eps / 2
    obj_rnd = (n * k + Xb.shape[-1] + 4) * u * 2 * (0.5 * (np.abs(probs) + Qn).sum(-1).mean(-1))
    gap = np.maximum(objective - lower, 0) + rnd + obj_rnd
    t = lambda a: torch.as_tensor(a, dtype=Q.dtype, device=Q.device)  # noqa: E731
    return FitResult(head="mixture", loss="tv", params={"A": t(A)}, probs=t(probs), objective=t(objective),
                     gap=t(gap), certificate="duality",
                     grad_norm=torch.full((B,), float("nan"), dtype=Q.dtype, device=Q.device),
                     iterations=torch.ones(B, dtype=torch.long, device=Q.device), converged=t(gap) <= tol,
                     method="highs-lp", info={"tol": tol, "certificate": "LP dual bound (TV is not smooth)"})
