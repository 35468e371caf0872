"""Small random instances for theorem checks and property tests (not worlds: see :mod:`w2s_theory.synthetic`).

Each generator draws from a ``numpy.random.Generator`` so that a check is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synthetic import corrupt_truth

__all__ = ["MixtureProblem", "random_simplex_rows", "random_mixture_problem"]


def random_simplex_rows(rng: np.random.Generator, shape: tuple, k: int, concentration: float = 1.0,
                        zero_fraction: float = 0.0) -> np.ndarray:
    """Rows in the simplex ``shape + (k,)`` from a symmetric Dirichlet; a ``zero_fraction`` of rows are
    made one-hot (probabilities exactly 0 and 1), the boundary case the theory must survive."""
    rows = rng.dirichlet(np.full(k, concentration), size=shape)
    if zero_fraction > 0:
        hot = rng.random(shape) < zero_fraction
        rows[hot] = np.eye(k)[rng.integers(0, k, size=int(hot.sum()))]
    return rows


@dataclass
class MixtureProblem:
    """A realizable mixture-head instance: ``truth = features @ truth_head.T`` is in the class."""

    features: np.ndarray  # (n, m), rows in the simplex (shared by the batch)
    truth_head: np.ndarray  # (B, k, m), column-stochastic
    truth: np.ndarray  # (B, n, k)
    teacher: np.ndarray  # (B, n, k)


def random_mixture_problem(rng: np.random.Generator, *, batch: int, n: int, m: int, k: int,
                           feature_concentration: float = 0.5, teacher: str = "dirichlet",
                           teacher_concentration: float = 1.0, corruption: float = 1.0,
                           zero_fraction: float = 0.0) -> MixtureProblem:
    """Random features, a random truth head ``A*`` and a teacher that is either an arbitrary distribution per
    row (``teacher="dirichlet"``) or the truth corrupted in logit space (``teacher="corrupt"``,
    :func:`w2s_theory.synthetic.corrupt_truth` with scale ``corruption``)."""
    features = random_simplex_rows(rng, (n,), m, feature_concentration)
    truth_head = np.swapaxes(rng.dirichlet(np.full(k, 0.7), size=(batch, m)), -1, -2)
    truth = features @ np.swapaxes(truth_head, -1, -2)
    if teacher == "dirichlet":
        q = random_simplex_rows(rng, (batch, n), k, teacher_concentration, zero_fraction)
    elif teacher == "corrupt":
        q = corrupt_truth(truth.reshape(-1, k), corruption, rng).reshape(truth.shape)
    else:
        raise ValueError(f"teacher must be 'dirichlet' or 'corrupt', not {teacher!r}")
    return MixtureProblem(features, truth_head, truth, q)
