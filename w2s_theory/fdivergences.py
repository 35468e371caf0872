r"""The field's training losses beyond KL: f-divergences and general Bregman divergences, as
:class:`~w2s_theory.divergences.Loss` objects that every solver and sweep understands.

**f-divergences** (Csiszár 1967; the family of Yao et al., arXiv 2506.03109). For a convex :math:`f` with
:math:`f(1) = 0`, :math:`D_f(a\|b) = \sum_y b_y f(a_y/b_y)`, a sum of per-class terms :math:`\ell(a_y, b_y)`
that are jointly convex (perspectives). A loss named ``<f>`` trains :math:`\mathbb E\,D_f(F(x)\|F_w(x))`,
**student first**; ``reverse_<f>`` puts the teacher first where that differs:

================  =====================================================  ===========================
name              per-class term :math:`\ell(a, b)`, student :math:`a`   :math:`f(t)`
================  =====================================================  ===========================
js                :math:`\tfrac12[a\log\frac{2a}{a+b} + b\log\frac{2b}{a+b}]`  Jensen–Shannon (symmetric)
jeffreys          :math:`(a - b)\log(a/b)`                                :math:`(t-1)\log t` (symmetric)
hellinger         :math:`(\sqrt a - \sqrt b)^2`                           :math:`(\sqrt t - 1)^2` (symmetric)
chi2              :math:`(a - b)^2/b`                                     :math:`(t - 1)^2`
reverse_chi2      :math:`(a - b)^2/a`                                     :math:`(t-1)^2/t`
tv                :math:`\tfrac12|a - b|`                                 :math:`\tfrac12|t - 1|` (symmetric)
================  =====================================================  ===========================

(``reverse_kl`` and ``forward_kl`` of :mod:`w2s_theory.divergences` are the f-divergences :math:`t\log t` and
:math:`-\log t`; :data:`F_DIVERGENCES` carries their terms too so that the f-divergence table treats all alike.)
Squared Hellinger is taken without the factor 1/2 some authors use.

Each term carries its derivatives: ``d_student`` and ``dd_student`` in the student's entry (what the solvers
need) and ``d_teacher`` in the other slot (what the perturbation certificate of
:func:`w2s_theory.fchecks.perturbation_bound` needs). Boundary conventions are exact: a term is 0 where both
entries are 0 and :math:`+\infty` where the divergence is.

**Bregman losses** ``bregman:<generator>`` train :math:`\mathbb E\,D_\phi(F(x), F_w(x))` (student first, so
``bregman:negative_entropy`` is the reverse KL of Yao et al. 2025 and Mulgund & Pabbaraju 2025 generalise its
Theorem 2 to every generator) for the generators of :data:`w2s_theory.bregman.LOSS_GENERATORS`.
``bregman:mahalanobis`` uses :func:`w2s_theory.bregman.kms_matrix` of the number of classes.

``tv`` is not differentiable; its solvers smooth it and certify the gap of TV itself
(:mod:`w2s_theory.solvers.frank_wolfe`). ``bregman:mahalanobis`` is not separable over classes
(:data:`NON_SEPARABLE`); it is quadratic, which the linear head's barrier solver uses
(:data:`w2s_theory.solvers.linear.QUADRATIC_LOSSES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ._backend import ops
from .bregman import LOSS_GENERATORS, generator_for
from .divergences import Loss

__all__ = ["FDivergence", "F_DIVERGENCES", "F_LOSSES", "NON_SEPARABLE", "NONSMOOTH", "extra_loss",
           "extra_loss_names", "is_extra_loss", "f_divergence", "smoothed_tv_loss"]


def _safe(o, x, mask, fill=1.0):
    return o.where(mask, fill + 0 * x, x)


# -- per-class terms l(a, b), a = student slot, b = teacher slot ------------------------------------------


def _js(a, b):
    o = ops(a, b)
    m = (a + b) / 2
    return 0.5 * (o.xlogy(a, a) + o.xlogy(b, b)) - o.xlogy(m, m)


def _js_d1(a, b):
    o = ops(a, b)
    pos = a > 0
    a_ = _safe(o, a, ~pos)
    val = 0.5 * (o.log(a_) - o.log((a_ + b) / 2))
    # a = 0: derivative is -inf where b > 0, and (1/2) log 2 where b = 0 (the limit along a -> 0+).
    return o.where(pos, val, o.where(b > 0, -o.inf + 0 * a, 0.5 * np.log(2) + 0 * a))


def _js_dd1(a, b):
    o = ops(a, b)
    pos = a > 0
    a_ = _safe(o, a, ~pos)
    return o.where(pos, 0.5 * b / (a_ * (a_ + b)), o.where(b > 0, o.inf + 0 * a, 0 * a))


def _jeffreys(a, b):
    o = ops(a, b)
    both = (a == 0) & (b == 0)
    one = (a == 0) != (b == 0)
    a_, b_ = _safe(o, a, both | one), _safe(o, b, both | one)
    val = (a_ - b_) * (o.log(a_) - o.log(b_))
    return o.where(both, 0 * a, o.where(one, o.inf + 0 * a, val))


def _jeffreys_d1(a, b):
    o = ops(a, b)
    ok = (a > 0) & (b > 0)
    a_, b_ = _safe(o, a, ~ok), _safe(o, b, ~ok)
    val = o.log(a_) - o.log(b_) + 1 - b_ / a_
    return o.where(ok, val, o.where((a == 0) & (b > 0), -o.inf + 0 * a, 0 * a))


def _jeffreys_dd1(a, b):
    o = ops(a, b)
    ok = a > 0
    a_ = _safe(o, a, ~ok)
    return o.where(ok, 1 / a_ + b / a_**2, o.where(b > 0, o.inf + 0 * a, 0 * a))


def _hellinger(a, b):
    o = ops(a, b)
    return (o.sqrt(a) - o.sqrt(b)) ** 2


def _hellinger_d1(a, b):
    o = ops(a, b)
    ok = a > 0
    a_ = _safe(o, a, ~ok)
    return o.where(ok, 1 - o.sqrt(b / a_), o.where(b > 0, -o.inf + 0 * a, 1 + 0 * a))


def _hellinger_dd1(a, b):
    o = ops(a, b)
    ok = a > 0
    a_ = _safe(o, a, ~ok)
    return o.where(ok, 0.5 * o.sqrt(b) * a_**-1.5, o.where(b > 0, o.inf + 0 * a, 0 * a))


def _chi2(a, b):
    o = ops(a, b)
    ok = b > 0
    b_ = _safe(o, b, ~ok)
    return o.where(ok, (a - b) ** 2 / b_, o.where(a > 0, o.inf + 0 * a, 0 * a))


def _chi2_d1(a, b):
    o = ops(a, b)
    ok = b > 0
    b_ = _safe(o, b, ~ok)
    return o.where(ok, 2 * (a - b) / b_, 0 * a)  # b = 0: the entry is pinned at 0


def _chi2_dd1(a, b):
    o = ops(a, b)
    ok = b > 0
    b_ = _safe(o, b, ~ok)
    return o.where(ok, 2 / b_, 0 * a)


def _swap(term):
    def swapped(a, b):
        return term(b, a)

    return swapped


def _rchi2_d1(a, b):  # d/da (a - b)^2 / a = 1 - b^2/a^2
    o = ops(a, b)
    ok = a > 0
    a_ = _safe(o, a, ~ok)
    return o.where(ok, 1 - (b / a_) ** 2, o.where(b > 0, -o.inf + 0 * a, 1 + 0 * a))


def _rchi2_dd1(a, b):
    o = ops(a, b)
    ok = a > 0
    a_ = _safe(o, a, ~ok)
    return o.where(ok, 2 * b**2 / a_**3, o.where(b > 0, o.inf + 0 * a, 0 * a))


def _tv(a, b):
    o = ops(a, b)
    return 0.5 * o.abs(a - b)


def _sign(o, x):
    return o.where(x > 0, 1 + 0 * x, o.where(x < 0, -1 + 0 * x, 0 * x))


def _tv_d1(a, b):  # a subgradient (0 where a = b)
    return 0.5 * _sign(ops(a, b), a - b)


def _kl(a, b):
    o = ops(a, b)
    return o.where((b == 0) & (a > 0), o.inf + 0 * a, o.xlogy(a, a) - o.xlogy(a, _safe(o, b, b == 0)))


def _kl_d1(a, b):
    o = ops(a, b)
    ok = (a > 0) & (b > 0)
    a_, b_ = _safe(o, a, ~ok), _safe(o, b, ~ok)
    return o.where(ok, o.log(a_) - o.log(b_) + 1, o.where((a == 0) & (b > 0), -o.inf + 0 * a, 0 * a))


def _kl_dd1(a, b):
    o = ops(a, b)
    ok = a > 0
    return o.where(ok, 1 / _safe(o, a, ~ok), o.where(b > 0, o.inf + 0 * a, 0 * a))


def _kl_d2(a, b):  # d/db [a log(a/b)] = -a/b
    o = ops(a, b)
    ok = b > 0
    return o.where(ok, -a / _safe(o, b, ~ok), o.where(a > 0, -o.inf + 0 * a, 0 * a))


def _fkl_d1(a, b):  # d/da [b log(b/a)] = -b/a
    return _kl_d2(b, a)


def _fkl_dd1(a, b):
    o = ops(a, b)
    ok = a > 0
    a_ = _safe(o, a, ~ok)
    return o.where(ok, b / a_**2, o.where(b > 0, o.inf + 0 * a, 0 * a))


def _lift(fn):
    """Python scalars and lists become float arrays (masks then are arrays, never Python bools)."""

    def lifted(a, b):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return fn(a, b)

    return lifted


@dataclass(frozen=True)
class FDivergence:
    r"""One f-divergence as per-class terms :math:`\ell(a, b)` (student slot ``a``), with
    ``d_student`` = :math:`\partial_a\ell`, ``dd_student`` = :math:`\partial_a^2\ell` (non-increasing in
    :math:`a` for every entry here, which :mod:`w2s_theory.fchecks` uses) and ``d_teacher`` =
    :math:`\partial_b\ell` (non-decreasing in :math:`b`: the term is convex in :math:`b`)."""

    name: str
    term: Callable
    d_student: Callable
    dd_student: Callable
    d_teacher: Callable
    pins_student_to_teacher_support: bool
    symmetric: bool
    smooth: bool
    description: str

    def __post_init__(self):
        for part in ("term", "d_student", "dd_student", "d_teacher"):
            object.__setattr__(self, part, _lift(getattr(self, part)))

    def __call__(self, student, teacher):
        r""":math:`D(\text{student}\,\|\,\text{teacher})` per sample (sum over the last axis)."""
        return ops(student, teacher).sum(self.term(student, teacher), axis=-1)


F_DIVERGENCES: dict[str, FDivergence] = {
    f.name: f for f in (
        FDivergence("reverse_kl", _kl, _kl_d1, _kl_dd1, _kl_d2, True, False, True,
                    "KL(student || teacher); f(t) = t log t"),
        FDivergence("forward_kl", _swap(_kl), _fkl_d1, _fkl_dd1, _swap(_kl_d1), False, False, True,
                    "KL(teacher || student); f(t) = -log t"),
        FDivergence("js", _js, _js_d1, _js_dd1, _swap(_js_d1), False, True, True,
                    "Jensen-Shannon divergence"),
        FDivergence("jeffreys", _jeffreys, _jeffreys_d1, _jeffreys_dd1, _swap(_jeffreys_d1), True, True, True,
                    "Jeffreys divergence KL(s||t) + KL(t||s)"),
        FDivergence("hellinger", _hellinger, _hellinger_d1, _hellinger_dd1, _swap(_hellinger_d1), False, True,
                    True, "squared Hellinger distance sum (sqrt s - sqrt t)^2"),
        FDivergence("chi2", _chi2, _chi2_d1, _chi2_dd1, _swap(_rchi2_d1), True, False, True,
                    "chi^2(student || teacher) = sum (s - t)^2 / t"),
        FDivergence("reverse_chi2", _swap(_chi2), _rchi2_d1, _rchi2_dd1, _swap(_chi2_d1), False, False, True,
                    "chi^2(teacher || student) = sum (s - t)^2 / s"),
        FDivergence("tv", _tv, _tv_d1, lambda a, b: 0 * a, _swap(_tv_d1), False, True, False,
                    "total variation (1/2) sum |s - t| (not differentiable)"),
    )
}

#: The f-divergence losses this module adds (the KL pair already lives in :data:`w2s_theory.divergences.LOSSES`).
F_LOSSES = ("js", "jeffreys", "hellinger", "chi2", "reverse_chi2", "tv")
#: Loss names whose solvers need a full (non-diagonal) gradient model.
NON_SEPARABLE = ("bregman:mahalanobis",)
#: Loss names that are not differentiable.
NONSMOOTH = ("tv",)


def f_divergence(name: str) -> FDivergence:
    try:
        return F_DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown f-divergence {name!r}; choose one of: {', '.join(F_DIVERGENCES)}") from None


def _f_loss(f: FDivergence) -> Loss:
    return Loss(
        f.name, f, False,
        lambda teacher, student: f.d_student(student, teacher),
        lambda teacher, student: f.dd_student(student, teacher),
        f.pins_student_to_teacher_support, True, False, f.description + " (student first)",
    )


def _mahalanobis_default(x):
    return generator_for("mahalanobis", int(x.shape[-1]))


def _bregman_loss(generator_name: str) -> Loss:
    name = f"bregman:{generator_name}"
    if generator_name == "mahalanobis":
        def divergence(x, y):
            return _mahalanobis_default(x).divergence(x, y)

        def grad(teacher, student):
            g = _mahalanobis_default(student)
            return g.gradient(student) - g.gradient(teacher)

        def curv(teacher, student):  # the diagonal of 2M = 2 (rho^0): a separable model, used by no solver
            return 2 + 0 * student

        return Loss(name, divergence, False, grad, curv, False, True, False,
                    "(s - t)^T M (s - t), M = Kac-Murdock-Szego(1/2) (student first)")
    g = generator_for(generator_name)
    pins = g.pins_zeros

    def grad(teacher, student):
        o = ops(teacher, student)
        if not pins:
            return g.gradient(student) - g.gradient(teacher)
        ok = (teacher > 0) & (student > 0)
        s_, t_ = _safe(o, student, ~ok), _safe(o, teacher, ~ok)
        return o.where(ok, g.gradient(s_) - g.gradient(t_),
                       o.where((student == 0) & (teacher > 0), -o.inf + 0 * student, 0 * student))

    def curv(teacher, student):
        o = ops(teacher, student)
        if not pins:
            return g.curvature(student)
        ok = student > 0
        return o.where(ok, g.curvature(_safe(o, student, ~ok)), o.where(teacher > 0, o.inf + 0 * student,
                                                                          0 * student))

    return Loss(name, g.divergence, False, grad, curv, pins, True, False, g.description + " (student first)")


def extra_loss_names() -> tuple[str, ...]:
    return F_LOSSES + tuple(f"bregman:{g}" for g in LOSS_GENERATORS)


def is_extra_loss(name: str) -> bool:
    return name in extra_loss_names()


def extra_loss(name: str) -> Loss:
    """The loss ``name`` of this module (an f-divergence of :data:`F_LOSSES` or ``bregman:<generator>``);
    anything else is a one-line ``ValueError`` naming the known generators or f-divergences."""
    if name.startswith("bregman:"):
        return _bregman_loss(name.split(":", 1)[1])  # unknown generator: ValueError from generator_for
    if name in F_LOSSES:
        return _f_loss(F_DIVERGENCES[name])
    raise ValueError(f"unknown loss {name!r}; f-divergences: {', '.join(F_LOSSES)}; "
                     f"Bregman: bregman:<{'|'.join(LOSS_GENERATORS)}>")


def smoothed_tv_loss(mu: float) -> Loss:
    r"""A smooth stand-in for ``tv``: :math:`\tfrac12\sum_y(\sqrt{(a-b)^2+\mu^2} - \mu)`, which lies in
    :math:`[\mathrm{TV} - k\mu/2, \mathrm{TV}]` per sample, so a gap :math:`g_\mu` for it certifies
    :math:`g_\mu + k\mu/2` for TV itself."""

    def divergence(student, teacher):
        o = ops(student, teacher)
        return 0.5 * o.sum(o.sqrt((student - teacher) ** 2 + mu**2) - mu, axis=-1)

    def grad(teacher, student):
        o = ops(teacher, student)
        d = student - teacher
        return 0.5 * d / o.sqrt(d**2 + mu**2)

    def curv(teacher, student):
        o = ops(teacher, student)
        d = student - teacher
        return 0.5 * mu**2 / o.sqrt(d**2 + mu**2) ** 3

    return Loss(f"tv_smoothed({mu:g})", divergence, False, grad, curv, False, True, False, "smoothed TV")
