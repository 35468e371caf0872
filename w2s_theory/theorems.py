r"""The inequalities of THEORY.md, each as a function that returns a :class:`TheoremResult`.

Every function takes the quantities of one or many instances (leading batch axis), evaluates both sides with
:mod:`w2s_theory.divergences`, and attaches the certificate that makes the verdict honest: a slack is compared
with what the solver *proved* about its student, never with a hand-picked tolerance (DESIGN.md, principle 1).

Notation: :math:`F^*` truth, :math:`F_w` weak teacher, :math:`F_{sw}` strong student fitted on the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._backend import to_numpy
from .bregman import LOG_PARTITION, NEGATIVE_ENTROPY, SQUARED_NORM, projection_inequality, rounding_bound, verdict
from .divergences import kl

__all__ = [
    "TheoremResult",
    "theorem2_reverse_kl",
    "forward_kl_pythagorean",
    "softmax_forward_identity",
    "charikar_squared",
]

SOURCES = {
    "yao2025": "Yao et al. 2025 (arXiv 2502.11107), Thm 2",
    "charikar2024": "Charikar, Pabbaraju, Shiragur 2024 (arXiv 2405.15116), Thm 1",
    "theory_md": "THEORY.md guarantee table",
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
    r"""The forward-KL analogue of Theorem 2, which is FALSE in general (THEORY.md):

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
    r"""Forward KL onto a softmax head is an M-projection onto an exponential family, so (THEORY.md)

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
        "THEORY.md guarantee table (M-projection onto an exponential family)", check)


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
