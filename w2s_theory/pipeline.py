r"""The flow of one study (DESIGN.md), one function per arrow:

world(seed) -> weak teacher fit on ground truth (split A) -> teacher probabilities on split B (optionally
flipped) -> students fit on split B (one batch per head x loss) -> metrics on split B (in-sample, where the
theorems are exact) and on held-out split C -> result rows.

A :class:`RunSpec` names one student; :func:`run_specs` fits any list of them, batching students with the same
(head, loss) and shapes into one solver call (features stacked per student, across worlds), and returns one
row per spec.

Metrics (for a model :math:`F` against the truth :math:`F^*`):

* ``*_kl_error`` = :math:`\mathbb E\,\mathrm{KL}(F^*\|F)` (the error of THEORY.md);
* ``*_accuracy`` = :math:`\mathbb E_x F^*_{\arg\max F(x)}(x)`, the expected accuracy against labels drawn
  from the truth (its maximum, the Bayes accuracy, is reported as ``bayes_accuracy``);
* ``gain`` = teacher error - student error; ``misfit`` = the KL disagreement in the trained direction
  (:math:`\mathbb E\,\mathrm{KL}(F_{sw}\|F_w)` for reverse losses, :math:`\mathbb E\,\mathrm{KL}(F_w\|F_{sw})` for
  forward ones; the CE objectives add an entropy); ``misfit_reverse`` = :math:`\mathbb E\,\mathrm{KL}(F_{sw}\|F_w)`
  and ``misfit_forward`` = :math:`\mathbb E\,\mathrm{KL}(F_w\|F_{sw})` both, for comparisons;
* ``pgr`` = (student accuracy - weak accuracy) / (ceiling accuracy - weak accuracy), the performance gap
  recovered (Burns et al. 2023), with the *ceiling* the strong head fitted on the truth itself;
* on split B, the Theorem-2 check (:func:`w2s_theory.theorems.theorem2_reverse_kl`) for reverse-KL students
  of convex heads, and the forward analogue for forward-KL ones: ``theorem_slack``, ``theorem_certificate``,
  ``theorem_verdict``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from ._backend import to_numpy
from .divergences import kl, kl_from_logits
from .heads import MixtureHead, SoftmaxHead
from .solvers import fit
from .synthetic import WorldConfig, flip_labels, make_world, rng_for
from .theorems import forward_kl_pythagorean, theorem2_reverse_kl

__all__ = ["RunSpec", "WorldData", "prepare_world", "predict", "model_metrics", "run_specs"]

CLASSIFICATION_LOSSES = ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce")
PROBABILITY_HEADS = ("mixture", "linear", "softmax")
STUDENT_LOSSES = CLASSIFICATION_LOSSES + ("squared",)  # squared loss on probabilities (Charikar-style)


@dataclass(frozen=True)
class RunSpec:
    """One student: a world, the split sizes, the weak teacher, the label noise and the (head, loss) trained.

    Serialisable (``as_dict`` / ``from_dict``) so that the CLI, the sweep configs and the results store speak
    the same names; ``run_id`` is a hash of all of it.
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    seed: int = 0
    loss: str = "reverse_kl"
    head: str = "mixture"
    noise: float = 0.0
    n_weak: int = 1000  # split A: the weak head is fitted on the truth here
    n_train: int = 1000  # split B: students are fitted on the teacher here
    n_test: int = 1000  # split C: held out
    weak_head: str = "mixture"
    weak_loss: str = "forward_kl"

    def __post_init__(self):
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        for name in ("n_weak", "n_train", "n_test", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'seed' else 1}, got {value}")
        for name, head in (("head", self.head), ("weak_head", self.weak_head)):
            if head not in PROBABILITY_HEADS:
                raise ValueError(f"{name} must be one of {', '.join(PROBABILITY_HEADS)} (a head with class "
                                 f"probabilities), got {head!r}")
        for name, loss in (("loss", self.loss), ("weak_loss", self.weak_loss)):
            if loss not in STUDENT_LOSSES:
                raise ValueError(f"{name} must be one of {', '.join(STUDENT_LOSSES)}, got {loss!r}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["world"] = self.world.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        d = dict(d)
        d["world"] = WorldConfig(**d.get("world", {}))
        return cls(**d)

    @property
    def run_id(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def world_key(self) -> tuple:
        """Runs with equal keys share a world, its samples and its weak teacher."""
        return (json.dumps(self.world.as_dict(), sort_keys=True), self.seed, self.n_weak, self.n_train,
                self.n_test, self.weak_head, self.weak_loss)


@dataclass
class WorldData:
    """A world's samples on the three splits, the weak teacher and the strong ceiling."""

    strong_train: np.ndarray  # (n_train, m_s)
    strong_test: np.ndarray
    truth_train: np.ndarray  # (n_train, k)
    truth_test: np.ndarray
    teacher_train: np.ndarray  # weak teacher's probabilities on split B (clean)
    teacher_test: np.ndarray
    ceiling_train: np.ndarray  # strong head fitted on the truth: what the student could reach at best
    ceiling_test: np.ndarray
    weak_gap: float


def predict(head: str, params: dict, features):
    """Outputs of a fitted head on new features (params as returned by :func:`w2s_theory.solvers.fit`)."""
    if head == "mixture":
        return MixtureHead.predict(params["A"], features)
    if head == "softmax":
        return SoftmaxHead.predict(params["W"], params["b"], features)
    if head == "linear":
        out = features @ params["W"].transpose(-1, -2) + params["b"][..., None, :]
        return out.clamp_min(0) / out.clamp_min(0).sum(-1, keepdim=True)  # off-sample rows may leave the simplex
    raise ValueError(f"predict: head {head!r} has no probability outputs")


def prepare_world(spec: RunSpec, device="cpu") -> WorldData:
    """Sample the splits, fit the weak head on the truth (split A) and the strong ceiling (split B)."""
    world = make_world(spec.world, spec.seed)
    a, b, c = world.sample(spec.n_weak, "A"), world.sample(spec.n_train, "B"), world.sample(spec.n_test, "C")
    weak = fit(a.weak_features, a.truth, loss=spec.weak_loss, head=spec.weak_head, device=device)
    teacher_train = to_numpy(predict(spec.weak_head, weak.params, torch.as_tensor(b.weak_features)))[0]
    teacher_test = to_numpy(predict(spec.weak_head, weak.params, torch.as_tensor(c.weak_features)))[0]
    ceiling = fit(b.strong_features, b.truth, loss="forward_kl", head="mixture", device=device)
    ceiling_test = to_numpy(predict("mixture", ceiling.params, torch.as_tensor(c.strong_features)))[0]
    return WorldData(b.strong_features, c.strong_features, b.truth, c.truth, teacher_train, teacher_test,
                     to_numpy(ceiling.probs)[0], ceiling_test, float(weak.gap[0]))


def model_metrics(truth: np.ndarray, probs: np.ndarray, prefix: str, logits: np.ndarray | None = None) -> dict:
    """KL error and expected accuracy of a model against the truth (rows: samples); from the ``logits`` when
    the model has them (softmax head: finite where its probabilities underflow to 0)."""
    chosen = np.take_along_axis(truth, probs.argmax(-1)[..., None], axis=-1)[..., 0]
    error = kl(truth, probs) if logits is None else kl_from_logits(truth, logits)
    return {f"{prefix}_kl_error": float(error.mean()), f"{prefix}_accuracy": float(chosen.mean())}


def _softmax_logits(head: str, params: dict, features) -> np.ndarray | None:
    """Logits of fitted softmax heads (``None`` for other heads)."""
    if head != "softmax":
        return None
    return to_numpy(SoftmaxHead.logits(params["W"], params["b"], features))


def _pgr(student: float, weak: float, ceiling: float) -> float:
    return (student - weak) / (ceiling - weak) if abs(ceiling - weak) > 1e-12 else float("nan")


def _noisy_teacher(spec: RunSpec, clean: np.ndarray) -> np.ndarray:
    if spec.noise == 0:
        return clean
    noisy, _ = flip_labels(clean, spec.noise, rng_for(spec.seed, "label-noise", spec.noise, spec.n_train))
    return noisy


def _student_shape(spec: RunSpec) -> tuple:
    """Students with equal shapes can share one solver batch, whatever their world."""
    return (spec.head, spec.loss, spec.n_train, spec.n_test, spec.world.strong_dim, spec.world.k)


def run_specs(specs: list[RunSpec], device="cpu", worlds: dict | None = None) -> list[dict]:
    """Fit every spec's student and return one row per spec (same order).

    All students with the same (head, loss) and shapes are fitted in one batched solver call, whatever their
    world, on their worlds' features stacked as ``(B, n, m)``. That layout is used even when all students
    share one world: its arithmetic for one student does not depend on the other students in the batch
    (checked bit for bit), so a row never depends on how a sweep was chunked, resumed or distributed,
    whereas the faster shared-features layout (one GEMM over all students) changes the last bits with the
    batch. ``worlds`` caches :class:`WorldData` by :meth:`RunSpec.world_key` across calls.
    """
    worlds = {} if worlds is None else worlds
    for spec in specs:
        if spec.world_key() not in worlds:
            worlds[spec.world_key()] = prepare_world(spec, device)
    rows: list[dict | None] = [None] * len(specs)
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(_student_shape(spec), []).append(i)
    for (head, loss, *_), members in groups.items():
        data = [worlds[specs[i].world_key()] for i in members]
        teachers = np.stack([_noisy_teacher(specs[i], d.teacher_train) for i, d in zip(members, data)])
        train_features = np.stack([d.strong_train for d in data])
        test_features = np.stack([d.strong_test for d in data])
        truth_train = np.stack([d.truth_train for d in data])
        result = fit(train_features, teachers, loss=loss, head=head, device=device)
        test_probs = to_numpy(predict(head, result.params, torch.as_tensor(test_features, device=result.probs.device)))
        train_probs = to_numpy(result.probs)
        train_logits = _softmax_logits(head, result.params, torch.as_tensor(train_features, device=result.probs.device))
        test_logits = _softmax_logits(head, result.params, torch.as_tensor(test_features, device=result.probs.device))
        if head in ("mixture", "linear") and loss in ("reverse_kl", "forward_kl"):
            check = (theorem2_reverse_kl if loss == "reverse_kl" else forward_kl_pythagorean)(
                truth_train, teachers, train_probs, to_numpy(result.gap))
        else:
            check = None
        for j, (i, d) in enumerate(zip(members, data)):
            spec = specs[i]
            q = teachers[j]
            row = {"run_id": spec.run_id, **_flat_spec(spec)}
            row.update(objective=float(result.objective[j]), gap=float(result.gap[j]),
                       certificate=result.certificate, converged=bool(result.converged[j]),
                       iterations=int(result.iterations[j]))
            row.update(model_metrics(d.truth_train, train_probs[j], "student_train",
                                     None if train_logits is None else train_logits[j]))
            row.update(model_metrics(d.truth_train, q, "teacher_train"))
            row.update(model_metrics(d.truth_test, test_probs[j], "student_test",
                                     None if test_logits is None else test_logits[j]))
            row.update(model_metrics(d.truth_test, d.teacher_test, "weak_test"))
            row.update(model_metrics(d.truth_test, d.ceiling_test, "ceiling_test"))
            row["bayes_accuracy"] = float(d.truth_test.max(-1).mean())
            row["gain_train"] = row["teacher_train_kl_error"] - row["student_train_kl_error"]
            row["misfit_reverse"] = float(kl(train_probs[j], q).mean())
            row["misfit_forward"] = float((kl(q, train_probs[j]) if train_logits is None else
                                           kl_from_logits(q, train_logits[j])).mean())
            row["misfit"] = (row["misfit_reverse"] if loss.startswith("reverse") else
                             row["misfit_forward"] if loss.startswith("forward") else row["objective"])
            row["gain_test"] = row["weak_test_kl_error"] - row["student_test_kl_error"]
            row["pgr"] = _pgr(row["student_test_accuracy"], row["weak_test_accuracy"], row["ceiling_test_accuracy"])
            if check is not None:
                row.update(theorem_slack=float(check.slack[j]), theorem_certificate=float(check.certificate[j]),
                           theorem_verdict=str(check.verdict[j]))
            rows[i] = row
    return rows  # type: ignore[return-value]


def _flat_spec(spec: RunSpec) -> dict:
    """The spec as flat columns (``world_*`` for the world's fields) for tables and the store."""
    d = spec.as_dict()
    world = d.pop("world")
    return {**{f"world_{k}": v for k, v in world.items()}, **d}


def with_overrides(spec: RunSpec, **changes) -> RunSpec:
    """A copy of ``spec`` with fields (``world_<field>`` for the world) replaced."""
    world_changes = {k[6:]: v for k, v in changes.items() if k.startswith("world_")}
    other = {k: v for k, v in changes.items() if not k.startswith("world_")}
    world = replace(spec.world, **world_changes) if world_changes else spec.world
    return replace(spec, world=world, **other)
