r"""Charikar, Pabbaraju and Shiragur's synthetic setup (NeurIPS 2024, arXiv 2405.15116, Sec. 5), in torch.

The experiment behind their "gain vs misfit" figure (THEORY.md, "Charikar et al.'s synthetic setup"):

* inputs :math:`x \sim \mathcal N(0, s^2 I_d)` with :math:`s = 500`, :math:`d = 8`;
* a frozen random *target representation* :math:`h^\star`: 5 Linear+ReLU blocks of width 16;
* a *weak* representation :math:`h_w` (2 blocks) and a *strong* one :math:`h_s` (8 blocks), each pre-trained
  on :math:`T = 10` random linear tasks :math:`y = a_t^\top h^\star(x)` with the task heads :math:`a_t` frozen
  (2000 samples per task, AdamW, learning rate :math:`10^{-3}`, batch 32), so only the representation learns;
* then fresh tasks :math:`f^\star = a^\top h^\star`: the weak head is the least-squares fit of :math:`f^\star`
  on :math:`h_w` (split A), the strong student the least-squares fit of the weak predictions on
  :math:`h_s` (split B), and

  .. math:: \text{gain} = \mathbb E(f_w - f^\star)^2 - \mathbb E(f_{sw} - f^\star)^2,\qquad
     \text{misfit} = \mathbb E(f_{sw} - f_w)^2.

Their Theorem 1: when :math:`f^\star` lies in the (convex) class of heads on :math:`h_s`, gain :math:`\ge`
misfit, with equality for an unconstrained linear head (the least-squares fit is an orthogonal projection).
Three variants of :math:`h_s` (``VARIANTS``):

* ``realizable``: :math:`h_s = h^\star` (the theorem applies; in-sample gain = misfit exactly);
* ``pretrained``: the 8-block network pre-trained as above (not realizable: the theorem only holds up to
  the :math:`O(\sqrt{\varepsilon})` term of their Theorem 2);
* ``perturbed``: :math:`h^\star` with every weight and bias perturbed by Gaussian noise of
  ``perturbation`` times that layer's weight standard deviation (close to realizable).

Heads are linear without bias, :math:`f(x) = w^\top h(x)` (as in their notebook), fitted batched over the
fresh tasks by :func:`w2s_theory.solvers.fit` (``head="squared"``), which certifies each least-squares
solution. Everything is seeded by :func:`w2s_theory.synthetic.rng_for` streams; torch runs in float64 on CPU
for the fits and float32 for the pre-training (as the original).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

import torch

from ._backend import to_numpy
from .solvers import fit
from .synthetic import rng_for
from .theorems import charikar_squared, squared_affine_certificate

__all__ = ["CharikarConfig", "VARIANTS", "Representation", "random_mlp", "pretrain_representation",
           "perturb_representation", "run_charikar"]

VARIANTS = ("realizable", "pretrained", "perturbed")


@dataclass(frozen=True)
class CharikarConfig:
    """Sizes of the experiment; the defaults are Charikar et al.'s except ``pretrain_epochs`` (not stated in
    THEORY.md; chosen so that the full figure stays within its CPU budget) and ``perturbation``."""

    seed: int = 0
    input_dim: int = 8
    input_scale: float = 500.0
    width: int = 16
    target_depth: int = 5
    strong_depth: int = 8
    weak_depth: int = 2
    pretrain_tasks: int = 10  # T
    pretrain_samples: int = 2000  # per task
    pretrain_epochs: int = 60
    batch_size: int = 32
    learning_rate: float = 1e-3
    fresh_tasks: int = 100
    n_weak: int = 2000  # split A: weak head fitted on the truth
    n_train: int = 2000  # split B: student fitted on the weak head's predictions
    n_test: int = 2000  # split C: fresh samples
    perturbation: float = 0.1  # relative weight noise of the "perturbed" variant

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def run_id(self, variant: str, task: int) -> str:
        """Identifier of one (variant, fresh task) row in the results store."""
        return f"charikar-{self.key}-{variant}-{task}"


class Representation:
    r"""A stack of Linear+ReLU blocks :math:`u_{l+1} = \mathrm{relu}(u_l W_l + b_l)`; the representation is
    the last block's output."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor]):
        self.weights = weights
        self.biases = biases

    @property
    def depth(self) -> int:
        return len(self.weights)

    def parameters(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for W, b in zip(self.weights, self.biases):
            x = torch.relu(x @ W + b)
        return x

    def detached(self, dtype=torch.float64) -> "Representation":
        return Representation([W.detach().to(dtype).clone() for W in self.weights],
                              [b.detach().to(dtype).clone() for b in self.biases])


def _generator(seed: int, *keys) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(rng_for(seed, "charikar", *keys).integers(2**62)))
    return g


def random_mlp(generator: torch.Generator, input_dim: int, width: int, depth: int,
               dtype=torch.float32) -> Representation:
    r"""PyTorch's default ``nn.Linear`` initialisation, :math:`W, b \sim U(-1/\sqrt{\text{fan-in}},
    1/\sqrt{\text{fan-in}})`, drawn from ``generator`` (what their notebook's ``nn.Sequential`` gets)."""
    weights, biases = [], []
    fan_in = input_dim
    for _ in range(depth):
        bound = 1.0 / math.sqrt(fan_in)
        weights.append((torch.rand((fan_in, width), generator=generator, dtype=dtype) * 2 - 1) * bound)
        biases.append((torch.rand((width,), generator=generator, dtype=dtype) * 2 - 1) * bound)
        fan_in = width
    return Representation(weights, biases)


def sample_inputs(generator: torch.Generator, n: int, config: CharikarConfig, dtype=torch.float64) -> torch.Tensor:
    return config.input_scale * torch.randn((n, config.input_dim), generator=generator, dtype=dtype)


def task_heads(generator: torch.Generator, count: int, width: int, dtype=torch.float64) -> torch.Tensor:
    r"""``count`` linear task heads :math:`a \sim U(-1/\sqrt{w}, 1/\sqrt{w})^w` (a default ``nn.Linear(w, 1)``),
    as rows ``(count, width)``."""
    bound = 1.0 / math.sqrt(width)
    return (torch.rand((count, width), generator=generator, dtype=dtype) * 2 - 1) * bound


def pretrain_representation(target: Representation, depth: int, config: CharikarConfig, name: str) -> tuple[
        Representation, list[float]]:
    r"""Pre-train a ``depth``-block representation :math:`h` on :math:`T` tasks with frozen heads:

    .. math:: \min_h \frac{1}{T n}\sum_{t=1}^T\sum_{i=1}^{n} \big(a_t^\top h(x_{t,i}) - a_t^\top h^\star(x_{t,i})\big)^2

    by AdamW (``learning_rate``, batch ``batch_size``, ``pretrain_epochs`` passes over the :math:`Tn` samples,
    shuffled each epoch). Returns the representation (float64, detached) and the mean training loss per epoch.
    """
    gen = _generator(config.seed, "pretrain", name)
    T, n = config.pretrain_tasks, config.pretrain_samples
    heads = task_heads(_generator(config.seed, "pretrain-heads"), T, config.width, torch.float32)
    x = sample_inputs(_generator(config.seed, "pretrain-inputs"), T * n, config, torch.float32)
    task = torch.arange(T).repeat_interleave(n)
    with torch.no_grad():
        y = (target.detached(torch.float32)(x) * heads[task]).sum(-1)
    model = random_mlp(gen, config.input_dim, config.width, depth)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    history: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 16-wide layers, batches of 32: extra threads only add synchronisation
    try:
        _train(model, opt, x, y, heads, task, gen, config, history)
    finally:
        torch.set_num_threads(threads)
    return model.detached(), history


def _train(model, opt, x, y, heads, task, gen, config, history) -> None:
    """The AdamW epochs of :func:`pretrain_representation`; appends each epoch's mean loss to ``history``."""
    T, n, B = config.pretrain_tasks, config.pretrain_samples, config.batch_size
    for _epoch in range(config.pretrain_epochs):
        order = torch.randperm(T * n, generator=gen)
        total = 0.0
        for start in range(0, T * n, B):
            idx = order[start : start + B]
            pred = (model(x[idx]) * heads[task[idx]]).sum(-1)
            loss = ((pred - y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        history.append(total / (T * n))


def perturb_representation(target: Representation, scale: float, generator: torch.Generator) -> Representation:
    """:math:`h^\\star` with each weight matrix and bias vector perturbed by ``scale`` times the standard
    deviation of that layer's weights, times standard normal noise."""
    weights, biases = [], []
    for W, b in zip(target.weights, target.biases):
        sd = float(W.std())
        weights.append(W + scale * sd * torch.randn(W.shape, generator=generator, dtype=W.dtype))
        biases.append(b + scale * sd * torch.randn(b.shape, generator=generator, dtype=b.dtype))
    return Representation(weights, biases)


def _squared_fit(features: torch.Tensor, targets: torch.Tensor):
    """Least-squares heads without bias, one per task: features ``(n, m)``, targets ``(B, n)``."""
    return fit(features, targets[..., None], loss="squared", head="squared", bias=False, tol=1e-10)


def _predict(theta: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return (features @ theta)[..., 0]  # (B, n)


def run_charikar(config: CharikarConfig = CharikarConfig(), variants=VARIANTS, progress=None) -> list[dict]:
    """Run the experiment; one row per (variant, fresh task) with gain and misfit in-sample (split B, where
    Theorem 1 is exact: ``gain_train``, ``misfit_train``, its check) and on fresh samples (split C: ``gain``,
    ``misfit``), plus the pre-training losses of the representations."""
    say = progress or (lambda s: None)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    target = random_mlp(_generator(config.seed, "target"), config.input_dim, config.width,
                        config.target_depth).detached()
    weak, weak_history = pretrain_representation(target, config.weak_depth, config, "weak")
    say(f"charikar: weak representation pre-trained ({time.perf_counter() - t0:.1f} s, "
        f"loss {weak_history[0]:.3g} -> {weak_history[-1]:.3g})")
    strong: dict[str, tuple[Representation, list[float]]] = {}
    for variant in variants:
        if variant == "realizable":
            strong[variant] = (target, [])
        elif variant == "pretrained":
            strong[variant] = pretrain_representation(target, config.strong_depth, config, "strong")
            h = strong[variant][1]
            say(f"charikar: strong representation pre-trained ({time.perf_counter() - t0:.1f} s, "
                f"loss {h[0]:.3g} -> {h[-1]:.3g})")
        else:
            strong[variant] = (perturb_representation(target, config.perturbation,
                                                       _generator(config.seed, "perturbation")), [])

    heads = task_heads(_generator(config.seed, "fresh-heads"), config.fresh_tasks, config.width)
    splits = {}
    for split, n in (("A", config.n_weak), ("B", config.n_train), ("C", config.n_test)):
        x = sample_inputs(_generator(config.seed, "fresh-inputs", split), n, config)
        splits[split] = (x, heads @ target(x).T)  # truth values (tasks, n)
    xa, truth_a = splits["A"]
    weak_fit = _squared_fit(weak(xa), truth_a)
    weak_theta = weak_fit.params["theta"]
    rows = []
    for variant in variants:
        rep, history = strong[variant]
        xb, truth_b = splits["B"]
        xc, truth_c = splits["C"]
        weak_b, weak_c = _predict(weak_theta, weak(xb)), _predict(weak_theta, weak(xc))
        hb, hc = rep(xb), rep(xc)
        student = _squared_fit(hb, weak_b)
        student_b, student_c = _predict(student.params["theta"], hb), _predict(student.params["theta"], hc)
        # The certificate of the in-sample check: the defect of the three-point identity at the computed
        # student is <g, theta_G - theta> for the best head theta_G on the truth, at most
        # 2 sqrt(gap * E(f_G - f_sw)^2) with the student's certified gap (which includes rounding; the computed
        # gradient's norm times the distance did not).
        best = _squared_fit(hb, truth_b)
        best_b = _predict(best.params["theta"], hb)
        certificate = squared_affine_certificate(to_numpy(student.gap), to_numpy(best_b), to_numpy(student_b))
        check = charikar_squared(truth_b, weak_b, student_b, certificate, equality=(variant == "realizable"))
        columns = {
            "weak_error_train": ((weak_b - truth_b) ** 2).mean(-1),
            "student_error_train": ((student_b - truth_b) ** 2).mean(-1),
            "misfit_train": ((student_b - weak_b) ** 2).mean(-1),
            "weak_error": ((weak_c - truth_c) ** 2).mean(-1),
            "student_error": ((student_c - truth_c) ** 2).mean(-1),
            "misfit": ((student_c - weak_c) ** 2).mean(-1),
            "best_error_train": best.objective,  # epsilon: how far f* is from the strong class
        }
        columns = {k: to_numpy(v) for k, v in columns.items()}
        for task in range(config.fresh_tasks):
            row = {"run_id": config.run_id(variant, task), "variant": variant, "task": task,
                   "config_key": config.key, **{k: float(v[task]) for k, v in columns.items()}}
            row["gain_train"] = row["weak_error_train"] - row["student_error_train"]
            row["gain"] = row["weak_error"] - row["student_error"]
            row.update(theorem_slack=float(check.slack[task]), theorem_certificate=float(check.certificate[task]),
                       theorem_verdict=str(check.verdict[task]), student_gap=float(to_numpy(student.gap)[task]),
                       pretrain_final_loss=(history[-1] if history else float("nan")),
                       weak_pretrain_final_loss=weak_history[-1])
            rows.append(row)
    say(f"charikar: {len(rows)} task rows ({time.perf_counter() - t0:.1f} s)")
    return rows
