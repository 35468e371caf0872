r"""The practice trainer: students trained the way the paper trains them, not solved to optimality.

Where :func:`w2s_theory.solvers.fit` returns the *certified minimiser* of a training loss, :func:`train`
runs what a practitioner runs (Yao et al. 2025, Sec. 5; Burns et al. 2023): the same head, started from an
initialisation, trained by mini-batch Adam or SGD for a few epochs with a learning-rate schedule, weight
decay and early stopping on a validation split. Theory and practice then sit side by side: every practice
student also reports its *objective gap* to the exact minimiser of the same loss on the same data.

**One tensor program.** The ``B`` students of a call are trained together: parameters carry a leading batch
axis, every step gathers each student's own mini-batch ``(B, batch, m)`` (in chunks of students that stay in
cache) and updates all students with the same kernels. The softmax head's gradient is in closed form (no
autograd; see :func:`_softmax_gradient`), the mixture head's comes from autograd. Each student has its own random stream (mini-batch order, random initialisation), so its
numbers do not depend on which other students share its batch (tested bit for bit: alone vs inside a
batch). Arithmetic is float64 (``dtype=torch.float32`` is available for large batches).

**Heads** (parameters, float64):

* ``mixture``: :math:`F(x) = A\,h(x)` with :math:`A = \mathrm{softmax}_{\text{classes}}(\Theta)`, column by
  column, so :math:`A` stays column-stochastic without projections; the minimiser on the boundary of the
  simplex is approached, not reached (``init = "zero"`` is the uniform head);
* ``softmax``: :math:`F(x) = \mathrm{softmax}(W h(x) + b)`; ``standardize`` trains on
  :math:`(h - \mu)/\sigma` (training-split moments per student), the same function class.

**Losses** (per sample, teacher :math:`q`, student :math:`F`, mean over the mini-batch):
``forward_kl`` :math:`\mathrm{KL}(q\|F)`, ``forward_ce`` :math:`-\sum_y q_y\log F_y`, ``reverse_kl``
:math:`\mathrm{KL}(F\|q)`, ``reverse_ce`` :math:`-\sum_y F_y\log q_y`; ``hard_ce`` :math:`-\log
F_{\arg\max q}` (hard labels from the teacher); ``aux_conf`` (Burns et al. 2023, "auxiliary confidence
loss") :math:`(1-\alpha_t)\,\mathrm{CE}(q, F) + \alpha_t\,\mathrm{CE}(\hat t(F), F)` with :math:`\hat t(F)`
the one-hot of the student's own (detached) prediction — the argmax, i.e. threshold 1/2 for k = 2 (Burns et
al. use a batch-quantile threshold matching the weak labels' class balance; the argmax is our simplification)
— and :math:`\alpha_t` warmed up linearly from 0 to :data:`AUX_ALPHA` = 0.75 over the first
:data:`AUX_WARMUP` = 20% of the steps, as in their large-model setting.

**Optimisers.** ``adam``: Adam (Kingma & Ba 2015; :math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-8}`)
with *decoupled* weight decay (AdamW, Loshchilov & Hutter 2019); ``sgd``: plain SGD with L2 weight decay.
Decay acts on :math:`\Theta` / :math:`W`, never the bias. Learning rate at step :math:`t` of :math:`T`:
:math:`\eta_t = \eta\cdot\min(1, (t+1)/t_w)\cdot s(t/T)` with :math:`s = 1` (``constant``), :math:`1 - t/T`
(``linear``) or :math:`\tfrac12(1+\cos\pi t/T)` (``cosine``), :math:`t_w` = ``warmup_steps``.

**Early stopping and evaluation.** Every ``eval_every`` steps (and at step 0 and the last step) the
validation loss is measured — the training loss against the weak teacher on a weak-labelled validation
split (``early_stopping = "weak"``), or the negative log-likelihood of ``n_val`` true labels drawn from the
truth (``"true"``) — and each student keeps its parameters from the evaluation with the lowest validation
loss (its ``stop_step``). Learning curves (test accuracy against the truth, weight norm, validation loss)
are recorded at the same steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ._backend import to_numpy
from .validation import InputError

__all__ = ["PracticeConfig", "PracticeResult", "train", "training_loss", "probabilities", "weight_norm",
           "expected_calibration_error", "bench_practice", "loop_student", "PRACTICE_LOSSES", "OPTIMIZERS", "SCHEDULES",
           "INITS", "EARLY_STOPPING", "AUX_ALPHA", "AUX_WARMUP", "PRACTICE_HEADS"]

PRACTICE_LOSSES = ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce", "hard_ce", "aux_conf")
PRACTICE_HEADS = ("mixture", "softmax")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
INITS = ("zero", "random", "ceiling")
EARLY_STOPPING = ("none", "weak", "true")
REVERSE_LOSSES = ("reverse_kl", "reverse_ce")

#: Burns et al. 2023: auxiliary-confidence weight and the fraction of training over which it is warmed up.
AUX_ALPHA = 0.75
AUX_WARMUP = 0.2

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
#: Students per chunk of a training step: as many as keep one chunk's mini-batches within ~4 MiB, so that they
#: are still cached when the gradient reads them again (1-8 MiB measured alike on the 2-core CI machine; the
#: unchunked step was slower there).
_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class PracticeConfig:
    """The optimisation knobs shared by one batch of students (the learning rate is per student)."""

    optimizer: str = "adam"
    schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 32
    epochs: int = 2
    weight_decay: float = 0.0
    eval_every: int = 50
    early_stopping: str = "none"

    def steps(self, n: int) -> int:
        return self.epochs * math.ceil(n / self.batch_size)


@dataclass
class PracticeResult:
    """Trained students: ``params`` (``{"theta"}`` or ``{"W", "b"}``, leading axis B) in the coordinates of
    the *raw* features (standardisation folded back in), the step each student's kept parameters come from,
    and the learning curves (lists over evaluation steps, one value per student each)."""

    head: str
    params: dict
    stop_step: np.ndarray  # (B,)
    val_loss: np.ndarray  # (B,) at the kept parameters; NaN without a validation split
    weight_norm: np.ndarray | None = None  # (B,) of the kept parameters, in the coordinates trained
    curve_steps: list = field(default_factory=list)
    curve_test_accuracy: list = field(default_factory=list)  # each (B,)
    curve_weight_norm: list = field(default_factory=list)
    curve_val_loss: list = field(default_factory=list)
    seconds: float = 0.0

    def curves(self, j: int) -> dict:
        """Student ``j``'s learning curve as plain lists (stored as one JSON column)."""
        return {"step": list(self.curve_steps),
                "test_accuracy": [float(v[j]) for v in self.curve_test_accuracy],
                "weight_norm": [float(v[j]) for v in self.curve_weight_norm],
                "val_loss": [float(v[j]) for v in self.curve_val_loss]}


# ----------------------------------------------------------------------------------------------------------
# Heads and losses
# ----------------------------------------------------------------------------------------------------------


def _log_probs(head: str, params: dict, X: torch.Tensor) -> torch.Tensor:
    """Log class probabilities ``(B, n, k)`` of the students on features ``X`` ``(B, n, m)``."""
    if head == "mixture":
        A = torch.softmax(params["theta"], dim=1)  # (B, k, m), columns in the simplex
        return torch.log(torch.bmm(X, A.transpose(1, 2)))
    logits = torch.bmm(X, params["W"].transpose(1, 2)) + params["b"][:, None, :]
    return torch.log_softmax(logits, dim=-1)


def probabilities(head: str, params: dict, X) -> torch.Tensor:
    """Class probabilities ``(B, n, k)`` of trained students (raw-feature parameters) on features ``X``."""
    X = torch.as_tensor(X, dtype=torch.float64)
    with torch.no_grad():
        return torch.exp(_log_probs(head, params, X))


def weight_norm(head: str, params: dict) -> torch.Tensor:
    r"""Frobenius norm of each student's weights: :math:`\|\Theta\|_F` (mixture logits) or :math:`\|W\|_F`
    (softmax, bias excluded). ``(B,)``."""
    w = params["theta"] if head == "mixture" else params["W"]
    return torch.linalg.vector_norm(w.detach().flatten(1), dim=1)


def training_loss(loss: str, teacher: torch.Tensor, log_student: torch.Tensor, *, aux_alpha: float = 0.0):
    """Per-sample loss ``(B, n)`` of the students (log-probabilities) against teacher probabilities
    (see the module docstring for the formulas)."""
    student = torch.exp(log_student)
    if loss in ("forward_kl", "forward_ce"):
        ce = -(teacher * log_student).sum(-1)
        if loss == "forward_ce":
            return ce
        return ce + torch.special.xlogy(teacher, teacher).sum(-1)
    if loss in REVERSE_LOSSES:
        # 0 * log 0 terms: the teacher has no zeros here (checked by the caller), so log q is finite.
        ce = -(student * torch.log(teacher)).sum(-1)
        return ce if loss == "reverse_ce" else ce + (student * log_student).sum(-1)
    if loss == "hard_ce":
        return -log_student.gather(-1, teacher.argmax(-1, keepdim=True))[..., 0]
    if loss == "aux_conf":
        soft = -(teacher * log_student).sum(-1)
        own = -log_student.gather(-1, log_student.detach().argmax(-1, keepdim=True))[..., 0]
        return (1 - aux_alpha) * soft + aux_alpha * own
    raise InputError(f"unknown practice loss {loss!r}; use one of: {', '.join(PRACTICE_LOSSES)}")


def _expected_accuracy(truth: torch.Tensor, log_student: torch.Tensor) -> torch.Tensor:
    """:math:`\\mathbb E_x F^*_{\\arg\\max F(x)}(x)` per student, ``(B,)``."""
    return truth.gather(-1, log_student.argmax(-1, keepdim=True))[..., 0].mean(-1)


def _schedule(config: PracticeConfig, step: int, total: int) -> float:
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    frac = step / total
    if config.schedule == "constant":
        decay = 1.0
    elif config.schedule == "linear":
        decay = 1.0 - frac
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * frac))
    return warm * decay


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _init_params(head: str, init: str, B: int, k: int, m: int, rngs, init_params: dict | None,
                 mean: torch.Tensor | None, scale: torch.Tensor | None, dtype=torch.float64,
                 device="cpu") -> dict:
    if init == "ceiling":
        if init_params is None:
            raise InputError("init = 'ceiling' needs the ceiling's parameters")
        if head == "mixture":
            A = torch.as_tensor(init_params["A"], dtype=dtype, device=device)
            return {"theta": torch.log(A.clamp_min(1e-12)).clone()}
        W = torch.as_tensor(init_params["W"], dtype=dtype, device=device)
        b = torch.as_tensor(init_params["b"], dtype=dtype, device=device)
        if mean is not None:  # the same function in standardised coordinates: W' = W sigma, b' = b + W mu
            b = b + (W * mean[:, None, :]).sum(-1)
            W = W * scale[:, None, :]
        return {"W": W.clone(), "b": b.clone()}
    if init == "random":
        # N(0, 1/m) entries, each student from its own stream.
        draws = np.stack([rng.standard_normal((k, m)) for rng in rngs]) / math.sqrt(m)
        w = torch.as_tensor(draws, dtype=dtype, device=device)
    else:
        w = torch.zeros(B, k, m, dtype=dtype, device=device)
    if head == "mixture":
        return {"theta": w}
    return {"W": w, "b": torch.zeros(B, k, dtype=dtype, device=device)}


def _to_raw(head: str, params: dict, mean, scale) -> dict:
    """Fold standardisation back: logits of (h - mu)/sigma under (W, b) = logits of h under (W/sigma, b - W mu/sigma)."""
    params = {name: p.detach().clone() for name, p in params.items()}
    if head == "softmax" and mean is not None:
        W = params["W"] / scale[:, None, :]
        params = {"W": W, "b": params["b"] - (W * mean[:, None, :]).sum(-1)}
    return params


def _softmax_gradient(loss: str, flat: torch.Tensor, X: torch.Tensor, Q, log_Q, alpha: float):
    r"""Gradient of the mini-batch objective (per-student mean of the per-sample loss) of the softmax head in
    closed form, ``(B, k, m + 1)`` for ``flat = [W | b]``, features ``X`` ``(B, s, m)`` and the teacher ``Q``
    (or ``log_Q`` for the reverse losses, which read only :math:`\log q`) *class-major*, ``(B, k, s)``. With
    logits :math:`z = Wh + b`, :math:`p = \mathrm{softmax}(z)` and :math:`\bar q = \sum_y q_y`, the per-sample
    gradient in the logits is :math:`G = p\bar q - q` (forward KL / CE), :math:`p - e_{\arg\max q}`
    (``hard_ce``), :math:`(1-\alpha)(p\bar q - q) + \alpha(p - e_{\arg\max p})` (``aux_conf``, its target
    detached) and :math:`p \odot (c - \langle p, c\rangle)` with :math:`c = -\log q` (reverse CE) or
    :math:`c = \log p - \log q` (reverse KL); then :math:`\nabla_W = G h / s`, :math:`\nabla_b = \sum G / s`
    over the :math:`s` rows of the mini-batch (the same numbers as autograd up to rounding; tested). The
    class-major layout (logits ``(B, k, s)``: ``W X^T``) is several times faster on CPU than ``X W^T`` for
    few classes: the matrix product and the softmax over classes then run along contiguous rows."""
    size, m = X.shape[1], X.shape[2]
    logits = torch.baddbmm(flat[:, :, m:], flat[:, :, :m], X.transpose(1, 2))
    if loss in REVERSE_LOSSES:
        log_p = torch.log_softmax(logits, dim=1)
        p = torch.exp(log_p)
        c = log_p - log_Q if loss == "reverse_kl" else -log_Q
        G = p * (c - (p * c).sum(1, keepdim=True))
    else:
        p = torch.exp(torch.log_softmax(logits, dim=1))
        if loss == "hard_ce":
            G = p.scatter_add(1, Q.argmax(1, keepdim=True), torch.full_like(p[:, :1], -1.0))
        else:
            G = p * Q.sum(1, keepdim=True) - Q
            if loss == "aux_conf":
                own = p.scatter_add(1, p.argmax(1, keepdim=True), torch.full_like(p[:, :1], -1.0))
                G = (1 - alpha) * G + alpha * own
    G = G / size
    return torch.cat([torch.bmm(G, X), G.sum(2, keepdim=True)], dim=2)


def _update(config: PracticeConfig, p: torch.Tensor, g: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor,
            rate: torch.Tensor, step: int, decay_mask) -> None:
    """One optimiser step on the flat parameters ``p`` in place (``rate``: per-student learning rate times the
    schedule, ``(B, 1, 1)``; ``decay_mask``: 1 where weight decay acts, None = everywhere)."""
    p = p.detach() if p.requires_grad else p
    wd = config.weight_decay
    if config.optimizer == "sgd":
        if wd:
            g = g + wd * (p if decay_mask is None else p * decay_mask)
        p.sub_(rate * g)
        return
    m1.mul_(_ADAM_BETAS[0]).add_(g, alpha=1 - _ADAM_BETAS[0])
    m2.mul_(_ADAM_BETAS[1]).addcmul_(g, g, value=1 - _ADAM_BETAS[1])
    c1 = 1 - _ADAM_BETAS[0] ** (step + 1)
    c2 = 1 - _ADAM_BETAS[1] ** (step + 1)
    if wd:  # decoupled (AdamW)
        p.sub_(rate * wd * (p if decay_mask is None else p * decay_mask))
    direction = m2.div(c2).sqrt_().add_(_ADAM_EPS)
    p.sub_(torch.div(m1, c1).div_(direction).mul_(rate))


def train(head: str, loss: str, features, teacher, *, lr, config: PracticeConfig, rngs: list,
          init: str = "zero", init_params: dict | None = None, standardize: bool = False,
          val_features=None, val_targets=None, test_features=None, test_truth=None,
          dtype=torch.float64, device="cpu") -> PracticeResult:
    r"""Train ``B`` students of one head with one loss, as one tensor program.

    Args:
        head: ``mixture`` or ``softmax``.
        loss: one of :data:`PRACTICE_LOSSES`.
        features: ``(B, n, m)`` training features (float64); teacher: ``(B, n, k)`` teacher probabilities.
        lr: the learning rate, a float or one per student ``(B,)``.
        config: the optimisation knobs (:class:`PracticeConfig`).
        rngs: one ``numpy.random.Generator`` per student: its mini-batch order and random initialisation.
        init: ``zero``, ``random`` or ``ceiling`` (then ``init_params`` = the ceiling head's parameters).
        standardize: softmax head only: train on standardised features.
        val_features, val_targets: ``(B, n_val, m)`` and ``(B, n_val, k)``: the validation split and its
            labels (weak teacher probabilities with ``config.early_stopping = "weak"``, one-hot true labels
            with ``"true"``); required unless ``early_stopping = "none"``.
        test_features, test_truth: optional held-out split for the learning curves' test accuracy.
        dtype: ``torch.float64`` (the default, used by the pipeline) or ``torch.float32`` (half the memory
            traffic; for large batches where 1e-7 relative rounding is acceptable).
        device: where the training runs (``cpu`` or ``cuda``); the mini-batch orders are drawn from ``rngs``
            on the host either way, so a student sees the same batches on every device. The result's arrays
            and parameters are on the CPU.
    """
    start = time.perf_counter()
    if head not in PRACTICE_HEADS:
        raise InputError(f"the practice trainer supports heads {', '.join(PRACTICE_HEADS)}, got {head!r}")
    dev = torch.device(device)
    X = torch.as_tensor(features, dtype=dtype, device=dev)
    Q = torch.as_tensor(teacher, dtype=dtype, device=dev)
    B, n, m = X.shape
    k = Q.shape[-1]
    if len(rngs) != B:
        raise ValueError(f"train: {B} students but {len(rngs)} random generators")
    if loss in REVERSE_LOSSES and bool((Q <= 0).any()):
        raise InputError(f"loss {loss!r}: the teacher has exact zeros, where a reverse loss is infinite; "
                         "set teacher_floor > 0 (e.g. 1e-6)")
    lr_t = torch.as_tensor(lr, dtype=dtype, device=dev).expand(B).clone()
    mean = scale = None
    if standardize:
        if head != "softmax":
            raise InputError("standardize = true needs head = 'softmax' (mixture features must stay in the simplex)")
        mean = X.mean(1)
        scale = X.std(1, unbiased=False)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    def prep(F):
        F = torch.as_tensor(F, dtype=dtype, device=dev)
        return (F - mean[:, None, :]) / scale[:, None, :] if standardize else F
    Xs = prep(X)
    V = prep(val_features) if val_features is not None else None
    VT = torch.as_tensor(val_targets, dtype=dtype, device=dev) if val_targets is not None else None
    T = prep(test_features) if test_features is not None else None
    TT = torch.as_tensor(test_truth, dtype=dtype, device=dev) if test_truth is not None else None
    if config.early_stopping != "none" and V is None:
        raise InputError(f"early_stopping = {config.early_stopping!r} needs a validation split")

    params = _init_params(head, init, B, k, m, rngs, init_params, mean, scale, dtype, dev)
    # The softmax head's parameters live in one flat tensor P = [W | b] (B, k, m + 1), so that its gradient,
    # Adam moments and update are a few kernels on one tensor; W and b are views of it.
    if head == "softmax":
        flat = torch.cat([params["W"], params["b"][:, :, None]], dim=2)
        params = {"W": flat[:, :, :m], "b": flat[:, :, m]}
        decay_mask = torch.ones(1, 1, m + 1, dtype=dtype, device=dev)
        decay_mask[..., m] = 0.0  # weight decay acts on W, never on the bias
    else:
        flat = params["theta"]
        decay_mask = None
        flat.requires_grad_(True)  # the mixture head's gradient comes from autograd
    m1, m2 = torch.zeros_like(flat), torch.zeros_like(flat)
    if loss in REVERSE_LOSSES:
        log_Q = torch.log(Q)

    steps_per_epoch = math.ceil(n / config.batch_size)
    total = config.epochs * steps_per_epoch
    # Mini-batches are gathered from the flattened (B * n, ...) arrays with one index_select (several times
    # faster than advanced indexing X[rows, idx] on CPU, and the same values).
    offsets = (torch.arange(B, device=dev) * n)[:, None]
    # On a GPU all students at once (cache-sized chunks are a CPU matter)
    chunk = max(1, _CHUNK_BYTES // (config.batch_size * (m + 2 * k) * X.element_size())) if dev.type == "cpu" else B
    X_flat, Q_flat = Xs.reshape(B * n, m), Q.reshape(B * n, k)
    if head == "softmax":  # the teacher class-major, (B, k, n) flattened (reverse losses: log q), k numbers a row
        teacher_classes = (log_Q if loss in REVERSE_LOSSES else Q).transpose(1, 2).reshape(-1)
        classes = torch.arange(B, device=dev)[:, None] * k + torch.arange(k, device=dev)[None, :]
        class_offsets = (classes * n)[:, :, None]

    def val_loss(current) -> torch.Tensor:
        with torch.no_grad():
            logp = _log_probs(head, current, V)
            if config.early_stopping == "true":
                return -(VT * logp).sum(-1).mean(-1)
            val_name = "forward_ce" if loss == "aux_conf" else loss
            return training_loss(val_name, VT, logp).mean(-1)

    result = PracticeResult(head=head, params={}, stop_step=np.zeros(B, dtype=np.int64), val_loss=np.full(B, np.nan))
    best = {name: p.detach().clone() for name, p in params.items()}
    best_val = torch.full((B,), math.inf, dtype=dtype, device=dev)
    best_step = torch.zeros(B, dtype=torch.int64, device=dev)

    def evaluate(step: int):
        nonlocal best_val
        result.curve_steps.append(step)
        result.curve_weight_norm.append(to_numpy(weight_norm(head, params)).copy())
        if T is not None:
            with torch.no_grad():
                result.curve_test_accuracy.append(
                    to_numpy(_expected_accuracy(TT, _log_probs(head, params, T))).copy())
        if V is not None:
            v = val_loss(params)
            result.curve_val_loss.append(to_numpy(v).copy())
            if config.early_stopping != "none":
                better = v < best_val
                best_val = torch.where(better, v, best_val)
                best_step[better] = step
                for name, p in params.items():
                    best[name][better] = p.detach()[better]

    evaluate(0)
    step = 0
    for epoch in range(config.epochs):
        # The epoch's rows of every student's flattened array, in its own order: one index tensor per epoch.
        local = torch.as_tensor(np.stack([rng.permutation(n) for rng in rngs]), device=dev)
        order = local + offsets
        if head == "softmax":
            order_classes = local[:, None, :] + class_offsets  # (B, k, n): where student j's class y of row i is
        for s in range(steps_per_epoch):
            rows = order[:, s * config.batch_size:(s + 1) * config.batch_size]
            size = rows.shape[1]
            alpha = AUX_ALPHA * min(1.0, step / max(1.0, AUX_WARMUP * total)) if loss == "aux_conf" else 0.0
            rate = (lr_t * _schedule(config, step, total)).reshape(B, 1, 1)
            # Students in chunks whose mini-batches fit in a core's cache: each chunk's rows are gathered and
            # used for the logits and the gradient while still cached (gathering all students' mini-batches
            # first read them from memory three times per step). Chunks change no student's numbers.
            grad = torch.empty_like(flat) if chunk < B else None
            for lo in range(0, B, chunk):
                hi = min(B, lo + chunk)
                idx = rows[lo:hi].reshape(-1)
                batch_X = X_flat.index_select(0, idx).view(hi - lo, size, m)
                if head == "softmax":
                    where = order_classes[lo:hi, :, s * config.batch_size:(s + 1) * config.batch_size].reshape(-1)
                    teacher_batch = teacher_classes.index_select(0, where).view(hi - lo, k, size)
                    batch_Q, batch_log_Q = (None, teacher_batch) if loss in REVERSE_LOSSES else (teacher_batch, None)
                    part_grad = _softmax_gradient(loss, flat[lo:hi], batch_X, batch_Q, batch_log_Q, alpha)
                else:
                    batch_Q = Q_flat.index_select(0, idx).view(hi - lo, size, k)
                    part = flat[lo:hi]
                    logp = _log_probs(head, {"theta": part}, batch_X)
                    objective = training_loss(loss, batch_Q, logp, aux_alpha=alpha).mean(-1).sum()
                    (part_grad,) = torch.autograd.grad(objective, [part])
                if grad is None:
                    grad = part_grad
                else:
                    grad[lo:hi] = part_grad
            with torch.no_grad():  # the update on all students at once: a few kernels on small tensors
                _update(config, flat, grad, m1, m2, rate, step, decay_mask)
            step += 1
            if step == total or (config.eval_every > 0 and step % config.eval_every == 0):
                evaluate(step)

    if config.early_stopping != "none":
        final = best
        result.stop_step = to_numpy(best_step).copy()
        result.val_loss = to_numpy(best_val).copy()
    else:
        final = {name: p.detach() for name, p in params.items()}
        result.stop_step = np.full(B, total, dtype=np.int64)
        if V is not None:
            result.val_loss = result.curve_val_loss[-1]
    result.weight_norm = to_numpy(weight_norm(head, final)).copy()
    result.params = {name: p.cpu() for name, p in _to_raw(head, final, mean, scale).items()}
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = 10) -> tuple[float, float]:
    r"""Expected calibration error with equal-mass bins (Guo et al. 2017; Nixon et al. 2019), and its standard
    error.

    Rows are sorted by confidence :math:`c_i = \max_y F_y(x_i)` and cut into ``bins`` bins of (nearly) equal
    size; correctness is the *expected* correctness against labels drawn from the truth,
    :math:`a_i = F^*_{\arg\max F(x_i)}(x_i)`, so no label noise enters.

    .. math:: \mathrm{ECE} = \sum_b \frac{n_b}{n}\,\Big|\frac1{n_b}\sum_{i\in b} (c_i - a_i)\Big|,\qquad
       \mathrm{SE} = \Big(\sum_b \frac{n_b^2}{n^2}\,\frac{s_b^2}{n_b}\Big)^{1/2}

    with :math:`s_b` the standard deviation of :math:`c_i - a_i` in bin :math:`b` (delta method, ignoring
    the kink of :math:`|\cdot|`).
    """
    probs = np.asarray(probs, dtype=float)
    truth = np.asarray(truth, dtype=float)
    confidence = probs.max(-1)
    correct = np.take_along_axis(truth, probs.argmax(-1)[..., None], axis=-1)[..., 0]
    n = confidence.shape[0]
    order = np.argsort(confidence, kind="stable")
    diff = (confidence - correct)[order]
    ece, var = 0.0, 0.0
    for part in np.array_split(diff, min(bins, n)):
        w = part.size / n
        ece += w * abs(part.mean())
        if part.size > 1:
            var += w * w * part.var(ddof=1) / part.size
    return float(ece), float(math.sqrt(var))


# ----------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------


def loop_student(loss: str, features, teacher, *, lr: float, config: PracticeConfig, rng,
                 dtype=torch.float64, device="cpu") -> dict:
    """One softmax student trained the way a practitioner writes it, the per-student baseline of
    :func:`bench_practice`: a plain torch loop over mini-batches (the same order as :func:`train` draws from
    ``rng``), autograd for the gradient and ``torch.optim.Adam`` (its fused CPU kernel) for the update, from
    the zero head, constant learning rate, no weight decay, no evaluation, on ``device``. Returns ``{"W", "b"}``
    on the CPU (numbers equal to :func:`train`'s up to rounding; tested)."""
    if config.optimizer != "adam" or config.weight_decay or config.schedule != "constant" or config.warmup_steps:
        raise ValueError("loop_student implements the benchmark's setting only: Adam, constant lr, no weight decay")
    X = torch.as_tensor(features, dtype=dtype, device=device)
    Q = torch.as_tensor(teacher, dtype=dtype, device=device)
    n, m = X.shape
    k = Q.shape[1]
    W = torch.zeros(k, m, dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(k, dtype=dtype, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([W, b], lr=lr, betas=_ADAM_BETAS, eps=_ADAM_EPS, fused=True)
    total = config.steps(n)
    step = 0
    for epoch in range(config.epochs):
        order = torch.as_tensor(rng.permutation(n), device=device)
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            alpha = AUX_ALPHA * min(1.0, step / max(1.0, AUX_WARMUP * total)) if loss == "aux_conf" else 0.0
            log_p = torch.log_softmax(X[idx] @ W.T + b, dim=-1)
            objective = training_loss(loss, Q[idx], log_p, aux_alpha=alpha).mean()
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            step += 1
    return {"W": W.detach().cpu(), "b": b.detach().cpu()}


def bench_practice(B: int = 1000, *, n: int = 2000, m: int = 64, k: int = 2, epochs: int = 2, batch_size: int = 32,
                   loss: str = "reverse_ce", head: str = "softmax", loop_students: int = 20,
                   device: str = "cpu", seed: int = 0, dtype: str = "float32") -> dict:
    """Students/s of the practice trainer: ``B`` softmax students trained in one batched :func:`train` call vs
    the per-student torch loop a practitioner writes (:func:`loop_student`: autograd and ``torch.optim.Adam``,
    the same mini-batches and arithmetic) on ``loop_students`` of them (its rate extrapolates); and, as a second
    baseline, :func:`train` itself called with one student at a time. Adam, lr 1e-2, constant schedule, no
    validation; both sides in ``dtype`` (``float32``, a practitioner's default, or ``float64``, the pipeline's),
    on features already in that dtype (preparing the workload is not timed), both on ``device`` (each call
    returns its parameters on the CPU, which waits for a GPU to finish). The loop's parameters are checked
    against the batched ones (``loop_max_abs_difference``). Returns a dict with the rates, ratios and workload."""
    from .synthetic import rng_for

    device = str(torch.device(device))
    if dtype not in ("float64", "float32"):
        raise InputError(f"bench_practice: dtype must be float32 or float64, got {dtype!r}")
    if head != "softmax":
        raise InputError("bench_practice times the softmax head (the per-student loop is written for it)")
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    gen = np.random.default_rng(seed)
    logits = gen.standard_normal((B, n, m)) * 2.0
    X = np.exp(logits - logits.max(-1, keepdims=True))
    del logits
    X /= X.sum(-1, keepdims=True)
    q = gen.uniform(0.05, 0.95, size=(B, n, 1))
    Q = np.concatenate([q, 1 - q], -1) if k == 2 else gen.dirichlet(np.ones(k), size=(B, n))
    X, Q = X.astype(dtype, copy=False), Q.astype(dtype, copy=False)
    config = PracticeConfig(epochs=epochs, batch_size=batch_size, eval_every=0)
    rngs = [rng_for(seed, "bench-practice", j) for j in range(B)]
    # Warm-up, untimed: the first torch.optim.Adam step and the first autograd call pay one-off set-up costs.
    warm = PracticeConfig(epochs=1, batch_size=batch_size, eval_every=0)
    loop_student(loss, X[0, :2 * batch_size], Q[0, :2 * batch_size], lr=1e-2, config=warm,
                 rng=np.random.default_rng(0), dtype=torch_dtype, device=device)
    train(head, loss, X[:2, :2 * batch_size], Q[:2, :2 * batch_size], lr=1e-2, config=warm,
          rngs=[np.random.default_rng(0), np.random.default_rng(1)], dtype=torch_dtype, device=device)
    t0 = time.perf_counter()
    batched_result = train(head, loss, X, Q, lr=1e-2, config=config, rngs=rngs, dtype=torch_dtype, device=device)
    batched = time.perf_counter() - t0
    loop_students = min(loop_students, B)
    t0 = time.perf_counter()
    looped = [loop_student(loss, X[j], Q[j], lr=1e-2, config=config, rng=rng_for(seed, "bench-practice", j),
                           dtype=torch_dtype, device=device) for j in range(loop_students)]
    loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in range(loop_students):
        train(head, loss, X[j:j + 1], Q[j:j + 1], lr=1e-2, config=config, rngs=[rng_for(seed, "bench-practice", j)],
              dtype=torch_dtype, device=device)
    one_at_a_time = time.perf_counter() - t0
    difference = max(float((batched_result.params[name][j] - looped[j][name]).abs().max())
                     for j in range(loop_students) for name in ("W", "b"))
    batched_rate, loop_rate, one_rate = B / batched, loop_students / loop, loop_students / one_at_a_time
    return {"workload": {"B": B, "n": n, "m": m, "k": k, "epochs": epochs, "batch_size": batch_size,
                         "steps": config.steps(n), "head": head, "loss": loss, "optimizer": "adam",
                         "loop_students": loop_students, "threads": torch.get_num_threads(), "dtype": dtype,
                         "device": device},
            "batched_seconds": batched, "batched_students_per_s": batched_rate,
            "loop_seconds": loop, "loop_students_per_s": loop_rate, "speedup": batched_rate / loop_rate,
            "loop": "per-student torch loop: autograd + torch.optim.Adam(fused=True)",
            "one_at_a_time_seconds": one_at_a_time, "one_at_a_time_students_per_s": one_rate,
            "speedup_vs_one_at_a_time": batched_rate / one_rate, "loop_max_abs_difference": difference}
