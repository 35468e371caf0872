r"""Batched, certified fit of the mixture head :math:`F(x) = A h(x)` on CPU or GPU.

Problem, for each of ``B`` students independently (``features`` :math:`h_i\in\Delta^m`, teacher
:math:`q_i\in\Delta^k`, a loss :math:`\ell` separable over classes):

.. math::

    \min_{A\in\mathbb R^{k\times m}} \Phi(A) = \frac1n\sum_{i=1}^n \ell\big(q_i,\; A h_i\big)
    \quad\text{s.t.}\quad A_{:,j}\in\Delta^k\ \ (j=1..m).

Method: projected Newton in reduced coordinates (Bertsekas 1982, "Projected Newton methods for optimization
problems with simple constraints"). In each column the largest entry is eliminated through the column-sum
constraint, which leaves a problem with lower bounds only near the solution; entries at 0 whose reduced
gradient pushes outwards are held at 0, the rest take a Newton step with the exact Hessian
:math:`\nabla^2\Phi = \bigoplus_y \tfrac1n X^\top\mathrm{diag}(\ell''_y) X` (the losses here have diagonal
curvature in the class probabilities). Steps follow the projected arc with an Armijo rule.

Certificate: the Frank–Wolfe gap :math:`g(A) = \max_{S}\langle\nabla\Phi(A), A - S\rangle
\ge \Phi(A) - \Phi^\star` over the product of simplices, computed in float64 at the returned point.
Where the teacher puts zero mass on a class, the reverse losses force the student to do the same
(any other choice has infinite loss): those entries of ``A`` are fixed at 0 before solving and the gap is
taken over the remaining face, which is exactly the set where the objective is finite.

Reverse cross-entropy is linear in the student's probabilities, so its minimiser is a vertex given by one
call of the linear-minimisation oracle (gap exactly 0 up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..divergences import Loss
from ..heads import MixtureHead

__all__ = ["MixtureFit", "fit_mixture_batched"]

_ARMIJO = 1e-4
_MAX_BACKTRACK = 40


@dataclass
class MixtureFit:
    """Result of a batched mixture-head fit; every tensor has the batch axis first."""

    A: torch.Tensor  # (B, k, m) column-stochastic
    probs: torch.Tensor  # (B, n, k)
    objective: torch.Tensor  # (B,) mean loss at A
    gap: torch.Tensor  # (B,) certified Frank-Wolfe gap >= objective - optimum (inf if infeasible)
    iterations: torch.Tensor  # (B,) Newton iterations used
    converged: torch.Tensor  # (B,) bool: gap <= tol


def _allowed_entries(features: torch.Tensor, teacher: torch.Tensor, loss: Loss) -> torch.Tensor:
    """Entries of ``A`` that may be positive: for reverse losses, ``A[y, j] = 0`` whenever some sample with
    ``h_ij > 0`` has teacher mass ``q_iy = 0``."""
    B, n, m = features.shape
    k = teacher.shape[-1]
    allowed = torch.ones((B, k, m), dtype=torch.bool, device=features.device)
    if not loss.pins_student_to_teacher_support:
        return allowed
    zero_teacher = teacher == 0
    with_zeros = zero_teacher.any(dim=2).any(dim=1).nonzero()[:, 0]  # usually none: skip the product
    if with_zeros.numel():
        zt = zero_teacher[with_zeros].to(features.dtype)
        support = (features[with_zeros] > 0).to(features.dtype)
        allowed[with_zeros] = ~(torch.bmm(zt.transpose(1, 2), support) > 0)
    return allowed


def _objective(features, teacher, A, loss: Loss):
    probs = MixtureHead.predict(A, features)
    return probs, loss.per_sample(teacher, probs).mean(dim=-1)


def _derivatives(features, teacher, probs, loss: Loss, allowed):
    n = features.shape[-2]
    dphi = loss.grad_student(teacher, probs)  # (B, n, k)
    G = torch.bmm(dphi.transpose(1, 2), features) / n  # (B, k, m)
    return dphi, G


def _curvature_blocks(features, curv, k2_fast: bool, buffer=None):
    r"""Blocks :math:`H_y = \frac1n X^\top\mathrm{diag}(\ell''_{\cdot y})X` (``B, k, m, m``) in float64.

    For ``k = 2`` only :math:`H_0 + H_1` is ever needed (see :func:`_newton_direction`), so one product with
    the summed curvature replaces two: returned as ``(B, 1, m, m)``. Each block is :math:`Y^\top Y` with
    :math:`Y = \sqrt{\ell''}\,X` (curvatures are non-negative for convex losses). ``Y`` is written into
    ``buffer``, whose dtype sets the precision of the product (float32 halves its cost and only makes the
    Newton direction approximate); a fresh ``B x n x m`` array every iteration would cost more than the
    product itself on CPU.
    """
    B, n, m = features.shape
    weights = (curv[..., :1] + curv[..., 1:2]) if k2_fast else curv
    Y = torch.empty_like(features) if buffer is None else buffer[:B]
    blocks = []
    for y in range(weights.shape[-1]):
        Y.copy_(features)
        Y.mul_(weights[..., y : y + 1].clamp_min(0).sqrt().to(Y.dtype))
        blocks.append(torch.bmm(Y.transpose(1, 2), Y).to(torch.float64) / n)
    return torch.stack(blocks, dim=1)


def _reduced_hessian_general(H, basis_onehot):
    r"""Hessian in reduced coordinates, all ``k*m`` entries indexed (basis rows are masked by the caller):
    :math:`\tilde H_{(c,j),(c',j')} = \delta_{cc'}H_c - E_{cj'}H_c - E_{c'j}H_{c'} + \sum_y E_{yj}E_{yj'}H_y`
    at :math:`[j,j']`, with :math:`E` the indicator of each column's basis (eliminated) class."""
    B, k, m, _ = H.shape
    E = basis_onehot.to(torch.float64)
    eye_k = torch.eye(k, dtype=torch.float64, device=H.device)
    T = eye_k[None, :, None, :, None] * H[:, :, :, None, :]
    T = T - (E[:, :, None, :] * H)[:, :, :, None, :]
    T = T - (E.transpose(1, 2)[:, :, :, None] * H.permute(0, 2, 1, 3))[:, None]
    T = T + torch.einsum("byj,byl,byjl->bjl", E, E, H)[:, None, :, None, :]
    return T.reshape(B, k * m, k * m)


def _masked_newton_solve(H, rhs, free):
    """Solve ``H_FF d_F = rhs_F`` (``d = 0`` off ``free``) for a batch, by Cholesky with a tiny relative ridge
    that makes exactly singular blocks (features never used) solvable; failures get more damping."""
    f = free.to(torch.float64)
    M = H * f[:, :, None]
    M.mul_(f[:, None, :])
    diag = torch.diagonal(M, dim1=1, dim2=2)
    scale = diag.abs().amax(dim=1).clamp_min(1e-300)
    base_diag = diag + (1 - f)  # identity on fixed coordinates
    rhs = rhs * f
    d = rhs / scale[:, None]  # scaled gradient: the fallback if every damping fails
    todo = None
    for damping in (1e-13, 1e-9, 1e-5, 1e-1):
        Mt = M if todo is None else M[todo]
        torch.diagonal(Mt, dim1=1, dim2=2).copy_((base_diag if todo is None else base_diag[todo])
                                                 + damping * (scale if todo is None else scale[todo])[:, None])
        L, info = torch.linalg.cholesky_ex(Mt)
        ok = info == 0
        idx = torch.arange(M.shape[0], device=M.device) if todo is None else todo
        if ok.all():
            d[idx] = torch.cholesky_solve(rhs[idx][..., None], L)[..., 0]
            todo = idx[:0]
            break
        if ok.any():
            d[idx[ok]] = torch.cholesky_solve(rhs[idx[ok]][..., None], L[ok])[..., 0]
        todo = idx[~ok]
    return d * f


def _newton_direction(G, A, H, allowed, eps):
    """Projected-Newton direction ``D`` (``B, k, m``) with ``sum_y D[:, y, j] = 0``, plus the masks that define
    the projected arc. ``H`` comes from :func:`_curvature_blocks`."""
    B, k, m = A.shape
    basis = torch.where(allowed, A, torch.full_like(A, -1.0)).argmax(dim=1)  # largest allowed entry
    is_basis = torch.zeros_like(allowed).scatter_(1, basis[:, None, :], True)
    R = G - torch.gather(G, 1, basis[:, None, :])  # reduced gradient, 0 on the basis
    nonbasic = allowed & ~is_basis
    active = nonbasic & (A <= eps[:, None, None]) & (R > 0)  # at 0 and pushed outwards: stays at 0
    free = nonbasic & ~active
    if k == 2:
        # One non-basic entry per column, c(j) = 1 - b(j); the reduced Hessian is s s^T * (H_0 + H_1) with
        # s_j = +1 where the non-basic class is 0 and -1 where it is 1.
        other = (1 - basis)[:, None, :]
        r = torch.gather(R, 1, other)[:, 0]
        f = torch.gather(free, 1, other)[:, 0]
        s = torch.where(basis == 1, 1.0, -1.0).to(torch.float64)
        Hm = H[:, 0] * s[:, :, None] * s[:, None, :]
        u = _masked_newton_solve(Hm, -r, f)
        D = torch.zeros_like(A).scatter_(1, other, u[:, None, :].to(A.dtype))
    else:
        H_red = _reduced_hessian_general(H, is_basis)
        u = _masked_newton_solve(H_red, -R.reshape(B, k * m), free.reshape(B, k * m))
        D = u.reshape(B, k, m).to(A.dtype)
    D = torch.where(active, -A, D)
    D = D - is_basis * D.sum(dim=1, keepdim=True)  # basis entry keeps the column sum fixed
    return D, nonbasic, is_basis


def _project_step(A, D, nonbasic, is_basis, alpha):
    """Point on the projected arc: non-basic entries clipped at 0, basis entry closes the column."""
    trial = torch.where(nonbasic, (A + alpha[:, None, None] * D).clamp_min(0), torch.zeros_like(A))
    basis_value = 1 - trial.sum(dim=1, keepdim=True)
    trial = torch.where(is_basis, basis_value.expand_as(A), trial)
    feasible = (basis_value >= 0).all(dim=2).all(dim=1)
    return trial, feasible


def _gradient_is_finite(teacher, probs, loss: Loss):
    """Reverse losses have :math:`\\partial\\ell/\\partial p_y = -\\infty` at ``p_y = 0 < q_y``: stay off it."""
    if not loss.pins_student_to_teacher_support or loss.linear_in_probabilities:
        return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    bad = (probs <= 0) & (teacher > 0)
    return ~bad.any(dim=2).any(dim=1)


def fit_mixture_batched(
    features: torch.Tensor,
    teacher: torch.Tensor,
    loss: Loss,
    *,
    tol: float = 1e-10,
    max_iter: int = 100,
    hessian_dtype: torch.dtype | None = None,
    hessian_reuse_step: float = 1e-3,
    A0: torch.Tensor | None = None,
) -> MixtureFit:
    r"""Fit ``B`` mixture-head students at once and certify each with its Frank–Wolfe gap.

    Args:
        features: ``(B, n, m)`` rows in :math:`\Delta^m` (float64 recommended).
        teacher: ``(B, n, k)`` rows in :math:`\Delta^k`.
        loss: a :class:`~w2s_theory.divergences.Loss` that is convex in the student's probabilities.
        tol: stop a student once its certified gap is at most ``tol``.
        hessian_dtype: dtype of the Hessian products (the dominant cost). ``float32`` halves their cost; the
            gradient, objective and gap stay in the features' dtype, so the certificate is unaffected and
            only the Newton direction is approximate.
        hessian_reuse_step: once a full Newton step moved no entry of ``A`` by more than this, the next
            iteration reuses the Hessian (the Shamanskii variant of Newton's method: still superlinear).
        A0: optional feasible warm start ``(B, k, m)``.
    """
    if not loss.convex_in_probabilities:
        raise ValueError(f"loss {loss.name!r} is not convex in the student's probabilities")
    B, n, m = features.shape
    k = teacher.shape[-1]
    dev = features.device
    allowed = _allowed_entries(features, teacher, loss)
    feasible_problem = allowed.any(dim=1).all(dim=1)  # every column has a class it may use

    if A0 is None:
        A = allowed.to(features.dtype)
        A = A / A.sum(dim=1, keepdim=True).clamp_min(1)
    else:
        A = A0.to(features.dtype).clone()
    iterations = torch.zeros(B, dtype=torch.long, device=dev)

    if loss.linear_in_probabilities:
        probs = MixtureHead.predict(A, features)
        _, G = _derivatives(features, teacher, probs, loss, allowed)
        A = MixtureHead.lmo(G, allowed)
        iterations += 1
        return _finish(features, teacher, A, loss, allowed, feasible_problem, iterations, tol)

    h_dtype = hessian_dtype or features.dtype

    # Working set: the students still iterating. It is compacted (one copy) only when it has thinned out,
    # so that most iterations index nothing.
    ws = torch.arange(B, device=dev)
    X, Q, al = features, teacher, allowed
    Aw = A.clone()
    Pw, Vw = _objective(X, Q, Aw, loss)
    running = feasible_problem.clone()
    H = None
    buffer = torch.empty(features.shape, dtype=h_dtype, device=dev)
    need_hessian = torch.ones(B, dtype=torch.bool, device=dev)
    for _ in range(max_iter):
        if not running.any():
            break
        if running.sum() < 0.6 * running.numel():
            A[ws] = Aw
            keep = running
            ws, X, Q, al, Aw, Pw, Vw = (t[keep] for t in (ws, X, Q, al, Aw, Pw, Vw))
            H, need_hessian, running = H[keep] if H is not None else None, need_hessian[keep], running[keep]
        _, G = _derivatives(X, Q, Pw, loss, al)
        gap = MixtureHead.frank_wolfe_gap(G, Aw, al)
        running = running & ~(gap <= tol)
        if not running.any():
            break
        # Hessian: fresh where the last step was large, reused where Newton is already in its fast phase.
        fresh = need_hessian & running
        if fresh.any():
            curv = loss.curvature_student(Q, Pw)
            if loss.pins_student_to_teacher_support:
                curv = torch.where(Q > 0, curv, torch.zeros_like(curv))
            if fresh.sum() > 0.5 * fresh.numel() or H is None:
                H_new = _curvature_blocks(X, curv, k == 2, buffer)
                H = H_new if H is None else torch.where(fresh[:, None, None, None], H_new, H)
            else:
                sel = fresh.nonzero()[:, 0]
                H[sel] = _curvature_blocks(X[sel], curv[sel], k == 2, buffer)
        D, nonbasic, is_basis = _newton_direction(G, Aw, H, al, gap.clamp(max=1e-2))
        D = D * running[:, None, None]

        # Armijo backtracking along the projected arc, only for running students; a rounding allowance keeps
        # the test meaningful once decreases reach the last bits of the objective.
        alpha = torch.ones(Aw.shape[0], dtype=features.dtype, device=dev)
        pending = running.clone()
        slack = 16 * torch.finfo(features.dtype).eps * (Vw.abs() + 1)
        A_old = Aw.clone()
        for _ in range(_MAX_BACKTRACK):
            todo = pending.nonzero()[:, 0]
            if todo.numel() == 0:
                break
            # Evaluate the whole working set (results of settled students are discarded) unless few are
            # pending: indexing copies the features, which costs more than the wasted products.
            if todo.numel() > 0.25 * pending.numel():
                todo = torch.arange(pending.numel(), device=dev)
            full = todo.numel() == pending.numel()
            pick = (lambda t: t) if full else (lambda t: t[todo])
            trial, feas = _project_step(pick(Aw), pick(D), pick(nonbasic), pick(is_basis), pick(alpha))
            Pt, Vt = _objective(pick(X), pick(Q), trial, loss)
            decrease = (pick(G) * (trial - pick(Aw))).sum(dim=(1, 2))
            ok = (
                feas
                & torch.isfinite(Vt)
                & _gradient_is_finite(pick(Q), Pt, loss)
                & (Vt <= pick(Vw) + _ARMIJO * decrease + pick(slack))
            )
            ok = ok & pending[todo]
            hit = todo[ok]
            Aw[hit], Pw[hit], Vw[hit] = trial[ok], Pt[ok], Vt[ok]
            pending[hit] = False
            alpha[todo[~ok & pending[todo]]] *= 0.5
        stalled = pending  # no acceptable step: stop, the certificate at the current point still holds
        running = running & ~stalled
        step = (Aw - A_old).abs().amax(dim=(1, 2))
        need_hessian = (alpha < 1) | (step > hessian_reuse_step)
        iterations[ws[running | stalled]] += 1
    A[ws] = Aw
    return _finish(features, teacher, A, loss, allowed, feasible_problem, iterations, tol)


def _finish(features, teacher, A, loss, allowed, feasible_problem, iterations, tol) -> MixtureFit:
    probs, value = _objective(features, teacher, A, loss)
    _, G = _derivatives(features, teacher, probs, loss, allowed)
    gap = MixtureHead.frank_wolfe_gap(G, A, allowed)
    inf = torch.full_like(gap, float("inf"))
    gap = torch.where(feasible_problem, gap, inf)
    value = torch.where(feasible_problem, value, inf)
    gap = torch.where(torch.isnan(gap), inf, gap)
    return MixtureFit(A=A, probs=probs, objective=value, gap=gap, iterations=iterations, converged=gap <= tol)
