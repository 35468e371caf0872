r"""Charikar, Pabbaraju and Shiragur's synthetic setup (NeurIPS 2024, arXiv 2405.15116, Sec. 5), after the
authors' public notebook (``chogba/wtsg-regression``, ``wts.ipynb``), in float64 and reproducible on any CPU.

The experiment behind their "gain vs misfit" scatter, for one draw of the seed (the notebook's is
:data:`AUTHORS_SEED`, named ``authors``):

* inputs :math:`x \sim \mathcal N(0, 500^2 I_8)`;
* a frozen random *target representation* :math:`h^\star`: 5 Linear+ReLU blocks of width 16 (PyTorch's default
  ``nn.Linear`` initialisation);
* a *strong* representation :math:`h_s` (8 blocks) and a *weak* one :math:`h_w` (2 blocks), each pre-trained
  on :math:`T = 10` tasks :math:`y = a_t^\top h^\star(x) + c_t` with random heads ``Linear(16, 1)`` (with bias)
  that stay frozen, 2000 inputs per task, 1000 epochs; each epoch visits the tasks in order, shuffles that
  task's inputs and takes minibatches of 32 (the last one 16); AdamW (learning rate :math:`10^{-3}`, weight
  decay 0.01, :math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-8}`) on the mean squared error;
* transfer: 100 fresh tasks :math:`f^\star = a^\top h^\star + c`, 2000 inputs each; the weak head is the
  least-squares fit (with bias) of :math:`f^\star` on :math:`h_w`, the strong student the least-squares fit of
  the weak head's predictions on :math:`h_s` (same inputs), and on fresh inputs

  .. math:: \text{gain} = \mathbb E(f_w - f^\star)^2 - \mathbb E(f_{sw} - f^\star)^2,\qquad
     \text{misfit} = \mathbb E(f_{sw} - f_w)^2.

Their Theorem 1: when :math:`f^\star` lies in the (convex) class of heads on :math:`h_s`, gain :math:`\ge`
misfit, with equality for an unconstrained linear head (least squares is an orthogonal projection); otherwise
only up to :math:`O(\sqrt\varepsilon)`, :math:`\varepsilon = \min_f \mathbb E(f\circ h_s - f^\star)^2`
(reported as ``best_error_train``, the strong head fitted on the truth). Variants of :math:`h_s`
(:data:`VARIANTS`):

* ``pretrained``: the notebook's experiment (its only one);
* ``realizable`` (*this project's own*): :math:`h_s = h^\star`, where Theorem 1 is an in-sample equality;
* ``perturbed`` (*this project's own*): :math:`h^\star` with every weight and bias moved by Gaussian noise of
  ``perturbation`` times that layer's weight standard deviation. :math:`\varepsilon` grows as the size
  squared: the default 0.01 gives a median :math:`\varepsilon` of 0.1-0.4 % of the weak error on the four
  draws (near-realizable, the regime between ``realizable`` and ``pretrained``); 0.1 gives 11-34 %, as far
  from realizable as the pre-trained network itself (``docs/charikar.md``).

Draw order, as in the notebook (so that ``seed=AUTHORS_SEED`` reproduces the authors' :math:`h^\star`, task
heads, inputs and initialisations exactly; checked in ``tests/test_charikar.py`` against ``nn.Linear``):
``torch.manual_seed(seed)`` draws, in order, the 5 target blocks and the target's own head (replaced before
use), the 10 pre-training heads, the strong network (8 blocks + head), the weak network (2 blocks + head) and
the 100 transfer heads; ``np.random.seed(seed)`` (the legacy ``RandomState``) draws the 10 pre-training input
sets, then the strong network's 10 000 shuffles (``T`` per epoch), the weak network's, then the 100 transfer
input sets.

Differences from the notebook (also in ``docs/charikar.md``):

* float64 throughout (the notebook trains in float32 and casts its float64 inputs to float32), one thread,
  and the forward/backward pass and the AdamW update written out (:func:`pretrain`), so that numbers are
  reproducible; the update is AdamW's formula step for step (checked against ``torch.optim.AdamW``);
* the transfer heads are the exact least-squares fits (certified, :func:`w2s_theory.solvers.fit`) instead of
  1000 epochs of AdamW from a random head; the notebook's fits are close to, not at, these minimisers;
* the evaluation inputs (one fresh set for the gain, another for the misfit, per task) are drawn right after
  the transfer inputs; the notebook draws them after its head-fitting loops have consumed further shuffles,
  so they are other (equally distributed) samples. The transfer-head initialisations, which exact least
  squares does not need, are not drawn;
* the realizable and perturbed variants, several seeds, and the in-sample check of Theorem 1 are additions.

Pre-trained representations are cached on disk by :class:`RepresentationCache` (keyed by a hash of everything
that determines them), so figures pay the pre-training once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ._backend import to_numpy
from .io import atomic_write
from .solvers import fit
from .theorems import charikar_squared

__all__ = ["AUTHORS_SEED", "CharikarConfig", "VARIANTS", "Representation", "NotebookDraw", "notebook_draw",
           "pretrain", "adamw_step", "perturb_representation", "RepresentationCache", "pretrained_pair",
           "run_charikar", "draw_name", "DIGITISED", "NOTEBOOK_FINAL_LOSS", "summarise", "single_thread"]

#: The seed of the authors' notebook (``torch.manual_seed`` and ``np.random.seed``).
AUTHORS_SEED = 112233445

VARIANTS = ("pretrained", "realizable", "perturbed")

#: The notebook's stored scatter (pretrained variant, authors' draw), digitised from its PNG output (gain on
#: x, misfit on y, fresh inputs; see docs/charikar.md), and the last pre-training losses it printed (sum over
#: the last epoch's 630 minibatches of the minibatch mean, float32).
#: About 80 of the 100 markers are recovered (the others overlap), hence two significant digits at most.
DIGITISED = {"median_gain": 0.12, "median_misfit": 0.14, "mean_abs_gain_minus_misfit": 0.026,
             "misfit_over_gain": 1.15, "median_misfit_over_median_gain": 1.18, "fraction_gain_ge_misfit": 0.17}
NOTEBOOK_FINAL_LOSS = {"strong": 36.88668, "weak": 260.779357}


def draw_name(seed: int) -> str:
    """``authors`` for the notebook's seed, ``seed <n>`` otherwise."""
    return "authors" if seed == AUTHORS_SEED else f"seed {seed}"


@dataclass(frozen=True)
class CharikarConfig:
    """Sizes of the experiment; defaults are the notebook's, except ``seeds`` (the notebook has one draw, the
    first here) and ``perturbation`` (the project's own variant)."""

    seeds: tuple = (AUTHORS_SEED, 1, 2, 3)  # draws of h*; each is the whole notebook with that seed
    input_dim: int = 8
    input_scale: float = 500.0
    width: int = 16
    target_depth: int = 5
    strong_depth: int = 8
    weak_depth: int = 2
    pretrain_tasks: int = 10  # T
    pretrain_samples: int = 2000  # per task
    pretrain_epochs: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    fresh_tasks: int = 100
    n_transfer: int = 2000  # weak head fitted on the truth, student on the weak labels: same inputs
    n_test: int = 2000  # fresh inputs for gain, and others for misfit
    perturbation: float = 0.01  # relative weight noise of the "perturbed" variant (ours)

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def pretrain_key(self, seed: int) -> str:
        """Hash of everything that determines the pre-trained pair of one draw (and the code's version)."""
        fields = {k: v for k, v in self.as_dict().items()
                  if k not in ("seeds", "fresh_tasks", "n_transfer", "n_test", "perturbation")}
        fields.update(seed=int(seed), version=PRETRAIN_VERSION)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]

    def run_id(self, seed: int, variant: str, task: int) -> str:
        """Identifier of one (draw, variant, fresh task) row in the results store."""
        return f"charikar-{self.key}-{seed}-{variant}-{task}"


#: Bumped whenever a change to the pre-training changes its numbers (invalidates cached representations).
PRETRAIN_VERSION = 2


# --------------------------------------------------------------------------------------------------------
# Representations and the notebook's draws
# --------------------------------------------------------------------------------------------------------


class Representation:
    r"""A stack of Linear+ReLU blocks :math:`u_{l+1} = \mathrm{relu}(u_l W_l + b_l)` (``W_l`` is
    ``nn.Linear.weight`` transposed, ``(fan_in, width)``); the representation is the last block's output."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor]):
        self.weights = [w.to(torch.float64) for w in weights]
        self.biases = [b.to(torch.float64) for b in biases]

    @property
    def depth(self) -> int:
        return len(self.weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        for W, b in zip(self.weights, self.biases):
            x = torch.relu(x @ W + b)
        return x

    def arrays(self, prefix: str) -> dict:
        out = {f"{prefix}W{i}": to_numpy(w) for i, w in enumerate(self.weights)}
        out.update({f"{prefix}b{i}": to_numpy(b) for i, b in enumerate(self.biases)})
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str, depth: int) -> "Representation":
        return cls([torch.as_tensor(np.asarray(arrays[f"{prefix}W{i}"])) for i in range(depth)],
                   [torch.as_tensor(np.asarray(arrays[f"{prefix}b{i}"])) for i in range(depth)])


def _linear(generator: torch.Generator, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear(fan_in, fan_out)``'s default initialisation drawn from ``generator`` (weight by
    ``kaiming_uniform_(a=√5)``, then the bias ~ U(±1/√fan_in)), in float32 as torch draws it; returns
    ``(weight.T, bias)``."""
    weight = torch.empty(fan_out, fan_in)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bias = torch.empty(fan_out)
    bound = 1 / math.sqrt(fan_in)
    torch.nn.init.uniform_(bias, -bound, bound, generator=generator)
    return weight.T.contiguous(), bias


def _mlp(generator: torch.Generator, config: CharikarConfig, depth: int) -> Representation:
    """The notebook's ``MLP(8, 16, 1, depth)``: ``depth`` blocks, then its head (drawn and discarded: the
    notebook replaces it before use)."""
    blocks = [_linear(generator, config.input_dim if i == 0 else config.width, config.width) for i in range(depth)]
    _linear(generator, config.width, 1)
    return Representation([w for w, _ in blocks], [b for _, b in blocks])


def _heads(generator: torch.Generator, count: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` heads ``nn.Linear(width, 1)``: weights ``(count, width)`` and biases ``(count,)``, float64."""
    pairs = [_linear(generator, width, 1) for _ in range(count)]
    return (torch.stack([w[:, 0] for w, _ in pairs]).to(torch.float64),
            torch.stack([b[0] for _, b in pairs]).to(torch.float64))


def _advance(rng: np.random.RandomState, shuffles: int, n: int) -> None:
    """Consume the draws of ``shuffles`` calls of ``rng.shuffle`` on ``n`` items (the notebook's epochs)."""
    order = np.arange(n)
    for _ in range(shuffles):
        rng.shuffle(order)


@dataclass
class NotebookDraw:
    """Everything the notebook draws for one seed before the transfer inputs. ``x`` ``(T, n, d)``; the heads
    ``a`` ``(T, width)``, ``c`` ``(T,)``; ``y = a_t·h*(x) + c_t`` ``(T, n)``; ``orders_state`` the legacy numpy
    generator's state where the pre-training shuffles start."""

    seed: int
    target: Representation
    a: torch.Tensor
    c: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    strong_init: Representation
    weak_init: Representation
    transfer_a: torch.Tensor
    transfer_c: torch.Tensor
    orders_state: tuple = field(repr=False)


def notebook_draw(seed: int, config: CharikarConfig) -> NotebookDraw:
    """The notebook's draws for ``seed``, in its order (module docstring)."""
    gen = torch.Generator().manual_seed(int(seed))
    target = _mlp(gen, config, config.target_depth)
    a, c = _heads(gen, config.pretrain_tasks, config.width)
    strong_init = _mlp(gen, config, config.strong_depth)
    weak_init = _mlp(gen, config, config.weak_depth)
    transfer_a, transfer_c = _heads(gen, config.fresh_tasks, config.width)
    rng = np.random.RandomState(int(seed))
    x = torch.as_tensor(np.stack([rng.normal(0, config.input_scale, (config.pretrain_samples, config.input_dim))
                                  for _ in range(config.pretrain_tasks)]))
    y = (target(x) * a[:, None, :]).sum(-1) + c[:, None]
    return NotebookDraw(int(seed), target, a, c, x, y, strong_init, weak_init, transfer_a, transfer_c,
                        rng.get_state())


def _orders(state, config: CharikarConfig, skip_epochs: int = 0):
    """The notebook's within-task permutations, epoch by epoch: a ``(T, n)`` int64 array per epoch, from the
    legacy generator at ``state`` after ``skip_epochs`` epochs' shuffles."""
    rng = np.random.RandomState()
    rng.set_state(state)
    T, n = config.pretrain_tasks, config.pretrain_samples
    _advance(rng, skip_epochs * T, n)
    while True:
        epoch = np.empty((T, n), dtype=np.int64)
        for t in range(T):
            order = np.arange(n)
            rng.shuffle(order)
            epoch[t] = order
        yield epoch


# --------------------------------------------------------------------------------------------------------
# Pre-training: networks of one depth trained together, forward/backward and AdamW written out
# --------------------------------------------------------------------------------------------------------


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: int, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
    r"""One AdamW update in place (Loshchilov & Hutter 2019), with ``torch.optim.AdamW``'s formulas:

    .. math:: \theta \leftarrow \theta(1-\eta\lambda),\quad m \leftarrow m + (1-\beta_1)(g - m),\quad
       v \leftarrow \beta_2 v + (1-\beta_2)g^2,\quad
       \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}.

    Written with elementwise ``+ − × ÷ √`` only, each rounded once: torch's fused ``lerp_``, ``addcmul_`` and
    ``addcdiv_`` use fused multiply-adds in their vectorised loops but not in their scalar tails, so their
    rounding depends on an element's position in the buffer and on the CPU. Here every element's update is
    the same on any CPU and in any batch of networks (it agrees with ``torch.optim.AdamW`` to rounding).
    """
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.add_(grad.sub(exp_avg).mul_(1 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad.mul(1 - beta2).mul_(grad))
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    param.add_(exp_avg.mul(-(lr / bias_correction1)).div_(denom))


class _Stack:
    """``N`` networks of one depth with their parameters in one flat float64 buffer, one block per parameter
    (``W_l`` as ``(N, fan_in, width)``, ``b_l`` as ``(N, 1, width)``), and gradients laid out alike."""

    def __init__(self, inits: list[Representation]):
        depth = inits[0].depth
        shapes = [tuple(w.shape) for w in inits[0].weights] + [(1, b.shape[0]) for b in inits[0].biases]
        N = len(inits)
        sizes = [N * math.prod(s) for s in shapes]
        self.flat = torch.empty(sum(sizes), dtype=torch.float64)
        self.grad = torch.zeros_like(self.flat)
        views, grads, offset = [], [], 0
        for s, size in zip(shapes, sizes):
            views.append(self.flat[offset:offset + size].view(N, *s))
            grads.append(self.grad[offset:offset + size].view(N, *s))
            offset += size
        self.W, self.b = views[:depth], views[depth:]
        self.gW, self.gb = grads[:depth], grads[depth:]
        for i, rep in enumerate(inits):
            for l in range(depth):
                self.W[l][i] = rep.weights[l]
                self.b[l][i, 0] = rep.biases[l]

    def representations(self) -> list[Representation]:
        return [Representation([W[i].clone() for W in self.W], [b[i, 0].clone() for b in self.b])
                for i in range(self.W[0].shape[0])]


def _forward_backward(stack: _Stack, xb: torch.Tensor, yb: torch.Tensor, a: torch.Tensor, c: torch.Tensor,
                      loss_sum: torch.Tensor) -> None:
    r"""Gradient of the minibatch loss :math:`\frac1b\sum_i (a^\top h(x_i) + c - y_i)^2` of every network into
    ``stack.grad``; adds each network's loss to ``loss_sum``. ``xb (N, b, d)``, ``yb (N, b, 1)``,
    ``a (N, width, 1)``, ``c (N, 1, 1)``."""
    u = [xb]
    for W, b in zip(stack.W, stack.b):
        u.append(torch.baddbmm(b, u[-1], W).relu_())
    a_row = a.transpose(1, 2)  # (N, 1, width)
    # The head as a product and a sum, not a matrix-vector bmm: MKL's batched gemv rounds differently
    # depending on how many networks are in the batch.
    r = (u[-1] * a_row).sum(-1, keepdim=True).add_(c).sub_(yb)  # (N, b, 1) residuals
    loss_sum.add_(r.square().sum((1, 2)).div_(xb.shape[1]))
    du = r.mul_(2 / xb.shape[1]) * a_row  # d loss / d u_L, (N, b, width)
    for l in range(len(stack.W) - 1, -1, -1):
        dz = torch.ops.aten.threshold_backward(du, u[l + 1], 0)  # ReLU: pass where the output is positive
        torch.bmm(u[l].transpose(1, 2), dz, out=stack.gW[l])
        torch.sum(dz, 1, keepdim=True, out=stack.gb[l])
        if l:
            du = torch.bmm(dz, stack.W[l].transpose(1, 2))


def pretrain(inits: list[Representation], draws: list[NotebookDraw], orders: list, config: CharikarConfig,
             epochs: int | None = None, progress=None) -> tuple[list[Representation], np.ndarray]:
    r"""Pre-train networks of one depth together, network ``i`` on ``draws[i]``'s tasks with its own shuffles
    ``orders[i]`` (an iterator of ``(T, n)`` permutations per epoch), as the notebook trains each one:

    .. math:: \min_h \sum_{t}\sum_{\text{batches } B\subset t}\ \frac1{|B|}\sum_{i\in B}
        \big(a_t^\top h(x_i) + c_t - y_i\big)^2

    one AdamW step per minibatch, tasks in order within each epoch. Float64, one thread, a fixed order of
    operations: the same numbers for any number of networks trained together and any thread setting.
    Returns the trained representations and the notebook's printed loss (sum over the epoch's minibatches
    of the minibatch mean) per epoch and network, ``(epochs, N)``.
    """
    epochs = config.pretrain_epochs if epochs is None else epochs
    stack = _Stack(inits)
    N, T, n, B = len(inits), config.pretrain_tasks, config.pretrain_samples, config.batch_size
    x = torch.stack([d.x for d in draws])  # (N, T, n, d)
    y = torch.stack([d.y for d in draws])[..., None]  # (N, T, n, 1)
    a = torch.stack([d.a for d in draws])[..., None]  # (N, T, width, 1)
    c = torch.stack([d.c for d in draws])[:, :, None, None]  # (N, T, 1, 1)
    exp_avg, exp_avg_sq = torch.zeros_like(stack.flat), torch.zeros_like(stack.flat)
    history = np.zeros((epochs, N))
    rows = torch.arange(N)[:, None]
    step, t0 = 0, time.perf_counter()
    with single_thread():
        for epoch in range(epochs):
            perms = torch.as_tensor(np.stack([next(o) for o in orders], axis=1))  # (T, N, n)
            loss_sum = torch.zeros(N, dtype=torch.float64)
            for t in range(T):
                xs, ys = x[rows, t, perms[t]], y[rows, t, perms[t]]  # (N, n, d), (N, n, 1)
                at, ct = a[:, t], c[:, t]
                for start in range(0, n, B):
                    _forward_backward(stack, xs[:, start:start + B], ys[:, start:start + B], at, ct, loss_sum)
                    step += 1
                    adamw_step(stack.flat, stack.grad, exp_avg, exp_avg_sq, step, config.learning_rate,
                               config.weight_decay)
            history[epoch] = to_numpy(loss_sum)
            if progress and (epoch + 1) % max(1, epochs // 10) == 0:
                progress(f"  epoch {epoch + 1}/{epochs} ({time.perf_counter() - t0:.0f} s)")
    return stack.representations(), history


@contextlib.contextmanager
def single_thread():
    """Run the block with one intra-op thread (restored afterwards): the reductions then have one order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------
# Cache of pre-trained representations
# --------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$W2S_THEORY_CACHE/charikar`` if set, else ``$XDG_CACHE_HOME/w2s-theory/charikar`` (default
    ``~/.cache/w2s-theory/charikar``)."""
    root = os.environ.get("W2S_THEORY_CACHE")
    if root:
        return Path(root) / "charikar"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "w2s-theory" / "charikar"


class RepresentationCache:
    """Pre-trained (strong, weak) pairs on disk, one ``.npz`` per :meth:`CharikarConfig.pretrain_key`.
    Writes are atomic; an entry that is missing or unreadable counts as absent (and is recomputed), so the
    folder is safe to delete. ``path=None`` disables the cache."""

    def __init__(self, path: str | os.PathLike | None = "default"):
        self.path = None if path is None else (default_cache_dir() if path == "default" else Path(path))

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.npz"

    def load(self, key: str, config: CharikarConfig):
        if self.path is None or not self._file(key).exists():
            return None
        try:
            # the file opened here, so that it is closed also when numpy fails on a corrupt entry
            with open(self._file(key), "rb") as fh, np.load(fh, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                strong = Representation.from_arrays(data, "s", config.strong_depth)
                weak = Representation.from_arrays(data, "w", config.weak_depth)
                history = np.asarray(data["history"])
        except Exception:  # corrupt or truncated: recompute
            return None
        return strong, weak, history

    def save(self, key: str, strong: Representation, weak: Representation, history: np.ndarray) -> None:
        if self.path is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, key=np.array(key), history=history, **strong.arrays("s"), **weak.arrays("w"))
        atomic_write(self._file(key), lambda fh: fh.write(buffer.getvalue()))


def pretrained_pair(config: CharikarConfig, seeds=None, cache: RepresentationCache | None = None,
                    progress=None) -> dict:
    """``{seed: (draw, strong, weak, history)}`` for each seed: the notebook's draws and its pre-trained
    representations (``history`` ``(epochs, 2)``: the strong and weak networks' printed losses), from the
    cache where present; the missing ones are pre-trained together (strong networks in one batch, weak in
    another) and cached."""
    say = progress or (lambda s: None)
    cache = cache or RepresentationCache(None)
    seeds = config.seeds if seeds is None else seeds
    out, missing = {}, []
    for seed in seeds:
        draw = notebook_draw(seed, config)
        hit = cache.load(config.pretrain_key(seed), config)
        if hit is None:
            missing.append(draw)
        else:
            out[seed] = (draw, *hit)
    if missing:
        E = config.pretrain_epochs
        t0 = time.perf_counter()
        say(f"charikar: pre-training {len(missing)} strong networks ({config.strong_depth} blocks, {E} epochs)")
        strong, h_s = pretrain([d.strong_init for d in missing], missing,
                               [_orders(d.orders_state, config) for d in missing], config, progress=say)
        say(f"charikar: pre-training {len(missing)} weak networks ({config.weak_depth} blocks, "
            f"{time.perf_counter() - t0:.0f} s so far)")
        weak, h_w = pretrain([d.weak_init for d in missing], missing,
                             [_orders(d.orders_state, config, skip_epochs=E) for d in missing], config, progress=say)
        say(f"charikar: pre-training done ({time.perf_counter() - t0:.0f} s)")
        for i, draw in enumerate(missing):
            history = np.stack([h_s[:, i], h_w[:, i]], axis=1)
            cache.save(config.pretrain_key(draw.seed), strong[i], weak[i], history)
            out[draw.seed] = (draw, strong[i], weak[i], history)
    return {seed: out[seed] for seed in seeds}


# --------------------------------------------------------------------------------------------------------
# Transfer
# --------------------------------------------------------------------------------------------------------


def perturb_representation(target: Representation, scale: float, generator: torch.Generator) -> Representation:
    r""":math:`h^\star` with each weight matrix and bias vector moved by ``scale`` times the standard deviation
    of that layer's weights, times standard normal noise (the project's ``perturbed`` variant)."""
    weights, biases = [], []
    for W, b in zip(target.weights, target.biases):
        sd = float(W.std())
        weights.append(W + scale * sd * torch.randn(W.shape, generator=generator, dtype=W.dtype))
        biases.append(b + scale * sd * torch.randn(b.shape, generator=generator, dtype=b.dtype))
    return Representation(weights, biases)


def _transfer_inputs(draw: NotebookDraw, config: CharikarConfig) -> dict:
    """The transfer inputs (the notebook's, after both networks' shuffles) and the evaluation inputs drawn
    next: ``{"train": (K, n, d), "gain": ..., "misfit": ...}``."""
    rng = np.random.RandomState()
    rng.set_state(draw.orders_state)
    _advance(rng, 2 * config.pretrain_epochs * config.pretrain_tasks, config.pretrain_samples)
    shape = (config.n_transfer, config.input_dim)
    train = np.stack([rng.normal(0, config.input_scale, shape) for _ in range(config.fresh_tasks)])
    test = (config.n_test, config.input_dim)
    evaluation = [(rng.normal(0, config.input_scale, test), rng.normal(0, config.input_scale, test))
                  for _ in range(config.fresh_tasks)]
    return {"train": torch.as_tensor(train), "gain": torch.as_tensor(np.stack([e[0] for e in evaluation])),
            "misfit": torch.as_tensor(np.stack([e[1] for e in evaluation]))}


def _least_squares(features: torch.Tensor, targets: torch.Tensor):
    """Least-squares heads with bias, one per task: features ``(K, n, m)``, targets ``(K, n)``."""
    return fit(features, targets[..., None], loss="squared", head="squared", bias=True, tol=1e-10)


def _predict(theta: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``[h, 1] θ`` for ``θ (K, m+1, 1)`` and ``h (K, n, m)``: ``(K, n)``."""
    return (features @ theta[:, :-1] + theta[:, -1:])[..., 0]


def _transfer(draw: NotebookDraw, strong: dict, weak: Representation, config: CharikarConfig,
              history: np.ndarray) -> list:
    """Rows of every variant for one draw (the 100 tasks of each variant solved in one batch)."""
    inputs = _transfer_inputs(draw, config)
    a, c = draw.transfer_a, draw.transfer_c
    truth = {k: (draw.target(x) * a[:, None, :]).sum(-1) + c[:, None] for k, x in inputs.items()}
    weak_fit = _least_squares(weak(inputs["train"]), truth["train"])
    theta_w = weak_fit.params["theta"]
    weak_pred = {k: _predict(theta_w, weak(x)) for k, x in inputs.items()}
    rows = []
    for variant, rep in strong.items():
        h_train = rep(inputs["train"])
        student = _least_squares(h_train, weak_pred["train"])
        theta = student.params["theta"]
        pred = {k: _predict(theta, rep(x)) for k, x in inputs.items()}
        best = _least_squares(h_train, truth["train"])  # epsilon: the strong head fitted on the truth
        # Certificate of the in-sample identity: its defect at the computed student is <g, theta_G - theta>
        # with theta_G the best head on the truth (Cauchy-Schwarz).
        certificate = student.grad_norm * (best.params["theta"] - theta).flatten(1).norm(dim=-1)
        check = charikar_squared(truth["train"], weak_pred["train"], pred["train"], to_numpy(certificate),
                                 equality=(variant == "realizable"))
        mse = lambda u, v: to_numpy(((u - v) ** 2).mean(-1))  # noqa: E731
        columns = {
            "weak_error_train": mse(weak_pred["train"], truth["train"]),
            "student_error_train": mse(pred["train"], truth["train"]),
            "misfit_train": mse(pred["train"], weak_pred["train"]),
            "weak_error": mse(weak_pred["gain"], truth["gain"]),
            "student_error": mse(pred["gain"], truth["gain"]),
            "misfit": mse(pred["misfit"], weak_pred["misfit"]),
            "best_error_train": to_numpy(best.objective),
            "student_gap": to_numpy(student.gap),
            "theorem_slack": np.asarray(check.slack, float),
            "theorem_certificate": np.asarray(check.certificate, float),
        }
        for task in range(config.fresh_tasks):
            row = {"run_id": config.run_id(draw.seed, variant, task), "seed": draw.seed, "draw": draw_name(draw.seed),
                   "variant": variant, "task": task, "config_key": config.key,
                   "pretrain_epochs": config.pretrain_epochs, "strong_pretrain_loss": float(history[-1, 0]),
                   "weak_pretrain_loss": float(history[-1, 1]),
                   **{k: float(v[task]) for k, v in columns.items()}}
            row["gain_train"] = row["weak_error_train"] - row["student_error_train"]
            row["gain"] = row["weak_error"] - row["student_error"]
            row["theorem_verdict"] = str(check.verdict[task])
            rows.append(row)
    return rows


def run_charikar(config: CharikarConfig = CharikarConfig(), variants=VARIANTS, cache: RepresentationCache | None
                 = None, progress=None) -> list[dict]:
    """Run the experiment for every seed of ``config``: one row per (draw, variant, fresh task) with gain and
    misfit on fresh inputs (``gain``, ``misfit``: the notebook's scatter), in-sample on the transfer inputs
    (``gain_train``, ``misfit_train``, where Theorem 1 is stated, with its check), ``best_error_train``
    (:math:`\\varepsilon`) and the weak head's error. Pre-trained representations come from ``cache``.
    One thread throughout: the rows are the same for any thread setting."""
    say = progress or (lambda s: None)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    pairs = pretrained_pair(config, cache=cache, progress=say)
    rows = []
    with single_thread():
        for seed, (draw, strong, weak, history) in pairs.items():
            reps = {}
            for variant in variants:
                if variant == "pretrained":
                    reps[variant] = strong
                elif variant == "realizable":
                    reps[variant] = draw.target
                else:
                    gen = torch.Generator().manual_seed(int(seed))
                    reps[variant] = perturb_representation(draw.target, config.perturbation, gen)
            rows += _transfer(draw, reps, weak, config, history)
    say(f"charikar: {len(rows)} task rows ({time.perf_counter() - t0:.1f} s)")
    return rows


def summarise(rows) -> list[dict]:
    """Per (variant, draw): ``median_eps`` (strong head on the truth, in-sample), ``weak_error`` (median, fresh
    inputs), ``median_gain``, ``median_misfit``, ``weak_strong_gap`` (median of weak error minus ε, in-sample),
    ``mean_abs_gain_minus_misfit``, ``misfit_over_gain`` = Σ misfit / Σ gain over the tasks (the slope of the
    cloud's centre of mass; 1 on y = x), ``median_misfit_over_median_gain`` and ``fraction_gain_ge_misfit``,
    all on the fresh inputs (the notebook's scatter) unless stated."""
    import pandas as pd

    frame = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows
    out = []
    for (variant, seed), d in frame.groupby(["variant", "seed"], sort=False):
        gain, misfit = d["gain"].to_numpy(), d["misfit"].to_numpy()
        out.append({
            "variant": variant, "draw": draw_name(int(seed)), "seed": int(seed), "tasks": len(d),
            "median_eps": float(d["best_error_train"].median()),
            "weak_error": float(d["weak_error"].median()),
            "weak_strong_gap": float((d["weak_error_train"] - d["best_error_train"]).median()),
            "median_gain": float(np.median(gain)), "median_misfit": float(np.median(misfit)),
            "mean_abs_gain_minus_misfit": float(np.mean(np.abs(gain - misfit))),
            "misfit_over_gain": float(misfit.sum() / gain.sum()),
            "median_misfit_over_median_gain": float(np.median(misfit) / np.median(gain)),
            "fraction_gain_ge_misfit": float(np.mean(gain >= misfit)),
            "strong_pretrain_loss": float(d["strong_pretrain_loss"].iloc[0]),
            "weak_pretrain_loss": float(d["weak_pretrain_loss"].iloc[0]),
        })
    return out
