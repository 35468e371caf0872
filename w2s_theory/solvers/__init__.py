r"""Fit last-layer students, with a certificate of optimality for each.

:func:`fit` is the one entry point: it validates the inputs, moves them to the device and routes each
(head, loss) pair to its solver:

=========  =============================================  ==========================================
head       batched solver (torch, CPU/GPU)                 certificate
=========  =============================================  ==========================================
mixture    projected Newton (:mod:`.mixture`)              Frank–Wolfe gap
softmax    Newton (:mod:`.softmax`)                        self-concordance bound (forward losses);
                                                           none for reverse losses (non-convex)
squared    normal equations / trust region (:mod:`.squared`)  exact quadratic gap / Frank–Wolfe gap
linear     log-barrier Newton (:mod:`.linear`)             Frank–Wolfe gap (weak LP duality)
=========  =============================================  ==========================================

``backend="cvxpy"`` sends every convex pair to the exact reference instead (one student at a time).
"""

from __future__ import annotations

import numpy as np
import torch

from .._backend import resolve_device
from ..divergences import get_loss
from ..heads import HEADS
from ..validation import InputError, check_batch_shapes, check_distributions, check_finite
from .result import CERTIFICATES, FitResult

__all__ = ["fit", "FitResult", "CERTIFICATES", "SOLVABLE"]

#: (head, loss) pairs that :func:`fit` accepts.
_FIELD_LOSSES = ("js", "jeffreys", "hellinger", "chi2", "reverse_chi2", "tv", "bregman:negative_entropy",
                 "bregman:squared_norm", "bregman:itakura_saito", "bregman:generalized_kl", "bregman:mahalanobis")
SOLVABLE = {
    "mixture": ("forward_kl", "forward_ce", "reverse_kl", "reverse_ce", "squared") + _FIELD_LOSSES,
    # The linear head's barrier solver takes any loss that is separable over the classes (TV through its
    # smoothing, with a certificate that pays for it) or quadratic (Mahalanobis: a constant k x k Hessian).
    "linear": ("forward_kl", "forward_ce", "reverse_kl", "reverse_ce", "squared") + _FIELD_LOSSES,
    "softmax": ("forward_kl", "forward_ce", "reverse_kl", "reverse_ce") + _FIELD_LOSSES,
    "mixture_of_softmax": ("forward_kl", "reverse_kl") + _FIELD_LOSSES,
    "squared": ("squared",),
}


def _as_tensor(x, device, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def fit(
    features,
    teacher,
    *,
    loss: str,
    head: str = "mixture",
    backend: str = "batched",
    device: str | None = "cpu",
    tol: float = 1e-10,
    max_iter: int = 200,
    gamma: float = 0.0,
    radius: float | None = None,
    bias: bool = True,
    heads: int = 2,
    restarts: int = 4,
    seed: int = 0,
    strong_convexity: bool = False,
) -> FitResult:
    r"""Fit students :math:`F = f\circ h` to teacher outputs by minimising the mean training loss.

    .. math:: \min_{f\in\mathcal F_{\text{head}}}\ \frac1n\sum_i \ell\big(q_i, f(h_i)\big)

    Args:
        features: ``(n, m)`` (one representation shared by all students) or ``(B, n, m)``.
        teacher: ``(n, k)`` or ``(B, n, k)`` teacher probabilities (real targets for the squared head).
        loss: one of ``forward_kl reverse_kl forward_ce reverse_ce squared``.
        head: one of ``mixture linear softmax squared``.
        backend: ``"batched"`` (torch) or ``"cvxpy"`` (exact reference, slow).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (cuda when available).
        tol: target certified gap.
        gamma: probability floor of the linear head.
        radius, bias: options of the squared head.
        heads, restarts, seed: options of the ``mixture_of_softmax`` head (joint training, uncertified; the
            frozen-heads fit is :func:`.mixture_of_softmax.fit_mixture_weights`).
        strong_convexity: mixture head (batched backend), two classes, KL losses: the gap may be the
            strong-convexity bound on ``objective - optimum`` (certificate ``frank_wolfe_or_strong_convexity``),
            which stops students about one iteration earlier but is not the first-order gap that the theorem
            checks need (:func:`.mixture.fit_mixture_batched`).

    Returns:
        A :class:`FitResult` with batch axis ``B`` (1 for unbatched input).
    """
    if head not in HEADS:
        raise InputError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    try:
        loss_obj = get_loss(loss)
    except ValueError as e:
        raise InputError(str(e)) from None
    if loss not in SOLVABLE[head]:
        raise InputError(f"loss {loss!r} is not available for head {head!r}; "
                         f"use one of: {', '.join(SOLVABLE[head])}")
    if backend not in ("batched", "cvxpy"):
        raise InputError(f"unknown backend {backend!r}; choose 'batched' or 'cvxpy'")
    if strong_convexity and (head != "mixture" or backend != "batched"):
        raise InputError(f"the strong-convexity certificate is for the mixture head's batched solver, "
                         f"not head {head!r} with backend {backend!r}")
    B, n, m, k = check_batch_shapes("features", features, "teacher", teacher)
    if strong_convexity:
        from .mixture import strong_convexity_unavailable

        refusal = strong_convexity_unavailable(k, loss)
        if refusal:
            raise InputError(refusal)
    check_finite("features", features)
    if head == "squared":
        check_finite("teacher", teacher)
    else:
        teacher = check_distributions("teacher", teacher)
    if head == "mixture":
        features = check_distributions("features (mixture head: each row must lie in the simplex)", features)
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise InputError(str(e)) from None

    unbatched = len(tuple(teacher.shape)) == 2
    X = _as_tensor(features, dev, torch.float64)
    Q = _as_tensor(teacher, dev, torch.float64)
    if unbatched:
        Q = Q[None]
    shared_features = X.ndim == 2  # one matrix for every student
    if shared_features and head != "mixture":
        X = X.expand(B, n, m)

    try:
        if head == "mixture_of_softmax" or (head == "softmax" and loss in _FIELD_LOSSES):
            from .mixture_of_softmax import fit_mixture_of_softmax_joint, fit_softmax_general

            if head == "softmax":
                return fit_softmax_general(X, Q, loss_obj)
            if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
                raise InputError(f"heads must be a positive integer, got {heads!r}")
            return fit_mixture_of_softmax_joint(X, Q, loss_obj, heads=heads, restarts=restarts, seed=seed)
        return _dispatch(X, Q, loss_obj, head, backend, tol=tol, max_iter=max_iter, gamma=gamma, radius=radius,
                         bias=bias, shared=shared_features, strong_convexity=strong_convexity)
    except ValueError as exc:  # the solvers' own input checks (e.g. reverse loss with teacher zeros on softmax)
        raise InputError(str(exc).splitlines()[0]) from exc


def _dispatch(X, Q, loss_obj, head, backend, *, tol, max_iter, gamma, radius, bias, shared=None,
              strong_convexity=False) -> FitResult:
    if backend == "cvxpy":
        from .reference import fit_reference_batch

        return fit_reference_batch(X, Q, loss_obj.name, head, gamma=gamma, radius=radius, bias=bias)
    if head == "linear" and loss_obj.name == "tv":
        from .linear import fit_tv_linear

        return fit_tv_linear(X, Q, gamma=gamma, tol=tol, max_iter=max_iter)
    if head == "linear":
        from .linear import fit_linear_batched

        return fit_linear_batched(X, Q, loss_obj, gamma=gamma, tol=tol, max_iter=max_iter)
    if head == "mixture" and loss_obj.name == "tv":  # not smooth: an LP per student, dual certificate
        from .frank_wolfe import fit_tv_mixture

        return fit_tv_mixture(X, Q, tol=tol)
    if head == "mixture" and loss_obj.name == "bregman:mahalanobis":  # not separable over classes
        from .frank_wolfe import fit_mixture_generic

        return fit_mixture_generic(X, Q, loss_obj, tol=tol, max_iter=max(max_iter, 2000))
    if head == "mixture":
        from .mixture import fit_mixture_batched

        return fit_mixture_batched(X, Q, loss_obj, tol=tol, max_iter=max_iter, strong_convexity=strong_convexity)
    if head == "softmax":
        from .softmax import fit_softmax_batched

        return fit_softmax_batched(X, Q, loss_obj, tol=tol, max_iter=max_iter)
    from .squared import fit_squared_batched

    return fit_squared_batched(X, Q, bias=bias, radius=radius, tol=tol, shared=shared)
