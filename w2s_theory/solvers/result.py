"""The one result type every solver returns, batched or reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .._backend import to_numpy

__all__ = ["FitResult", "CERTIFICATES", "single_student"]

#: What a ``gap`` means, by certificate kind. Every kind except ``"none"`` is a proven upper bound on
#: ``objective - optimum`` (up to floating-point rounding in its own evaluation).
CERTIFICATES = {
    "frank_wolfe": "max_S <grad, theta - S> over the feasible set (convex objective, Jaggi 2013)",
    "frank_wolfe_or_strong_convexity": "the smaller of the Frank-Wolfe gap and ||v||^2 / (2 mu), v the smallest "
                                       "subgradient and mu a certified strong-convexity modulus (two-class mixture "
                                       "head, opt-in): bounds objective - optimum, not the first-order gap",
    "self_concordance": "generalized self-concordance bound from the Newton decrement (Bach 2010)",
    "normal_equations": "exact quadratic suboptimality (theta - theta*)^T H (theta - theta*) / 2 via H^{-1} g",
    "duality": "objective minus a dual lower bound (linear programmes, e.g. total variation)",
    "none": "no certificate (non-convex problem): gap is NaN, see grad_norm",
}


@dataclass
class FitResult:
    """Students fitted by a solver. Tensors carry a leading batch axis ``B``.

    Attributes:
        head, loss: names as in :mod:`w2s_theory.heads` and :data:`w2s_theory.divergences.LOSSES`.
        params: the head's parameters, e.g. ``{"A": (B, k, m)}`` or ``{"W": (B, k, m), "b": (B, k)}``.
        probs: the student's outputs on the training sample, ``(B, n, k)``.
        objective: mean training loss per student, ``(B,)``.
        gap: certified upper bound on ``objective - min objective`` per student; NaN where none exists,
            ``inf`` where the problem is infeasible (every head in the class has infinite loss).
        certificate: the kind of ``gap`` (a key of :data:`CERTIFICATES`).
        grad_norm: norm of the (reduced) gradient at the returned point, ``(B,)``.
        iterations: iterations used per student.
        converged: ``gap <= tol`` (or, without certificate, ``grad_norm <= tol``).
        method: the algorithm, for the record.
        info: solver details. Certified solvers that can decline to certify (softmax forward losses, squared
            head) put a boolean ``singular`` ``(B,)`` there: True where the design is numerically collinear
            after scaling its columns, so that no bound can be proven for the problem as stated (``gap = inf``,
            ``converged = False``); ``uncertified_reason`` then says so in one line.
    """

    head: str
    loss: str
    params: dict
    probs: torch.Tensor
    objective: torch.Tensor
    gap: torch.Tensor
    certificate: str
    grad_norm: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    method: str
    info: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.objective.shape[0])

    def numpy(self) -> dict:
        """Plain numpy arrays, for ``np.savez`` and the results store."""
        out = {f"param_{k}": to_numpy(v) for k, v in self.params.items()}
        out.update(
            probs=to_numpy(self.probs),
            objective=to_numpy(self.objective),
            gap=to_numpy(self.gap),
            grad_norm=to_numpy(self.grad_norm),
            iterations=to_numpy(self.iterations),
            converged=to_numpy(self.converged),
        )
        return out

    @classmethod
    def concat(cls, parts: list["FitResult"]) -> "FitResult":
        """Students of several results (same head, loss and certificate) as one batch, in order."""
        first = parts[0]
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return cls(
            head=first.head, loss=first.loss, params={k: torch.cat([p.params[k] for p in parts]) for k in first.params},
            probs=cat("probs"), objective=cat("objective"), gap=cat("gap"), certificate=first.certificate,
            grad_norm=cat("grad_norm"), iterations=cat("iterations"), converged=cat("converged"),
            method=first.method, info=_concat_info(parts),
        )


def _concat_info(parts: list["FitResult"]) -> dict:
    """The first part's ``info``, with work counters (``info["work"]``, a dict of counts) summed over parts and
    per-student tensors concatenated."""
    info = dict(parts[0].info)
    if all(isinstance(p.info.get("work"), dict) for p in parts):
        info["work"] = {key: sum(p.info["work"].get(key, 0) for p in parts) for key in parts[0].info["work"]}
    for key, value in parts[0].info.items():  # per-student tensors (first axis = the part's batch) are joined
        if all(isinstance(p.info.get(key), torch.Tensor) and p.info[key].ndim >= 1
               and p.info[key].shape[0] == p.batch_size for p in parts):
            info[key] = torch.cat([p.info[key] for p in parts])
    return info


def single_student(name: str, array) -> np.ndarray:
    """``array`` as float64 numpy without a batch axis: ``(n, d)`` or ``(1, n, d)`` in, ``(n, d)`` out.
    The cvxpy references fit one student; a larger batch is an error naming the argument."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 3:
        if a.shape[0] != 1:
            raise ValueError(f"{name}: the reference fits one student (B = 1), got batch {a.shape[0]}")
        a = a[0]
    return a
