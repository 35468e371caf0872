r"""The flow of one study (docs/design.md), one function per arrow:

world(seed) -> weak teacher fit on ground truth (split A) -> teacher probabilities on split B (optionally
flipped) -> students fit on split B (one batch per head x loss) -> metrics on split B (in-sample, where the
theorems are exact) and on held-out split C -> result rows.

A :class:`RunSpec` names one student; :func:`run_specs` fits any list of them, batching students with the same
(head, loss) and shapes into one solver call (features stacked per student, across worlds), and returns one
row per spec.

Metrics (for a model :math:`F` against the truth :math:`F^*`):

* ``*_kl_error`` = :math:`\mathbb E\,\mathrm{KL}(F^*\|F)` (the error of docs/theory.md);
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
from .divergences import get_loss, kl, kl_from_logits
from .heads import LinearHead, MixtureHead, SoftmaxHead
from .profile import phase
from .solvers import fit
from .practice import (EARLY_STOPPING, INITS, OPTIMIZERS, PRACTICE_HEADS, PRACTICE_LOSSES, SCHEDULES,
                       PracticeConfig, expected_calibration_error, probabilities, train)
from .synthetic import (NOISE_KINDS, WorldConfig, confident_wrong_labels, flip_labels, floor_probs, make_world, rng_for,
                        temper, uncertain_labels)
from .theorems import forward_kl_pythagorean, theorem2_reverse_kl
from .validation import InputError

__all__ = ["RunSpec", "WorldData", "prepare_world", "prepare_worlds", "predict", "model_metrics", "run_specs"]

CLASSIFICATION_LOSSES = ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce")
TRAINERS = ("exact", "practice")
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
    # -- the teacher's knobs (every trainer) --
    teacher_temperature: float = 1.0  # q ∝ q^(1/T) before noise
    noise_kind: str = "flip"  # flip | confident_wrong | uncertain, on a fraction `noise` of the rows
    teacher_floor: float = 0.0  # q -> max(q, floor), renormalised, after noise
    # -- the trainer: exact (certified minimiser) or practice (w2s_theory.practice) --
    trainer: str = "exact"
    optimizer: str = "adam"
    lr: float = 1e-2
    lr_grid: tuple = ()  # non-empty: train once per lr, keep the best on the validation split
    schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 32
    epochs: int = 2
    weight_decay: float = 0.0
    init: str = "zero"
    standardize: bool = False
    early_stopping: str = "none"
    n_val: int = 200  # validation split V (weak- or true-labelled)
    eval_every: int = 50

    def __post_init__(self):
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        if isinstance(self.lr_grid, list):
            object.__setattr__(self, "lr_grid", tuple(float(v) for v in self.lr_grid))
        self._check_practice()
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
        from .fdivergences import is_extra_loss  # the field's losses: f-divergences, bregman:<generator>

        if self.weak_loss not in STUDENT_LOSSES and not is_extra_loss(self.weak_loss):
            raise ValueError(f"weak_loss must be one of {', '.join(STUDENT_LOSSES)}, got {self.weak_loss!r}")
        losses = PRACTICE_LOSSES if self.trainer == "practice" else STUDENT_LOSSES
        if self.loss not in losses and not (self.trainer == "exact" and is_extra_loss(self.loss)):
            raise ValueError(f"loss must be one of {', '.join(losses)} for trainer {self.trainer!r}, got {self.loss!r}")

    def _check_practice(self):
        """The teacher's and the practice trainer's knobs (each message names the field)."""
        choices = {"trainer": TRAINERS, "noise_kind": NOISE_KINDS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "init": INITS, "early_stopping": EARLY_STOPPING}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not (self.teacher_temperature > 0 and np.isfinite(self.teacher_temperature)):
            raise ValueError(f"teacher_temperature must be a finite number > 0, got {self.teacher_temperature!r}")
        if not 0 <= self.teacher_floor < 1 / self.world.k:
            raise ValueError(f"teacher_floor must be in [0, 1/k) = [0, {1 / self.world.k:g}), got {self.teacher_floor!r}")
        for name in ("lr", *(("lr_grid",) if self.lr_grid else ())):
            for v in (self.lr_grid if name == "lr_grid" else (self.lr,)):
                if not (v > 0 and np.isfinite(v)):
                    raise ValueError(f"{name} must be a finite learning rate > 0, got {v!r}")
        if not (self.weight_decay >= 0 and np.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name, low in (("warmup_steps", 0), ("batch_size", 1), ("epochs", 1), ("n_val", 1), ("eval_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.trainer == "practice":
            if self.head not in PRACTICE_HEADS:
                raise ValueError(f"head must be one of {', '.join(PRACTICE_HEADS)} for the practice trainer, "
                                 f"got {self.head!r}")
            if self.standardize and self.head != "softmax":
                raise ValueError("standardize = true needs head = 'softmax' (mixture features must stay in the simplex)")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["world"] = self.world.as_dict()
        d["lr_grid"] = list(self.lr_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        d = dict(d)
        d["world"] = WorldConfig(**d.get("world", {}))
        return cls(**d)

    @property
    def run_id(self) -> str:
        """A hash of the spec. Fields added after the first stores (the teacher's knobs and the trainer's) enter
        only where they differ from their defaults, so every run stored before they existed keeps its id and
        old stores resume."""
        d = self.as_dict()
        for name in ADDED_FIELDS:
            if d[name] == _DEFAULTS[name]:
                del d[name]
        text = json.dumps(d, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def world_key(self) -> tuple:
        """Runs with equal keys share a world, its samples and its weak teacher."""
        return (json.dumps(self.world.as_dict(), sort_keys=True), self.seed, self.n_weak, self.n_train,
                self.n_test, self.weak_head, self.weak_loss)


#: RunSpec fields added after stores existed: hashed into run_id only where they differ from the default.
ADDED_FIELDS = ("teacher_temperature", "noise_kind", "teacher_floor", "trainer", "optimizer", "lr", "lr_grid",
                "schedule", "warmup_steps", "batch_size", "epochs", "weight_decay", "init", "standardize",
                "early_stopping", "n_val", "eval_every")
_DEFAULTS = {name: (list(v) if isinstance(v, tuple) else v) for name, v in
             ((name, getattr(RunSpec.__dataclass_fields__[name], "default")) for name in ADDED_FIELDS)}

#: The practice trainer's knobs that one batched training call shares (lr is per student).
PRACTICE_KNOBS = ("optimizer", "lr_grid", "schedule", "warmup_steps", "batch_size", "epochs", "weight_decay", "init",
                  "standardize", "early_stopping", "n_val", "eval_every")


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
    world: object = None  # the World (to sample the validation split)
    weak_params: dict | None = None  # the weak head (to label the validation split)


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


def head_inputs(head: str, features):
    """The features a head is fitted and evaluated on. The world's features are simplex rows, whose sum equals the
    bias column only up to rounding: the linear and softmax heads (affine in the features, with a bias) read them
    without their last coordinate, the same class stated as a well-posed problem that a certificate can cover
    (:meth:`LinearHead.affine_coordinates`)."""
    return LinearHead.affine_coordinates(features) if head in ("linear", "softmax") else features


def prepare_world(spec: RunSpec, device="cpu") -> WorldData:
    """Sample the splits, fit the weak head on the truth (split A) and the strong ceiling (split B)."""
    return prepare_worlds([spec], device)[0]


def prepare_worlds(specs: list[RunSpec], device="cpu") -> list[WorldData]:
    """:func:`prepare_world` for each of ``specs`` (one per world), with the auxiliary fits batched: the weak
    teachers of worlds with equal shapes (weak head and loss, ``n_weak``, weak features, ``k``) in one solver
    call, and so the strong ceilings (``n_train``, strong features, ``k``). At one world per call, each
    fit's fixed per-call and per-iteration costs are most of its time (a ceiling on 1000 x 16 features:
    12 Newton steps, 40 ms). The batched solvers' arithmetic for a student does not depend on the other
    students of its batch (on the sweep's one solver thread), so every world comes out bit for bit as when it
    is prepared alone (tested)."""
    worlds = [make_world(spec.world, spec.seed) for spec in specs]
    samples = [(w.sample(s.n_weak, "A"), w.sample(s.n_train, "B"), w.sample(s.n_test, "C"))
               for s, w in zip(specs, worlds)]

    def batched(keys, inputs, targets, options):
        """One ``fit`` per group of equal ``keys`` (``options`` of a group: from its first world); each world's
        (params, probs, gap) as a batch of one."""
        groups: dict = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(specs)
        for members in groups.values():
            with phase("solver: weak teachers and ceilings"):
                result = fit(np.stack([inputs[i] for i in members]), np.stack([targets[i] for i in members]),
                             device=device, **options(specs[members[0]]))
            for j, i in enumerate(members):  # kept on the CPU: the world's samples and predictions live there
                params = {name: value[j : j + 1].cpu() for name, value in result.params.items()}
                out[i] = (params, result.probs[j : j + 1].cpu(), float(result.gap[j]))
        return out

    weak_inputs = [head_inputs(s.weak_head, a.weak_features) for s, (a, _, _) in zip(specs, samples)]
    weak = batched([(s.weak_head, s.weak_loss, x.shape, s.world.k) for s, x in zip(specs, weak_inputs)],
                   weak_inputs, [a.truth for a, _, _ in samples],
                   lambda s: {"loss": s.weak_loss, "head": s.weak_head})
    ceiling = batched([(b.strong_features.shape, s.world.k) for s, (_, b, _) in zip(specs, samples)],
                      [b.strong_features for _, b, _ in samples], [b.truth for _, b, _ in samples],
                      lambda s: {"loss": "forward_kl", "head": "mixture"})
    out = []
    for spec, world, (a, b, c), (weak_params, _, weak_gap), (ceiling_params, ceiling_probs, _) in zip(
            specs, worlds, samples, weak, ceiling):
        weak_on = lambda sample: torch.as_tensor(head_inputs(spec.weak_head, sample.weak_features))  # noqa: E731
        teacher_train = to_numpy(predict(spec.weak_head, weak_params, weak_on(b)))[0]
        teacher_test = to_numpy(predict(spec.weak_head, weak_params, weak_on(c)))[0]
        ceiling_test = to_numpy(predict("mixture", ceiling_params, torch.as_tensor(c.strong_features)))[0]
        out.append(WorldData(b.strong_features, c.strong_features, b.truth, c.truth, teacher_train, teacher_test,
                             to_numpy(ceiling_probs)[0], ceiling_test, weak_gap, world, weak_params))
    return out


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


def _noisy_teacher(spec: RunSpec, clean: np.ndarray, split: str = "B") -> np.ndarray:
    r"""The teacher the student sees: the weak model's probabilities on ``split`` (B: training, V: validation),
    tempered (:math:`q\propto q^{1/T}`, :func:`w2s_theory.synthetic.temper`), then a fraction ``noise`` of
    the rows corrupted by ``noise_kind``, then floored (:func:`w2s_theory.synthetic.floor_probs`). Each split
    has its own noise stream (the training split's flip stream is the one stores already hold)."""
    teacher = temper(clean, spec.teacher_temperature)
    if spec.noise > 0:
        n = teacher.shape[0]
        if split == "B" and spec.noise_kind == "flip":
            rng = rng_for(spec.seed, "label-noise", spec.noise, spec.n_train)
        else:
            rng = rng_for(spec.seed, "label-noise", split, spec.noise_kind, spec.noise, n)
        corrupt = {"flip": flip_labels, "confident_wrong": confident_wrong_labels, "uncertain": uncertain_labels}
        teacher, _ = corrupt[spec.noise_kind](teacher, spec.noise, rng)
    return floor_probs(teacher, spec.teacher_floor)


def _student_shape(spec: RunSpec) -> tuple:
    """Students with equal shapes (and, for the practice trainer, equal shared knobs) can share one batch,
    whatever their world."""
    shape = (spec.head, spec.loss, spec.n_train, spec.n_test, spec.world.strong_dim, spec.world.k, spec.trainer)
    if spec.trainer == "practice":
        shape += tuple(getattr(spec, name) for name in PRACTICE_KNOBS)
    return shape


def run_specs(specs: list[RunSpec], device="cpu", worlds: dict | None = None) -> list[dict]:
    """Fit every spec's student and return one row per spec (same order).

    All students with the same (head, loss) and shapes are fitted in one batched solver call, whatever their
    world, on their worlds' features stacked as ``(B, n, m)``. That layout is used even when all students
    share one world: its arithmetic for one student does not depend on the other students in the batch
    (checked bit for bit under the sweep's one solver thread, :data:`w2s_theory.sweep.SOLVE_THREADS`; with
    more threads the BLAS may split one student's long sums differently for a batch of one), so a row never
    depends on how a sweep was chunked, resumed or distributed,
    whereas the faster shared-features layout (one GEMM over all students) changes the last bits with the
    batch. ``worlds`` caches :class:`WorldData` by :meth:`RunSpec.world_key` across calls.
    """
    worlds = {} if worlds is None else worlds
    missing = {spec.world_key(): spec for spec in specs if spec.world_key() not in worlds}
    if missing:
        with phase("worlds (sampling, teacher outputs)"):
            worlds.update(zip(missing, prepare_worlds(list(missing.values()), device)))
    rows: list[dict | None] = [None] * len(specs)
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(_student_shape(spec), []).append(i)
    for (head, loss, *_), members in groups.items():
        group = [specs[i] for i in members]
        data = [worlds[spec.world_key()] for spec in group]
        teachers = np.stack([_noisy_teacher(spec, d.teacher_train) for spec, d in zip(group, data)])
        train_features = head_inputs(head, np.stack([d.strong_train for d in data]))
        test_features = head_inputs(head, np.stack([d.strong_test for d in data]))
        truth_train = np.stack([d.truth_train for d in data])
        extra: list[dict] = [{} for _ in members]
        if group[0].trainer == "practice":
            with phase("solver: students"):
                train_probs, test_probs, extra = _train_practice(group, data, teachers, device)
            result, check = None, None
            train_logits = test_logits = None
        else:
            with phase("solver: students"):
                result = fit(train_features, teachers, loss=loss, head=head, device=device)
            test_probs = to_numpy(predict(head, result.params,
                                          torch.as_tensor(test_features, device=result.probs.device)))
            train_probs = to_numpy(result.probs)
            train_logits = _softmax_logits(head, result.params,
                                           torch.as_tensor(train_features, device=result.probs.device))
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
            if result is not None:
                row.update(objective=float(result.objective[j]), gap=float(result.gap[j]),
                           certificate=result.certificate, converged=bool(result.converged[j]),
                           iterations=int(result.iterations[j]))
            row.update(extra[j])
            row.update(model_metrics(d.truth_train, train_probs[j], "student_train",
                                     None if train_logits is None else train_logits[j]))
            row.update(model_metrics(d.truth_train, q, "teacher_train"))
            row.update(model_metrics(d.truth_test, test_probs[j], "student_test",
                                     None if test_logits is None else test_logits[j]))
            row.update(model_metrics(d.truth_test, d.teacher_test, "weak_test"))
            row.update(model_metrics(d.truth_test, d.ceiling_test, "ceiling_test"))
            row["ece"], row["ece_se"] = expected_calibration_error(test_probs[j], d.truth_test)
            row["bayes_accuracy"] = float(d.truth_test.max(-1).mean())
            row["gain_train"] = row["teacher_train_kl_error"] - row["student_train_kl_error"]
            row["misfit_reverse"] = float(kl(train_probs[j], q).mean())
            row["misfit_forward"] = float((kl(q, train_probs[j]) if train_logits is None else
                                           kl_from_logits(q, train_logits[j])).mean())
            row["misfit"] = (row["misfit_reverse"] if loss in ("reverse_kl", "reverse_ce") else
                             row["misfit_forward"] if loss in ("forward_kl", "forward_ce") else row["objective"])
            row["gain_test"] = row["weak_test_kl_error"] - row["student_test_kl_error"]
            row["pgr"] = _pgr(row["student_test_accuracy"], row["weak_test_accuracy"], row["ceiling_test_accuracy"])
            if check is not None:
                row.update(theorem_slack=float(check.slack[j]), theorem_certificate=float(check.certificate[j]),
                           theorem_verdict=str(check.verdict[j]))
            rows[i] = row
    return rows  # type: ignore[return-value]


def _validation_split(spec: RunSpec, d: WorldData) -> tuple[np.ndarray, np.ndarray]:
    """Split V of the spec's world: strong features and the labels early stopping / lr selection read:
    the weak teacher's probabilities with the spec's temperature, noise (its own stream) and floor
    (``early_stopping`` ``weak`` or ``none``), or ``n_val`` one-hot labels drawn from the truth (``true``)."""
    v = d.world.sample(spec.n_val, "V")
    if spec.early_stopping == "true":
        u = rng_for(spec.seed, "validation-labels", spec.n_val).random(spec.n_val)
        labels = (u[:, None] > np.cumsum(v.truth, axis=1)).sum(1).clip(max=v.truth.shape[1] - 1)
        return v.strong_features, np.eye(v.truth.shape[1])[labels]
    weak = to_numpy(predict(spec.weak_head, d.weak_params, torch.as_tensor(v.weak_features)))[0]
    return v.strong_features, _noisy_teacher(spec, weak, split="V")


def _train_practice(group: list[RunSpec], data: list[WorldData], teachers: np.ndarray, device) -> tuple:
    """Train one batch of practice students (:func:`w2s_theory.practice.train`); with ``lr_grid`` every
    student is trained once per learning rate (all in the same batch) and keeps the one whose validation
    loss is lowest. Returns train and test probabilities and each row's practice columns, among them the
    objective gap to the exact minimiser of the same loss on the same data (:func:`w2s_theory.solvers.fit`;
    ``hard_ce``: forward CE on the teacher's one-hot argmax; ``aux_conf`` has no fixed objective: NaN)."""
    spec0 = group[0]
    head, loss = spec0.head, spec0.loss
    grid = list(spec0.lr_grid) or [None]
    G = len(grid)
    config = PracticeConfig(optimizer=spec0.optimizer, schedule=spec0.schedule, warmup_steps=spec0.warmup_steps,
                            batch_size=spec0.batch_size, epochs=spec0.epochs, weight_decay=spec0.weight_decay,
                            eval_every=spec0.eval_every, early_stopping=spec0.early_stopping)
    repeat = lambda a: np.repeat(np.asarray(a), G, axis=0)  # noqa: E731  student-major, lr-minor
    X = np.stack([d.strong_train for d in data])
    lrs = np.array([spec.lr if lr is None else lr for spec in group for lr in grid])
    # Each student's own stream, shared by its copies across the lr grid and by the other losses of the same
    # world and seed (so that paired comparisons see the same mini-batches).
    rngs = [rng_for(spec.seed, "practice", spec.n_train, spec.batch_size) for spec in group for _ in grid]
    need_val = spec0.early_stopping != "none" or spec0.lr_grid
    val = [_validation_split(spec, d) for spec, d in zip(group, data)] if need_val else None
    init_params = None
    if spec0.init == "ceiling":
        ceiling = fit(X, np.stack([d.truth_train for d in data]), loss="forward_kl", head=head, device="cpu")
        init_params = {name: np.repeat(to_numpy(p), G, axis=0) for name, p in ceiling.params.items()}
    trained = train(head, loss, repeat(X), repeat(teachers), lr=lrs, config=config, rngs=rngs, init=spec0.init,
                    init_params=init_params, standardize=spec0.standardize,
                    val_features=repeat([v[0] for v in val]) if val else None,
                    val_targets=repeat([v[1] for v in val]) if val else None,
                    test_features=repeat([d.strong_test for d in data]),
                    test_truth=repeat([d.truth_test for d in data]), device=device)
    B = len(group)
    pick = np.zeros(B, dtype=np.int64) if G == 1 else np.nanargmin(trained.val_loss.reshape(B, G), axis=1)
    chosen = np.arange(B) * G + pick
    params = {name: p[torch.as_tensor(chosen)] for name, p in trained.params.items()}
    train_probs = probabilities(head, params, X).numpy()
    test_probs = probabilities(head, params, np.stack([d.strong_test for d in data])).numpy()

    if loss in ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce", "hard_ce"):
        exact_loss = "forward_ce" if loss == "hard_ce" else loss
        targets = np.eye(teachers.shape[-1])[teachers.argmax(-1)] if loss == "hard_ce" else teachers
        try:
            # The exact minimiser of the same class, fitted on its well-posed coordinates (head_inputs), once
            # per distinct (features, targets): students that differ only in their learning rate share it (a
            # student's fit does not depend on its batch, so this changes no number).
            first: dict = {}
            distinct, where = [], []
            for j in range(B):
                key = hashlib.sha256(X[j].tobytes() + targets[j].tobytes()).digest()
                if key not in first:
                    first[key] = len(distinct)
                    distinct.append(j)
                where.append(first[key])
            exact = fit(head_inputs(head, X[distinct]), targets[distinct], loss=exact_loss, head=head, device=device)
            objective = get_loss(exact_loss).per_sample
            practice_obj = objective(targets, train_probs).mean(-1)
            exact_obj = objective(targets[distinct], to_numpy(exact.probs)).mean(-1)[where]
            gap = np.where(to_numpy(exact.converged)[where], practice_obj - exact_obj, np.nan)
        except InputError:  # no exact minimiser for this data (e.g. a reverse loss on a teacher with zeros)
            practice_obj, gap = np.full(B, np.nan), np.full(B, np.nan)
    else:
        practice_obj, gap = np.full(B, np.nan), np.full(B, np.nan)
    steps = config.steps(group[0].n_train)
    extra = []
    for j in range(B):
        c = chosen[j]
        extra.append({"objective": float(practice_obj[j]), "gap": float("nan"),
                      "certificate": "none: practice trainer (see exact_objective_gap)", "converged": False,
                      "iterations": steps, "stop_step": int(trained.stop_step[c]),
                      "weight_norm": float(trained.weight_norm[c]), "exact_objective_gap": float(gap[j]),
                      "lr_selected": float(lrs[c]), "val_loss": float(trained.val_loss[c]),
                      "curve": json.dumps(trained.curves(c), separators=(",", ":"))})
    return train_probs, test_probs, extra


def _flat_spec(spec: RunSpec) -> dict:
    """The spec as flat columns (``world_*`` for the world's fields) for tables and the store."""
    d = spec.as_dict()
    world = d.pop("world")
    d["lr_grid"] = json.dumps(d["lr_grid"])  # a text column ("[]" = the shared lr), so tables round-trip
    return {**{f"world_{k}": v for k, v in world.items()}, **d}


def with_overrides(spec: RunSpec, **changes) -> RunSpec:
    """A copy of ``spec`` with fields (``world_<field>`` for the world) replaced."""
    world_changes = {k[6:]: v for k, v in changes.items() if k.startswith("world_")}
    other = {k: v for k, v in changes.items() if not k.startswith("world_")}
    world = replace(spec.world, **world_changes) if world_changes else spec.world
    return replace(spec, world=world, **other)
