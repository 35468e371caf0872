r"""The k-head mixture :math:`F(x) = \sum_{j=1}^{K}\pi_j\,\mathrm{softmax}(W_j h(x) + b_j)`,
:math:`\pi\in\Delta^K` (Mulgund & Pabbaraju 2025, convex combinations of strong models), fitted two ways:

* **frozen heads** (:func:`fit_mixture_weights`): the component outputs :math:`S_{ij}\in\Delta^c` are fixed and
  only :math:`\pi` is trained. The class :math:`\{\sum_j\pi_jS_{\cdot j}\}` is a polytope in prediction
  space, so Theorem 2 (and its Bregman generalisation) holds exactly; the fit is certified by the
  Frank–Wolfe gap (:func:`w2s_theory.solvers.frank_wolfe.fit_simplex_product`).
* **joint training** (:func:`fit_mixture_of_softmax_joint`): heads and weights together, a non-convex problem:
  L-BFGS (torch) from ``restarts`` random starts, the best objective kept per student; **uncertified**
  (``gap = NaN``, ``certificate = "none"``). With ``heads = 1`` this is also the softmax head's fit for the
  losses of :mod:`w2s_theory.fdivergences` (:func:`fit_softmax_general`).

The gradient in the parameters is the loss's analytic derivative in the probabilities
(``Loss.grad_student``, exact at the boundary) pulled back through the head by autograd.
"""

from __future__ import annotations

import numpy as np
import torch

from ..divergences import Loss
from .frank_wolfe import fit_simplex_product
from .result import FitResult

__all__ = ["mixture_of_softmax_probs", "fit_mixture_weights", "fit_mixture_of_softmax_joint",
           "fit_softmax_general"]


def mixture_of_softmax_probs(W, b, weights, features):
    r"""Outputs ``(B, n, c)`` of :math:`\sum_j\pi_j\mathrm{softmax}(W_jh + b_j)`; ``W`` ``(B, K, c, m)``,
    ``b`` ``(B, K, c)``, ``weights`` ``(B, K)`` in the simplex, ``features`` ``(B, n, m)`` or ``(n, m)``."""
    logits = torch.einsum("...nm,bkcm->bnkc", features, W) + b[:, None]
    return torch.einsum("bnkc,bk->bnc", torch.softmax(logits, dim=-1), weights)


def fit_mixture_weights(components: torch.Tensor, teacher: torch.Tensor, loss: Loss, *, tol: float = 1e-9,
                        max_iter: int = 4000) -> FitResult:
    r"""Frozen heads: minimise :math:`\frac1n\sum_i\ell(q_i, \sum_j\pi_jS_{ij})` over :math:`\pi\in\Delta^K`.
    ``components`` ``(B, n, K, c)`` are the heads' outputs; certified by the Frank–Wolfe gap."""
    B, n, K, c = components.shape

    def apply(pi):
        return torch.einsum("bnkc,bk->bnc", components, pi[..., 0])

    def adjoint(D):
        return torch.einsum("bnkc,bnc->bk", components, D)[..., None]

    pi0 = torch.full((B, K, 1), 1.0 / K, dtype=teacher.dtype, device=teacher.device)
    pi, probs, obj, gap, iters = fit_simplex_product(apply, adjoint, teacher, loss, pi0, tol=tol,
                                                     max_iter=max_iter, count=4 * (n + K + c))
    return FitResult(head="mixture_of_softmax", loss=loss.name, params={"weights": pi[..., 0]}, probs=probs,
                     objective=obj, gap=gap, certificate="frank_wolfe",
                     grad_norm=torch.full((B,), float("nan"), dtype=teacher.dtype, device=teacher.device),
                     iterations=iters,
                     converged=gap <= tol, method="accelerated-projected-gradient (frozen heads)",
                     info={"tol": tol, "heads": K})


def _lbfgs(params, probs_fn, teacher, loss, max_iter):
    """Minimise the sum over students of their mean loss by L-BFGS; returns per-student objectives."""
    n = teacher.shape[-2]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        P = probs_fn()
        with torch.no_grad():
            value = loss.per_sample(teacher, P.detach()).mean(-1)
            g = loss.grad_student(teacher, P.detach()) / n
            g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        P.backward(g)
        total = value.sum()
        return total if torch.isfinite(total) else torch.tensor(float("inf"), dtype=total.dtype)

    opt.step(closure)
    with torch.no_grad():
        P = probs_fn()
        return P, loss.per_sample(teacher, P).mean(-1)


def fit_mixture_of_softmax_joint(X: torch.Tensor, Q: torch.Tensor, loss: Loss, *, heads: int,
                                 restarts: int = 4, seed: int = 0, max_iter: int = 300, init_scale: float = 1.0,
                                 train_weights: bool = True) -> FitResult:
    """Joint training of ``heads`` softmax heads and their mixing weights; best of ``restarts`` L-BFGS runs,
    uncertified. Starting points come from ``torch.Generator`` seeded with ``seed``."""
    B, n, c = Q.shape
    m = X.shape[-1]
    Xb = X if X.ndim == 3 else X.expand(B, n, m)
    Xb = Xb.contiguous()
    gen = torch.Generator().manual_seed(int(seed))
    best = None
    threads = torch.get_num_threads()
    if Q.numel() * heads < 2**20:
        torch.set_num_threads(1)
    try:
        for r in range(restarts):
            W = (init_scale * torch.randn((B, heads, c, m), generator=gen, dtype=Q.dtype)).to(Q.device)
            W.requires_grad_(True)
            b = torch.zeros((B, heads, c), dtype=Q.dtype, device=Q.device, requires_grad=True)
            alpha = torch.zeros((B, heads), dtype=Q.dtype, device=Q.device, requires_grad=train_weights)
            params = [W, b] + ([alpha] if train_weights else [])

            def probs_fn():
                logits = torch.einsum("bnm,bkcm->bnkc", Xb, W) + b[:, None]
                return torch.einsum("bnkc,bk->bnc", torch.softmax(logits, dim=-1), torch.softmax(alpha, dim=-1))

            P, obj = _lbfgs(params, probs_fn, Q, loss, max_iter)
            cand = {"W": W.detach().clone(), "b": b.detach().clone(),
                    "weights": torch.softmax(alpha.detach(), dim=-1)}
            if best is None:
                best = (obj, P, cand)
            else:
                better = obj < best[0]
                view = lambda t: better.view((B,) + (1,) * (t.ndim - 1))  # noqa: E731
                best = (torch.where(better, obj, best[0]), torch.where(view(P), P, best[1]),
                        {k: torch.where(view(v), v, best[2][k]) for k, v in cand.items()})
    finally:
        torch.set_num_threads(threads)
    obj, P, params = best
    nan = torch.full((B,), float("nan"), dtype=Q.dtype, device=Q.device)
    return FitResult(head="mixture_of_softmax", loss=loss.name, params=params, probs=P, objective=obj, gap=nan,
                     certificate="none", grad_norm=nan,
                     iterations=torch.full((B,), max_iter * restarts, device=Q.device),
                     converged=torch.zeros(B, dtype=torch.bool, device=Q.device),
                     method=f"L-BFGS, best of {restarts} restarts",
                     info={"heads": heads, "restarts": restarts, "seed": seed,
                           "uncertified": "joint training of the heads is not convex"})


def fit_softmax_general(X: torch.Tensor, Q: torch.Tensor, loss: Loss, *, max_iter: int = 300) -> FitResult:
    """The softmax head for losses outside the KL family (not convex in the logits): L-BFGS from zero,
    uncertified. Returns ``W`` ``(B, c, m)`` and ``b`` ``(B, c)`` like the softmax solver."""
    res = fit_mixture_of_softmax_joint(X, Q, loss, heads=1, restarts=1, max_iter=max_iter, init_scale=0.0,
                                       train_weights=False)
    res.head = "softmax"
    res.params = {"W": res.params["W"][:, 0], "b": res.params["b"][:, 0]}
    res.method = "L-BFGS from zero (uncertified)"
    res.info = {"uncertified": f"{loss.name} on the softmax head is not convex in the logits"}
    return res
