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

Safeguards for the barrier losses (KL: infinite derivative, and for forward KL infinite value, at a
prediction 0 where the teacher has mass), without which instances with one-hot features, teacher zeros and
a rare class stalled far from the optimum: no step may shrink such a prediction more than 200-fold, and a
step that would reach the barrier is retried with a floor (entries keep 1% of their value) before it is
shortened; a Hessian is reused only if no such prediction changed by more than 1% (a tiny absolute step
near the barrier changes the curvature by orders of magnitude); the Newton system is solved after Jacobi
scaling; float32 Hessian products fall back to float64 for a student whose curvatures exceed their range.
After a Newton step that was cut short, the next step is a majorise–minimise step (the EM update for the
forward losses, an entropic update for reverse KL; :func:`_em_step`, :func:`_entropic_step`): monotone,
Hessian-free, multiplicative, and exact in one step on one-hot features.

Certificate: the Frank–Wolfe gap :math:`g(A) = \max_{S}\langle\nabla\Phi(A), A - S\rangle
\ge \Phi(A) - \Phi^\star` over the product of simplices, computed in float64 at the returned point
(in the same product as the gradient, :func:`_certified_gradient`) and increased by a bound on the
rounding error of that computation, so that it bounds the exact gap.
Where the teacher puts zero mass on a class, the reverse losses force the student to do the same
(any other choice has infinite loss): those entries of ``A`` are fixed at 0 before solving and the gap is
taken over the remaining face, which is exactly the set where the objective is finite.

Two layouts of the features are supported with one algorithm: one matrix per student, ``(B, n, m)``
(products are batched matrix products), or one matrix shared by all students, ``(n, m)`` — the common case
in a sweep, where many teachers (tasks, noise levels, losses) are fitted on one strong representation. Then
every product is a single large matrix product, and the ``B`` Hessians come from one product with the
precomputed symmetric outer products :math:`\mathrm{vec}_{\le}(h_ih_i^\top)`.

Cost (per-student features, CPU): the products are limited by reading the features from memory, so an
iteration reads them twice: once for the predictions of the line search's trial, once for the gradient, its
certificate and, where a fresh Newton step will follow, the Hessian, formed a few students at a time so that
:math:`\sqrt w X` (in ``hessian_dtype``) stays in cache (:meth:`_StudentFeatures.gradient_and_curvature`).
The per-sample terms of the KL losses take the teacher's logarithms once and one logarithm of the
predictions per evaluation (:class:`_KLTerms`). A student whose curvature sits mostly on the diagonal of
:math:`X^\top\mathrm{diag}(w)X` (near one-hot features) starts with the majorise–minimise step.

Reverse cross-entropy is linear in the student's probabilities, so its minimiser is a vertex given by one
call of the linear-minimisation oracle (gap exactly 0 up to rounding).
"""

from __future__ import annotations

import torch

from ..divergences import Loss
from ..heads import MixtureHead
from .conditioning import _U as _U64
from .conditioning import (cholesky_ex, derivative_term_magnitude, shift_is_below_the_spectrum,
                           unit_roundoff_gamma)
from .result import FitResult

__all__ = ["fit_mixture_batched", "flop_count", "peak_gemm_rate", "default_hessian_dtype",
           "SUB_BATCH_BYTES"]

_ARMIJO = 1e-4
#: Per-student features on CPU are solved in sub-batches of about this many bytes (:func:`fit_mixture_batched`).
SUB_BATCH_BYTES = 2**25
_MAX_BACKTRACK = 40


def _new_work() -> dict:
    """Work counters of one fit: ``feature_reads`` (students' products with their features: predictions,
    gradient sweeps), ``hessians`` (students' curvature-block products). Per-student features are read from
    memory once per counted read, which makes the counts a floor on the solve's time (``w2s-theory bench``)."""
    return {"feature_reads": 0, "hessians": 0}


class _StudentFeatures:
    """One feature matrix per student, ``(B, n, m)``: products are batched matrix products.

    Predictions and per-sample derivatives are kept class-major, ``(B, k, n)``: then ``A X^T`` and
    ``D X`` are plain batched products and sums over classes run over contiguous rows.
    """

    shared = False

    def __init__(self, X: torch.Tensor, hessian_dtype: torch.dtype, buffers=None, work=None):
        self.X = X
        self.n, self.m = X.shape[-2], X.shape[-1]
        self.hessian_dtype = hessian_dtype
        self.work = _new_work() if work is None else work
        # Scratch space for X and sqrt(curvature) * X in the Hessian's dtype, allocated once. On CPU the
        # Hessians are formed a few students at a time, so that the scratch stays in the core's cache between
        # its write and the product that reads it (one pass over the features from memory instead of three, and
        # no full low-precision copy of the features, whose fresh pages cost more than the conversion); on a
        # GPU all at once.
        if X.device.type == "cpu":
            per_student = self.n * self.m * torch.finfo(hessian_dtype).bits // 8
            self._chunk = max(1, torch.get_num_threads() * 2**20 // per_student)
        else:
            self._chunk = None
        self._buffers = buffers

    def take(self, keep: torch.Tensor) -> "_StudentFeatures":
        return _StudentFeatures(self.X[keep], self.hessian_dtype, self._buffers, self.work)

    def support_products(self, zero_teacher: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.work["feature_reads"] += rows.numel()
        support = (self.X[rows] > 0).to(zero_teacher.dtype)
        return torch.bmm(zero_teacher, support)

    def predict(self, A: torch.Tensor) -> torch.Tensor:
        """``A X^T``, ``(B, k, n)``."""
        self.work["feature_reads"] += A.shape[0]
        return torch.bmm(A, self.X.transpose(1, 2))

    def gradient(self, dphi: torch.Tensor) -> torch.Tensor:
        """``dphi X / n`` for ``dphi`` ``(B, c, n)``."""
        return self.gradient_and_curvature(dphi)[0]

    def gradient_and_curvature(self, dphi: torch.Tensor, weights: torch.Tensor | None = None,
                               rows: torch.Tensor | None = None):
        """``dphi X / n`` for every student and :meth:`curvature_blocks` of ``weights`` for the students
        ``rows`` (sorted) in the same sweep over the features: each chunk of features is read from memory
        once for both products. The gradient is always formed chunk by chunk, so that its arithmetic does
        not depend on which students also get a Hessian."""
        b = dphi.shape[0]
        self.work["feature_reads"] += b
        grad = torch.empty((b, dphi.shape[1], self.m), dtype=dphi.dtype, device=dphi.device)
        chunk = self._chunk or b
        hessian = rows is not None and rows.numel() > 0
        if hessian:
            roots, Hh = self._hessian_scratch(weights, chunk)
            wanted = torch.zeros(b, dtype=torch.bool)
            wanted[rows.cpu()] = True
            wanted, done = wanted.tolist(), 0
        for start in range(0, b, chunk):
            stop = min(start + chunk, b)
            X = self.X[start:stop]
            torch.bmm(dphi[start:stop], X, out=grad[start:stop])
            if hessian:
                local = [i - start for i in range(start, stop) if wanted[i]]
                if local:
                    pick = local if len(local) < stop - start else None
                    self._hessian_chunk(X, roots[done : done + len(local)], Hh[done : done + len(local)], pick)
                    done += len(local)
        grad.div_(self.n)
        return grad, (self._finish_hessian(Hh, weights, rows) if hessian else None)

    def curvature_blocks(self, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`\frac1n X^\top\mathrm{diag}(w_c)X` for each row ``c`` of ``weights`` ``(b, c, n)``, as
        :math:`Y^\top Y` with :math:`Y = \sqrt{w_c}X` (weights are curvatures of convex losses, >= 0), for
        the students ``rows`` (all if ``None``).

        In a low-precision ``hessian_dtype`` the products of a student whose curvatures are extreme (a
        prediction near a barrier: ``n max w`` near the dtype's range) would overflow or lose their range;
        those students are recomputed in float64, so the choice depends on the student alone."""
        b = weights.shape[0]
        self.work["feature_reads"] += b
        chunk = self._chunk or b
        roots, Hh = self._hessian_scratch(weights, chunk)
        for start in range(0, b, chunk):
            stop = min(start + chunk, b)
            X = self.X[start:stop] if rows is None else self.X[rows[start:stop]]
            self._hessian_chunk(X, roots[start:stop], Hh[start:stop])
        return self._finish_hessian(Hh, weights, rows)

    def _hessian_scratch(self, weights, chunk):
        b, c = weights.shape[0], weights.shape[1]
        if self._buffers is None or self._buffers[0].shape[0] < min(chunk, b):
            shape = (min(chunk, b), self.n, self.m)
            self._buffers = tuple(torch.empty(shape, dtype=self.hessian_dtype, device=self.X.device) for _ in "XY")
        roots = weights.clamp_min(0).sqrt().to(self.hessian_dtype)
        return roots, torch.empty((b, c, self.m, self.m), dtype=self.hessian_dtype, device=self.X.device)

    def _hessian_chunk(self, X, roots, out, pick=None):
        """``out[:, y] = Y^T Y`` with ``Y = roots[:, y] * X`` for a chunk of students (those at ``pick`` in ``X``
        if given), in the scratch space: picked students are converted straight into it, one by one, rather
        than gathered into a copy first."""
        count = X.shape[0] if pick is None else len(pick)
        self.work["hessians"] += count
        if self.hessian_dtype != X.dtype:
            buffer = self._buffers[0][:count]
            if pick is None:
                X = buffer.copy_(X)
            else:
                for j, i in enumerate(pick):
                    buffer[j].copy_(X[i])
                X = buffer
        elif pick is not None:
            X = X[torch.tensor(pick, device=X.device)]
        Y = self._buffers[1][: X.shape[0]]
        for y in range(roots.shape[1]):
            torch.mul(X, roots[:, y, :, None], out=Y)
            torch.bmm(Y.transpose(1, 2), Y, out=out[:, y])

    def _finish_hessian(self, Hh, weights, rows):
        c = weights.shape[1]
        H = Hh.to(torch.float64)
        if self.hessian_dtype != torch.float64:
            limit = torch.finfo(self.hessian_dtype).max * 1e-3
            # all entries finite <=> their sum is (float32 entries cannot overflow a float64 sum)
            extreme = (weights.amax(dim=(1, 2)) * self.n >= limit) | ~torch.isfinite(H.sum(dim=(1, 2, 3)))
            if extreme.any():
                idx = extreme.nonzero()[:, 0]
                self.work["hessians"] += idx.numel()
                self.work["feature_reads"] += idx.numel()
                X64 = (self.X if rows is None else self.X[rows])[idx]
                roots64 = weights[idx].clamp_min(0).sqrt()
                for y in range(c):
                    Y64 = X64 * roots64[:, y, :, None]
                    H[idx, y] = torch.bmm(Y64.transpose(1, 2), Y64)
        return H.div_(self.n)


class _SharedFeatures:
    """One feature matrix ``(n, m)`` for every student: products are single large matrix products."""

    shared = True

    def __init__(self, X: torch.Tensor, hessian_dtype: torch.dtype):
        self.X = X
        self.n, self.m = X.shape
        self.hessian_dtype = hessian_dtype
        self.work = _new_work()
        self._iu, self._ju = torch.triu_indices(self.m, self.m, device=X.device)
        # Row i holds the upper triangle of h_i h_i^T: the Hessians of all students are then W @ Z.
        self._Z = (X[:, self._iu] * X[:, self._ju]).to(hessian_dtype)

    def take(self, keep: torch.Tensor) -> "_SharedFeatures":
        return self

    def support_products(self, zero_teacher: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        support = (self.X > 0).to(zero_teacher.dtype)
        return zero_teacher @ support

    def predict(self, A: torch.Tensor) -> torch.Tensor:
        B, k, m = A.shape
        self.work["feature_reads"] += B
        return (A.reshape(B * k, m) @ self.X.T).reshape(B, k, self.n)

    def gradient(self, dphi: torch.Tensor) -> torch.Tensor:
        B, c, n = dphi.shape
        self.work["feature_reads"] += B
        return (dphi.reshape(B * c, n) @ self.X).reshape(B, c, self.m) / n

    def gradient_and_curvature(self, dphi, weights=None, rows=None):
        """:meth:`gradient`, and :meth:`curvature_blocks` of ``weights`` if ``rows`` is given."""
        hessian = rows is not None and rows.numel() > 0
        return self.gradient(dphi), (self.curvature_blocks(weights) if hessian else None)

    def curvature_blocks(self, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        b, c, n = weights.shape
        self.work["hessians"] += b
        flat = weights.reshape(b * c, n).to(self.hessian_dtype) @ self._Z
        flat = flat.to(torch.float64).reshape(b, c, -1) / n
        H = torch.zeros((b, c, self.m, self.m), dtype=torch.float64, device=weights.device)
        H[..., self._iu, self._ju] = flat
        H[..., self._ju, self._iu] = flat
        return H


def _allowed_entries(design, teacher: torch.Tensor, loss: Loss) -> torch.Tensor:
    """Entries of ``A`` that may be positive: for reverse losses, ``A[y, j] = 0`` whenever some sample with
    ``h_ij > 0`` has teacher mass ``q_iy = 0`` (any other choice has infinite loss). ``teacher`` is
    class-major, ``(B, k, n)``."""
    B, k, n = teacher.shape
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
    reachable = design.predict(allowed.to(teacher.dtype)) > 0  # (B, k, n): some allowed entry reaches it
    return torch.where(reachable, teacher, torch.zeros_like(teacher))


class _LossTerms:
    r"""Per-sample loss, derivative and curvature of ``loss`` on class-major ``(B, k, n)`` predictions.

    ``teacher`` is the real teacher (it defines the objective), ``teacher_d`` the teacher for derivatives
    (:func:`_teacher_for_derivatives`). This generic version calls the :class:`Loss`; :class:`_KLTerms`
    computes the same quantities for the KL family with the teacher's logarithms taken once and one
    logarithm of the predictions per evaluation (``xlogy`` costs several logarithms).
    """

    def __init__(self, loss: Loss, teacher: torch.Tensor, teacher_d: torch.Tensor):
        self.loss, self.Q, self.Qd = loss, teacher, teacher_d

    def take(self, keep: torch.Tensor) -> "_LossTerms":
        return type(self)(self.loss, self.Q[keep], self.Qd[keep])

    def value(self, probs: torch.Tensor) -> torch.Tensor:
        """Mean loss per student."""
        return self.loss.per_sample(self.Q.transpose(1, 2), probs.transpose(1, 2)).mean(dim=-1)

    def derivative(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-sample derivative ``(B, k, n)``, 0 where ``teacher_d`` pins the entry."""
        return self.loss.grad_student(self.Qd.transpose(1, 2), probs.transpose(1, 2)).transpose(1, 2)

    def magnitude(self, probs: torch.Tensor, dphi: torch.Tensor) -> torch.Tensor:
        r"""A bound ``M`` with ``|fl(dphi) - dphi| <= gamma_{m+4} M`` entrywise (:func:`_certified_gradient`).

        Two errors enter: the computed prediction is :math:`p(1+\delta)`, :math:`|\delta|\le\gamma_m`,
        which moves the derivative by about :math:`|\delta|\,p\,|\ell''(p)|` (counted twice, for the
        second-order part), and the derivative's own formula rounds each of its terms, by a few units of
        roundoff of :math:`T`, the sum of their magnitudes (:func:`~.conditioning.derivative_term_magnitude`; e.g. :math:`|\log p| +
        |\log q|` for :math:`\log p - \log q`, which cancel where :math:`p\approx q`, so :math:`|\ell'|` alone
        is no bound). :math:`M = |\ell'| + 2 + T + 2p|\ell''|`, 0 where an entry is pinned."""
        finite = lambda x: torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))  # noqa: E731
        terms = derivative_term_magnitude(self.loss.name, self.Qd, probs)
        if terms is None:  # no stated formula: no allowance covers it, so no certificate
            return torch.full_like(dphi, float("inf"))
        curvature = self.loss.curvature_student(self.Qd.transpose(1, 2), probs.transpose(1, 2)).transpose(1, 2)
        extra = finite(terms) + 2 * probs * finite(curvature)
        if self.loss.pins_student_to_teacher_support:
            extra = torch.where(self.Qd > 0, extra, torch.zeros_like(extra))
        return finite(dphi) + 2 + extra

    def derivative_and_magnitude(self, probs: torch.Tensor) -> torch.Tensor:
        """:meth:`derivative` and :meth:`magnitude` stacked, ``(B, 2k, n)``: one product with the features
        gives the gradient and its rounding allowance."""
        dphi = self.derivative(probs)
        return torch.cat([dphi, self.magnitude(probs, dphi)], dim=1)

    def curvature(self, probs: torch.Tensor, dphi: torch.Tensor, k2_fast: bool) -> torch.Tensor:
        """Per-sample curvatures ``(B, k, n)`` (0 where pinned); for ``k = 2`` only their sum enters the
        reduced Hessian. ``dphi`` is :meth:`derivative` at ``probs``."""
        curv = self.loss.curvature_student(self.Qd.transpose(1, 2), probs.transpose(1, 2)).transpose(1, 2)
        if self.loss.pins_student_to_teacher_support:
            curv = torch.where(self.Qd > 0, curv, torch.zeros_like(curv))
        return curv[:, :1] + curv[:, 1:2] if k2_fast else curv

    def gradient_is_finite(self, probs: torch.Tensor) -> torch.Tensor:
        """Reverse losses have an infinite derivative at ``p_y = 0 < q_y``: iterates stay off that boundary."""
        if not self.loss.pins_student_to_teacher_support or self.loss.linear_in_probabilities:
            return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
        bad = (probs <= 0) & (self.Qd > 0)
        return ~bad.any(dim=2).any(dim=1)

    def stays_off_the_barrier(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Whether no prediction with teacher mass shrinks below ``_SHRINK`` times its value in one step.

        The KL losses have a barrier at ``p_y = 0 < q_y`` (infinite derivative, and for the forward losses
        an infinite value): their optima keep such predictions positive, but a backtracked projected-Newton
        step can land within 1e-12 of the barrier, after which Newton's quadratic model only doubles the
        entry per iteration (tens of iterations). Refusing such a step costs nothing where the model is good."""
        return ~((new < _SHRINK * old) & (self.Qd > 0)).any(dim=2).any(dim=1)

    def relative_change(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Largest relative change of a prediction that carries curvature (teacher mass > 0), per student;
        NaN (read: large) where a zero prediction stayed zero.

        The curvatures of the losses here are functions of ``p`` alone up to factors ``q`` (``1/p``,
        ``q/p^2``, constant), so a reused Hessian is within a factor ``(1 +- r)^2`` of the fresh one."""
        rel = (new - old).abs_().div_(old)
        rel = torch.where(self.Qd > 0, rel, torch.zeros_like(rel))
        return rel.flatten(1).amax(dim=1)


class _KLTerms(_LossTerms):
    r""":class:`_LossTerms` for forward KL / forward CE (:math:`\ell = \sum_y q_y\log(q_y/p_y)`, resp.
    :math:`-\sum_y q_y\log p_y`) and reverse KL (:math:`\ell = \sum_y p_y\log(p_y/q_y)`), with
    :math:`\log q`, :math:`\sum q\log q` and the pinning masks computed once.

    Where no teacher (of the batch) has a zero, the masks are skipped; the arithmetic of every entry with
    teacher mass is the same either way, so a student's numbers do not depend on its batch. The values
    agree with :meth:`Loss.per_sample` (``xlogy`` semantics: :math:`0\log 0 = 0`, NaN propagates) and the
    derivatives and curvatures with :meth:`Loss.grad_student` / :meth:`Loss.curvature_student`."""

    def __init__(self, loss: Loss, teacher: torch.Tensor, teacher_d: torch.Tensor, _pre=None):
        super().__init__(loss, teacher, teacher_d)
        self.reverse = loss.name == "reverse_kl"
        if _pre is not None:
            self.zeros, self.pinned, self.log_q, self.log_qd, self.entropy_term = _pre
            return
        self.zeros = bool((teacher == 0).any()) or bool((teacher_d == 0).any())
        self.pinned = teacher_d == 0 if self.zeros else None
        if self.reverse:
            self.log_q = torch.log(teacher)  # -inf at teacher zeros: p log(p / 0) = +inf for p > 0
            log_qd = torch.log(teacher_d)
            # log q - 1 (the derivative is log p - that) and |log q| + 2 (its rounding allowance), 0 if pinned
            self.log_qd = (log_qd - 1, log_qd.abs() + 2)
            if self.zeros:
                self.log_qd = tuple(torch.where(teacher_d > 0, t, torch.zeros_like(t)) for t in self.log_qd)
            self.entropy_term = None
        else:
            self.log_q, self.log_qd = None, None
            self.entropy_term = (torch.special.xlogy(teacher, teacher).sum(dim=(1, 2)) if loss.name == "forward_kl"
                                 else torch.zeros(teacher.shape[0], dtype=teacher.dtype, device=teacher.device))

    def take(self, keep: torch.Tensor) -> "_KLTerms":
        pick = lambda t: None if t is None else (tuple(u[keep] for u in t) if isinstance(t, tuple) else t[keep])  # noqa: E731
        return _KLTerms(self.loss, self.Q[keep], self.Qd[keep], (self.zeros, pick(self.pinned), pick(self.log_q),
                                                                pick(self.log_qd), pick(self.entropy_term)))

    def value(self, probs):
        n = probs.shape[-1]
        if self.reverse:
            # p (log p - log q) with 0 log 0 = 0 (also at teacher zeros, where the entry is pinned at 0). A
            # zero prediction gives 0 * -inf = NaN, so only a student whose sum is NaN needs the mask (one
            # elementwise pass fewer for every other; each entry's value is the same either way)
            terms = torch.log(probs).sub_(self.log_q).mul_(probs)
            total = terms.sum(dim=(1, 2))
            zero = torch.isnan(total)
            if bool(zero.any()):
                idx = zero.nonzero()[:, 0]
                masked = terms[idx].masked_fill_(probs[idx] == 0, 0)
                total[idx] = masked.sum(dim=(1, 2))
            return total / n
        # q log q - q log p, where q log p is xlogy(q, p): 0 where q = 0 (NaN if p is)
        cross = self.Q * torch.log(probs)
        if self.zeros:
            cross = torch.where(self.Q > 0, cross, 0 * probs)
        return (self.entropy_term - cross.sum(dim=(1, 2))) / n

    def derivative(self, probs):
        if self.reverse:
            dphi = torch.log(probs) - self.log_qd[0]  # log(p / q) + 1
        else:
            dphi = -self.Qd / probs
        return torch.where(self.Qd > 0, dphi, torch.zeros_like(dphi)) if self.zeros else dphi

    def magnitude(self, probs, dphi):
        if not self.reverse:
            return dphi.abs() + 2
        # log p - (log q - 1): the rounding of each logarithm is relative to |log p|, |log q|, not to their
        # difference (p = q = 1e-300: derivative 1, logarithms -690).
        M = dphi.abs() + torch.log(probs).abs_() + self.log_qd[1]
        return torch.where(self.Qd > 0, M, torch.zeros_like(M)) if self.zeros else M

    def derivative_and_magnitude(self, probs):
        B, k, n = probs.shape
        both = torch.empty((B, 2 * k, n), dtype=probs.dtype, device=probs.device)
        dphi, M = both[:, :k], both[:, k:]
        if self.reverse:
            log_p = torch.log(probs)
            torch.sub(log_p, self.log_qd[0], out=dphi)
            torch.add(log_p.abs_(), self.log_qd[1], out=M)
            M.add_(dphi.abs())
            if self.zeros:
                dphi.masked_fill_(self.pinned, 0)
                M.masked_fill_(self.pinned, 0)
        else:
            torch.div(self.Qd, probs, out=dphi).neg_()
            if self.zeros:
                dphi.masked_fill_(self.pinned, 0)
            torch.abs(dphi, out=M).add_(2)
        return both

    def curvature(self, probs, dphi, k2_fast):
        curv = (1 / probs) if self.reverse else (-dphi / probs)  # 1/p, resp. q/p^2 = (-q/p)/p
        if self.zeros:
            curv.masked_fill_(self.pinned, 0)
        return curv[:, :1] + curv[:, 1:2] if k2_fast else curv

    def gradient_is_finite(self, probs):
        if not self.reverse:
            return super().gradient_is_finite(probs)
        if self.zeros:
            return super().gradient_is_finite(probs)
        return probs.flatten(1).amin(dim=1) > 0

    def stays_off_the_barrier(self, old, new):
        if self.zeros:
            return super().stays_off_the_barrier(old, new)
        return ~(new < _SHRINK * old).flatten(1).any(dim=1)

    def relative_change(self, old, new):
        if self.zeros:
            return super().relative_change(old, new)
        return (new - old).abs_().div_(old).flatten(1).amax(dim=1)


def _loss_terms(loss: Loss, teacher, teacher_d) -> _LossTerms:
    if loss.name in ("reverse_kl", "forward_kl", "forward_ce"):
        return _KLTerms(loss, teacher, teacher_d)
    return _LossTerms(loss, teacher, teacher_d)


def _certified_gradient(design, terms: _LossTerms, A, probs, allowed, hessian_rows=None, k2_fast=False,
                        modulus=None):
    r"""Gradient ``G`` ``(B, k, m)`` at ``A``, its certified gap ``(B,)``, the per-sample derivatives
    ``(B, k, n)``, for the students ``hessian_rows`` (sorted; ``None`` for none) the curvature blocks at ``A``,
    formed in the same sweep over the features as the gradient, and which gaps are strong-convexity bounds.

    The gap is the Frank–Wolfe gap below or, for students with a certified ``modulus`` (``k = 2``,
    :func:`_strong_convexity_modulus`), the smaller of it and :func:`_strong_convexity_gap`.

    The gap :math:`g(A) = \max_S\langle G, A - S\rangle \ge \Phi(A) - \Phi^\star` is increased by a
    bound on the floating-point error of its own evaluation, so that it bounds the *exact* gap of ``A``
    (Higham, *Accuracy and Stability*, §3.1). :math:`G = \frac1n\sum_i \ell'(q_i, p_i)h_i^\top` with
    :math:`p_i = Ah_i` a sum of :math:`m` non-negative products (relative error :math:`\le\gamma_m`); each
    derivative is then off by at most :math:`\gamma_{m+4}M_i` (:meth:`_LossTerms.magnitude`: the
    prediction's error through :math:`p|\ell''|` and the formula's own rounding through the magnitudes of its
    terms, e.g. :math:`M_i = |\ell'_i| + |\log p_i| + |\log q_i| + 2` for reverse KL), so :math:`G` by
    :math:`\varepsilon = \gamma_{n+m+4}\frac1n\sum_i M_ih_i^\top` entrywise (computed in the same product
    as ``G``: one pass over the features). The columns of :math:`A` lie in the simplex, so the gap moves by
    at most :math:`2\sum_j\max_y\varepsilon_{yj}`, plus :math:`\gamma_{k+m}` times itself for its own sums.
    Without it an interior optimum, where Theorem 2 is an equality, is undecidable: slack and gap both sit at
    the level of rounding. A non-finite gradient gives an infinite gap.
    """
    k = A.shape[1]
    both = terms.derivative_and_magnitude(probs)
    dphi = both[:, :k]
    weights = None
    if hessian_rows is not None and hessian_rows.numel():
        weights = terms.curvature(probs, dphi, k2_fast)  # elementwise: cheaper for all than indexing the inputs
        weights = weights if hessian_rows.numel() == weights.shape[0] else weights[hessian_rows]
    both, H = design.gradient_and_curvature(both, weights, hessian_rows)
    G, eps_G = both[:, :k], both[:, k:] * unit_roundoff_gamma(design.n + design.m + 4, dphi.dtype)
    gap = MixtureHead.frank_wolfe_gap(G, A, allowed)
    # frank_wolfe_gap sums A (G - Gmin), which is <G, A> - min G per column only where the column sums to 1;
    # after projections and renormalisations it does so within a few units of roundoff
    # (the computed sum itself errs by up to gamma_k sum|A|: a column whose sum rounds to 1 need not be 1)
    Gmin = torch.where(allowed, G, torch.full_like(G, float("inf"))).amin(dim=1)
    off = (A.sum(dim=1) - 1).abs() + unit_roundoff_gamma(k, dphi.dtype) * A.abs().sum(dim=1)
    column_sum_error = torch.where(off > 0, off * Gmin.abs(), torch.zeros_like(off)).sum(dim=-1)
    column_sum_error = column_sum_error * (1 + unit_roundoff_gamma(k + 2, dphi.dtype))
    own_sums = unit_roundoff_gamma(k + design.m, dphi.dtype) * gap
    gap = gap + 2 * eps_G.amax(dim=1).sum(dim=-1) + own_sums + column_sum_error
    gap = torch.where(torch.isnan(gap), torch.full_like(gap, float("inf")), gap)
    from_modulus = torch.zeros_like(gap, dtype=torch.bool)
    if modulus is not None and k == 2 and bool((modulus > 0).any()):
        bound = _strong_convexity_gap(G, eps_G, A, allowed, modulus, design.n)
        from_modulus = bound < gap
        gap = torch.where(from_modulus, bound, gap)
    return G, gap, dphi, H, from_modulus


#: Share of a two-class student's curvature at the uniform start that every feasible point keeps, by loss
#: (:func:`_strong_convexity_modulus`): with :math:`s_i = \sum_j h_{ij}` and :math:`p_{i0} + p_{i1} = s_i`,
#: reverse KL's :math:`1/p_{i0} + 1/p_{i1} \ge 4/s_i`, its value at the start (AM-HM); forward KL's (and CE's)
#: :math:`q_0/p_0^2 + q_1/p_1^2 \ge (q_0^{1/3} + q_1^{1/3})^3/s^2 \ge (q_0 + q_1)/s^2`, a quarter of its value
#: :math:`4(q_0 + q_1)/s^2` at the start.
_START_CURVATURE_SHARE = {"reverse_kl": 1.0, "forward_kl": 0.25, "forward_ce": 0.25}

#: Losses the opt-in strong-convexity certificate covers (two classes, a cold start).
STRONG_CONVEXITY_LOSSES = tuple(_START_CURVATURE_SHARE)


def strong_convexity_unavailable(k: int, loss_name: str, warm_start: bool = False) -> str | None:
    """Why the strong-convexity certificate cannot be given (its modulus comes from the first Hessian at the
    uniform start of a two-class KL problem; anywhere else the gap would be the plain Frank-Wolfe one under the
    other certificate's name), or ``None`` where it can."""
    if k == 2 and loss_name in STRONG_CONVEXITY_LOSSES and not warm_start:
        return None
    return (f"the strong-convexity certificate is for two classes, a cold start and the losses "
            f"{', '.join(STRONG_CONVEXITY_LOSSES)} (got k = {k}, loss {loss_name!r}"
            f"{', a warm start' if warm_start else ''})")


def _strong_convexity_modulus(H0, share: float, n: int, hessian_dtype) -> torch.Tensor:
    r"""A certified lower bound :math:`\mu` on the smallest eigenvalue of the two-class Hessian
    :math:`\nabla^2\varphi(a) = \frac1n\sum_i w_i(a)h_ih_i^\top` over the whole feasible set
    (:math:`A = (a, 1-a)`, :math:`a\in[0,1]^m`), from ``H0`` ``(b, m, m)``, the computed Hessian at the
    uniform start; 0 where none is proved.

    Every feasible point keeps ``share`` of the start's curvature per sample (:data:`_START_CURVATURE_SHARE`),
    up to the rounding of the start's weights :math:`\hat w_i` (predictions within :math:`\gamma_m`, a few
    divisions: :math:`w_i \ge \kappa\hat w_i` with :math:`\kappa = \mathrm{share}\,(1-\gamma_{2m+6})`), so
    :math:`\nabla^2\varphi \succeq \kappa H_w` with :math:`H_w = \frac1n\sum_i\hat w_ih_ih_i^\top` in exact
    arithmetic. The computed ``H0`` (products in ``hessian_dtype``, :math:`n` terms, a few roundings each)
    has :math:`|\hat H - H_w| \le \gamma_{n+8}|Y|^\top|Y|/n` entrywise, :math:`Y = \sqrt{\hat w}\circ X`,
    whose spectral norm is at most its trace: :math:`\|H_w - \hat H\|_2 \le \delta := \gamma_{n+8}
    \mathrm{tr}\,H_w`. A shift :math:`t` a quarter below :math:`\lambda_{\min}(\hat H)` (inverse iteration)
    is proved by one Cholesky factorisation (:func:`~.conditioning.shift_is_below_the_spectrum`), so
    :math:`\lambda_{\min}(H_w) \ge t - \delta` (Weyl) and :math:`\mu = \kappa(t - \delta)`."""
    m = H0.shape[-1]
    gamma_h = unit_roundoff_gamma(n + 8, hessian_dtype) + 4 * _U64
    trace = H0.diagonal(dim1=-2, dim2=-1).sum(-1) * (1 + unit_roundoff_gamma(m + 1))
    error = gamma_h * trace / (1 - gamma_h) * (1 + 4 * _U64)  # >= ||H_w - H0||_2
    # A shift t just below H0's smallest eigenvalue, estimated by inverse iteration (any shift is safe: only the
    # factorisation of the shifted matrix proves anything); a shift that fails is retried at a quarter
    L, info = cholesky_ex(H0)
    eye = torch.eye(m, dtype=H0.dtype, device=H0.device)
    L = torch.where((info == 0)[:, None, None], L, eye)
    v = torch.where(torch.arange(m, device=H0.device) % 2 == 0, 1.0, -1.0).to(H0.dtype).expand(H0.shape[0], m)
    v = v[..., None] / m**0.5
    for _ in range(8):
        w = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, v, upper=False), upper=True)
        rayleigh = (v * w).sum(dim=(-2, -1))
        v = w / w.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    shift = torch.where((info == 0) & (rayleigh > 0), 0.75 / rayleigh.clamp_min(1e-300), torch.zeros_like(trace))
    smallest = torch.zeros_like(trace)
    for attempt in range(2):
        todo = (smallest == 0) & (shift > 0)
        if not bool(todo.any()):
            break
        proved = shift_is_below_the_spectrum(H0[todo], shift[todo])
        smallest[todo] = torch.where(proved, shift[todo], torch.zeros_like(shift[todo]))
        shift = shift / 4
    # lambda_min(H_w) >= lambda_min(H0) - ||H_w - H0||_2
    smallest = torch.where(smallest > 0, (smallest - error) * (1 - 4 * _U64), smallest)
    mu = share * (1 - unit_roundoff_gamma(2 * m + 6)) * smallest * (1 - 8 * _U64)
    good = torch.isfinite(mu) & (mu > 0)
    return torch.where(good, mu, torch.zeros_like(mu))


def _strong_convexity_gap(G, eps_G, A, allowed, modulus, n: int) -> torch.Tensor:
    r"""For ``k = 2``: :math:`\Phi(A) - \Phi^\star \le \|v\|^2/(2\mu)`, where :math:`\mu` (``modulus``) is a
    certified strong-convexity modulus of :math:`\varphi(a) = \Phi(a, 1-a)` on :math:`[0,1]^m` and :math:`v` the
    smallest element of :math:`\nabla\varphi(a) + N_{[0,1]^m}(a)`: from :math:`\varphi(y) \ge \varphi(a) +
    \langle v, y - a\rangle + \frac\mu2\|y-a\|^2` for feasible :math:`y`, minimised over :math:`y`. The
    Frank–Wolfe gap is linear in the distance to the optimum, this bound quadratic: near the optimum it is
    orders of magnitude smaller, which is what lets a student stop an iteration earlier.

    :math:`\partial\varphi/\partial a_j = G_{0j} - G_{1j}` =: :math:`g_j`, known within
    :math:`r_j = (\varepsilon_{0j} + \varepsilon_{1j})(1+\gamma_{n+4}) + u|\hat g_j|` (``eps_G``: the bound of
    :func:`_certified_gradient` on :math:`|\hat G - G|`, itself computed by a rounded product). Then
    :math:`|v_j| \le |\hat g_j| + r_j` inside the box, :math:`\max(r_j - \hat g_j, 0)` at :math:`a_j = 0` (only
    a negative :math:`g_j` counts there), :math:`\max(\hat g_j + r_j, 0)` at :math:`a_j = 1`; the sums are
    rounded up. Only for a student whose every column is :math:`(a_j, 1 - a_j)` *exactly*
    (:func:`_exact_two_class_columns`) and whose entries are all allowed; ``inf`` otherwise."""
    m = A.shape[-1]
    g = G[:, 0] - G[:, 1]
    r = ((eps_G[:, 0] + eps_G[:, 1]) * (1 + unit_roundoff_gamma(n + 4)) + g.abs() * _U64) * (1 + 4 * _U64)
    a = A[:, 0]
    v = torch.where(a == 0, (r - g).clamp_min(0), torch.where(a == 1, (g + r).clamp_min(0), g.abs() + r))
    bound = (v * v).sum(dim=-1) * (1 + unit_roundoff_gamma(m + 2)) / (2 * modulus) * (1 + 4 * _U64)
    top = torch.maximum(A[:, 0], A[:, 1])
    exact = ((torch.minimum(A[:, 0], A[:, 1]) == 1 - top) & (top >= 0.5)).all(dim=-1)
    ok = exact & (modulus > 0) & allowed.all(dim=-1).all(dim=-1) & torch.isfinite(bound)
    return torch.where(ok, bound, torch.full_like(bound, float("inf")))


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


def _diagonal_share(H):
    """Share of the curvature blocks' total mass on their diagonals, per student: about ``sum_i |h_i|^2 / n``,
    near 1 for one-hot features and near ``1/m`` for spread ones (NaN where the blocks are 0)."""
    return torch.diagonal(H, dim1=-2, dim2=-1).sum(dim=(1, 2)) / H.sum(dim=(1, 2, 3))


def _masked_newton_solve(H, rhs, free, sign=None):
    """Solve ``H_FF d_F = rhs_F`` (``d = 0`` off ``free``) for a batch, where ``H`` is ``S H S`` with the
    diagonal signs ``S = diag(sign)`` when given (no pass over ``H`` for them), by Cholesky of the Jacobi-scaled
    matrix (unit diagonal, so the solve does not depend on the scale of each coordinate: curvatures near a
    barrier reach 1e20 and more while others stay O(1)) with a tiny ridge that makes exactly singular blocks
    (features never used) solvable; failures get more damping."""
    f = free.to(torch.float64)
    diag = torch.diagonal(H, dim1=1, dim2=2) * f
    inv_root = torch.where(diag > 0, diag, torch.ones_like(diag)).rsqrt() * f
    v = inv_root if sign is None else inv_root * sign
    M = H * v[:, :, None]
    M.mul_(v[:, None, :])
    rhs = rhs * inv_root
    y = rhs.clone()  # scaled gradient step: the fallback if every damping fails
    todo = None
    for damping in (1e-13, 1e-9, 1e-5, 1e-1):
        idx = torch.arange(M.shape[0], device=M.device) if todo is None else todo
        Mt = M if todo is None else M[todo]
        # Unit diagonal everywhere: the scaled free block's own, the identity on fixed and unused coordinates.
        torch.diagonal(Mt, dim1=1, dim2=2).fill_(1 + damping)
        L, info = cholesky_ex(Mt)
        ok = info == 0
        if ok.all():
            y[idx] = torch.cholesky_solve(rhs[idx][..., None], L)[..., 0]
            break
        if ok.any():
            y[idx[ok]] = torch.cholesky_solve(rhs[idx[ok]][..., None], L[ok])[..., 0]
        todo = idx[~ok]
    return y * inv_root


def _newton_direction(G, A, H, allowed, eps):
    """Projected-Newton direction ``D`` (``B, k, m``) with ``sum_y D[:, y, j] = 0``. ``H`` holds the curvature blocks (``B, k, m, m``; ``B, 1, m, m`` summed for ``k = 2``)."""
    B, k, m = A.shape
    V = torch.where(allowed, A, torch.full_like(A, -1.0))
    # largest allowed entry (the first on ties); for k = 2 a comparison (argmax over 2 rows is a slow reduction)
    basis = (V[:, 1] > V[:, 0]).long() if k == 2 else V.argmax(dim=1)
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
        u = _masked_newton_solve(H[:, 0], -r, f, sign=s)
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
    if V.shape[1] == 2:
        return _project_pairs_to_simplex(V, allowed)
    u, _ = torch.sort(V, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    j = torch.arange(1, V.shape[1] + 1, dtype=V.dtype, device=V.device)[None, :, None]
    cond = u - css / j > 0
    rho = cond.to(V.dtype).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last index where cond holds
    theta = torch.gather(css, 1, rho) / (rho + 1).to(V.dtype)
    return torch.where(allowed, (V - theta).clamp_min(0), torch.zeros_like(V))


def _project_pairs_to_simplex(V, allowed):
    """:func:`_project_columns_to_simplex` for ``k = 2`` (after its substitution of disallowed entries), with
    the same floating-point operations on each entry, so the results are bit-identical: the sort of two
    entries is a max and a min, and the prefix sums ``u_0 - 1``, ``(u_0 + u_1) - 1``. The threshold is
    ``((u_0 + u_1) - 1)/2`` where ``u_1 - that > 0`` (the last index where the condition holds is 1) and
    ``u_0 - 1`` otherwise. Sorting, prefix sums and an arg-max over two rows cost far more than this."""
    first, second = V[:, 0], V[:, 1]
    top, low = torch.maximum(first, second), torch.minimum(first, second)
    pair = (top + low) - 1
    half = pair / 2
    theta = torch.where(low - half > 0, half, top - 1)
    return torch.where(allowed, (V - theta[:, None, :]).clamp_min(0), torch.zeros_like(V))


def _project_step(A, D, allowed, alpha, floor=None):
    """Point on the projected arc ``P(A + alpha D)``, each column projected onto its simplex (for ``k = 2``
    this is the clip to ``[0, 1]`` of projected Newton for box constraints).

    With ``floor`` (per student), no entry falls below ``_FLOOR`` times its current value (columns are then
    renormalised): for the barrier losses, where the arc would zero a prediction the teacher gives mass to,
    this lets the other entries take the full Newton step while the overshooting entry shrinks by a fixed
    factor, instead of halving every entry's step (an entry far above a tiny optimum then costs a handful of
    iterations, not one per factor 2)."""
    V = _project_columns_to_simplex(A + alpha[:, None, None] * D, allowed)
    if floor is None or not bool(floor.any()):
        return V
    raised = torch.maximum(V, _FLOOR * A)
    raised = raised / raised.sum(dim=1, keepdim=True)
    return torch.where(floor[:, None, None], raised, V)


def _exact_two_class_columns(A, allowed):
    r"""For ``k = 2``, with the strong-convexity certificate: every column of ``A`` made to sum to 1 *exactly*.
    The smaller entry becomes ``1 - larger``, which is exact for a larger entry in :math:`[1/2, 1]` (Sterbenz),
    so the column is :math:`(a, 1-a)` in exact arithmetic and ``A`` lies in the feasible set itself (the
    certificate, :func:`_strong_convexity_gap`, is about such points). A column with one allowed entry gets 1
    there; columns whose larger entry is below 1/2 (far from any simplex) are left alone. Other ``k``: ``A``
    unchanged. (Without the certificate the Frank–Wolfe gap pays for inexact column sums instead.)"""
    if A.shape[1] != 2:
        return A
    first, second = A[:, 0], A[:, 1]
    top = torch.maximum(first, second).clamp(max=1.0)
    low = 1 - top
    both = allowed[:, 0] & allowed[:, 1]
    first_top = first >= second
    paired = both & (top >= 0.5)
    new_first = torch.where(paired, torch.where(first_top, top, low), first)
    new_second = torch.where(paired, torch.where(first_top, low, top), second)
    one = allowed[:, 0] ^ allowed[:, 1]  # the only allowed entry is 1, the other 0
    new_first = torch.where(one, allowed[:, 0].to(A.dtype), new_first)
    new_second = torch.where(one, allowed[:, 1].to(A.dtype), new_second)
    return torch.stack([new_first, new_second], dim=1)


_FLOOR = 1e-2
_SHRINK = _FLOOR / 2


def _em_step(A, G, column_mass, allowed):
    r"""Majorise–minimise step for the forward losses (the EM update of mixture weights):
    :math:`A_{yj} \leftarrow A_{yj}(-G_{yj}) / \sum_{y'} A_{y'j}(-G_{y'j})`.

    With responsibilities :math:`r_{ij} = A_{yj}h_{ij}/p_{iy}`, Jensen's inequality gives
    :math:`-\log p_{iy}(A') \le -\sum_j r_{ij}\log(A'_{yj}h_{ij}/r_{ij})`, with equality at :math:`A' = A`;
    the step minimises this majoriser over the simplices, so it never increases the objective. It is exact
    in one step for one-hot features, and moves entries far from their optimum multiplicatively, where a
    Newton step is cut short by the barrier :math:`q_y\log(1/p_y)`."""
    V = A * (-G).clamp_min(0)
    Z = V.sum(dim=1, keepdim=True)
    return torch.where(Z > 0, V / Z, A)


def _entropic_step(A, G, column_mass, allowed):
    r"""Majorise–minimise step for reverse KL: :math:`A_{yj} \leftarrow A_{yj}e^{-G_{yj}/w_j} / Z_j` with
    :math:`w_j = \frac1n\sum_i h_{ij}`.

    Jensen for the convex :math:`p\log p` with responsibilities :math:`A_{yj}h_{ij}/p_{iy}` gives
    :math:`p_{iy}(A')\log p_{iy}(A') \le \sum_j h_{ij}A'_{yj}\log(p_{iy}A'_{yj}/A_{yj})` (equality at
    :math:`A' = A`), a majoriser separable over columns whose minimiser over the simplex is this step: the
    objective never increases. Exact in one step for one-hot features (the normalised geometric mean)."""
    E = torch.where(allowed & (A > 0), -G / column_mass, torch.full_like(G, -float("inf")))
    V = A * torch.exp(E - E.amax(dim=1, keepdim=True))
    Z = V.sum(dim=1, keepdim=True)
    ok = (column_mass > 0) & torch.isfinite(Z) & (Z > 0)
    return torch.where(ok, V / Z, A)


#: Majorise–minimise steps by loss: monotone, cheap (no Hessian), and multiplicative, so they complement
#: projected Newton where its quadratic model is poor (entries orders of magnitude from their optimum).
_MM_STEPS = {"forward_kl": _em_step, "forward_ce": _em_step, "reverse_kl": _entropic_step}


def default_hessian_dtype(features: torch.Tensor) -> torch.dtype:
    """float32 for per-student features on CPU (half the cost of the dominant product; the certificate stays
    in the features' dtype), the features' dtype otherwise."""
    return torch.float32 if (features.device.type == "cpu" and features.ndim == 3) else features.dtype


def fit_mixture_batched(
    features: torch.Tensor,
    teacher: torch.Tensor,
    loss: Loss,
    *,
    tol: float = 1e-10,
    max_iter: int = 200,
    hessian_dtype: torch.dtype | None = None,
    hessian_reuse_step: float = 1e-3,
    hessian_reuse_change: float = 0.01,
    mm_start: int = 0,
    A0: torch.Tensor | None = None,
    sub_batch_bytes: int | None = SUB_BATCH_BYTES,
    strong_convexity: bool = False,
) -> FitResult:
    r"""Fit ``B`` mixture-head students at once and certify each with its Frank–Wolfe gap.

    Args:
        features: ``(B, n, m)`` or shared ``(n, m)``, rows in :math:`\Delta^m` (float64 recommended).
        teacher: ``(B, n, k)`` rows in :math:`\Delta^k`.
        loss: a :class:`~w2s_theory.divergences.Loss` that is convex in the student's probabilities.
        tol: stop a student once its certified gap is at most ``tol``.
        max_iter: most Newton steps per student (the certificate is always taken at the returned point).
        hessian_dtype: dtype of the Hessian products, the dominant cost. Default: float32 on CPU for
            per-student features (half the cost), the features' dtype otherwise. The gradient, objective
            and gap always stay in the features' dtype, so the certificate is unaffected: only the Newton
            direction is approximate, which costs at most an extra iteration. Students whose curvatures
            exceed the low-precision range get float64 products.
        hessian_reuse_step, hessian_reuse_change: once a full Newton step moved no entry of ``A`` by more
            than ``hessian_reuse_step`` and no prediction (with teacher mass) by more than the relative
            ``hessian_reuse_change``, the next iteration reuses the Hessian (the Shamanskii variant of
            Newton's method: still superlinear). The relative test matters near a barrier: there a tiny
            absolute step changes the curvature by orders of magnitude, and a stale Hessian stalls Newton.
            A reused Hessian is within a factor :math:`(1\pm r)^2` of the fresh one, which bounds the linear
            rate of the reused steps: at ``r = 0.1`` (the earlier default) students on near one-hot
            features needed 6.3 iterations on average, at ``r = 0.01`` 5.1 (the bench's sparse workload,
            B = 200); on dense features both take the same steps.
        A0: optional feasible warm start ``(B, k, m)``.
        strong_convexity: for ``k = 2``, a cold start and the KL losses (:data:`STRONG_CONVEXITY_LOSSES`;
            elsewhere a ``ValueError``), the gap is the smaller of the Frank–Wolfe gap and the strong-convexity bound :math:`\|v\|^2/(2\mu)` (:func:`_strong_convexity_gap`), quadratic in the
            distance to the optimum where the Frank–Wolfe gap is linear: students stop about one iteration
            earlier. That gap bounds ``objective - optimum`` only, not the first-order quantity
            :math:`\max_S\langle\nabla\Phi, A - S\rangle` that the theorem checks need (a Theorem-2 slack can be
            :math:`-\sqrt{\text{gap}}`-sized), so it is off by default; the certificate is then named
            ``"frank_wolfe_or_strong_convexity"`` and ``info`` marks the students it certified
            (``strong_convexity``) with their ``modulus``.
        sub_batch_bytes: per-student features on CPU are solved in sub-batches of about this many bytes of
            features (32 MiB): the arithmetic of a student does not depend on its batch (on one thread, as
            in sweeps; with more, the BLAS may split a long sum differently for a batch of one), and on CPU one
            huge batch pays for fresh memory pages every iteration and elementwise passes over arrays that
            leave the cache (measured at B = 1000, n = 2000, m = 64, 2 threads: 3.6 s at once, 1.53 ms per
            student in sub-batches of 128 MiB, 1.46-1.50 ms in 32 MiB, 1.67 ms in 16 MiB, where per-call
            overheads take over). ``None`` solves the batch at once.
    """
    if not loss.convex_in_probabilities:
        raise ValueError(f"loss {loss.name!r} is not convex in the student's probabilities")
    B, n, k = teacher.shape
    refusal = strong_convexity_unavailable(k, loss.name, A0 is not None) if strong_convexity else None
    if refusal:
        raise ValueError(refusal)
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
                                    hessian_reuse_change=hessian_reuse_change, mm_start=mm_start,
                                    A0=None if A0 is None else A0[s : s + size], sub_batch_bytes=None,
                                    strong_convexity=strong_convexity)
                for s in range(0, B, size)
            ])
    if hessian_dtype is None:
        hessian_dtype = default_hessian_dtype(features)
    design = _SharedFeatures(features, hessian_dtype) if shared else _StudentFeatures(features, hessian_dtype)
    Qt = teacher.transpose(1, 2).contiguous()  # class-major (B, k, n), like the predictions
    allowed = _allowed_entries(design, Qt, loss)
    feasible_problem = allowed.any(dim=1).all(dim=1)  # every column has a class it may use
    Qd = _teacher_for_derivatives(design, Qt, allowed, loss)
    terms = _loss_terms(loss, Qt, Qd)

    if A0 is None:
        A = allowed.to(dtype)
        A = A / A.sum(dim=1, keepdim=True).clamp_min(1)
    else:
        A = A0.to(device=dev, dtype=dtype).clone()
    iterations = torch.zeros(B, dtype=torch.long, device=dev)

    if loss.linear_in_probabilities:
        # Reverse CE: Phi is linear in A, so one call of the linear-minimisation oracle is exact.
        G = design.gradient(terms.derivative(design.predict(A)))
        A = MixtureHead.lmo(G, allowed)
        iterations += 1
        probs = design.predict(A)
        value = terms.value(probs)
        G, gap, _, _, _ = _certified_gradient(design, terms, A, probs, allowed)
        return _result(design, loss, A, probs, value, G, gap, allowed, feasible_problem, iterations, tol)

    probs = design.predict(A)
    value = terms.value(probs)
    G_all = torch.zeros_like(A)
    gap_all = torch.full_like(value, float("inf"))
    # The best certified point each student has visited: past its rounding floor (a tol below it) an
    # iteration can wander off a point whose gap was small, and the student then returns the better one
    best_A, best_gap = A.clone(), torch.full_like(value, float("inf"))
    k2_fast = k == 2
    # Strong-convexity certificate (k = 2, from the first Hessian, taken at the uniform start): its modulus per
    # student (0: none proved) and which returned gaps it gave
    share = _START_CURVATURE_SHARE[loss.name] if strong_convexity else None
    modulus = torch.zeros_like(value)
    from_modulus = torch.zeros(B, dtype=torch.bool, device=dev)
    barrier_free = loss.name == "squared"
    mm_step = _MM_STEPS.get(loss.name)
    has_mm = mm_step is not None
    mm_start = mm_start if has_mm else 0
    # w_j = mean_i h_ij (B, 1, m), for the entropic step only: a pass over the features, taken when first needed
    mass = None
    # Working set: the students still iterating. Compaction copies the per-student features, so for that
    # layout it waits until the set has thinned out; shared features cost nothing to compact.
    compact_below = 1.0 if shared else 0.6
    ws = torch.arange(B, device=dev)
    d, tw, al, Aw, Pw, Vw = design, terms, allowed, A.clone(), probs.clone(), value.clone()
    running = feasible_problem.clone()
    H = None
    need_hessian = torch.ones(B, dtype=torch.bool, device=dev)
    mm_next, newton_failed = torch.zeros_like(need_hessian), torch.zeros_like(need_hessian)

    def evaluate_some(students, candidate, newton: bool):
        """Probabilities, values and acceptability (finite; for Newton steps also off the barrier) of
        ``candidate(pick)`` for ``students`` of the working set: the whole set is evaluated (results of others
        discarded) unless few are asked, since indexing per-student features copies them, which costs more
        than the products. Majorise-minimise steps are multiplicative and monotone: they need no guard."""
        full = students.numel() == Aw.shape[0] or (students.numel() > 0.25 * Aw.shape[0] and not d.shared)
        idx = torch.arange(Aw.shape[0], device=dev) if full else students
        pick = (lambda t: t) if idx.numel() == Aw.shape[0] else (lambda t: t[idx])  # noqa: E731
        trial = candidate(pick)
        if share is not None:  # the strong-convexity certificate is about points in the feasible set itself
            trial = _exact_two_class_columns(trial, pick(al))
        sub = idx.numel() != Aw.shape[0]
        Pt = (d.take(idx) if sub else d).predict(trial)
        t = tw.take(idx) if sub else tw
        Vt = t.value(Pt)
        ok = torch.isfinite(Vt) & t.gradient_is_finite(Pt)
        if newton and not barrier_free:
            ok &= t.stays_off_the_barrier(pick(Pw), Pt)
        return idx, trial, Pt, Vt, ok

    for it in range(max_iter + 1):
        if running.sum() < compact_below * running.numel():
            A[ws], probs[ws], value[ws] = Aw, Pw, Vw
            keep = running.nonzero()[:, 0]
            ws, al, Aw, Pw, Vw = (t[keep] for t in (ws, al, Aw, Pw, Vw))
            mass = mass[keep] if mass is not None else None
            d, tw = d.take(keep), tw.take(keep)
            H = H[keep] if H is not None else None
            need_hessian, running, mm_next, newton_failed = (
                t[keep] for t in (need_hessian, running, mm_next, newton_failed))
        # The certificate of every student in the working set at its current point: the returned gap of a
        # student is the one computed here at its last point.
        # Students that will take a Newton step with a fresh Hessian unless this certificate stops them get
        # their Hessian in the certificate's sweep over the features (one pass instead of two). Guessed from
        # the last gap: a Frank-Wolfe gap above 1e3 tol is not followed by one below tol (Newton's quadratic
        # convergence); with a strong-convexity modulus the gap is quadratic in the step, and a gap g was
        # followed by at most about 10 g^2 (measured on the bench's workloads). A wrong guess costs time only.
        worth_it = gap_all[ws] > 1e3 * tol
        if share is not None:
            worth_it = torch.where(modulus[ws] > 0, 10 * gap_all[ws] ** 2 > tol, worth_it)
        fused = running & need_hessian & ~mm_next & (it >= mm_start) & worth_it
        rows = fused.nonzero()[:, 0] if bool(fused.any()) else None
        G, gap, dphi, H_fused, by_modulus = _certified_gradient(d, tw, Aw, Pw, al, rows, k2_fast,
                                                                modulus[ws] if share is not None else None)
        G_all[ws], gap_all[ws] = G, gap
        if share is not None:
            from_modulus[ws] = by_modulus
        better = gap < best_gap[ws]
        best_gap[ws[better]], best_A[ws[better]] = gap[better], Aw[better]
        running = running & ~(gap <= tol)
        if it == max_iter or not running.any():
            break
        slack = 16 * torch.finfo(dtype).eps * (Vw.abs() + 1)
        # Step kind per student: a majorise-minimise step during the warm-up and right after a Newton step that
        # was cut short (its quadratic model is poor there: typically an entry orders of magnitude above a
        # tiny optimum, which the barrier lets Newton only halve per iteration); Newton otherwise.
        use_mm = running & (mm_next | (it < mm_start))
        if H_fused is not None:
            if H is None:
                H = torch.zeros((Aw.shape[0], *H_fused.shape[1:]), dtype=H_fused.dtype, device=dev)
            H[rows] = H_fused
            need_hessian = need_hessian & ~fused
            if it == 0 and share is not None:
                modulus[ws[rows]] = _strong_convexity_modulus(H_fused[:, 0], share, n, design.hessian_dtype)
        if it == 0 and has_mm and mm_start == 0 and A0 is None and H_fused is not None:
            # First step of a student whose features are close to one-hot (most of its curvature on the
            # diagonal of X^T diag(w) X): majorise-minimise, exact in one step on one-hot features, where
            # Newton's first steps from the uniform start are cut short (measured: 8.0 -> 6.3 iterations on
            # near one-hot features).
            near_one_hot = fused & running & (_diagonal_share(H) >= 0.5)
            use_mm |= near_one_hot
            need_hessian |= near_one_hot
        newton = running & ~use_mm
        A_old, P_old, V_old = Aw.clone(), Pw.clone(), Vw.clone()
        alpha = torch.ones(Aw.shape[0], dtype=dtype, device=dev)
        pending = newton.clone()
        floor = torch.zeros_like(pending)
        if newton.any():
            # Hessian: fresh where the last step was large, reused where Newton is already in its fast phase.
            fresh = need_hessian & newton
            if fresh.any() or H is None:
                if H is None or fresh.sum() > 0.5 * fresh.numel():
                    H_new = d.curvature_blocks(tw.curvature(Pw, dphi, k2_fast))
                    H = H_new if H is None else torch.where(fresh[:, None, None, None], H_new, H)
                else:
                    sel = fresh.nonzero()[:, 0]
                    H[sel] = d.curvature_blocks(tw.curvature(Pw, dphi, k2_fast)[sel], sel)
            D = _newton_direction(G, Aw, H, al, gap.clamp(max=1e-2))
            D = D * newton[:, None, None]
            # Armijo backtracking along the projected arc; a rounding allowance keeps the test meaningful once
            # decreases reach the last bits of the objective.
            for _ in range(_MAX_BACKTRACK):
                todo = pending.nonzero()[:, 0]
                if todo.numel() == 0:
                    break
                idx, trial, Pt, Vt, fine = evaluate_some(
                    todo, lambda pick: _project_step(pick(A_old), pick(D), pick(al), pick(alpha), pick(floor)), True)
                decrease = (G[idx] * (trial - A_old[idx])).sum(dim=(1, 2))
                ok = fine & (Vt <= V_old[idx] + _ARMIJO * decrease + slack[idx]) & pending[idx]
                hit = idx[ok]
                Aw[hit], Pw[hit], Vw[hit] = trial[ok], Pt[ok], Vt[ok]
                pending[hit] = False
                # A step that reaches the barrier is first retried with the floor, then shortened.
                to_floor = ~fine & pending[idx] & ~floor[idx] & (not barrier_free)
                floor[idx[to_floor]] = True
                alpha[idx[~ok & ~to_floor & pending[idx]]] *= 0.5
        mm_failed = torch.zeros_like(running)
        if use_mm.any():
            if mass is None:
                mass = (d.X.sum(dim=-2) / n).expand(Aw.shape[0], -1)[:, None, :]
                d.work["feature_reads"] += Aw.shape[0]
            cm = mass
            idx, trial, Pt, Vt, ok = evaluate_some(
                use_mm.nonzero()[:, 0], lambda pick: mm_step(pick(A_old), pick(G), pick(cm), pick(al)), False)
            ok &= use_mm[idx] & (Vt <= V_old[idx] + slack[idx])
            hit = idx[ok]
            Aw[hit], Pw[hit], Vw[hit] = trial[ok], Pt[ok], Vt[ok]
            mm_failed[idx[~ok & use_mm[idx]]] = True
        # No acceptable step: stop, the certificate at the current point still holds. A failed Newton step is
        # followed by a majorise-minimise step where the loss has one; the student stops if that fails too.
        stalled = (pending & (not has_mm)) | (mm_failed & newton_failed)
        newton_failed = pending.clone()
        mm_next = newton & ((alpha < 1) | floor) & has_mm
        running = running & ~stalled
        step = (Aw - A_old).abs().amax(dim=(1, 2))
        need_hessian = (alpha < 1) | (use_mm & need_hessian) | (step > hessian_reuse_step)
        if not bool(need_hessian.all()):  # the relative test only decides between the remaining students
            need_hessian |= ~(tw.relative_change(P_old, Pw) <= hessian_reuse_change)
        iterations[ws[running | stalled]] += 1
    A[ws], probs[ws], value[ws] = Aw, Pw, Vw
    back = (best_gap < gap_all).nonzero()[:, 0]
    if back.numel():  # rare: recomputed (prediction, value, certificate) at the best point for these alone
        A[back] = best_A[back]
        d, tw = design.take(back), terms.take(back)
        probs[back] = d.predict(A[back])
        value[back] = tw.value(probs[back])
        G_all[back], gap_all[back], _, _, from_modulus[back] = _certified_gradient(
            d, tw, A[back], probs[back], allowed[back], modulus=modulus[back] if share is not None else None)
    result = _result(design, loss, A, probs, value, G_all, gap_all, allowed, feasible_problem, iterations, tol)
    if strong_convexity:
        result.certificate = "frank_wolfe_or_strong_convexity"
        result.info.update(strong_convexity=from_modulus & torch.isfinite(result.gap), modulus=modulus)
    return result


def _result(design, loss, A, probs, value, G, gap, allowed, feasible_problem, iterations, tol) -> FitResult:
    """The :class:`FitResult`; ``probs`` ``(B, k, n)``, ``value``, ``G`` and the certified ``gap`` are those
    computed at the returned ``A`` (:func:`_certified_gradient`). Infeasible students get infinite values."""
    inf = torch.full_like(gap, float("inf"))
    gap = torch.where(feasible_problem & ~torch.isnan(gap), gap, inf)
    value = torch.where(feasible_problem, value, inf)
    # Norm of the reduced gradient (gradient minus its column-wise mean over allowed classes), for the record.
    Gm = torch.where(allowed, G, torch.zeros_like(G))
    centred = Gm - Gm.sum(dim=1, keepdim=True) / allowed.sum(dim=1, keepdim=True).clamp_min(1)
    grad_norm = torch.where(allowed, centred, torch.zeros_like(G)).flatten(1).norm(dim=1)
    return FitResult(
        head="mixture", loss=loss.name, params={"A": A}, probs=probs.transpose(1, 2).contiguous(),
        objective=value, gap=gap, certificate="frank_wolfe", grad_norm=grad_norm, iterations=iterations,
        converged=gap <= tol,
        method="projected-newton" if not loss.linear_in_probabilities else "linear-minimisation-oracle",
        info={"shared_features": design.shared, "tol": tol, "work": dict(design.work)},
    )


def flop_count(n: int, m: int, k: int, iterations: float, *, trials: float = 1.0) -> float:
    r"""Multiply-adds one student costs for ``iterations`` Newton iterations (each with a fresh Hessian).

    Per iteration: the Hessian blocks :math:`X^\top\mathrm{diag}(w)X`, :math:`n m^2` for ``k = 2`` (one
    block of the reduced problem) and :math:`k n m^2` otherwise, plus forming :math:`\sqrt w X`
    (:math:`n m` per block); the gradient and its certificate in one product (:math:`2 k n m`); ``trials``
    line-search predictions (:math:`k n m` each). Plus the start's prediction. An upper bound where Hessians
    are reused. Divide by seconds for the achieved rate and compare with :func:`peak_gemm_rate`.
    """
    blocks = 1 if k == 2 else k
    per_iteration = blocks * (n * m * m + n * m) + 2 * k * n * m + trials * k * n * m
    return float(iterations) * per_iteration + 2 * k * n * m


def peak_gemm_rate(dtype: torch.dtype = torch.float64, size: int = 2048, repeats: int = 3, device="cpu") -> float:
    """Multiply-adds per second of one large square ``torch.matmul`` on this machine (best of ``repeats``):
    the practical peak to compare :func:`flop_count` / seconds with."""
    import time

    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if a.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return size**3 / best
