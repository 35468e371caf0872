r"""Forward KL onto a softmax head is an M-projection onto an exponential family (docs/theory.md, guarantee table):

.. math::

    \mathbb E\,\mathrm{KL}(F_{sw}\|F^*) \;=\; \mathbb E\,\mathrm{KL}(F_w\|F^*) - \mathbb E\,\mathrm{KL}(F_w\|F_{sw}),
    \qquad F_{sw} = \arg\min_{W,b}\mathbb E\,\mathrm{KL}\big(F_w\,\|\,\mathrm{softmax}(W h + b)\big),

for every truth :math:`F^* = \mathrm{softmax}(W^* h + b^*)` in the family. Note the error is measured as
:math:`\mathrm{KL}(\text{model}\|\text{truth})`, the reverse of Theorem 2's. It is the Bregman identity of the
log-partition function on logits, exact because the head's logits form a linear space
(:func:`w2s_theory.theorems.softmax_forward_identity`); the defect of the computed head is
:math:`\langle\nabla\Phi(\hat W,\hat b), (W^*,b^*) - (\hat W,\hat b)\rangle`, bounded by the gradient norm times the
parameter distance (:func:`w2s_theory.guarantees.softmax_forward_certificate_terms`), so ``|slack| <=
certificate`` is what the identity implies for the computed student.

Instances: Gaussian features (k = 2, 3, 5 classes), and the strong features of synthetic worlds
(:mod:`w2s_theory.synthetic`) with a softmax truth drawn on them; teachers are the truth corrupted in logit
space, arbitrary Dirichlet rows, or rows with exact zeros (allowed for forward KL). Students: the batched
Newton solver (self-concordance certificate). Expected: holds (equality within the certificate) everywhere.
Default size: ``SIZES``.
"""

import numpy as np

from w2s_theory._backend import to_numpy
from w2s_theory.checks import PaperCheck, outcome_from_results
from w2s_theory.guarantees import softmax_forward_certificate_terms
from w2s_theory.heads import SoftmaxHead
from w2s_theory.solvers import fit
from w2s_theory.synthetic import WorldConfig, make_world
from w2s_theory.theorems import softmax_forward_identity

SIZES = {"quick": 12, "full": 100}  # students per setting
SETTINGS = [(2, 2, 15), (3, 3, 30), (5, 4, 40)]  # (k, m, n)


def _teachers(rng, truth, kind):
    if kind == "corrupt":
        q = np.exp(np.log(truth) + rng.normal(size=truth.shape))
    elif kind == "dirichlet":
        q = rng.dirichlet(np.ones(truth.shape[-1]), size=truth.shape[:-1])
    else:  # a sparse teacher: about a third of the entries exactly 0, no row all zero
        q = rng.dirichlet(np.ones(truth.shape[-1]), size=truth.shape[:-1]) * (rng.random(truth.shape) > 0.33)
        q[q.sum(-1) == 0] = 1.0
    return q / q.sum(-1, keepdims=True)


def _identity(rng, X, k, kind):
    B = X.shape[0]
    W, b = rng.normal(size=(B, k, X.shape[-1])), rng.normal(size=(B, k))
    truth = np.asarray(SoftmaxHead.predict(W, b, X))
    teacher = _teachers(rng, truth, kind)
    st = fit(X, teacher, loss="forward_kl", head="softmax")
    Wh, bh = to_numpy(st.params["W"]), to_numpy(st.params["b"])
    grad, dist = softmax_forward_certificate_terms(X, teacher, Wh, bh, W, b)
    return softmax_forward_identity(np.asarray(SoftmaxHead.logits(W, b, X)), teacher,
                                    np.asarray(SoftmaxHead.logits(Wh, bh, X)), grad, dist)


def run(quick: bool, seed: int):
    rng = np.random.default_rng([seed, 5])
    B = SIZES["quick" if quick else "full"]
    results = []
    for (k, m, n), kind in zip(SETTINGS, ("corrupt", "dirichlet", "sparse")):
        results.append(_identity(rng, rng.normal(size=(B, n, m)), k, kind))
    world = make_world(WorldConfig(k=3, strong_dim=6, weak_dim=3), seed)
    features = world.sample(60, "B").strong_features
    results.append(_identity(rng, np.broadcast_to(features, (B, *features.shape)).copy(), 3, "corrupt"))
    return outcome_from_results(results)


CHECK = PaperCheck(
    name="softmax_forward_identity",
    claim="softmax head, forward KL: E KL(F_sw||F*) = E KL(F_w||F*) - E KL(F_w||F_sw) (equality)",
    source="docs/theory.md, guarantee table (M-projection onto an exponential family)",
    expected="holds",
    run=run,
    statement=__doc__,
)
