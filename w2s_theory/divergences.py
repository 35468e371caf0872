r"""Divergences between distributions, each written once, with direction as an argument.

All functions act on the **last axis** (classes) and return one value per sample (the caller reduces), for
numpy or torch inputs alike (:mod:`w2s_theory._backend`). Bernoulli inputs are turned into two-class
categoricals by :func:`as_categorical`.

Boundary conventions (exact, never a floor):

* :math:`0 \log 0 = 0` (``xlogy``);
* :math:`\mathrm{KL}(p\|q) = +\infty` where some :math:`q_y = 0 < p_y`, never NaN;
* :math:`\mathrm{CE}(p, q) = +\infty` likewise.

Losses used to train a student are named by the direction that is trained (first argument = reference):

=============  ==========================================  =====================================
name           per-sample loss                             reference
=============  ==========================================  =====================================
forward_kl     :math:`\mathrm{KL}(F_w(x)\|F(x))`           soft-label distillation
forward_ce     :math:`\mathrm{CE}(F_w(x), F(x))`           = forward_kl + :math:`H(F_w)` (constant)
reverse_kl     :math:`\mathrm{KL}(F(x)\|F_w(x))`           Yao et al. 2025, Thm 2
reverse_ce     :math:`\mathrm{CE}(F(x), F_w(x))`           = reverse_kl + :math:`H(F)`
squared        :math:`\|F(x) - F_w(x)\|_2^2`               Charikar et al. 2024
=============  ==========================================  =====================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ._backend import ops

__all__ = [
    "as_categorical",
    "kl",
    "generalized_kl",
    "cross_entropy",
    "entropy",
    "squared",
    "total_variation",
    "reverse",
    "Loss",
    "LOSSES",
    "get_loss",
]


def as_categorical(p):
    r"""Bernoulli parameters :math:`p` (any shape) -> two-class distributions :math:`(p, 1-p)` on a new last axis."""
    o = ops(p)
    return o.stack([p, 1 - p], axis=-1)


def kl(p, q):
    r"""Kullback–Leibler divergence :math:`\mathrm{KL}(p\|q) = \sum_y p_y \log(p_y / q_y)` per sample.

    Exact at the boundary: :math:`0\log 0 = 0`, and :math:`+\infty` where :math:`q_y = 0 < p_y`.
    """
    o = ops(p, q)
    return o.sum(o.xlogy(p, p) - o.xlogy(p, q), axis=-1)


def generalized_kl(p, q):
    r"""KL for non-negative vectors, :math:`\sum_y p_y\log(p_y/q_y) - p_y + q_y`: the Bregman divergence of
    the negative entropy :math:`\phi(p) = \sum_y p_y \log p_y`. Equal to :func:`kl` on the simplex."""
    o = ops(p, q)
    return o.sum(o.xlogy(p, p) - o.xlogy(p, q) - p + q, axis=-1)


def cross_entropy(p, q):
    r"""Cross-entropy :math:`\mathrm{CE}(p, q) = -\sum_y p_y \log q_y = \mathrm{KL}(p\|q) + H(p)` per sample."""
    o = ops(p, q)
    return -o.sum(o.xlogy(p, q), axis=-1)


def entropy(p):
    r"""Shannon entropy :math:`H(p) = -\sum_y p_y \log p_y` (nats) per sample."""
    o = ops(p)
    return -o.sum(o.xlogy(p, p), axis=-1)


def squared(p, q):
    r"""Squared Euclidean distance :math:`\|p - q\|_2^2` per sample (the Bregman divergence of :math:`\|\cdot\|^2`)."""
    o = ops(p, q)
    return o.sum((p - q) ** 2, axis=-1)


def total_variation(p, q):
    r"""Total variation distance :math:`\mathrm{TV}(p, q) = \tfrac12 \sum_y |p_y - q_y|` per sample."""
    o = ops(p, q)
    return 0.5 * o.sum(o.abs(p - q), axis=-1)


def reverse(divergence: Callable) -> Callable:
    r"""The same divergence with its arguments swapped: ``reverse(kl)(p, q) = kl(q, p)``."""

    def reversed_divergence(p, q):
        return divergence(q, p)

    reversed_divergence.__name__ = f"reverse_{divergence.__name__}"
    reversed_divergence.__doc__ = f"{divergence.__name__} with arguments swapped."
    return reversed_divergence


# --------------------------------------------------------------------------------------------------------
# Training losses: a divergence plus a direction, with the derivatives the solvers need.
# --------------------------------------------------------------------------------------------------------


def _forward_kl_grad(teacher, student):
    # d/dp KL(q||p) = -q/p, with 0 where q = 0 (those terms are identically 0).
    o = ops(teacher, student)
    return o.where(teacher > 0, -teacher / student, 0 * student)


def _forward_kl_curv(teacher, student):
    o = ops(teacher, student)
    return o.where(teacher > 0, teacher / student**2, 0 * student)


def _reverse_kl_grad(teacher, student):
    # d/dp KL(p||q) = log(p/q) + 1.  Where q = 0 the student entry is pinned at 0 (any other value has an
    # infinite loss); the solver fixes those entries, so their derivative is reported as 0.
    o = ops(teacher, student)
    return o.where(teacher > 0, o.log(student) - o.log(teacher) + 1, 0 * student)


def _reverse_kl_curv(teacher, student):
    o = ops(teacher, student)
    return o.where(teacher > 0, 1 / student, 0 * student)


def _reverse_ce_grad(teacher, student):
    # d/dp CE(p, q) = -log q: linear in the student.
    o = ops(teacher, student)
    return o.where(teacher > 0, -o.log(teacher), 0 * student) + 0 * student


def _zero_curv(teacher, student):
    return 0 * student + 0 * teacher


def _squared_grad(teacher, student):
    return 2 * (student - teacher)


def _squared_curv(teacher, student):
    return 2 + 0 * (student - teacher)


@dataclass(frozen=True)
class Loss:
    r"""A training loss :math:`\ell(F_w(x), F(x))` between teacher and student outputs.

    ``per_sample(teacher, student)`` evaluates it; ``grad_student`` and ``curvature_student`` are its first
    and (diagonal) second derivative in the student's probabilities, which is all the solvers need since
    every loss here is separable over classes.
    """

    name: str
    divergence: Callable
    teacher_first: bool
    grad_student: Callable
    curvature_student: Callable
    pins_student_to_teacher_support: bool
    convex_in_probabilities: bool
    linear_in_probabilities: bool
    description: str

    def per_sample(self, teacher, student):
        if self.teacher_first:
            return self.divergence(teacher, student)
        return self.divergence(student, teacher)

    def __call__(self, teacher, student):
        return self.per_sample(teacher, student)


LOSSES: dict[str, Loss] = {
    "forward_kl": Loss(
        "forward_kl", kl, True, _forward_kl_grad, _forward_kl_curv, False, True, False,
        "KL(teacher || student): soft-label distillation",
    ),
    "forward_ce": Loss(
        "forward_ce", cross_entropy, True, _forward_kl_grad, _forward_kl_curv, False, True, False,
        "CE(teacher, student) = forward_kl + H(teacher): same minimiser and gradients as forward_kl",
    ),
    "reverse_kl": Loss(
        "reverse_kl", kl, False, _reverse_kl_grad, _reverse_kl_curv, True, True, False,
        "KL(student || teacher): Yao et al. 2025",
    ),
    "reverse_ce": Loss(
        "reverse_ce", cross_entropy, False, _reverse_ce_grad, _zero_curv, True, True, True,
        "CE(student, teacher) = reverse_kl + H(student): linear in the student's probabilities",
    ),
    "squared": Loss(
        "squared", squared, True, _squared_grad, _squared_curv, False, True, False,
        "||student - teacher||^2: Charikar et al. 2024",
    ),
}


def get_loss(name: str) -> Loss:
    """The loss named ``name``; an unknown name is a ``ValueError`` that lists the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        pass
    from .fdivergences import extra_loss, is_extra_loss  # f-divergences and bregman:<generator>

    if is_extra_loss(name) or name.startswith("bregman:"):
        return extra_loss(name)
    raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}, or an f-divergence or "
                     f"bregman:<generator> of w2s_theory.fdivergences") from None


# --------------------------------------------------------------------------------------------------------
# From logits: exact where the probabilities would underflow (a softmax student's entries are never 0).
# --------------------------------------------------------------------------------------------------------


def cross_entropy_from_logits(p, logits):
    r""":math:`\mathrm{CE}(p, \mathrm{softmax}(\eta)) = -\sum_y p_y\,(\eta_y - \mathrm{lse}(\eta))` per sample,
    through ``log_softmax`` (log-sum-exp), so it stays finite for any finite logits (e.g. 0 vs 800, where
    :math:`\mathrm{softmax}` underflows to an exact 0 and :func:`cross_entropy` returns :math:`+\infty`).
    Terms with :math:`p_y = 0` are exactly 0."""
    o = ops(p, logits)
    log_q = o.log_softmax(logits, axis=-1)
    return -o.sum(o.where(p > 0, p * log_q, 0 * log_q), axis=-1)


def kl_from_logits(p, logits):
    r""":math:`\mathrm{KL}(p\,\|\,\mathrm{softmax}(\eta)) = \sum_y p_y\log p_y - p_y(\eta_y - \mathrm{lse}(\eta))`
    per sample, finite for finite logits (:func:`cross_entropy_from_logits`)."""
    o = ops(p, logits)
    return o.sum(o.xlogy(p, p), axis=-1) + cross_entropy_from_logits(p, logits)


def reverse_kl_from_logits(logits, q):
    r""":math:`\mathrm{KL}(\mathrm{softmax}(\eta)\,\|\,q) = \sum_y s_y(\log s_y - \log q_y)` per sample with
    :math:`\log s = \log\mathrm{softmax}(\eta)`; :math:`+\infty` where some :math:`q_y = 0` (every
    :math:`s_y > 0` in exact arithmetic, even where it underflows)."""
    o = ops(logits, q)
    log_s = o.log_softmax(logits, axis=-1)
    s = o.exp(log_s)
    inf = o.sum(o.where(q > 0, 0 * q, 0 * q + float("inf")), axis=-1)
    safe_log_q = o.log(o.where(q > 0, q, 0 * q + 1))
    return o.sum(s * (log_s - safe_log_q), axis=-1) + inf


def reverse_cross_entropy_from_logits(logits, q):
    r""":math:`\mathrm{CE}(\mathrm{softmax}(\eta), q) = -\sum_y s_y\log q_y` per sample; :math:`+\infty` where
    some :math:`q_y = 0`."""
    o = ops(logits, q)
    s = o.exp(o.log_softmax(logits, axis=-1))
    inf = o.sum(o.where(q > 0, 0 * q, 0 * q + float("inf")), axis=-1)
    safe_log_q = o.log(o.where(q > 0, q, 0 * q + 1))
    return -o.sum(s * safe_log_q, axis=-1) + inf


#: Per-sample training losses of a softmax student from its logits: ``LOSSES_FROM_LOGITS[name](teacher, logits)``.
LOSSES_FROM_LOGITS: dict[str, Callable] = {
    "forward_kl": kl_from_logits,
    "forward_ce": cross_entropy_from_logits,
    "reverse_kl": lambda teacher, logits: reverse_kl_from_logits(logits, teacher),
    "reverse_ce": lambda teacher, logits: reverse_cross_entropy_from_logits(logits, teacher),
}

__all__ += ["cross_entropy_from_logits", "kl_from_logits", "reverse_kl_from_logits",
            "reverse_cross_entropy_from_logits", "LOSSES_FROM_LOGITS"]
