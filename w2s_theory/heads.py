r"""Head geometries: what "train only the last linear layer" can mean.

Each head is a class of maps from a frozen representation :math:`h(x)` to outputs. Shapes: features are
``(..., n, m)``; a batch of students has leading axes ``...``; class probabilities come out as
``(..., n, k)``. Everything accepts numpy or torch arrays.

===========  ===================================================  ================================
head         class                                                 convex in
===========  ===================================================  ================================
mixture      :math:`F(x) = A\,h(x)`, :math:`h(x)\in\Delta^m`,      probability space
             :math:`A\in\mathbb{R}^{k\times m}` column-stochastic
linear       :math:`F(x) = W h(x) + b` with :math:`F(x_i)\ge\gamma`,  probability space
             :math:`\mathbf 1^\top F(x_i)=1` on the sample
softmax      :math:`F(x) = \mathrm{softmax}(W h(x) + b)`            logit space (not probability space)
squared      :math:`f(x) = w\cdot h(x) + b` (optionally               parameter space
             :math:`\|(w,b)\|_2\le r`), real outputs
===========  ===================================================  ================================

The mixture head with :math:`m = 1` is the class of all constant distributions (docs/theory.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._backend import is_torch, ops

__all__ = ["MixtureHead", "LinearHead", "SoftmaxHead", "SquaredHead", "MixtureOfSoftmaxHead", "HEADS", "get_head"]


def _swap_last(x):
    return x.transpose(-1, -2) if is_torch(x) else np.swapaxes(x, -1, -2)


@dataclass(frozen=True)
class MixtureHead:
    r"""Mixture head :math:`F(x) = A h(x)` with :math:`A` column-stochastic (each column in :math:`\Delta^k`).

    Linear-minimisation oracle over the product of simplices: for a gradient :math:`G` (``k x m``) the
    minimiser of :math:`\langle G, S\rangle` puts all of column :math:`j`'s mass on
    :math:`\arg\min_y G_{yj}`. The Frank–Wolfe gap :math:`\max_S\langle G, A - S\rangle
    = \sum_j(\sum_y G_{yj}A_{yj} - \min_y G_{yj})` bounds :math:`\Phi(A) - \min\Phi` for convex
    :math:`\Phi` (Jaggi 2013).
    """

    name: str = "mixture"
    convex_in_probabilities: bool = True

    @staticmethod
    def predict(A, features):
        """Class probabilities ``(..., n, k)`` from ``A`` ``(..., k, m)`` and features ``(..., n, m)``."""
        return features @ _swap_last(A)

    @staticmethod
    def uniform(k: int, m: int, like=None, batch_shape=()):
        """The head that predicts the uniform distribution everywhere."""
        if like is not None and is_torch(like):
            return torch.full((*batch_shape, k, m), 1.0 / k, dtype=like.dtype, device=like.device)
        return np.full((*batch_shape, k, m), 1.0 / k)

    @staticmethod
    def lmo(G, allowed=None):
        """Vertex of the product of simplices minimising ``<G, S>``; ``allowed`` masks entries that may be > 0."""
        if is_torch(G):
            Gm = G if allowed is None else torch.where(allowed, G, torch.full_like(G, float("inf")))
            idx = Gm.argmin(dim=-2, keepdim=True)
            return torch.zeros_like(G).scatter_(-2, idx, 1.0)
        Gm = G if allowed is None else np.where(allowed, G, np.inf)
        idx = np.argmin(Gm, axis=-2)
        S = np.zeros_like(G, dtype=float)
        np.put_along_axis(S, idx[..., None, :], 1.0, axis=-2)
        return S

    @staticmethod
    def frank_wolfe_gap(G, A, allowed=None):
        r"""Per-student :math:`\sum_j(\sum_y G_{yj}A_{yj} - \min_{y\,\text{allowed}} G_{yj}) \ge 0`."""
        o = ops(G, A)
        if allowed is None:
            Gmin = o.min(G, axis=-2)
        elif is_torch(G):
            Gmin = torch.where(allowed, G, torch.full_like(G, float("inf"))).amin(dim=-2)
        else:
            Gmin = np.where(allowed, G, np.inf).min(axis=-2)
        # Columns where G is constant over the allowed classes contribute exactly 0: compute the per-column
        # gap as sum_y A_yj (G_yj - Gmin_j) so that it is exactly 0 there and never negative by rounding.
        per_column = o.sum(A * (G - Gmin[..., None, :]), axis=-2)
        if is_torch(per_column):
            per_column = per_column.clamp_min(0)
        else:
            per_column = np.maximum(per_column, 0)
        return o.sum(per_column, axis=-1)

    @staticmethod
    def project_to_class(A):
        """Nearest-by-renormalisation member of the class: clip negatives to 0, renormalise each column.

        Used to turn a solver's slightly infeasible output (interior-point solvers return ``-1e-10``) into a
        feasible head before its objective and certificate are evaluated.
        """
        if is_torch(A):
            A = A.clamp_min(0)
            return A / A.sum(dim=-2, keepdim=True)
        A = np.maximum(A, 0)
        return A / A.sum(axis=-2, keepdims=True)


@dataclass(frozen=True)
class LinearHead:
    r"""Affine head :math:`F(x) = W h(x) + b`, kept in the simplex with floor :math:`\gamma` *on the sample*:
    :math:`F(x_i) \ge \gamma` entrywise and :math:`\mathbf 1^\top F(x_i) = 1` for every training point.

    The class is a polyhedron in prediction space, so it is convex and Theorem 2 applies. ``gamma = 0`` is
    the plain simplex; a positive floor keeps every loss finite and is needed by the :math:`\sqrt{\cdot}`-bounds.
    """

    gamma: float = 0.0
    name: str = "linear"
    convex_in_probabilities: bool = True

    @staticmethod
    def predict(W, b, features):
        return features @ _swap_last(W) + b[..., None, :]

    @staticmethod
    def affine_coordinates(features):
        r"""Simplex features without their last coordinate: :math:`h' = (h_1,\dots,h_{m-1})`.

        For rows with :math:`\mathbf 1^\top h = 1` the class :math:`\{W h + b\}` equals :math:`\{W' h' + b'\}`
        (:math:`h_m = 1 - \mathbf 1^\top h'`), but in floating point the row sums of :math:`h` equal the bias
        column only up to rounding, so the stated problem on :math:`h` has a numerically rank-deficient span that
        no certificate can cover. On :math:`h'` the same class is a well-posed problem. A single feature
        (:math:`m = 1`, the constant class) is kept: a constant column is exactly the bias direction."""
        return features if features.shape[-1] <= 1 else features[..., :-1]


@dataclass(frozen=True)
class SoftmaxHead:
    r"""Log-linear head :math:`F(x) = \mathrm{softmax}(W h(x) + b)`: an exponential family, convex in logit
    space. Forward KL onto it is an M-projection (moment matching); the class is *not* convex in probability
    space, which is why Theorem 2 can fail for it."""

    name: str = "softmax"
    convex_in_probabilities: bool = False

    @staticmethod
    def logits(W, b, features):
        return features @ _swap_last(W) + b[..., None, :]

    @classmethod
    def predict(cls, W, b, features):
        z = cls.logits(W, b, features)
        o = ops(z)
        return o.exp(o.log_softmax(z, axis=-1))


@dataclass(frozen=True)
class SquaredHead:
    r"""Regression head :math:`f(x) = w\cdot h(x) + b` with real outputs, trained with squared loss
    (Charikar et al. 2024). With ``radius`` set the class is the convex set :math:`\|(w, b)\|_2 \le r`;
    without it, the whole linear space (where the Pythagorean inequality is an equality)."""

    bias: bool = True
    radius: float | None = None
    name: str = "squared"
    convex_in_probabilities: bool = True

    def design(self, features):
        """The design matrix :math:`[h(x), 1]` (or :math:`h(x)` without bias)."""
        if not self.bias:
            return features
        if is_torch(features):
            ones = torch.ones((*features.shape[:-1], 1), dtype=features.dtype, device=features.device)
            return torch.cat([features, ones], dim=-1)
        return np.concatenate([features, np.ones((*features.shape[:-1], 1))], axis=-1)

    def predict(self, theta, features):
        """``theta`` is ``(..., d)`` or ``(..., d, k_out)`` over the design's ``d`` columns."""
        Z = self.design(features)
        if theta.ndim == Z.ndim - 1:
            return (Z @ theta[..., None])[..., 0]
        return Z @ theta


@dataclass(frozen=True)
class MixtureOfSoftmaxHead:
    r""":math:`F(x) = \sum_{j\le K}\pi_j\,\mathrm{softmax}(W_jh(x) + b_j)`, :math:`\pi\in\Delta^K`: ``heads = K``
    softmax heads mixed in probability space (Mulgund & Pabbaraju 2025). Convex in :math:`\pi` for frozen heads,
    not jointly (:mod:`w2s_theory.solvers.mixture_of_softmax`)."""

    heads: int = 2
    name: str = "mixture_of_softmax"
    convex_in_probabilities: bool = False


HEADS = {"mixture": MixtureHead, "linear": LinearHead, "softmax": SoftmaxHead, "squared": SquaredHead,
         "mixture_of_softmax": MixtureOfSoftmaxHead}


def get_head(name: str, **options):
    """The head named ``name`` (with options such as ``gamma`` or ``radius``); unknown names are a ``ValueError``."""
    try:
        cls = HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}") from None
    return cls(**options)
