r"""Exact reference solvers (cvxpy + Clarabel), one student at a time, for checking the batched solvers.

Problem, for one student (features :math:`h_i`, teacher :math:`q_i\in\Delta^k`, a loss :math:`\ell` from
:data:`w2s_theory.divergences.LOSSES`):

.. math::

    \min_{F\in\mathcal F}\ \Phi(F) = \frac1n\sum_{i=1}^n \ell\big(q_i,\ F(h_i)\big)

over the **mixture** head :math:`F(h) = A h` (:math:`A` column-stochastic, :math:`h_i\in\Delta^m`) or the
**linear** head :math:`F(h) = W h + b` with :math:`F(h_i)\ge\gamma` entrywise and
:math:`\mathbf 1^\top F(h_i) = 1` on the sample (docs/theory.md, "Head geometries").

The conic program is stated declaratively and solved by an interior-point method: reverse KL as
:math:`\sum\mathrm{rel\_entr}(P, q) = -\sum\mathrm{entr}(P) - \sum P\log q`, forward KL as
:math:`-\sum q\log P` plus a constant, reverse CE as the linear :math:`-\sum P\log q`, squared loss as
``sum_squares``, all divided by :math:`n`. Only the status ``"optimal"`` is accepted (:class:`SolverError`
otherwise). Its answer is **not** taken
on trust: interior-point solutions are slightly infeasible (entries of ``-1e-10``, column sums of
``1 ± 1e-9``), and an infeasible point can have an objective *below* the optimum. So every solution is first
mapped into the class, and the objective and the Frank–Wolfe certificate (Jaggi 2013)

.. math:: g(F) = \max_{S\in\mathcal F}\langle\nabla\Phi(F), F - S\rangle \ \ge\ \Phi(F) - \min_{\mathcal F}\Phi

are evaluated by us, with :mod:`w2s_theory.divergences`, at that feasible point. For the mixture head the
maximum is a closed form (:meth:`MixtureHead.frank_wolfe_gap`); for the linear head it is a linear program
over a polyhedron in prediction space, solved by HiGHS, and its value is bounded rigorously through the LP
dual (weak duality), so the certificate stays an upper bound even if the LP solution is slightly off.

Teacher zeros: under the reverse losses, a student with :math:`F_y(h_i) > 0 = q_{iy}` has infinite loss, so
those entries are pinned to 0 and the problem (and its certificate) lives on the face where the objective is
finite — the same convention as the batched solver's ``allowed`` mask. Where no member of the class has a
finite loss the answer is ``objective = gap = +inf``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .._backend import to_numpy
from ..divergences import get_loss
from ..heads import MixtureHead
from .result import FitResult

__all__ = ["SolverError", "fit_reference", "fit_reference_batch", "linear_head_lmo"]

#: Losses with a cvxpy formulation, for both the mixture and the linear head.
REFERENCE_LOSSES = ("forward_kl", "forward_ce", "reverse_kl", "reverse_ce", "squared")

#: The linear head's floor must hold with this margin before the outputs are recomputed from parameters:
#: ``U @ C`` has an absolute rounding error of about ``1e-16`` on O(1) numbers.
_FLOOR_MARGIN = 1e-13
#: An entry counts as strictly positive on the face once some feasible point puts this much on it.
_POSITIVE = 1e-9
_HIGHS_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
#: Clarabel's gap and feasibility tolerances, tried in this order until one ends "optimal".
_CLARABEL_TOLERANCES = (1e-12, 1e-11, 1e-10, 1e-9, 1e-8)


class SolverError(RuntimeError):
    """The reference solver did not certify an optimum (status other than ``"optimal"``, or a failed LP)."""


# --------------------------------------------------------------------------------------------------------
# The loss as a cvxpy expression.
# --------------------------------------------------------------------------------------------------------


def _cvxpy_objective(P, teacher: np.ndarray, loss: str, live: np.ndarray):
    r""":math:`\sum_i \ell(q_i, P_i)` as a convex cvxpy expression in the prediction matrix ``P`` ``(n, k)``.

    ``live`` marks the entries whose loss term is present: under the reverse losses, entries pinned to 0
    contribute exactly 0 (:math:`0\log 0 = 0`) and are left out so that no cone sits on its boundary.
    Constants (the teacher's entropy) are included so that the solver's value is the objective itself.
    """
    import cvxpy as cp

    n, k = teacher.shape
    if loss == "squared":
        return cp.sum_squares(P - teacher)
    flat = cp.reshape(P, (n * k,), order="C")
    q = teacher.reshape(-1)
    if loss in ("forward_kl", "forward_ce"):
        # Terms with q = 0 are identically 0: only q > 0 entries carry -q log p.
        sel = np.flatnonzero(q > 0)
        cross = -cp.sum(cp.multiply(q[sel], cp.log(flat[sel])))
        if loss == "forward_ce":
            return cross
        return cross + float(np.sum(q[sel] * np.log(q[sel])))
    sel = np.flatnonzero(live.reshape(-1))
    if sel.size == 0:
        return cp.Constant(0.0)
    # Live entries all have q > 0 (teacher zeros are pinned, hence not live).
    linear = -cp.sum(cp.multiply(np.log(q[sel]), flat[sel]))  # CE(P, q) = -sum P log q
    if loss == "reverse_ce":
        return linear
    return -cp.sum(cp.entr(flat[sel])) + linear  # KL(P||q) = sum P log P - P log q


def _solve(problem, solver: str, solver_options: dict | None):
    """Solve and insist on ``"optimal"``; anything else (``optimal_inaccurate`` included) is an error.

    Without ``solver_options``, Clarabel is asked for tight tolerances first (its default ``1e-8`` leaves
    Frank–Wolfe gaps near ``1e-5``) and, where that ends in ``optimal_inaccurate`` or a solver failure, the
    problem is solved again with looser ones. A non-optimal answer is never used; only an ``"optimal"`` one is.
    """
    import cvxpy as cp

    if solver_options is not None:
        ladder = [dict(solver_options)]
    elif solver == "CLARABEL":
        ladder = [dict(tol_gap_abs=t, tol_gap_rel=t, tol_feas=t, tol_ktratio=min(1e-6, 1e4 * t))
                  for t in _CLARABEL_TOLERANCES]
    else:
        ladder = [{}]
    statuses = []
    for options in ladder:
        try:
            with warnings.catch_warnings():
                # cvxpy warns "solution may be inaccurate" for non-optimal statuses; the status check below
                # turns those into an error (or a retry), so the warning adds nothing.
                warnings.simplefilter("ignore", UserWarning)
                problem.solve(solver=solver, **options)
            status = problem.status
        except cp.error.SolverError as e:
            status = f"solver_error ({e})"
        statuses.append(status)
        if status == cp.OPTIMAL:
            stats = problem.solver_stats
            iters = stats.num_iters if stats is not None and stats.num_iters is not None else -1
            return {"solver_value": float(problem.value), "status": status, "num_iters": int(iters),
                    "solver_options": options, "statuses_tried": statuses}
    raise SolverError(f"cvxpy/{solver} returned status {statuses[-1]!r}, not 'optimal' (tried: {statuses}); "
                      "the reference refuses to use a non-optimal result")


# --------------------------------------------------------------------------------------------------------
# Mixture head.
# --------------------------------------------------------------------------------------------------------


def _mixture_allowed(features: np.ndarray, teacher: np.ndarray, pins: bool) -> np.ndarray:
    """``(k, m)`` entries of ``A`` that may be positive: under the reverse losses ``A[y, j] = 0`` whenever a
    sample with ``h_ij > 0`` has ``q_iy = 0`` (same rule as the batched solver)."""
    k, m = teacher.shape[1], features.shape[1]
    if not pins:
        return np.ones((k, m), dtype=bool)
    return ~(((teacher == 0).T.astype(float) @ (features > 0).astype(float)) > 0)


def _mixture_forced_zero(features: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``(n, k)`` predictions that are 0 for every ``A`` on the face: all of ``h_i``'s support is pinned in row y."""
    return ((features > 0).astype(float) @ allowed.T.astype(float)) == 0


def _mixture_gradient(features, teacher, A, loss_obj, forced_zero):
    r""":math:`\nabla_A\Phi = \frac1n (\partial\ell/\partial P)^\top X`, with the terms of predictions that are 0
    on the whole face dropped (they do not depend on ``A`` there; their derivative may be :math:`-\infty`)."""
    n = features.shape[0]
    probs = features @ A.T
    with np.errstate(divide="ignore", invalid="ignore"):  # an infinite derivative gives inf or NaN entries of G
        dphi = loss_obj.grad_student(teacher, probs)
        dphi = np.where(forced_zero, 0.0, dphi)
        return probs, dphi.T @ features / n


def _fit_mixture(features, teacher, loss, solver, solver_options):
    import cvxpy as cp

    loss_obj = get_loss(loss)
    n, m = features.shape
    k = teacher.shape[1]
    allowed = _mixture_allowed(features, teacher, loss_obj.pins_student_to_teacher_support)
    if not allowed.any(axis=0).all():
        # Some column j has no class it may use: every A gives some sample infinite loss.
        return _infeasible("mixture", loss, n, m, k)
    forced_zero = _mixture_forced_zero(features, allowed)
    live = (teacher > 0) & ~forced_zero

    A_var = cp.Variable((k, m), nonneg=True)
    constraints = [cp.sum(A_var, axis=0) == 1]
    if not allowed.all():
        constraints.append(cp.multiply((~allowed).astype(float), A_var) == 0)
    P = features @ A_var.T
    problem = cp.Problem(cp.Minimize(_cvxpy_objective(P, teacher, loss, live) / n), constraints)
    info = _solve(problem, solver, solver_options)

    # Into the class: disallowed entries exactly 0, clip the -1e-10s, renormalise the columns.
    A = MixtureHead.project_to_class(np.where(allowed, A_var.value, 0.0))
    probs, G = _mixture_gradient(features, teacher, A, loss_obj, forced_zero)
    objective = float(np.mean(loss_obj.per_sample(teacher, probs)))
    with np.errstate(invalid="ignore"):  # inf - inf in such a G: NaN, read as no certificate below
        gap = float(MixtureHead.frank_wolfe_gap(G, A, allowed))
        # Gradient component that moves mass within a column (its allowed-entry mean removed).
        Gc = np.where(allowed, G - (np.where(allowed, G, 0).sum(0) / allowed.sum(0))[None, :], 0.0)
    gap = gap if not np.isnan(gap) else np.inf  # an infinite derivative inside the face: no certificate
    return _result("mixture", loss, {"A": A}, probs, objective, gap, float(np.linalg.norm(Gc)), info)


# --------------------------------------------------------------------------------------------------------
# Linear head, in prediction space: P = Z Θ with Z = [X, 1]; we use an orthonormal basis U of span(Z), so
# P = U C with C (r, k), and the row-sum constraint P 1 = 1 is exactly C 1 = U^T 1 (1 lies in span(U)).
# --------------------------------------------------------------------------------------------------------


class _LinearBasis:
    """Orthonormal basis of the span of ``[X, 1]`` and the maps between ``C`` and ``(W, b)``."""

    def __init__(self, features: np.ndarray):
        n, m = features.shape
        Z = np.concatenate([features, np.ones((n, 1))], axis=1)
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        rank = int(np.sum(s > s[0] * max(Z.shape) * np.finfo(float).eps))
        self.U, self.s, self.Vt = U[:, :rank], s[:rank], Vt[:rank]
        self.ones = self.U.T @ np.ones(n)  # U^T 1: the row sums of P = U C are 1 iff C 1 = this
        self.n, self.m, self.r = n, m, rank

    def params(self, C: np.ndarray):
        """``(W, b)`` with ``[X, 1] [W^T; b^T] = U C``: ``Θ = V S^{-1} C``."""
        theta = self.Vt.T @ (C / self.s[:, None])  # (m + 1, k)
        return theta[:-1].T.copy(), theta[-1].copy()

    def entry_matrix(self, k: int) -> np.ndarray:
        """``(n k, r k)``: row ``i k + y`` maps ``vec(C)`` (row-major) to ``P[i, y]``."""
        return np.kron(self.U, np.eye(k))

    def rowsum_matrix(self, k: int) -> np.ndarray:
        """``(r, r k)``: ``C 1`` from ``vec(C)``."""
        return np.kron(np.eye(self.r), np.ones((1, k)))


def _linear_lp(basis: _LinearBasis, cost_P: np.ndarray, gamma: float, pinned: np.ndarray):
    r"""Solve :math:`\min \langle c, P\rangle` over :math:`\{P = U C:\ C\mathbf 1 = U^\top\mathbf 1,\ P_e\ge\gamma
    \text{ (free } e),\ P_e = 0 \text{ (pinned } e)\}` with HiGHS. Returns the scipy result and the matrices."""
    n, k = cost_P.shape
    E = basis.entry_matrix(k)
    free = ~pinned.reshape(-1)
    A_ub = -E[free]
    b_ub = -np.full(int(free.sum()), gamma)
    A_eq = np.concatenate([basis.rowsum_matrix(k), E[~free]], axis=0)
    b_eq = np.concatenate([basis.ones, np.zeros(int((~free).sum()))])
    c = E.T @ cost_P.reshape(-1)  # <cost, U C> = <U^T cost, C>
    res = _highs(c, A_ub, b_ub, A_eq, b_eq, [(None, None)] * c.size)
    return res, (c, A_ub, b_ub, A_eq, b_eq)


def _highs(c, A_ub, b_ub, A_eq, b_eq, bounds):
    """``scipy.optimize.linprog`` with HiGHS: dual simplex first (a vertex, exact duals); it can stop with
    "numerical difficulties" on these many-rows, few-free-columns programs, where the interior-point method
    (with crossover) succeeds. Returns the first definite answer (optimal or infeasible), else the last try."""
    from scipy.optimize import linprog

    for method in ("highs-ds", "highs-ipm"):
        res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method=method,
                      options=_HIGHS_OPTIONS)
        if res.status in (0, 2):
            break
    return res


def _linear_lmo_with_bound(basis, gradient_in_probs, gamma, pinned):
    """The LP oracle's minimiser ``P_lmo`` and a rigorous lower bound on ``min <G, P>`` from weak duality."""
    n, k = gradient_in_probs.shape
    # HiGHS is scale-sensitive (it fails on costs of 1e-5 that it solves at 1): solve for G / max|G|.
    scale = float(np.max(np.abs(gradient_in_probs)))
    if scale == 0 or not np.isfinite(scale):
        if scale == 0:  # <0, P> is 0 everywhere: any member is a minimiser
            return basis.U @ (np.outer(basis.ones, np.ones(k)) / k), 0.0
        raise SolverError("linear-head LP oracle: the gradient is not finite at the given point")
    res, (c, A_ub, b_ub, A_eq, b_eq) = _linear_lp(basis, gradient_in_probs / scale, gamma, pinned)
    if res.status != 0:
        raise SolverError(f"HiGHS could not solve the linear-head LP oracle: {res.message}")
    P_lmo = (basis.U @ res.x.reshape(basis.r, k))
    # Weak duality with a sign-corrected dual and its residual: for every feasible C,
    # <c, C> >= y_ub.b_ub + y_eq.b_eq - ||c - A_ub^T y_ub - A_eq^T y_eq|| ||C||, and ||C|| = ||P|| <= sqrt(n).
    y_ub = np.minimum(res.ineqlin.marginals, 0.0) if b_ub.size else np.zeros(0)
    y_eq = res.eqlin.marginals
    residual = c - (A_ub.T @ y_ub if b_ub.size else 0.0) - A_eq.T @ y_eq
    lower = float(y_ub @ b_ub + y_eq @ b_eq - np.linalg.norm(residual) * np.sqrt(n))
    return P_lmo, scale * lower


def linear_head_lmo(features: np.ndarray, gradient_in_probs: np.ndarray, gamma: float, *,
                    pinned: np.ndarray | None = None) -> np.ndarray:
    r"""Linear-minimisation oracle of the linear head, in prediction space:

    .. math:: P_{\text{lmo}} = \arg\min_P \langle G, P\rangle \quad\text{s.t.}\quad P = H W^\top + \mathbf 1 b^\top,
        \ P\ge\gamma,\ P\mathbf 1 = \mathbf 1 \ \ (P_e = 0 \text{ on ``pinned`` entries})

    solved as a linear program by HiGHS. Returns ``P_lmo`` ``(n, k)``.
    """
    features = np.asarray(features, dtype=float)
    G = np.asarray(gradient_in_probs, dtype=float)
    pinned = np.zeros(G.shape, dtype=bool) if pinned is None else np.asarray(pinned, dtype=bool)
    return _linear_lmo_with_bound(_LinearBasis(features), G, gamma, pinned)[0]


def _linear_face(basis, teacher, gamma, pins):
    r"""The face where the objective is finite and a point in its relative interior.

    Returns ``(zero, centre_C)``: ``zero`` ``(n, k)`` marks predictions that are 0 on the face (teacher zeros
    under the reverse losses, plus entries that the class then forces to 0), and ``centre_C`` a member with
    every other entry strictly above ``gamma``. ``None`` when the face is empty (infeasible).
    Without teacher zeros the centre is the uniform prediction (``W = 0``, ``b = 1/k``).
    """
    n, k = teacher.shape
    pinned = (teacher == 0) if pins else np.zeros((n, k), dtype=bool)
    if not pinned.any():
        return pinned, np.outer(basis.ones, np.ones(k)) / k
    if gamma > 0:
        return None  # a pinned entry cannot be both 0 and >= gamma > 0
    # Find the entries that some feasible point makes positive, by rounds of
    #   max sum_{e undecided} u_e  s.t.  u_e <= P_e, 0 <= u_e <= 1, P in the face;
    # a round whose optimum is 0 proves the undecided entries are 0 on the whole face. The average of the
    # points found is in the relative interior.
    E = basis.entry_matrix(k)
    undecided = ~pinned.reshape(-1)
    positive = np.zeros(n * k, dtype=bool)
    points = []
    while undecided.any():
        zero = ~(undecided | positive)
        nu, nc = int(undecided.sum()), basis.r * k
        # Variables [vec(C), u]; u_e <= P_e for undecided e; P_e >= 0 for all non-zero e.
        A_ub = np.concatenate([
            np.concatenate([-E[undecided], np.eye(nu)], axis=1),
            np.concatenate([-E[~zero], np.zeros((int((~zero).sum()), nu))], axis=1),
        ])
        b_ub = np.zeros(A_ub.shape[0])
        A_eq = np.concatenate([basis.rowsum_matrix(k), E[zero]], axis=0)
        A_eq = np.concatenate([A_eq, np.zeros((A_eq.shape[0], nu))], axis=1)
        b_eq = np.concatenate([basis.ones, np.zeros(int(zero.sum()))])
        c = np.concatenate([np.zeros(nc), -np.ones(nu)])
        res = _highs(c, A_ub, b_ub, A_eq, b_eq, [(None, None)] * nc + [(0, 1)] * nu)
        if res.status == 2:
            return None
        if res.status != 0:
            raise SolverError(f"HiGHS could not find a feasible linear head: {res.message}")
        C = res.x[:nc].reshape(basis.r, k)
        P = (basis.U @ C).reshape(-1)
        found = undecided & (P > _POSITIVE)
        if not found.any():
            break  # the rest are 0 on every feasible point
        points.append(C)
        positive |= found
        undecided &= ~found
    zero = ~positive.reshape(n, k)
    if not points:  # every entry is 0: impossible with rows summing to 1, but be explicit
        return None
    return zero, np.mean(points, axis=0)


def _project_linear(basis, C, zero, centre_C, gamma):
    """Map a solver's ``C`` into the class: exact equalities (row sums, zeros) by a least-norm correction,
    then the floor by the smallest move toward ``centre_C``; rows are renormalised at the end."""
    n, k = zero.shape
    if zero.any():
        E = basis.entry_matrix(k)
        M = np.concatenate([basis.rowsum_matrix(k), E[zero.reshape(-1)]], axis=0)
        d = np.concatenate([basis.ones, np.zeros(int(zero.sum()))])
        v = C.reshape(-1)
        v = v - np.linalg.lstsq(M, M @ v - d, rcond=None)[0]
        C = v.reshape(basis.r, k)
    else:
        C = C - np.outer(C.sum(axis=1) - basis.ones, np.ones(k)) / k
    free = ~zero
    P, Pc = basis.U @ C, basis.U @ centre_C
    margin = _FLOOR_MARGIN
    for _ in range(60):
        short = free & (P < gamma + margin)
        lam = 0.0
        if short.any():
            lam = float(np.max((gamma + margin - P[short]) / (Pc[short] - P[short])))
            lam = min(lam, 1.0)
        C_new = (1 - lam) * C + lam * centre_C
        P_new = basis.U @ C_new
        P_new = np.where(zero, 0.0, P_new)
        P_new = P_new / P_new.sum(axis=1, keepdims=True)
        if np.all(P_new[free] >= gamma):
            return C_new, P_new
        margin *= 4
    raise SolverError("could not move the linear head's solution into the class (floor gamma)")


def _fit_linear(features, teacher, loss, gamma, solver, solver_options):
    import cvxpy as cp

    loss_obj = get_loss(loss)
    n, m = features.shape
    k = teacher.shape[1]
    if not 0 <= gamma < 1 / k:
        raise ValueError(f"gamma = {gamma} for the linear head: the floor must satisfy 0 <= gamma < 1/k = {1 / k:.4g}")
    basis = _LinearBasis(features)
    face = _linear_face(basis, teacher, gamma, loss_obj.pins_student_to_teacher_support)
    if face is None:
        return _infeasible("linear", loss, n, m, k)
    zero, centre_C = face
    free = ~zero

    C_var = cp.Variable((basis.r, k))
    P = basis.U @ C_var
    flat = cp.reshape(P, (n * k,), order="C")
    constraints = [cp.sum(C_var, axis=1) == basis.ones, flat[np.flatnonzero(free.reshape(-1))] >= gamma]
    if zero.any():
        constraints.append(flat[np.flatnonzero(zero.reshape(-1))] == 0)
    live = (teacher > 0) & free
    problem = cp.Problem(cp.Minimize(_cvxpy_objective(P, teacher, loss, live) / n), constraints)
    info = _solve(problem, solver, solver_options)

    C, probs = _project_linear(basis, C_var.value, zero, centre_C, gamma)
    W, b = basis.params(C)
    objective = float(np.mean(loss_obj.per_sample(teacher, probs)))
    with np.errstate(divide="ignore", invalid="ignore"):
        G = loss_obj.grad_student(teacher, probs) / n
    G = np.where(zero, 0.0, G)  # constant on the face: no contribution to any direction within it
    P_lmo, lower = _linear_lmo_with_bound(basis, G, gamma, zero)
    value = float(np.sum(G * probs))
    gap = max(value - float(np.sum(G * P_lmo)), value - lower, 0.0)
    info["lmo_primal_gap"] = value - float(np.sum(G * P_lmo))
    # Gradient component within the row-sum constraint (free entries, row mean removed).
    Gr = np.where(free, G - (np.where(free, G, 0).sum(1) / free.sum(1))[:, None], 0.0)
    return _result("linear", loss, {"W": W, "b": b}, probs, objective, gap, float(np.linalg.norm(Gr)), info)


# --------------------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------------------


def _result(head, loss, params, probs, objective, gap, grad_norm, info, method="cvxpy-CLARABEL"):
    t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float64))[None]  # noqa: E731
    return FitResult(
        head=head, loss=loss, params={name: t(v) for name, v in params.items()}, probs=t(probs),
        objective=t(objective), gap=t(gap), certificate="frank_wolfe", grad_norm=t(grad_norm),
        iterations=torch.tensor([info.get("num_iters", 0)], dtype=torch.long),
        converged=torch.tensor([bool(np.isfinite(gap))]), method=method, info=info,
    )


def _infeasible(head, loss, n, m, k):
    """Every member of the class has infinite loss: objective = gap = +inf, parameters NaN."""
    nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
    params = {"A": nan(k, m)} if head == "mixture" else {"W": nan(k, m), "b": nan(k)}
    return _result(head, loss, params, nan(n, k), np.inf, np.inf, np.nan,
                   {"solver_value": np.inf, "status": "infeasible (detected before solving)", "num_iters": 0})


def fit_reference(
    features: np.ndarray,
    teacher: np.ndarray,
    loss: str,
    head: str = "mixture",
    *,
    gamma: float = 0.0,
    solver: str = "CLARABEL",
    solver_options: dict | None = None,
) -> FitResult:
    r"""Fit one student exactly (cvxpy) and certify it: :math:`\min_{F\in\mathcal F_{\text{head}}}
    \frac1n\sum_i\ell(q_i, F(h_i))` for ``head`` in ``mixture``, ``linear``.

    Args:
        features: ``(n, m)``; rows in :math:`\Delta^m` for the mixture head.
        teacher: ``(n, k)`` teacher probabilities.
        loss: one of ``forward_kl forward_ce reverse_kl reverse_ce squared``.
        gamma: the linear head's floor, ``0 <= gamma < 1/k``.
        solver, solver_options: passed to ``cvxpy.Problem.solve``.

    Returns:
        A :class:`FitResult` with batch axis 1; ``objective`` and ``gap`` are evaluated by us at a point of the
        class (never the solver's own value, which is kept in ``info["solver_value"]``).

    Raises:
        SolverError: the solver's status is not ``"optimal"`` (``"optimal_inaccurate"`` included).
    """
    features = np.asarray(to_numpy(features), dtype=np.float64)
    teacher = np.asarray(to_numpy(teacher), dtype=np.float64)
    if features.ndim != 2 or teacher.ndim != 2 or features.shape[0] != teacher.shape[0]:
        raise ValueError(f"fit_reference: expected features (n, m) and teacher (n, k), got "
                         f"{features.shape} and {teacher.shape}")
    get_loss(loss)
    if loss not in REFERENCE_LOSSES:
        raise ValueError(f"fit_reference: no cvxpy formulation for loss {loss!r}")
    if head == "mixture":
        return _fit_mixture(features, teacher, loss, solver, solver_options)
    if head == "linear":
        return _fit_linear(features, teacher, loss, gamma, solver, solver_options)
    raise ValueError(f"fit_reference: head {head!r} is not handled here; use 'mixture' or 'linear' "
                     "(softmax and squared have their own references, see fit_reference_batch)")


def fit_reference_batch(features: torch.Tensor, teacher: torch.Tensor, loss: str, head: str, *,
                        gamma: float = 0.0, radius=None, bias=True) -> FitResult:
    """The exact reference for each student of a batch, one at a time, concatenated (float64 tensors on the
    input's device).

    ``features`` is ``(n, m)`` (shared) or ``(B, n, m)``; ``teacher`` is ``(B, n, k)`` (or ``(n, k)``).
    Mixture and linear heads use :func:`fit_reference`; the ``softmax`` and ``squared`` heads use their own
    references, :func:`.softmax.fit_softmax_reference` and :func:`.squared.fit_squared_reference`.
    """
    if head == "softmax":
        from .softmax import fit_softmax_reference

        def fit_one(X, Q):
            return fit_softmax_reference(X, Q, loss)
    elif head == "squared":
        from .squared import fit_squared_reference

        def fit_one(X, Q):
            return fit_squared_reference(X, Q, bias=bias, radius=radius)
    else:
        def fit_one(X, Q):
            return fit_reference(X, Q, loss, head, gamma=gamma)

    device = teacher.device if isinstance(teacher, torch.Tensor) else torch.device("cpu")
    X, Q = to_numpy(features), to_numpy(teacher)
    if Q.ndim == 2:
        Q = Q[None]
    if X.ndim == 2:
        X = np.broadcast_to(X, (Q.shape[0], *X.shape))
    if X.shape[0] != Q.shape[0]:
        raise ValueError(f"fit_reference_batch: {X.shape[0]} feature sets for {Q.shape[0]} teachers")
    parts = [fit_one(np.ascontiguousarray(X[b]), np.ascontiguousarray(Q[b])) for b in range(Q.shape[0])]

    def cat(tensors, dtype=None):
        out = torch.cat([torch.as_tensor(t) for t in tensors]).to(device)
        return out if dtype is None else out.to(dtype)

    return FitResult(
        head=parts[0].head, loss=parts[0].loss,
        params={name: cat([p.params[name] for p in parts], torch.float64) for name in parts[0].params},
        probs=cat([p.probs for p in parts], torch.float64),
        objective=cat([p.objective for p in parts], torch.float64),
        gap=cat([p.gap for p in parts], torch.float64),
        certificate=parts[0].certificate,
        grad_norm=cat([p.grad_norm for p in parts], torch.float64),
        iterations=cat([p.iterations for p in parts]),
        converged=cat([p.converged for p in parts]),
        method=parts[0].method,
        info={"per_student": [p.info for p in parts],
              "solver_value": [p.info.get("solver_value") for p in parts],
              "status": [p.info.get("status") for p in parts]},
    )
