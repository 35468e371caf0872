r"""The upper half of the :math:`\sqrt\cdot`-bound (Lemma 1 as stated in docs/theory.md), reverse misfit:

.. math::

    L(F^*,F_{sw}) \le L(F^*,F_w) + C(\gamma)\sqrt{d}\qquad d = \mathbb E\,\mathrm{KL}(F_{sw}\|F_w),

for teacher and student probabilities at least :math:`\gamma`, with the provable constant
:math:`C(\gamma) = 1/(\sqrt2\,\gamma)` (docs/theory.md; :func:`w2s_theory.bounds.provable_sqrt_constant`) and
:math:`L = \mathbb E\,\mathrm{KL}(F^*\|\cdot)` or :math:`\mathbb E\,\mathrm{CE}(F^*,\cdot)` (with :math:`d` in the same
loss). The paper states this bound with an unknown constant :math:`C_1`; the constant checked here is the
provable one, not the paper's.

Instances: random (linear head with floor 0.02 and softmax students), a synthetic pipeline and the sharp
path (:mod:`paper_checks._sqrt_bound`); every instance uses its own floor. Expected: holds on every instance.
The details report the bound's tightness (left side / :math:`C\sqrt d`, at most :math:`C^*/C = 2\sqrt{\gamma(1-\gamma)}`
by the sharp constant) and the empirical constant as a fraction of :math:`C^*(\gamma)`.
Default size: ``SIZES`` in :mod:`paper_checks._sqrt_bound` (quick: 6 random instances per student kind,
one world; full: 40 and four worlds).
"""

from paper_checks._sqrt_bound import run_sqrt_bound
from w2s_theory.checks import PaperCheck


def run(quick: bool, seed: int):
    return run_sqrt_bound("upper", "reverse", quick, seed)


CHECK = PaperCheck(
    name="sqrt_bound_upper_reverse",
    claim="upper bound on the student's error: L(F*,F_sw) <= L(F*,F_w) + C sqrt(d), reverse d, C = 1/(sqrt2 gamma)",
    source="Yao et al. 2025, Lemma 1 (form per docs/theory.md); constant 1/(sqrt(2) gamma) from docs/theory.md (provable)",
    expected="holds",
    run=run,
    statement=__doc__,
)
