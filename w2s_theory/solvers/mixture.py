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
\ge \Phi(A) - \Phi^\star` over the product of simplices, computed in float64 at the returned point and
increased by a bound on the rounding error of that computation, so that it bounds the exact gap.
Where the teacher puts zero mass on a class, the reverse losses force the student to do the same
(any other choice has infinite loss): those entries of ``A`` are fixed at 0 before solving and the gap is
taken over the remaining face, which is exactly the set where the objective is finite.

Two layouts of the features are supported with one algorithm: one matrix per student, ``(B, n, m)``
(products are batched matrix products), or one matrix shared by all students, ``(n, m)`` — the common case
in a sweep, where many teachers (tasks, noise levels, losses) are fitted on one strong representation. Then
every product is a single large matrix product, and the ``B`` Hessians come from one product with the
precomputed symmetric outer products :math:`\mathrm{vec}_{\le}(h_ih_i^\top)`.

Reverse cross-entropy is linear in the student's probabilities, so its minimiser is a vertex given by one
call of the linear-minimisation oracle (gap exactly 0 up to rounding).
"""

from __future__ import annotations

import torch

from ..divergences import Loss
from ..heads import MixtureHead
from .result import FitResult

__all__ = ["fit_mixture_batched"]

_ARMIJO = 1e-4
_MAX_BACKTRACK = 40


class _StudentFeatures:
    """One feature matrix per student, ``(B, n, m)``: products are batched matrix products."""

    shared = False

    def __init__(self, X: torch.Tensor, hessian_dtype: torch.dtype, buffer=None):
        self.X = X
        self.n, self.m = X.shape[-2], X.shape[-1]
        self.hessian_dtype = hessian_dtype
        # Scratch space for sqrt(curvature) * X. Allocating B x n x m afresh every iteration costs more than
        # the product itself on CPU (page faults), so it is allocated once and sliced after compaction.
        self._buffer = buffer

    def take(self, keep: torch.Tensor) -> "_StudentFeatures":
        return _StudentFeatures(self.X[keep], self.hessian_dtype, self._buffer)

    def support_products(self, zero_teacher: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        support = (self.X[rows] > 0).to(zero_teacher.dtype)
        return torch.bmm(zero_teacher.transpose(1, 2), support)

    def predict(self, A: torch.Tensor) -> torch.Tensor:
        return MixtureHead.predict(A, self.X)

    def gradient(self, dphi: torch.Tensor) -> torch.Tensor:
        return torch.bmm(dphi.transpose(1, 2), self.X) / self.n

    def curvature_blocks(self, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\frac1n X^\top\mathrm{diag}(w_{\cdot c})X` for each column ``c`` of ``weights`` ``(b, n, c)``,
        as :math:`Y^\top Y` with :math:`Y = \sqrt{w}X` (weights are curvatures of convex losses, >= 0)."""
        X = self.X if rows is None else self.X[rows]
        if self._buffer is None:
            self._buffer = torch.empty(self.X.shape, dtype=self.hessian_dtype, device=self.X.device)
        Y = self._buffer[: X.shape[0]]
        blocks = []
        for c in range(weights.shape[-1]):
            Y.copy_(X)
            Y.mul_(weights[..., c : c + 1].clamp_min(0).sqrt().to(Y.dtype))
            blocks.append(torch.bmm(Y.transpose(1, 2), Y).to(torch.float64) / self.n)
        return torch.stack(blocks, dim=1)


class _SharedFeatures:
    """One feature matrix ``(n, m)`` for every student: products are single large matrix products."""

    shared = True

    def __init__(self, X: torch.Tensor, hessian_dtype: torch.dtype):
        self.X = X
        self.n, self.m = X.shape
        self.hessian_dtype = hessian_dtype
        self._iu, self._ju = torch.triu_indices(self.m, self.m, device=X.device)
        # Row i holds the upper triangle of h_i h_i^T: the Hessians of all students are then W @ Z.
        self._Z = (X[:, self._iu] * X[:, self._ju]).to(hessian_dtype)

    def take(self, keep: torch.Tensor) -> "_SharedFeatures":
        return self

    def support_products(self, zero_teacher: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        support = (self.X > 0).to(zero_teacher.dtype)
        return zero_teacher.transpose(1, 2) @ support

    def predict(self, A: torch.Tensor) -> torch.Tensor:
        B, k, m = A.shape
        return (self.X @ A.reshape(B * k, m).T).reshape(self.n, B, k).permute(1, 0, 2).contiguous()

    def gradient(self, dphi: torch.Tensor) -> torch.Tensor:
        B, n, k = dphi.shape
        return (dphi.transpose(1, 2).reshape(B * k, n) @ self.X).reshape(B, k, self.m) / n

    def curvature_blocks(self, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = weights.shape
        flat = weights.transpose(1, 2).reshape(b * c, n).to(self.hessian_dtype) @ self._Z
        flat = flat.to(torch.float64).reshape(b, c, -1) / n
        H = torch.zeros((b, c, self.m, self.m), dtype=torch.float64, device=weights.device)
        H[..., self._iu, self._ju] = flat
        H[..., self._ju, self._iu] = flat
        return H


def _allowed_entries(design, teacher: torch.Tensor, loss: Loss) -> torch.Tensor:
    """Entries of ``A`` that may be positive: for reverse losses, ``A[y, j] = 0`` whenever some sample with
    ``h_ij > 0`` has teacher mass ``q_iy = 0`` (any other choice has infinite loss)."""
    B, n, k = teacher.shape
    allowed = torch.ones((B, k, design.m), dtype=torch.bool, device=teacher.device)
    if not loss.pins_student_to_teacher_support:
        return allowed
    zero_teacher = teacher == 0
    rows = zero_teacher.any(dim=2).any(dim=1).nonzero()[:, 0]  # usually none: skip the product
    if rows.numel():
        products = design.support_products(zero_teacher[rows].to(design.X.dtype), rows)
        allowed[rows] = ~(products > 0)
    return allowed


def _teacher_for_derivatives(design, teacher, allowed, loss: Loss) -> torch.Tensor:
    """The teacher with entries zeroed where the student's prediction is 0 for *every* allowed head.

    Such a prediction is constant on the feasible face, so its (possibly infinite) derivative must not enter
    the gradient: the reverse losses' derivatives already treat teacher zeros as pinned entries, so zeroing
    the teacher there is exactly that. The objective itself always uses the real teacher.
    """
    if not loss.pins_student_to_teacher_support or bool(allowed.all()):
        return teacher
    reachable = design.predict(allowed.to(teacher.dtype)) > 0  # (B, n, k): some allowed entry reaches it
    return torch.where(reachable, teacher, torch.zeros_like(teacher))


def _evaluate(design, teacher, A, loss: Loss):
    """Student probabilities and mean loss per student."""
    probs = design.predict(A)
    return probs, loss.per_sample(teacher, probs).mean(dim=-1)


def _curvature_weights(teacher, probs, loss: Loss, k2_fast: bool):
    """Per-sample curvatures; for ``k = 2`` only their sum enters the reduced Hessian."""
    curv = loss.curvature_student(teacher, probs)
    if loss.pins_student_to_teacher_support:
        curv = torch.where(teacher > 0, curv, torch.zeros_like(curv))
    return curv[..., :1] + curv[..., 1:2] if k2_fast else curv


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
    """Projected-Newton direction ``D`` (``B, k, m``) with ``sum_y D[:, y, j] = 0``. ``H`` holds the curvature blocks (``B, k, m, m``; ``B, 1, m, m`` summed for ``k = 2``)."""
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
    return D


def _project_columns_to_simplex(V, allowed):
    """Euclidean projection of every column of ``V`` (``B, k, m``) onto the simplex of its allowed entries
    (Duchi et al. 2008, sort-based). Disallowed entries are set 2 below the column maximum first: the
    projection's threshold is at least ``max - 1``, so they come out exactly 0 and do not move it."""
    col_max = torch.where(allowed, V, torch.full_like(V, -float("inf"))).amax(dim=1, keepdim=True)
    V = torch.where(allowed, V, col_max - 2)
    u, _ = torch.sort(V, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    j = torch.arange(1, V.shape[1] + 1, dtype=V.dtype, device=V.device)[None, :, None]
    cond = u - css / j > 0
    rho = cond.to(V.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last index where cond holds
    theta = torch.gather(css, 1, rho) / (rho + 1).to(V.dtype)
    return torch.where(allowed, (V - theta).clamp_min(0), torch.zeros_like(V))


def _project_step(A, D, allowed, alpha):
    """Point on the projected arc ``P(A + alpha D)``, each column projected onto its simplex (for ``k = 2``
    this is the clip to ``[0, 1]`` of projected Newton for box constraints)."""
    return _project_columns_to_simplex(A + alpha[:, None, None] * D, allowed)


def _gradient_is_finite(teacher, probs, loss: Loss):
    """Reverse losses have an infinite derivative at ``p_y = 0 < q_y``: iterates stay off that boundary."""
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
    max_iter: int = 200,
    hessian_dtype: torch.dtype | None = None,
    hessian_reuse_step: float = 1e-3,
    A0: torch.Tensor | None = None,
    sub_batch_bytes: int | None = 2**27,
) -> FitResult:
    r"""Fit ``B`` mixture-head students at once and certify each with its Frank–Wolfe gap.

    Args:
        features: ``(B, n, m)`` or shared ``(n, m)``, rows in :math:`\Delta^m` (float64 recommended).
        teacher: ``(B, n, k)`` rows in :math:`\Delta^k`.
        loss: a :class:`~w2s_theory.divergences.Loss` that is convex in the student's probabilities.
        tol: stop a student once its certified gap is at most ``tol``.
        hessian_dtype: dtype of the Hessian products, the dominant cost. Default: float32 on CPU for
            per-student features (half the cost), the features' dtype otherwise. The gradient, objective
            and gap always stay in the features' dtype, so the certificate is unaffected: only the Newton
            direction is approximate, which costs at most an extra iteration.
        hessian_reuse_step: once a full Newton step moved no entry of ``A`` by more than this, the next
            iteration reuses the Hessian (the Shamanskii variant of Newton's method: still superlinear).
        A0: optional feasible warm start ``(B, k, m)``.
        sub_batch_bytes: per-student features on CPU are solved in sub-batches of about this many bytes of
            features (128 MiB): the arithmetic of a student does not depend on its batch, and on CPU one
            huge batch pays for fresh memory pages every iteration (measured: B = 1000, n = 2000, m = 64
            takes 3.6 s at once and 2.55 s in sub-batches of 125). ``None`` solves the batch at once.
    """
    if not loss.convex_in_probabilities:
        raise ValueError(f"loss {loss.name!r} is not convex in the student's probabilities")
    B, n, k = teacher.shape
    dev, dtype = teacher.device, features.dtype
    shared = features.ndim == 2
    if not shared and dev.type == "cpu" and sub_batch_bytes is not None:
        per_student = features[0].numel() * features.element_size()
        size = max(1, sub_batch_bytes // per_student)
        if B > size:
            return FitResult.concat([
                fit_mixture_batched(features[s : s + size], teacher[s : s + size], loss, tol=tol,
                                    max_iter=max_iter, hessian_dtype=hessian_dtype,
                                    hessian_reuse_step=hessian_reuse_step,
                                    A0=None if A0 is None else A0[s : s + size], sub_batch_bytes=None)
                for s in range(0, B, size)
            ])
    if hessian_dtype is None:
        hessian_dtype = torch.float32 if (dev.type == "cpu" and not shared) else dtype
    design = _SharedFeatures(features, hessian_dtype) if shared else _StudentFeatures(features, hessian_dtype)
    allowed = _allowed_entries(design, teacher, loss)
    feasible_problem = allowed.any(dim=1).all(dim=1)  # every column has a class it may use

    if A0 is None:
        A = allowed.to(dtype)
        A = A / A.sum(dim=1, keepdim=True).clamp_min(1)
    else:
        A = A0.to(dtype).clone()
    iterations = torch.zeros(B, dtype=torch.long, device=dev)

    if loss.linear_in_probabilities:
        # Reverse CE: Phi is linear in A, so one call of the linear-minimisation oracle is exact.
        probs = design.predict(A)
        G = design.gradient(loss.grad_student(_teacher_for_derivatives(design, teacher, allowed, loss), probs))
        A = MixtureHead.lmo(G, allowed)
        iterations += 1
        return _finish(design, teacher, A, loss, allowed, feasible_problem, iterations, tol)

    k2_fast = k == 2
    # Working set: the students still iterating. Compaction copies the per-student features, so for that
    # layout it waits until the set has thinned out; shared features cost nothing to compact.
    compact_below = 1.0 if shared else 0.6
    ws = torch.arange(B, device=dev)
    d, Q, al, Aw = design, teacher, allowed, A.clone()
    Qd = _teacher_for_derivatives(design, teacher, allowed, loss)
    Pw, Vw = _evaluate(d, Q, Aw, loss)
    running = feasible_problem.clone()
    H = None
    need_hessian = torch.ones(B, dtype=torch.bool, device=dev)
    for _ in range(max_iter):
        if not running.any():
            break
        if running.sum() < compact_below * running.numel():
            A[ws] = Aw
            keep = running.nonzero()[:, 0]
            ws, Q, Qd, al, Aw, Pw, Vw = (t[keep] for t in (ws, Q, Qd, al, Aw, Pw, Vw))
            d = d.take(keep)
            H = H[keep] if H is not None else None
            need_hessian, running = need_hessian[keep], running[keep]
        G = d.gradient(loss.grad_student(Qd, Pw))
        gap = MixtureHead.frank_wolfe_gap(G, Aw, al)
        running = running & ~(gap <= tol)
        if not running.any():
            break
        # Hessian: fresh where the last step was large, reused where Newton is already in its fast phase.
        fresh = need_hessian & running
        if fresh.any() or H is None:
            if H is None or fresh.sum() > 0.5 * fresh.numel():
                H_new = d.curvature_blocks(_curvature_weights(Qd, Pw, loss, k2_fast))
                H = H_new if H is None else torch.where(fresh[:, None, None, None], H_new, H)
            else:
                sel = fresh.nonzero()[:, 0]
                H[sel] = d.curvature_blocks(_curvature_weights(Qd[sel], Pw[sel], loss, k2_fast), sel)
        D = _newton_direction(G, Aw, H, al, gap.clamp(max=1e-2))
        D = D * running[:, None, None]

        # Armijo backtracking along the projected arc, only for running students; a rounding allowance keeps
        # the test meaningful once decreases reach the last bits of the objective.
        alpha = torch.ones(Aw.shape[0], dtype=dtype, device=dev)
        pending = running.clone()
        slack = 16 * torch.finfo(dtype).eps * (Vw.abs() + 1)
        A_old = Aw.clone()
        for _ in range(_MAX_BACKTRACK):
            todo = pending.nonzero()[:, 0]
            if todo.numel() == 0:
                break
            # Evaluate the whole working set (results of settled students are discarded) unless few are
            # pending: indexing per-student features copies them, which costs more than wasted products.
            if todo.numel() > 0.25 * pending.numel() and not d.shared:
                todo = torch.arange(pending.numel(), device=dev)
            full = todo.numel() == pending.numel()
            pick = (lambda t: t) if full else (lambda t: t[todo])  # noqa: E731
            dt = d if full else d.take(todo)
            trial = _project_step(pick(Aw), pick(D), pick(al), pick(alpha))
            Pt, Vt = _evaluate(dt, pick(Q), trial, loss)
            decrease = (pick(G) * (trial - pick(Aw))).sum(dim=(1, 2))
            ok = (
                torch.isfinite(Vt)
                & _gradient_is_finite(pick(Qd), Pt, loss)
                & (Vt <= pick(Vw) + _ARMIJO * decrease + pick(slack))
                & pending[todo]
            )
            hit = todo[ok]
            Aw[hit], Pw[hit], Vw[hit] = trial[ok], Pt[ok], Vt[ok]
            pending[hit] = False
            alpha[todo[~ok & pending[todo]]] *= 0.5
        stalled = pending  # no acceptable step: stop; the certificate at the current point still holds
        running = running & ~stalled
        step = (Aw - A_old).abs().amax(dim=(1, 2))
        need_hessian = (alpha < 1) | (step > hessian_reuse_step)
        iterations[ws[running | stalled]] += 1
    A[ws] = Aw
    return _finish(design, teacher, A, loss, allowed, feasible_problem, iterations, tol)


def _gamma(count: int, dtype) -> float:
    u = torch.finfo(dtype).eps / 2
    return count * u / (1 - count * u)


def _gap_rounding_bound(design, dphi, gap):
    r"""Bound on the floating-point error of the computed Frank–Wolfe gap, added to it so that the reported
    certificate bounds the *exact* gap of the returned head (Higham, *Accuracy and Stability*, §3.1).

    :math:`G = \frac1n\sum_i \ell'(q_i, p_i)h_i^\top` with :math:`p_i = Ah_i` a sum of :math:`m` non-negative
    products (relative error :math:`\le\gamma_m`); each derivative
    :math:`\ell'\in\{\log(p/q)+1, -q/p, -\log q, 2(p-q)\}` is then off by at most
    :math:`\gamma_{m+4}(|\ell'| + 2)`, so :math:`G` by :math:`\varepsilon = \gamma_{n+m+4}\frac1n\sum_i
    (|\ell'_i| + 2)h_i^\top` entrywise. The columns of :math:`A` lie in the simplex, so the gap moves by at
    most :math:`2\sum_j\max_y\varepsilon_{yj}`, plus :math:`\gamma_{k+m}` times itself for its own sums.
    Without it an interior optimum, where Theorem 2 is an equality, is undecidable: slack and gap both sit at
    the level of rounding.
    """
    n, m, k = design.n, design.m, dphi.shape[-1]
    magnitude = torch.where(torch.isfinite(dphi), dphi.abs(), torch.zeros_like(dphi)) + 2
    eps_G = _gamma(n + m + 4, dphi.dtype) * design.gradient(magnitude)  # features are >= 0: |X| = X
    return 2 * eps_G.amax(dim=1).sum(dim=-1) + _gamma(k + m, dphi.dtype) * gap


def _finish(design, teacher, A, loss, allowed, feasible_problem, iterations, tol) -> FitResult:
    """Objective and certificate at the returned point, recomputed from scratch in the features' dtype; the
    certificate includes a bound on the rounding of its own evaluation (:func:`_gap_rounding_bound`)."""
    probs, value = _evaluate(design, teacher, A, loss)
    dphi = loss.grad_student(_teacher_for_derivatives(design, teacher, allowed, loss), probs)
    G = design.gradient(dphi)
    gap = MixtureHead.frank_wolfe_gap(G, A, allowed)
    gap = gap + _gap_rounding_bound(design, dphi, gap)
    inf = torch.full_like(gap, float("inf"))
    gap = torch.where(feasible_problem & ~torch.isnan(gap), gap, inf)
    value = torch.where(feasible_problem, value, inf)
    # Norm of the reduced gradient (gradient minus its column-wise mean over allowed classes), for the record.
    Gm = torch.where(allowed, G, torch.zeros_like(G))
    centred = Gm - Gm.sum(dim=1, keepdim=True) / allowed.sum(dim=1, keepdim=True).clamp_min(1)
    grad_norm = torch.where(allowed, centred, torch.zeros_like(G)).flatten(1).norm(dim=1)
    return FitResult(
        head="mixture", loss=loss.name, params={"A": A}, probs=probs, objective=value, gap=gap,
        certificate="frank_wolfe", grad_norm=grad_norm, iterations=iterations, converged=gap <= tol,
        method="projected-newton" if not loss.linear_in_probabilities else "linear-minimisation-oracle",
        info={"shared_features": design.shared, "tol": tol},
    )
