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

Instances (docs/theory.md):

====================  ===========================  =============================================
generator             divergence                   theorem
====================  ===========================  =============================================
negative entropy      :math:`\mathrm{KL}(x\|y)`    Yao et al. 2025, Thm 2: reverse KL, convex head
squared norm          :math:`\|x - y\|^2`          Charikar et al. 2024, Thm 1: squared loss
log-partition         :math:`\mathrm{KL}(\sigma(y)\|\sigma(x))` on logits  forward KL onto a softmax
                                                   head: an affine set of logits, so equality
Burg entropy          Itakura–Saito                Mulgund & Pabbaraju 2025 (any Bregman divergence)
x log x - x           generalised KL               Mulgund & Pabbaraju 2025
x^T M x (M SPD)       Mahalanobis                  Mulgund & Pabbaraju 2025
====================  ===========================  =============================================

The probability-space generators are training losses too: ``bregman:<generator>`` is
:math:`\mathbb E\,D_\phi(F(x), F_w(x))`, student in the first argument (:mod:`w2s_theory.fdivergences`).

Non-realizable targets (the truth :math:`A` outside :math:`\mathcal C`). For any :math:`G\in\mathcal C`,

.. math::

    \mathbb E\,D_\phi(A,T) - \mathbb E\,D_\phi(A,P) - \mathbb E\,D_\phi(P,T)
    = \underbrace{\langle\nabla\Phi(P),\, G - P\rangle}_{\ge -g(P)}
    + \underbrace{\mathbb E\,\langle\nabla\phi(P) - \nabla\phi(T),\, A - G\rangle}_{\text{misspecification term}},

so the corrected inequality :math:`\mathbb E D(A,P) \le \mathbb E D(A,T) - \mathbb E D(P,T) + |\text{misspecification}|`
holds with the same certificate. Each generator bounds the misspecification term by a Hölder pair
(:func:`misspecification_bound`): :math:`2\Lambda\,\mathbb E\,\mathrm{TV}(A, G)` for the negative entropy
(:math:`\Lambda = \max|\log(P/T)|`, docs/theory.md) and :math:`2\sqrt{\mathbb E\|P-T\|^2\,\mathbb E\|A-G\|^2}` for
the squared norm (the :math:`O(\sqrt\varepsilon)` term of Charikar et al. 2024). One function,
:func:`nonrealizable_projection_inequality`, evaluates both.

Certifying that an inequality *fails*. A slack below ``-g(P)`` refutes the theorem only when the theorem
applies (realizable :math:`A`). To show that the *plain* inequality fails at the exact projection
:math:`P^\circ` for a truth outside the class, :func:`projection_inequality_at_minimiser` bounds
:math:`|\mathrm{slack}(P) - \mathrm{slack}(P^\circ)|` from the gap alone, via the exact identity
:math:`\Phi(P) - \Phi(P^\circ) = \langle\nabla\Phi(P^\circ), P - P^\circ\rangle + \mathbb E\,D_\phi(P, P^\circ)
\ge \mathbb E\,D_\phi(P, P^\circ)`, so :math:`\mathbb E\,D_\phi(P, P^\circ) \le g(P)`; each generator turns that
into a bound on :math:`|\mathbb E D(A,P) - \mathbb E D(A,P^\circ)|` (:attr:`BregmanGenerator.truth_term_perturbation`).

(For the log-partition generator :math:`\psi(z) = \log\sum_y e^{z_y}`,
:math:`D_\psi(z_1, z_2) = \mathrm{KL}(\mathrm{softmax}(z_2)\,\|\,\mathrm{softmax}(z_1))`, so projecting the
teacher's logits onto the head's logits is exactly forward-KL training, and the identity reads
:math:`\mathbb E\,\mathrm{KL}(F_{sw}\|F^*) = \mathbb E\,\mathrm{KL}(F_w\|F^*) - \mathbb E\,\mathrm{KL}(F_w\|F_{sw})`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ._backend import ops
from .divergences import generalized_kl, kl, squared
from .solvers.conditioning import unit_roundoff_gamma

__all__ = [
    "BregmanGenerator",
    "NEGATIVE_ENTROPY",
    "SQUARED_NORM",
    "LOG_PARTITION",
    "GENERATORS",
    "ITAKURA_SAITO",
    "GENERALIZED_KL",
    "LOSS_GENERATORS",
    "itakura_saito",
    "kms_matrix",
    "mahalanobis",
    "generator_for",
    "three_point_defect",
    "ProjectionCheck",
    "projection_inequality",
    "misspecification_term",
    "misspecification_bound",
    "nonrealizable_projection_inequality",
    "projection_inequality_at_minimiser",
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


def _neg_entropy_gradient_difference(p, t):
    # grad phi(p) - grad phi(t) = log(p / t); 0 where both are 0 (an entry pinned at 0 in both), +-inf where
    # exactly one is 0.
    p, t = _to_numpy(p), _to_numpy(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(p) - np.log(t)
    return np.where((p == 0) & (t == 0), 0.0, out)


def _squared_gradient_difference(p, t):
    return 2 * (_to_numpy(p) - _to_numpy(t))


def _log_partition_gradient_difference(z1, z2):
    return _to_numpy(_softmax(z1)) - _to_numpy(_softmax(z2))


def _neg_entropy_holder_bound(truth, reference, target, projection):
    r""":math:`2\Lambda\,\mathbb E\,\mathrm{TV}(A, G)` with :math:`\Lambda = \max_{x,y}|\log(P_y/T_y)|` (docs/theory.md,
    "Non-realizable reverse bound"); entries where both are 0 are excluded (their ratio is 1 by convention)."""
    A, G = _to_numpy(truth), _to_numpy(reference)
    tv = 0.5 * np.abs(A - G).sum(-1).mean(-1)
    log_ratio = np.abs(_neg_entropy_gradient_difference(projection, target))
    lam = log_ratio.max(axis=(-1, -2))
    with np.errstate(invalid="ignore"):
        return np.where(tv == 0, 0.0, 2 * lam * tv)


def _squared_holder_bound(truth, reference, target, projection):
    r""":math:`2\sqrt{\mathbb E\|P-T\|^2\;\mathbb E\|A-G\|^2}` (Cauchy–Schwarz; the :math:`O(\sqrt\varepsilon)` term
    of Charikar et al. 2024 with :math:`\varepsilon = \mathbb E\|A - G\|^2`)."""
    misfit = ((_to_numpy(projection) - _to_numpy(target)) ** 2).sum(-1).mean(-1)
    eps = ((_to_numpy(truth) - _to_numpy(reference)) ** 2).sum(-1).mean(-1)
    return 2 * np.sqrt(misfit * eps)


def _neg_entropy_truth_term_perturbation(truth, projection, eps):
    r"""Bound on :math:`|\mathbb E\,\mathrm{KL}(A\|P) - \mathbb E\,\mathrm{KL}(A\|P^\circ)|` given
    :math:`\mathbb E\,\mathrm{KL}(P\|P^\circ)\le\varepsilon` (rows in the simplex).

    Pinsker per sample, :math:`\mathrm{KL}_i \ge 2\,\mathrm{TV}_i^2 \ge 2\max_y\Delta_{iy}^2` with
    :math:`\Delta = P - P^\circ`, gives :math:`|\Delta_{iy}| \le \delta = \sqrt{n\varepsilon/2}` and
    :math:`\mathbb E\sum_y\Delta_y^2 \le \mathbb E(2\mathrm{TV})^2 \le 2\varepsilon`. By the mean-value theorem
    :math:`|\log P_y - \log P^\circ_y| \le |\Delta_y|/\tilde P_y` with :math:`\tilde P = P - \delta`, and by
    Cauchy–Schwarz the difference is at most :math:`\sqrt{\mathbb E\sum_{y: A_y>0}(A_y/\tilde P_y)^2}\,
    \sqrt{2\varepsilon}`; infinite where :math:`\tilde P_y \le 0 < A_y`."""
    A, P = _to_numpy(truth), _to_numpy(projection)
    # a computed divergence can come out a few ulps below 0; a negative bound on E KL means 0
    eps = np.maximum(np.broadcast_to(_to_numpy(eps), P.shape[:-2]).astype(float), 0)
    n = P.shape[-2]
    delta = np.sqrt(n * eps / 2)[..., None, None]
    lower = P - delta
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(A > 0, (A / lower) ** 2, 0.0)
        bad = ((A > 0) & (lower <= 0)).any(axis=(-1, -2))
        bound = np.sqrt(terms.sum(-1).mean(-1)) * np.sqrt(2 * eps)
    bound = np.where(bad, np.inf, bound)
    return np.where(eps == 0, 0.0, bound)


def _squared_truth_term_perturbation(truth, projection, eps):
    r"""Bound on :math:`|\mathbb E\|A-P\|^2 - \mathbb E\|A-P^\circ\|^2|` given
    :math:`\mathbb E\|P-P^\circ\|^2 \le \varepsilon`: the difference of squares of two norms that differ by at
    most :math:`\sqrt\varepsilon`, i.e. :math:`\sqrt\varepsilon\,(2\|A - P\| + \sqrt\varepsilon)`."""
    eps = np.maximum(_to_numpy(eps).astype(float), 0)
    dist = np.sqrt(((_to_numpy(truth) - _to_numpy(projection)) ** 2).sum(-1).mean(-1))
    return np.sqrt(eps) * (2 * dist + np.sqrt(eps))


@dataclass(frozen=True)
class BregmanGenerator:
    r"""A generator :math:`\phi`, its Bregman divergence (exact at the boundary) and a bound on the size of
    the terms that divergence sums, from which the floating-point error of an evaluation is bounded.

    Optional parts (``None`` where not available for a generator):

    * ``gradient_difference(x, y)`` = :math:`\nabla\phi(x) - \nabla\phi(y)` per entry (for the
      misspecification term);
    * ``holder_bound(A, G, T, P)``: an upper bound on
      :math:`|\mathbb E\langle\nabla\phi(P) - \nabla\phi(T), A - G\rangle|`;
    * ``truth_term_perturbation(A, P, eps)``: a bound on :math:`|\mathbb E D(A,P) - \mathbb E D(A,P^\circ)|`
      for every :math:`P^\circ` with :math:`\mathbb E D(P, P^\circ) \le` ``eps``.
    """

    name: str
    divergence: Callable
    term_magnitude: Callable
    description: str
    gradient_difference: Callable | None = None
    holder_bound: Callable | None = None
    truth_term_perturbation: Callable | None = None
    gradient: Callable | None = None  # grad phi(x), per entry (or a matrix product for Mahalanobis)
    curvature: Callable | None = None  # diagonal of the Hessian of phi; None where it is not diagonal
    symmetric: bool = False  # D(x, y) = D(y, x) for all x, y
    pins_zeros: bool = False  # D(x, y) = inf where y_j = 0 < x_j: a student entry under a teacher zero is 0


NEGATIVE_ENTROPY = BregmanGenerator(
    "negative_entropy", generalized_kl, _neg_entropy_magnitude,
    "phi(x) = sum x log x; D = KL on the simplex (generalised KL off it)",
    _neg_entropy_gradient_difference, _neg_entropy_holder_bound, _neg_entropy_truth_term_perturbation,
    gradient=lambda x: ops(x).log(x) + 1, curvature=lambda x: 1 / x, pins_zeros=True,
)
SQUARED_NORM = BregmanGenerator(
    "squared_norm", squared, _squared_magnitude, "phi(x) = ||x||^2; D = ||x - y||^2",
    _squared_gradient_difference, _squared_holder_bound, _squared_truth_term_perturbation,
    gradient=lambda x: 2 * x, curvature=lambda x: 2 + 0 * x, symmetric=True,
)
LOG_PARTITION = BregmanGenerator(
    "log_partition", _log_partition_divergence, _log_partition_magnitude,
    "psi(z) = logsumexp(z) on logits; D(z1, z2) = KL(softmax(z2) || softmax(z1))",
    _log_partition_gradient_difference,
)

def itakura_saito(x, y):
    r"""Itakura–Saito divergence :math:`\sum_j x_j/y_j - \log(x_j/y_j) - 1`, the Bregman divergence of the
    Burg entropy :math:`\phi(x) = -\sum_j\log x_j` on the positive orthant (Banerjee et al. 2005, Table 1).
    Exact at the boundary: an entry with :math:`x_j = y_j = 0` contributes 0 (a pinned class), an entry with
    exactly one of them 0 contributes :math:`+\infty`."""
    o = ops(x, y)
    both = (x == 0) & (y == 0)
    one = (x == 0) != (y == 0)
    safe_x = o.where(both | one, 1 + 0 * x, x)
    safe_y = o.where(both | one, 1 + 0 * y, y)
    r = safe_x / safe_y
    # log(x/y) as a difference of logs: the ratio may overflow to inf (y subnormal), where inf - log(inf) is NaN.
    term = r - (o.log(safe_x) - o.log(safe_y)) - 1
    term = o.where(one, o.inf + 0 * term, term)
    return o.sum(o.where(both, 0 * safe_x, term), axis=-1)  # 0 * term would be 0 * inf where `one`


def _itakura_saito_magnitude(x, y):
    o = ops(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = o.abs(x) / o.where(y == 0, 1 + 0 * y, o.abs(y))
        lx = o.where(x > 0, o.abs(o.log(o.where(x > 0, x, 1 + 0 * x))), 0 * x)
        ly = o.where(y > 0, o.abs(o.log(o.where(y > 0, y, 1 + 0 * y))), 0 * y)
    return o.sum(r + lx + ly + 1, axis=-1)


def _itakura_saito_gradient_difference(p, t):
    # grad phi(x) = -1/x; 0 where both are 0 (a pinned entry).
    p, t = _to_numpy(p), _to_numpy(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1 / t - 1 / p
    return np.where((p == 0) & (t == 0), 0.0, out)


ITAKURA_SAITO = BregmanGenerator(
    "itakura_saito", itakura_saito, _itakura_saito_magnitude,
    "phi(x) = -sum log x (Burg entropy); D = sum x/y - log(x/y) - 1 on the positive orthant",
    _itakura_saito_gradient_difference, gradient=lambda x: -1 / x, curvature=lambda x: 1 / x**2,
    pins_zeros=True,
)
GENERALIZED_KL = BregmanGenerator(
    "generalized_kl", generalized_kl, _neg_entropy_magnitude,
    "phi(x) = sum x log x - x on the positive orthant; D = sum x log(x/y) - x + y (the negative entropy's "
    "divergence: phi differs by a linear term, which no Bregman divergence sees)",
    _neg_entropy_gradient_difference, gradient=lambda x: ops(x).log(x), curvature=lambda x: 1 / x,
    pins_zeros=True,
)


def kms_matrix(k: int, rho: float = 0.5) -> np.ndarray:
    r"""The Kac–Murdock–Szegő matrix :math:`M_{yz} = \rho^{|y - z|}`, symmetric positive definite for
    :math:`|\rho| < 1`: the default metric of ``bregman:mahalanobis`` (classes that are near in index are
    coupled)."""
    idx = np.arange(k)
    return rho ** np.abs(idx[:, None] - idx[None, :])


def mahalanobis(M) -> BregmanGenerator:
    r"""The generator :math:`\phi(x) = x^\top M x` for a symmetric positive definite ``M`` (``k x k``):
    :math:`D(x, y) = (x - y)^\top M (x - y)`, :math:`\nabla\phi(x) = 2Mx`. Not separable over classes
    (``curvature`` is None). An ``M`` that is not symmetric positive definite is a ``ValueError``."""
    M = np.asarray(M, dtype=float)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"mahalanobis: M must be a square matrix, got shape {M.shape}")
    if not np.allclose(M, M.T) or np.linalg.eigvalsh((M + M.T) / 2).min() <= 0:
        raise ValueError("mahalanobis: M must be symmetric positive definite")
    absM = np.abs(M)

    def _mat(x, A):
        return torch.as_tensor(A, dtype=x.dtype, device=x.device) if isinstance(x, torch.Tensor) else A

    def divergence(x, y):
        d = x - y
        return ((d @ _mat(d, M)) * d).sum(-1)

    def magnitude(x, y):
        o = ops(x, y)
        a = o.abs(x) + o.abs(y)
        return ((a @ _mat(a, absM)) * a).sum(-1)

    def gradient(x):
        return 2 * (x @ _mat(x, M))

    def gradient_difference(p, t):
        return 2 * ((_to_numpy(p) - _to_numpy(t)) @ M)

    return BregmanGenerator("mahalanobis", divergence, magnitude,
                            "phi(x) = x^T M x for an SPD M; D = (x - y)^T M (x - y)", gradient_difference,
                            gradient=gradient, curvature=None, symmetric=True)


#: Generators with a fixed form (Mahalanobis needs its matrix: :func:`mahalanobis`).
GENERATORS = {g.name: g for g in (NEGATIVE_ENTROPY, SQUARED_NORM, LOG_PARTITION, ITAKURA_SAITO, GENERALIZED_KL)}
#: The generators that ``bregman:<name>`` losses accept (probability-space students).
LOSS_GENERATORS = ("negative_entropy", "squared_norm", "itakura_saito", "generalized_kl", "mahalanobis")


def generator_for(name: str, k: int | None = None) -> BregmanGenerator:
    """The generator ``name`` of :data:`LOSS_GENERATORS`; ``mahalanobis`` uses :func:`kms_matrix` (``k``
    classes). An unknown name is a one-line ``ValueError`` that lists the known ones."""
    if name == "mahalanobis":
        if k is None:
            raise ValueError("generator 'mahalanobis' needs the number of classes k for its default matrix")
        return mahalanobis(kms_matrix(k))
    if name not in LOSS_GENERATORS:
        raise ValueError(f"unknown Bregman generator {name!r}; choose one of: {', '.join(LOSS_GENERATORS)}")
    return GENERATORS[name]


def three_point_defect(generator: BregmanGenerator, reference, target, projection):
    r"""The three-point identity's defect, zero for every generator and every three points (up to rounding):

    .. math:: D(G,T) - D(G,P) - D(P,T) - \langle\nabla\phi(P) - \nabla\phi(T), G - P\rangle.
    """
    D = generator.divergence
    G, T, P = (_to_numpy(x) for x in (reference, target, projection))
    inner = (_require(generator, "gradient_difference")(P, T) * (G - P)).sum(-1)
    return D(G, T) - D(G, P) - D(P, T) - inner


def rounding_bound(generator: BregmanGenerator, pairs, n_terms: int):
    r"""A priori bound on the floating-point error of :math:`\sum_{(x,y)} \pm\,\mathbb E\,D(x, y)`.

    Summing :math:`N` terms in floating point errs by at most :math:`\gamma_N\sum|t|` with
    :math:`\gamma_N = N u/(1 - N u)` (Higham, *Accuracy and Stability*, §4.2); each term of these
    divergences is itself a product/log with relative error a few :math:`u`. ``n_terms`` is the number of
    summed terms per divergence (``n * k``); a factor 4 covers the per-term error.
    """
    gamma = unit_roundoff_gamma(n_terms + 8)
    total = sum(_to_numpy(generator.term_magnitude(x, y)).mean(axis=-1) for x, y in pairs)
    return 4 * gamma * total


def verdict(slack, certificate, rounding, *, equality: bool = False):
    r"""Verdict of one inequality check from its slack, certificate and rounding bound (docs/design.md):

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
    terms: dict = field(default_factory=dict)  # extra per-instance numbers (corrections, misfits, ...)


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


def _require(generator: BregmanGenerator, part: str):
    fn = getattr(generator, part)
    if fn is None:
        raise NotImplementedError(f"generator {generator.name!r} has no {part}")
    return fn


def misspecification_term(generator: BregmanGenerator, truth, reference, target, projection) -> np.ndarray:
    r"""The exact misspecification term :math:`\mathbb E\,\langle\nabla\phi(P) - \nabla\phi(T), A - G\rangle`
    per instance (``0 * inf = 0`` where :math:`A = G`), for truth ``A``, reference ``G`` in the class, target
    ``T`` and projection ``P``."""
    diff = _require(generator, "gradient_difference")(projection, target)
    delta = _to_numpy(truth) - _to_numpy(reference)
    with np.errstate(invalid="ignore"):
        prod = np.where(delta == 0, 0.0, diff * delta)
    return prod.sum(-1).mean(-1)


def misspecification_bound(generator: BregmanGenerator, truth, reference, target, projection) -> np.ndarray:
    """The generator's Hölder bound on :func:`misspecification_term` (see the module docstring)."""
    return np.asarray(_require(generator, "holder_bound")(truth, reference, target, projection), dtype=float)


def nonrealizable_projection_inequality(generator: BregmanGenerator, truth, reference, target, projection,
                                        certificate) -> ProjectionCheck:
    r"""The corrected Pythagorean inequality for a truth ``A`` that need not lie in the class:

    .. math:: \mathbb E D(A,P) \le \mathbb E D(A,T) - \mathbb E D(P,T) + \beta(A, G, T, P),

    with ``reference`` :math:`G` any member of the class and :math:`\beta` the generator's Hölder bound
    (:func:`misspecification_bound`). ``certificate`` is what the solver proved about ``P``: the Frank–Wolfe gap
    (``slack >= -gap`` then follows from the identity in the module docstring), or, for an affine class, a
    bound on :math:`|\langle\nabla\Phi(P), G - P\rangle|`. The result is an inequality check either way; ``terms`` holds the plain slack, the exact misspecification term and
    :math:`\beta`.
    """
    D = generator.divergence
    A, G, T, P = (_to_numpy(x) for x in (truth, reference, target, projection))
    d_ap, d_at, d_pt = (_to_numpy(D(x, y)).mean(-1) for x, y in ((A, P), (A, T), (P, T)))
    beta = misspecification_bound(generator, A, G, T, P)
    lhs, rhs_plain = d_ap, d_at - d_pt
    rhs = rhs_plain + beta
    n_terms = int(np.prod(A.shape[-2:]))
    rnd = _to_numpy(rounding_bound(generator, [(A, P), (A, T), (P, T)], n_terms))
    u = float(np.finfo(np.float64).eps) / 2
    with np.errstate(invalid="ignore"):
        rnd = rnd + 16 * (n_terms + 8) * u * np.where(np.isfinite(beta), beta, 0.0)
        slack = np.where(np.isinf(rhs) & (rhs > 0), np.inf, rhs - lhs)
        plain = np.where(np.isinf(rhs_plain) & (rhs_plain > 0), np.inf, rhs_plain - lhs)
    cert = np.broadcast_to(_to_numpy(certificate), slack.shape).astype(float)
    terms = {"plain_slack": plain, "correction": beta,
             "misspecification": misspecification_term(generator, A, G, T, P), "misfit": d_pt}
    return ProjectionCheck(generator.name, lhs, rhs, slack, cert, rnd, np.asarray(verdict(slack, cert, rnd)),
                           False, terms)


def projection_inequality_at_minimiser(generator: BregmanGenerator, truth, target, projection, gap
                                       ) -> ProjectionCheck:
    r"""The plain inequality :math:`\mathbb E D(A,P) \le \mathbb E D(A,T) - \mathbb E D(P,T)` with a certificate
    that bounds how far its slack at the computed ``projection`` can be from the slack at the *exact*
    projection :math:`P^\circ`, whatever the truth ``A`` (in the class or not):

    .. math:: |\mathrm{slack}(P) - \mathrm{slack}(P^\circ)| \le g + \pi(A, P, g),

    :math:`g` the solver's gap (which bounds both :math:`\Phi(P) - \Phi(P^\circ)` and
    :math:`\mathbb E D(P, P^\circ)`) and :math:`\pi` the generator's ``truth_term_perturbation``. A
    ``violated`` verdict therefore certifies that the inequality fails for the exact minimiser: this is how a
    counterexample outside the realizable setting is certified.
    """
    D = generator.divergence
    A, T, P = (_to_numpy(x) for x in (truth, target, projection))
    g = np.broadcast_to(_to_numpy(gap), P.shape[:-2]).astype(float)
    d_ap, d_at, d_pt = (_to_numpy(D(x, y)).mean(-1) for x, y in ((A, P), (A, T), (P, T)))
    lhs, rhs = d_ap, d_at - d_pt
    cert = g + _require(generator, "truth_term_perturbation")(A, P, g)
    rnd = _to_numpy(rounding_bound(generator, [(A, P), (A, T), (P, T)], int(np.prod(A.shape[-2:]))))
    with np.errstate(invalid="ignore"):
        slack = np.where(np.isinf(rhs) & (rhs > 0), np.inf, rhs - lhs)
    return ProjectionCheck(generator.name, lhs, rhs, slack, cert, rnd, np.asarray(verdict(slack, cert, rnd)),
                           False, {"misfit": d_pt})
