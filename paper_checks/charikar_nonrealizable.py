r"""Charikar et al. (2024), non-realizable squared loss: as :math:`f^*` leaves the convex class the plain
inequality gain :math:`\ge` misfit fails, while the corrected one holds:

.. math::

    \mathbb E(f_{sw}-f^*)^2 \;\le\; \mathbb E(f_w-f^*)^2 - \mathbb E(f_{sw}-f_w)^2
    + 2\sqrt{\varepsilon\;\mathbb E(f_{sw}-f_w)^2},\qquad \varepsilon = \mathbb E(f^* - f_G)^2,

with :math:`f_G` any member of the class (here the least-squares projection of :math:`f^*`, so :math:`\varepsilon`
is :math:`\min_f d(f, f^*)`). The paper states an :math:`O(\sqrt\varepsilon)` term; the explicit constant 2 is
derived in :mod:`w2s_theory.bregman` (three-point identity plus Cauchy–Schwarz), not quoted.

Sweep: :math:`f^* = \theta^{*\top}[h,1] + \epsilon\, g(x)` with :math:`g` a fixed nonlinearity of unit scale,
:math:`\epsilon \in \{0, 0.1, 0.3, 1\}`; teacher :math:`f_w = f^* + 0.3\,\xi`; unconstrained and ball-constrained
heads, Gaussian features and a synthetic world's strong features. Certificates: the (honest) normal-equations
gap through :func:`w2s_theory.theorems.squared_affine_certificate`, or the Frank–Wolfe gap; the plain inequality
is certified for the exact minimiser (:func:`w2s_theory.theorems.charikar_squared_at_minimiser`).
Expected: holds (corrected everywhere, plain at :math:`\epsilon = 0`), with certified plain failures for
:math:`\epsilon > 0` (:mod:`paper_checks._nonrealizable`). Default size: ``SIZES``.
"""

import numpy as np

from paper_checks._nonrealizable import combine
from w2s_theory._backend import to_numpy
from w2s_theory.checks import PaperCheck
from w2s_theory.solvers import fit
from w2s_theory.synthetic import WorldConfig, make_world
from w2s_theory.theorems import (
    charikar_nonrealizable,
    charikar_squared,
    charikar_squared_at_minimiser,
    squared_affine_certificate,
)

SIZES = {"quick": 12, "full": 100}  # students per (eps, head, features)
EPSILONS = (0.0, 0.1, 0.3, 1.0)
RADIUS = 3.0


def _nonlinearity(X):
    g = np.sin(2 * X[..., 0]) * X[..., 1] + X[..., -1] ** 2
    return g / np.sqrt((g**2).mean(-1, keepdims=True))


def _fit(X, targets, radius, bias):
    st = fit(X, targets[..., None], loss="squared", head="squared", radius=radius, bias=bias)
    gap = to_numpy(st.gap)
    return to_numpy(st.probs)[..., 0], gap


def run(quick: bool, seed: int):
    rng = np.random.default_rng([seed, 17])
    B = SIZES["quick" if quick else "full"]
    world = make_world(WorldConfig(strong_dim=10), seed)
    strong = world.sample(60, "B").strong_features
    # Strong features lie in the simplex: with a bias column the design is collinear up to rounding (no
    # certificate exists for the problem as stated), so they are fitted without it (the class is still linear).
    feature_sets = [(rng.normal(size=(B, 40, 4)), True), (np.broadcast_to(strong, (B, *strong.shape)).copy(), False)]
    theorems, plain_by_eps = [], {}
    for eps in EPSILONS:
        plain = []
        for X, bias in feature_sets:
            m = X.shape[-1]
            theta = rng.normal(size=(B, m + 1))
            if not bias:
                theta[:, m:] = 0.0
            theta *= 0.8 * RADIUS / np.linalg.norm(theta, axis=1, keepdims=True)  # inside the ball
            linear = np.einsum("bnm,bm->bn", X, theta[:, :m]) + theta[:, m:]
            truth = linear + eps * _nonlinearity(X)
            weak = truth + 0.3 * rng.normal(size=truth.shape)
            for radius in (None, RADIUS):
                P, gap = _fit(X, weak, radius, bias)
                G, _ = _fit(X, truth, radius, bias)  # a member of the class close to the truth
                cert = squared_affine_certificate(gap, G, P) if radius is None else gap
                theorems.append(charikar_nonrealizable(truth, weak, P, G, cert))
                plain.append(charikar_squared_at_minimiser(truth, weak, P, gap))
                if eps == 0:
                    cert0 = squared_affine_certificate(gap, truth, P) if radius is None else gap
                    theorems.append(charikar_squared(truth, weak, P, cert0, equality=radius is None))
        plain_by_eps[eps] = _merge(plain)
    return combine(theorems, plain_by_eps)


def _merge(results):
    from w2s_theory.theorems import TheoremResult

    cat = lambda key: np.concatenate([np.ravel(getattr(r, key)) for r in results])  # noqa: E731
    r0 = results[0]
    return TheoremResult(r0.name, r0.statement, r0.source, cat("lhs"), cat("rhs"), cat("slack"), cat("certificate"),
                         cat("rounding"), cat("verdict"))


CHECK = PaperCheck(
    name="charikar_nonrealizable",
    claim="squared loss, f* outside the class: gain >= misfit fails; gain >= misfit - 2 sqrt(eps misfit) holds",
    source="Charikar et al. 2024 (non-realizable theorem; constant 2 derived here)",
    expected="holds",
    run=run,
    statement=__doc__,
)
