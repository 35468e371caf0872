r"""Gain >= misfit for an f-divergence loss, with a certificate for both verdicts.

For a loss :math:`D` (:data:`w2s_theory.fdivergences.F_DIVERGENCES`, student slot first) the inequality is
measured in the loss's own divergence,

.. math:: \mathrm{slack} = \mathbb E\,D(F^*, F_w) - \mathbb E\,D(F^*, F_{sw}) - \mathbb E\,D(F_{sw}, F_w)
   \quad(\text{gain} - \text{misfit}),

at the exact minimiser :math:`F^\circ` of :math:`\Phi(F) = \mathbb E\,D(F, F_w)` over a convex head. Only
the computed :math:`\hat F` is known, with a certified gap :math:`g \ge \Phi(\hat F) - \Phi(F^\circ)`.
:func:`perturbation_bound` bounds :math:`|\mathrm{slack}(\hat F) - \mathrm{slack}(F^\circ)|`:

* the misfit is :math:`\Phi`, so it moves by at most :math:`g`;
* first-order optimality of :math:`F^\circ` and a lower bound :math:`c_{iy} = \partial_a^2\ell(1, q_{iy})` on
  the curvature of each term over :math:`a\in[0,1]` (every term here has :math:`\partial_a^2\ell`
  non-increasing in :math:`a`) give :math:`\frac1n\sum_{iy}c_{iy}\Delta_{iy}^2 \le 2g`, hence
  :math:`|\Delta_{iy}| \le \delta_{iy} = \sqrt{2ng/c_{iy}}`, :math:`\Delta = \hat F - F^\circ`;
* the term :math:`\ell(F^*_{iy}, b)` is convex in :math:`b`, so its derivative is monotone and its largest
  absolute value on :math:`[\hat F - \delta, \hat F + \delta]\cap[0,1]` is at an end: the truth term moves
  by at most :math:`\frac1n\sum_{iy}\delta_{iy}\max_{\text{ends}}|\partial_b\ell|`.

A slack above the bound certifies that the inequality holds at :math:`F^\circ`; one below minus the bound
(and rounding) certifies a counterexample. Total variation has no curvature (:math:`c = 0`): its minimiser need
not be unique and its verdicts are inconclusive. For ``reverse_kl`` (a Bregman divergence) the three-point
identity gives the sharper ``slack >= -g`` for the computed student (:mod:`w2s_theory.bregman`).
"""

from __future__ import annotations

import numpy as np

from .bregman import verdict
from .fdivergences import F_DIVERGENCES

__all__ = ["f_slack", "perturbation_bound", "f_inequality_verdicts"]


def f_slack(name: str, truth, teacher, student):
    """gain, misfit and slack = gain - misfit per instance (arrays ``(B, n, k)``)."""
    D = F_DIVERGENCES[name]
    gain = D(truth, teacher).mean(-1) - D(truth, student).mean(-1)
    misfit = D(student, teacher).mean(-1)
    return gain, misfit, gain - misfit


def perturbation_bound(name: str, truth, teacher, student, gap) -> np.ndarray:
    """The bound of the module docstring on ``|slack(computed) - slack(exact minimiser)|`` per instance."""
    f = F_DIVERGENCES[name]
    G, T, P = (np.asarray(x, dtype=float) for x in (truth, teacher, student))
    n = P.shape[-2]
    g = np.broadcast_to(np.asarray(gap, dtype=float), P.shape[:-2])[..., None, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c = np.asarray(f.dd_student(np.ones_like(T), T), dtype=float)
        delta = np.where(g == 0, 0.0, np.sqrt(2 * n * g / c))
        lo, hi = np.clip(P - delta, 0, 1), np.clip(P + delta, 0, 1)
        slope = np.maximum(np.abs(f.d_teacher(G, lo)), np.abs(f.d_teacher(G, hi)))
        term = np.where(delta == 0, 0.0, slope * delta)
        bound = g[..., 0, 0] + term.sum(-1).mean(-1)
    return np.where(np.isnan(bound), np.inf, bound)


def f_inequality_verdicts(name: str, truth, teacher, student, gap):
    """Per-instance ``(slack, certificate, rounding, verdicts)``; see the module docstring."""
    gain, misfit, slack = f_slack(name, truth, teacher, student)
    u = np.finfo(float).eps
    n_terms = int(np.prod(np.shape(truth)[-2:]))
    rounding = 8 * (n_terms + 8) * u * (np.abs(gain) + np.abs(misfit) + 1)
    if name == "reverse_kl":
        cert = np.asarray(gap, dtype=float)
        return slack, cert, rounding, np.asarray(verdict(slack, cert, rounding))
    cert = perturbation_bound(name, truth, teacher, student, gap)
    out = np.full(slack.shape, "inconclusive", dtype=object)
    out = np.where(np.isfinite(cert) & (slack >= cert), "holds", out)
    out = np.where(np.isfinite(cert) & (slack < -cert - rounding), "violated", out)
    return slack, cert, rounding, out
