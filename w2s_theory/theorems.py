r"""The inequalities of docs/theory.md, each as a function that returns a :class:`TheoremResult`.

Every function takes the quantities of one or many instances (leading batch axis), evaluates both sides with
:mod:`w2s_theory.divergences`, and attaches the certificate that makes the verdict honest: a slack is compared
with what the solver *proved* about its student, never with a hand-picked tolerance (docs/design.md, principle 1).

Notation: :math:`F^*` truth, :math:`F_w` weak teacher, :math:`F_{sw}` strong student fitted on the teacher.

Realizable theorems: :func:`theorem2_reverse_kl`, :func:`charikar_squared`, :func:`softmax_forward_identity`;
a false analogue with a certificate for its counterexamples: :func:`forward_kl_pythagorean`. Non-realizable
versions (truth outside the class), all instances of :mod:`w2s_theory.bregman`: the corrected inequalities
:func:`reverse_kl_nonrealizable` and :func:`charikar_nonrealizable`, and the plain ones certified for the exact
minimiser, :func:`reverse_kl_pythagorean_at_minimiser` and :func:`charikar_squared_at_minimiser` (so that their
failures are real). The :math:`\sqrt\cdot`-bounds live in :mod:`w2s_theory.bounds`, the softmax reverse-KL row
(non-convex, certified by branch and bound) in :mod:`w2s_theory.guarantees`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._backend import to_numpy
from .bregman import (
    LOG_PARTITION,
    NEGATIVE_ENTROPY,
    SQUARED_NORM,
    nonrealizable_projection_inequality,
    projection_inequality,
    projection_inequality_at_minimiser,
    rounding_bound,
    verdict,
)
from .divergences import kl

__all__ = [
    "TheoremResult",
    "theorem2_reverse_kl",
    "forward_kl_pythagorean",
    "softmax_forward_identity",
    "charikar_squared",
    "squared_affine_certificate",
    "reverse_kl_nonrealizable",
    "reverse_kl_pythagorean_at_minimiser",
    "charikar_nonrealizable",
    "charikar_squared_at_minimiser",
]

SOURCES = {
    "yao2025": "Yao et al. 2025 (arXiv 2502.11107), Thm 2",
    "charikar2024": "Charikar, Pabbaraju, Shiragur 2024 (arXiv 2405.15116), Thm 1",
    "charikar2024_nonrealizable": "Charikar, Pabbaraju, Shiragur 2024 (arXiv 2405.15116), non-realizable "
                                  "theorem; explicit constant 2*sqrt(eps*misfit) derived here",
    "theory_md_nonrealizable": "docs/theory.md, 'Non-realizable reverse bound' (derived there, not the paper's)",
    "theory_md": "docs/theory.md, guarantee table",
}


@dataclass
class TheoremResult:
    """One inequality on a batch of instances: ``slack = rhs - lhs`` with its certificate and verdict."""

    name: str
    statement: str
    source: str
    lhs: np.ndarray
    rhs: np.ndarray
    slack: np.ndarray
    certificate: np.ndarray
    rounding: np.ndarray
    verdict: np.ndarray
    equality: bool = False
    details: dict = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return int(np.size(self.slack))

    def count(self, what: str) -> int:
        return int(np.sum(np.asarray(self.verdict) == what))

    def worst_index(self) -> int:
        """The instance closest to (or furthest into) violation: smallest ``slack + certificate``
        (for equalities, largest ``|slack| - certificate``)."""
        s, c = np.asarray(self.slack, float), np.nan_to_num(np.asarray(self.certificate, float), nan=np.inf)
        score = (np.abs(s) - c) if self.equality else -(s + c)
        return int(np.nanargmax(np.where(np.isnan(score), -np.inf, score)))

    def summary(self) -> dict:
        i = self.worst_index()
        return {
            "name": self.name, "statement": self.statement, "source": self.source,
            "instances": self.instances, "holds": self.count("holds"), "violated": self.count("violated"),
            "inconclusive": self.count("inconclusive"),
            "worst_slack": float(np.ravel(self.slack)[i]), "certificate": float(np.ravel(self.certificate)[i]),
            "lhs": float(np.ravel(self.lhs)[i]), "rhs": float(np.ravel(self.rhs)[i]),
        }


def _np(x) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=float)


def _from_projection(name, statement, source, check, details=None) -> TheoremResult:
    return TheoremResult(name, statement, source, check.lhs, check.rhs, check.slack, check.certificate,
                         check.rounding, check.verdict, check.equality, details or {})


def theorem2_reverse_kl(truth, teacher, student, gap) -> TheoremResult:
    r"""Yao et al. 2025, Theorem 2 (realizable, convex head, reverse KL):

    .. math:: \mathbb E\,\mathrm{KL}(F^*\|F_{sw}) \le \mathbb E\,\mathrm{KL}(F^*\|F_w) - \mathbb E\,\mathrm{KL}(F_{sw}\|F_w)

    ``student`` must be the reverse-KL projection of ``teacher`` onto a convex class containing ``truth``,
    fitted to Frank–Wolfe gap ``gap``; the three-point identity then gives ``slack >= -gap`` for the
    computed student (:mod:`w2s_theory.bregman`), so a slack below ``-gap - rounding`` refutes the theorem.
    """
    check = projection_inequality(NEGATIVE_ENTROPY, _np(truth), _np(teacher), _np(student), _np(gap))
    return _from_projection(
        "theorem2_reverse_kl", "E KL(F*||F_sw) <= E KL(F*||F_w) - E KL(F_sw||F_w)", SOURCES["yao2025"], check)


def forward_kl_pythagorean(truth, teacher, student, gap) -> TheoremResult:
    r"""The forward-KL analogue of Theorem 2, which is FALSE in general (docs/theory.md):

    .. math:: \mathbb E\,\mathrm{KL}(F^*\|F_{sw}) \le \mathbb E\,\mathrm{KL}(F^*\|F_w) - \mathbb E\,\mathrm{KL}(F_w\|F_{sw})

    with :math:`F_{sw}` the forward-KL projection of the teacher onto a convex class. The certificate bounds
    how far the slack at the *exact* minimiser :math:`F^\circ` can be from the slack at the computed
    :math:`\hat F` (Frank–Wolfe gap :math:`\varepsilon`), so that ``slack < -certificate - rounding``
    certifies a counterexample:

    * :math:`\Phi(F) = \mathbb E\,\mathrm{KL}(F_w\|F)` has curvature :math:`F_w/F^2 \ge F_w` on
      :math:`[0,1]`, and :math:`\langle\nabla\Phi(F^\circ), \hat F - F^\circ\rangle \ge 0`, hence
      :math:`\tfrac12\mathbb E\sum_y F_{w,y}\Delta_y^2 \le \Phi(\hat F) - \Phi(F^\circ) \le \varepsilon`
      with :math:`\Delta = \hat F - F^\circ`; in particular :math:`|\Delta_{iy}| \le \delta_{iy} =
      \sqrt{2\varepsilon n / F_{w,iy}}`.
    * :math:`|\mathbb E\sum_y F^*_y\log(\hat F_y/F^\circ_y)| \le \mathbb E\sum_y F^*_y|\Delta_y|/\tilde F_y
      \le C\sqrt{2\varepsilon}`, :math:`\tilde F = \hat F - \delta`,
      :math:`C^2 = \mathbb E\sum_{y:F^*_y>0} (F^*_y/\tilde F_y)^2/F_{w,y}` (Cauchy–Schwarz).
    * So :math:`|\mathrm{slack}(F^\circ) - \mathrm{slack}(\hat F)| \le \varepsilon + C\sqrt{2\varepsilon}`.

    Where :math:`\tilde F \le 0` or a teacher entry under positive truth is 0 the bound is infinite
    (inconclusive). For closed-form minimisers pass ``gap = 0``.
    """
    G, T, P = _np(truth), _np(teacher), _np(student)
    eps = np.broadcast_to(_np(gap), np.shape(P)[:-2]).astype(float)
    n = P.shape[-2]
    lhs = kl(G, P).mean(-1)
    d_gt = kl(G, T).mean(-1)
    d_tp = kl(T, P).mean(-1)
    rhs = d_gt - d_tp
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.sqrt(2 * eps[..., None, None] * n / T)
        lower = P - delta
        terms = np.where(G > 0, (G / lower) ** 2 / T, 0.0)
        bad = ((G > 0) & ((lower <= 0) | (T <= 0))).any(axis=(-1, -2))
        C = np.sqrt(terms.mean(-2).sum(-1) * 1.0)
        cert = np.where(eps == 0, 0.0, eps + C * np.sqrt(2 * eps))
        cert = np.where(bad & (eps > 0), np.inf, cert)
        slack = np.where(np.isinf(rhs) & (rhs > 0), np.inf, rhs - lhs)
    rnd = rounding_bound(NEGATIVE_ENTROPY, [(G, P), (G, T), (T, P)], int(np.prod(P.shape[-2:])))
    return TheoremResult(
        "forward_kl_pythagorean", "E KL(F*||F_sw) <= E KL(F*||F_w) - E KL(F_w||F_sw)  (forward-trained F_sw)",
        SOURCES["theory_md"], lhs, rhs, slack, cert, rnd, np.asarray(verdict(slack, cert, rnd)))


def softmax_forward_identity(truth_logits, teacher, student_logits, gradient_norm, parameter_distance) -> TheoremResult:
    r"""Forward KL onto a softmax head is an M-projection onto an exponential family, so (docs/theory.md)

    .. math:: \mathbb E\,\mathrm{KL}(F_{sw}\|F^*) = \mathbb E\,\mathrm{KL}(F_w\|F^*) - \mathbb E\,\mathrm{KL}(F_w\|F_{sw})

    for :math:`F^*` in the family (error measured as KL(model‖truth)). It is the Bregman identity of the
    log-partition function on logits, with equality because the head's logits form an affine set. The defect
    of the computed student equals :math:`\langle\nabla\Phi(\hat\theta), \theta^* - \hat\theta\rangle`, so
    its certificate is ``gradient_norm * parameter_distance`` (Cauchy–Schwarz), both in the same
    parametrisation (e.g. Frobenius norms over ``(W, b)``).
    """
    T = _np(teacher)
    with np.errstate(divide="ignore"):
        teacher_logits = np.log(T)
    cert = _np(gradient_norm) * _np(parameter_distance)
    check = projection_inequality(LOG_PARTITION, _np(truth_logits), teacher_logits, _np(student_logits), cert,
                                  equality=True)
    return _from_projection(
        "softmax_forward_identity", "E KL(F_sw||F*) = E KL(F_w||F*) - E KL(F_w||F_sw)  (softmax head, forward KL)",
        "docs/theory.md, guarantee table (M-projection onto an exponential family)", check)


def charikar_squared(truth_values, weak_values, student_values, certificate, *, equality: bool) -> TheoremResult:
    r"""Charikar et al. 2024, Theorem 1: for the squared-loss projection :math:`f_{sw}` of :math:`f_w` onto a
    convex class containing :math:`f^*`,

    .. math:: \mathbb E(f_{sw}-f^*)^2 \le \mathbb E(f_w - f^*)^2 - \mathbb E(f_{sw} - f_w)^2,

    i.e. gain ≥ misfit; with equality for an unconstrained linear head (``equality=True``; certificate
    :math:`|\langle\nabla\Phi, \theta^*-\hat\theta\rangle|` bound), and the Frank–Wolfe gap for a constrained one.
    """
    as3 = lambda v: _np(v)[..., None] if _np(v).ndim < 3 else _np(v)  # noqa: E731  (B, n) -> (B, n, 1)
    check = projection_inequality(SQUARED_NORM, as3(truth_values), as3(weak_values), as3(student_values),
                                  _np(certificate), equality=equality)
    return _from_projection(
        "charikar_squared", "E(f_sw-f*)^2 <= E(f_w-f*)^2 - E(f_sw-f_w)^2  (gain >= misfit)",
        SOURCES["charikar2024"], check)


def _as3(v) -> np.ndarray:
    """Real outputs ``(B, n)`` -> ``(B, n, 1)`` (one output), leaving ``(B, n, k_out)`` alone."""
    a = _np(v)
    return a[..., None] if a.ndim < 3 else a


def squared_affine_certificate(gap, reference_values, student_values) -> np.ndarray:
    r"""Certificate of the Pythagorean *equality* for least squares over an affine (unconstrained linear) class:

    .. math:: |\langle\nabla\Phi(\hat\theta), \theta_G - \hat\theta\rangle| \le \sqrt{g^\top H^+ g}\,
        \|\theta_G - \hat\theta\|_H = 2\sqrt{\mathrm{gap}\cdot\mathbb E(f_G - f_{sw})^2},

    because :math:`\Phi(\theta) = \mathbb E(z^\top\theta - y)^2` has Hessian :math:`H = \tfrac2n Z^\top Z`, the
    normal-equations gap is exactly :math:`\tfrac12 g^\top H^+ g` (:mod:`w2s_theory.solvers.squared`) and
    :math:`\|\Delta\|_H^2 = 2\,\mathbb E(z^\top\Delta)^2`. ``reference_values`` are the outputs of any member
    :math:`f_G` of the class (the truth, when realizable)."""
    G, P = _as3(reference_values), _as3(student_values)
    return 2 * np.sqrt(np.maximum(_np(gap), 0) * ((G - P) ** 2).sum(-1).mean(-1))


def reverse_kl_nonrealizable(truth, teacher, student, gap, reference) -> TheoremResult:
    r"""docs/theory.md's non-realizable reverse bound: for :math:`F_{sw}` the reverse-KL projection of :math:`F_w` onto a
    convex class and *any* :math:`G` in the class,

    .. math:: \mathbb E\,\mathrm{KL}(F^*\|F_{sw}) \le \mathbb E\,\mathrm{KL}(F^*\|F_w) - \mathbb E\,\mathrm{KL}(F_{sw}\|F_w)
        + 2\Lambda\,\mathbb E\,\mathrm{TV}(F^*, G),\qquad \Lambda = \max_{x,y}|\log(F_{sw,y}/F_{w,y})|.

    Proof: the negative-entropy instance of :func:`w2s_theory.bregman.nonrealizable_projection_inequality`
    (three-point identity plus Hölder), so ``slack >= -gap`` for the computed student. ``reference`` is the
    chosen :math:`G` (e.g. the realizable part of a misspecified truth). ``details`` holds the plain slack
    (the uncorrected Theorem-2 form) and the correction per instance.
    """
    check = nonrealizable_projection_inequality(NEGATIVE_ENTROPY, _np(truth), _np(reference), _np(teacher),
                                                _np(student), _np(gap))
    return _from_projection(
        "reverse_kl_nonrealizable",
        "E KL(F*||F_sw) <= E KL(F*||F_w) - E KL(F_sw||F_w) + 2 Lambda E TV(F*, G)",
        SOURCES["theory_md_nonrealizable"], check, dict(check.terms))


def reverse_kl_pythagorean_at_minimiser(truth, teacher, student, gap) -> TheoremResult:
    r"""The plain Theorem-2 inequality :math:`\mathbb E\,\mathrm{KL}(F^*\|F_{sw}) \le \mathbb E\,\mathrm{KL}(F^*\|F_w)
    - \mathbb E\,\mathrm{KL}(F_{sw}\|F_w)` for a truth that need not lie in the class, with a certificate for the
    *exact* reverse-KL projection (:func:`w2s_theory.bregman.projection_inequality_at_minimiser`):
    ``violated`` certifies that the inequality fails at the exact minimiser, which is how docs/theory.md's "the plain
    inequality does fail once F* leaves the class" is checked. For a realizable truth use
    :func:`theorem2_reverse_kl` (whose certificate, the gap alone, is smaller)."""
    check = projection_inequality_at_minimiser(NEGATIVE_ENTROPY, _np(truth), _np(teacher), _np(student), _np(gap))
    return _from_projection(
        "reverse_kl_pythagorean_at_minimiser", "E KL(F*||F_sw) <= E KL(F*||F_w) - E KL(F_sw||F_w)  (any F*)",
        SOURCES["yao2025"] + " (plain form, truth outside the class)", check, dict(check.terms))


def charikar_nonrealizable(truth_values, weak_values, student_values, reference_values, certificate
                           ) -> TheoremResult:
    r"""Charikar et al. 2024, non-realizable version, with the :math:`O(\sqrt\varepsilon)` term made explicit:
    for :math:`f_{sw}` the squared-loss projection of :math:`f_w` onto a convex class and any :math:`f_G` in it,

    .. math:: \mathbb E(f_{sw}-f^*)^2 \le \mathbb E(f_w-f^*)^2 - \mathbb E(f_{sw}-f_w)^2
        + 2\sqrt{\varepsilon\;\mathbb E(f_{sw}-f_w)^2},\qquad \varepsilon = \mathbb E(f^*-f_G)^2

    (the squared-norm instance of :func:`w2s_theory.bregman.nonrealizable_projection_inequality`; with
    :math:`f_G` the best in class, :math:`\varepsilon = \min_f d(f, f^*)`). The constant 2 is derived here, not
    quoted from the paper. ``certificate``: the Frank–Wolfe gap for a constrained class, or
    :func:`squared_affine_certificate` (with ``reference_values``) for an unconstrained one.
    """
    check = nonrealizable_projection_inequality(SQUARED_NORM, _as3(truth_values), _as3(reference_values),
                                                _as3(weak_values), _as3(student_values), _np(certificate))
    return _from_projection(
        "charikar_nonrealizable",
        "E(f_sw-f*)^2 <= E(f_w-f*)^2 - E(f_sw-f_w)^2 + 2 sqrt(eps E(f_sw-f_w)^2)",
        SOURCES["charikar2024_nonrealizable"], check, dict(check.terms))


def charikar_squared_at_minimiser(truth_values, weak_values, student_values, gap) -> TheoremResult:
    r"""Charikar's plain inequality (gain >= misfit) for a truth that need not lie in the class, certified for the
    exact least-squares projection (:func:`w2s_theory.bregman.projection_inequality_at_minimiser` with the
    squared norm): ``violated`` certifies that gain < misfit at the exact minimiser."""
    check = projection_inequality_at_minimiser(SQUARED_NORM, _as3(truth_values), _as3(weak_values),
                                               _as3(student_values), _np(gap))
    return _from_projection(
        "charikar_squared_at_minimiser", "E(f_sw-f*)^2 <= E(f_w-f*)^2 - E(f_sw-f_w)^2  (any f*)",
        SOURCES["charikar2024"] + " (plain form, truth outside the class)", check, dict(check.terms))
