r"""One theorem, many instances: the Pythagorean inequality of Bregman projections.

For a strictly convex generator :math:`\phi` with Bregman divergence
:math:`D_\phi(x, y) = \phi(x) - \phi(y) - \langle\nabla\phi(y), x - y\rangle`, a closed convex set
:math:`\mathcal C` and a target :math:`T`, let :math:`P = \arg\min_{F\in\mathcal C} \mathbb E\,D_\phi(F, T)`
(the projection that varies the *first* argument). For every :math:`G \in \mathcal C`:

.. math::

    \mathbb E\,D_\phi(G, P) \;\le\; \mathbb E\,D_\phi(G, T) - \mathbb E\,D_\phi(P, T),

because of the three-point identity

.. math::

    \mathbb E\,D_\phi(G,T) - \mathbb E\,D_\phi(G,P) - \mathbb E\,D_\phi(P,T)
    = \mathbb E\,\langle\nabla\phi(P) - \nabla\phi(T),\, G - P\rangle
    = \langle\nabla\Phi(P),\, G - P\rangle,\qquad \Phi(F) = \mathbb E\,D_\phi(F, T),

which is :math:`\ge 0` at the minimiser (first-order optimality) and :math:`\ge -g(P)` at any feasible
point, :math:`g` the Frank–Wolfe gap. If :math:`\mathcal C` is affine the identity is an equality at the
minimiser, and :math:`|\text{defect}| \le \|\nabla\Phi(P)\|\,\|G-P\|` in general.

Instances (THEORY.md):

====================  ===========================  =============================================
generator             divergence                   theorem
====================  ===========================  =============================================
negative entropy      :math:`\mathrm{KL}(x\|y)`    Yao et al. 2025, Thm 2: reverse KL, convex head
squared norm          :math:`\|x - y\|^2`          Charikar et al. 2024, Thm 1: squared loss
log-partition         :math:`\mathrm{KL}(\sigma(y)\|\sigma(x))` on logits  forward KL onto a softmax
                                                   head: an affine set of logits, so equality
====================  ===========================  =============================================

(For the log-partition generator :math:`\psi(z) = \log\sum_y e^{z_y}`,
:math:`D_\psi(z_1, z_2) = \mathrm{KL}(\mathrm{softmax}(z_2)\,\|\,\mathrm{softmax}(z_1))`, so projecting the
teacher's logits onto the head's logits is exactly forward-KL training, and the identity reads
:math:`\mathbb E\,\mathrm{KL}(F_{sw}\|F^*) = \mathbb E\,\mathrm{KL}(F_w\|F^*) - \mathbb E\,\mathrm{KL}(F_w\|F_{sw})`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._backend import ops
from .divergences import generalized_kl, kl, squared

__all__ = [
    "BregmanGenerator",
    "NEGATIVE_ENTROPY",
    "SQUARED_NORM",
    "LOG_PARTITION",
    "GENERATORS",
    "ProjectionCheck",
    "projection_inequality",
    "verdict",
    "rounding_bound",
]


def _to_numpy(t) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=float)


def _softmax(z):
    o = ops(z)
    return o.exp(o.log_softmax(z, axis=-1))


def _log_partition_divergence(x, y):
    # D_psi(x, y) = KL(softmax(y) || softmax(x)); computed from probabilities so -inf logits (zeros) are exact.
    return kl(_softmax(y), _softmax(x))


def _neg_entropy_magnitude(x, y):
    o = ops(x, y)
    return o.sum(o.abs(o.xlogy(x, x)) + o.abs(o.xlogy(x, y)) + o.abs(x) + o.abs(y), axis=-1)


def _squared_magnitude(x, y):
    o = ops(x, y)
    return o.sum(x * x + y * y, axis=-1)


def _log_partition_magnitude(x, y):
    return _neg_entropy_magnitude(_softmax(y), _softmax(x))


@dataclass(frozen=True)
class BregmanGenerator:
    r"""A generator :math:`\phi`, its Bregman divergence (exact at the boundary) and a bound on the size of
    the terms that divergence sums, from which the floating-point error of an evaluation is bounded."""

    name: str
    divergence: Callable
    term_magnitude: Callable
    description: str


NEGATIVE_ENTROPY = BregmanGenerator(
    "negative_entropy", generalized_kl, _neg_entropy_magnitude,
    "phi(x) = sum x log x; D = KL on the simplex (generalised KL off it)",
)
SQUARED_NORM = BregmanGenerator(
    "squared_norm", squared, _squared_magnitude, "phi(x) = ||x||^2; D = ||x - y||^2",
)
LOG_PARTITION = BregmanGenerator(
    "log_partition", _log_partition_divergence, _log_partition_magnitude,
    "psi(z) = logsumexp(z) on logits; D(z1, z2) = KL(softmax(z2) || softmax(z1))",
)
GENERATORS = {g.name: g for g in (NEGATIVE_ENTROPY, SQUARED_NORM, LOG_PARTITION)}


def rounding_bound(generator: BregmanGenerator, pairs, n_terms: int):
    r"""A priori bound on the floating-point error of :math:`\sum_{(x,y)} \pm\,\mathbb E\,D(x, y)`.

    Summing :math:`N` terms in floating point errs by at most :math:`\gamma_N\sum|t|` with
    :math:`\gamma_N = N u/(1 - N u)` (Higham, *Accuracy and Stability*, §4.2); each term of these
    divergences is itself a product/log with relative error a few :math:`u`. ``n_terms`` is the number of
    summed terms per divergence (``n * k``); a factor 4 covers the per-term error.
    """
    u = float(np.finfo(np.float64).eps) / 2
    N = n_terms + 8
    gamma = N * u / (1 - N * u)
    total = sum(_to_numpy(generator.term_magnitude(x, y)).mean(axis=-1) for x, y in pairs)
    return 4 * gamma * total


def verdict(slack, certificate, rounding, *, equality: bool = False):
    r"""Verdict of one inequality check from its slack, certificate and rounding bound (DESIGN.md):

    * inequality ``rhs - lhs >= 0``: ``holds`` if slack >= -certificate; ``violated`` if
      slack < -certificate - rounding; ``inconclusive`` otherwise (including a non-finite certificate);
    * equality: ``holds`` if |slack| <= certificate; ``violated`` if |slack| > certificate + rounding.

    Accepts scalars or arrays; returns a string or an array of strings.
    """
    s = np.asarray(slack, dtype=float)
    c = np.asarray(certificate, dtype=float)
    r = np.asarray(rounding, dtype=float)
    out = np.full(np.broadcast(s, c, r).shape, "inconclusive", dtype=object)
    finite_c = np.isfinite(c)
    if equality:
        out = np.where(finite_c & (np.abs(s) <= c), "holds", out)
        out = np.where(finite_c & (np.abs(s) > c + r), "violated", out)
    else:
        out = np.where(s == np.inf, "holds", out)  # rhs infinite: nothing to violate
        out = np.where(finite_c & (s >= -c), "holds", out)
        out = np.where(finite_c & np.isfinite(s) & (s < -c - r), "violated", out)
    return out.item() if out.ndim == 0 else out


@dataclass
class ProjectionCheck:
    """Per-instance numbers of one Pythagorean check (arrays with a leading batch axis)."""

    generator: str
    lhs: np.ndarray  # E D(G, P)
    rhs: np.ndarray  # E D(G, T) - E D(P, T)
    slack: np.ndarray  # rhs - lhs
    certificate: np.ndarray
    rounding: np.ndarray
    verdict: np.ndarray
    equality: bool


def projection_inequality(generator: BregmanGenerator, reference, target, projection, certificate, *,
                          equality: bool = False) -> ProjectionCheck:
    r"""Evaluate :math:`\mathbb E D(G,P) \le \mathbb E D(G,T) - \mathbb E D(P,T)` for reference ``G``
    (the truth, a member of the class), target ``T`` (the teacher) and projection ``P`` (the student).

    Arrays are ``(..., n, k)`` (numpy or torch); expectations are means over the sample axis. ``certificate``
    is what the solver proved about ``P`` (Frank–Wolfe gap, or the bound on :math:`|\langle\nabla\Phi, G-P
    \rangle|` for an affine class with ``equality=True``).
    """
    D = generator.divergence
    d_gp = D(reference, projection).mean(-1)
    d_gt = D(reference, target).mean(-1)
    d_pt = D(projection, target).mean(-1)
    lhs, rhs = d_gp, d_gt - d_pt
    n_terms = int(np.prod(reference.shape[-2:]))
    rnd = rounding_bound(generator, [(reference, projection), (reference, target), (projection, target)], n_terms)
    lhs, rhs, rnd = _to_numpy(lhs), _to_numpy(rhs), _to_numpy(rnd)
    with np.errstate(invalid="ignore"):
        slack = np.where(np.isinf(rhs) & (rhs > 0), np.inf, rhs - lhs)
    cert = np.broadcast_to(_to_numpy(certificate), slack.shape).astype(float)
    return ProjectionCheck(generator.name, lhs, rhs, slack, cert, rnd,
                           np.asarray(verdict(slack, cert, rnd, equality=equality)), equality)
