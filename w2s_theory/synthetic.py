r"""Seeded synthetic weak-to-strong worlds: inputs, frozen representations, ground truth, label noise.

A *world* fixes an input distribution :math:`P`, a frozen strong representation :math:`h_s`, a frozen weak
representation :math:`h_w` and a ground truth :math:`F^\star` (docs/theory.md, "Notation"). It only samples
data; fitting heads is the solvers' job. Everything here is float64 numpy.

Construction (all weights drawn once, at :func:`make_world`, from the world's seed):

* inputs :math:`x \sim \mathcal N(0, I_d)`, ``d = input_dim``;
* a frozen random MLP :math:`u_L(x)` of ``strong_depth`` Linear+ReLU blocks of width ``width``
  (He initialisation, :math:`W_{ij}\sim\mathcal N(0, 2/\text{fan-in})`, biases :math:`\mathcal N(0, 0.5^2)`);
* a *feature map* turns a hidden layer :math:`u` into a point of the simplex,

  .. math:: h(x) = \mathrm{softmax}\big(\tau\cdot \mathrm{standardise}(u(x)\,P)\big),
     \qquad P_{ij}\sim\mathcal N(0, 1/\dim u),

  where ``standardise`` centres and scales each logit with a mean and standard deviation measured once on a
  fixed reference batch (drawn from the world's own stream), so features never depend on ``n`` or on the
  split. Every logit then has standard deviation :math:`\tau` (``temperature``) over the inputs: larger
  :math:`\tau` means sharper (more nearly one-hot) feature rows;
* strong representation :math:`h_s = h(u_L)`, ``strong_dim`` features;
* weak representation :math:`h_w`, ``weak_dim`` features: the weak model is the **same** network cut
  after :math:`L_w =` ``weak_depth`` :math:`\le L` blocks, topped by one softmax layer that was *fitted to
  the task* — the analogue of a small model fine-tuned on the ground truth, as the paper's weak teachers
  are. Concretely, on the reference batch a linear read-out :math:`\hat s(x) = [u_{L_w}(x), 1]\,R` is fitted
  by least squares to the centred log-truth :math:`\log F^\star(x) - \overline{\log F^\star(x)}`
  (floored at :math:`10^{-12}`), :math:`m_w` prototypes :math:`c_j` are picked among the read-outs of the
  reference batch (k-means++ seeding), and

  .. math:: h_w(x) = \mathrm{softmax}_j\Big(-\tau\,\frac{\|\hat s(x) - c_j\|^2}{2v}\Big),
     \qquad v = \text{mean } \|\hat s - \bar s\|^2 \text{ on the reference batch},

  a soft assignment of the weak read-out to prototypes (a softmax of an affine function of
  :math:`u_{L_w}`, since the :math:`\|\hat s\|^2` term cancels). It is weaker because it misses the last
  :math:`L - L_w` layers the truth is computed from (at the defaults a linear read-out of
  :math:`u_1` explains only about a third of the log-truth's variance) and has few features; it is
  correlated with :math:`F^\star` because it was fitted to it. Random projections of a shallow layer
  (task-agnostic) were tried first and rejected: with :math:`m_w = 8` the best weak mixture head then
  removes only about 10% of the constant predictor's KL error, a teacher barely better than a constant.
  Because it is fitted to the full truth, in a misspecified world the weak model may capture part of
  :math:`G` and, at large :math:`\varepsilon`, beat the strong ceiling (as a real weak model could);
* ground truth, with :math:`A^\star` a ``k x strong_dim`` column-stochastic matrix whose columns are
  :math:`\mathrm{Dirichlet}(\alpha\mathbf 1_k)`, :math:`\alpha` = ``truth_concentration``,

  .. math:: F^\star(x) = (1-\varepsilon)\,A^\star h_s(x) + \varepsilon\, G(x),

  :math:`\varepsilon` = ``misspecification``. :math:`G(x) = \mathrm{softmax}(\tau\cdot
  \mathrm{standardise}(v(x) P_G))` comes from an *independent* random MLP :math:`v`, so it does not factor
  through :math:`h_s`: for :math:`\varepsilon > 0` the truth leaves the mixture class
  :math:`\{A h_s\}` (checked in the tests by a positive least-squares residual, which lower-bounds the
  distance to the mixture class since :math:`\{A h_s\}` lies in the linear span of :math:`h_s`).
  At the defaults the truth is soft (mean :math:`\max_y F^\star_y(x) \approx 0.6`, since a row of
  :math:`h_s` spreads over ~20 features); larger ``temperature`` and smaller ``truth_concentration``
  give sharper tasks (:math:`\tau = 8, \alpha = 0.1`: about 0.8).

Every component has its own random stream (:func:`rng_for` with the world's seed and the component's name),
so changing, say, ``misspecification`` or ``weak_dim`` leaves the strong representation and :math:`A^\star`
unchanged (the weak representation, being fitted to :math:`F^\star`, follows the truth); and every split
has its own stream of inputs, so sampling one split never changes another.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from .validation import check_distributions

__all__ = [
    "WorldConfig",
    "World",
    "Sample",
    "make_world",
    "corrupt_truth",
    "flip_labels",
    "confident_wrong_labels",
    "uncertain_labels",
    "temper",
    "floor_probs",
    "NOISE_KINDS",
    "CONFIDENT_WRONG",
    "rng_for",
    "SPLITS",
]

#: The three splits of the flow in docs/design.md: A (weak teacher trained on truth), B (transfer: students
#: trained on teacher labels, in-sample theorem checks), C (held out).
SPLITS = ("A", "B", "C", "V")  # V: a validation split for early stopping and learning-rate selection

#: Size of the fixed reference batch that sets the standardisation of every logit; large enough that the
#: statistics are stable, small enough that ``make_world`` stays in the millisecond range.
_REFERENCE_BATCH = 4096

# ----------------------------------------------------------------------------------------------------------
# Random streams
# ----------------------------------------------------------------------------------------------------------


def _stable_key(key) -> int:
    # Python's hash() of a str changes between processes (PYTHONHASHSEED); a BLAKE2b digest does not.
    # 64 bits make collisions between different run ids negligible (crc32 collides at ~1% for 10^4 keys).
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rng_for(study_seed: int, *keys) -> np.random.Generator:
    r"""A reproducible, independent random stream for ``(study_seed, *keys)``.

    Returns ``np.random.default_rng(np.random.SeedSequence([study_seed, *map(stable_hash, keys)]))``, where
    ``stable_hash`` is a 64-bit BLAKE2b digest of ``str(key)`` (identical across processes and machines,
    unlike Python's ``hash``). Keys are compared by their ``str``: ``rng_for(0, 3)`` and ``rng_for(0, "3")``
    are the same stream.
    """
    if isinstance(study_seed, bool) or not isinstance(study_seed, numbers.Integral) or study_seed < 0:
        raise ValueError(f"study_seed: expected a non-negative integer, got {study_seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(study_seed), *(_stable_key(k) for k in keys)]))


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


def _require_int(name: str, value, lowest: int, highest: int | None = None) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and value >= lowest and (highest is None or value <= highest)
    if not ok:
        allowed = f">= {lowest}" if highest is None else f"in [{lowest}, {highest}]"
        raise ValueError(f"{name}: expected an integer {allowed}, got {value!r}")


def _require_real(name: str, value, *, low: float, high: float = math.inf, low_open: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        allowed = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{name}: expected a finite number in {allowed}, got {value!r}")


@dataclass(frozen=True)
class WorldConfig:
    r"""Shape of a synthetic world (see the module docstring for how each field enters).

    ``realizable`` and ``misspecification`` must agree: a realizable world has :math:`\varepsilon = 0`
    (:math:`F^\star = A^\star h_s`), a non-realizable one :math:`\varepsilon \in (0, 1]`. Contradictory
    values are an error rather than a silent choice of one of them.
    """

    k: int = 2  # classes
    input_dim: int = 8
    strong_dim: int = 64  # m_s, features of the strong representation
    weak_dim: int = 8  # m_w, features of the weak representation
    strong_depth: int = 3  # Linear+ReLU blocks of the frozen MLP
    weak_depth: int = 1  # the weak representation reads the MLP after this many blocks (<= strong_depth)
    width: int = 32
    temperature: float = 2.0  # standard deviation of every feature logit; larger = sharper features
    realizable: bool = True  # F* = A* h_s
    misspecification: float = 0.0  # eps: F* = (1 - eps) A* h_s + eps G(x)
    truth_concentration: float = 0.5  # Dirichlet concentration of the columns of A*

    def __post_init__(self):
        _require_int("k", self.k, 2)
        _require_int("input_dim", self.input_dim, 1)
        _require_int("strong_dim", self.strong_dim, 1)
        _require_int("weak_dim", self.weak_dim, 1)
        _require_int("width", self.width, 1)
        _require_int("strong_depth", self.strong_depth, 0)
        # The weak representation is an earlier layer of the same network, so it cannot be deeper.
        _require_int("weak_depth", self.weak_depth, 0, self.strong_depth)
        _require_real("temperature", self.temperature, low=0.0, low_open=True)
        _require_real("misspecification", self.misspecification, low=0.0, high=1.0, low_open=False)
        _require_real("truth_concentration", self.truth_concentration, low=0.0, low_open=True)
        if not isinstance(self.realizable, (bool, np.bool_)):
            raise ValueError(f"realizable: expected True or False, got {self.realizable!r}")
        if self.realizable and self.misspecification != 0:
            raise ValueError(f"misspecification: must be 0 when realizable=True (got {self.misspecification!r}); "
                             "set realizable=False for a misspecified world")
        if not self.realizable and self.misspecification == 0:
            raise ValueError("misspecification: must be in (0, 1] when realizable=False (got 0); "
                             "set realizable=True for a realizable world")

    def as_dict(self) -> dict:
        """Plain field -> value mapping (for result stores and TOML round trips)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------------------------------------
# Frozen random networks
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MLP:
    """Linear+ReLU blocks ``u_{l+1} = relu(u_l W_l + b_l)``; ``hidden(x, depth)`` returns ``u_depth``."""

    weights: tuple
    biases: tuple

    @staticmethod
    def random(rng: np.random.Generator, input_dim: int, width: int, depth: int) -> "_MLP":
        weights, biases = [], []
        fan_in = input_dim
        for _ in range(depth):
            # He initialisation keeps the scale of ReLU activations roughly constant with depth.
            weights.append(rng.standard_normal((fan_in, width)) * math.sqrt(2.0 / fan_in))
            # Non-zero biases break the positive homogeneity of a bias-free ReLU net (h(cx) = c h(x)), so the
            # representation is a genuinely nonlinear function of x, not just of its direction.
            biases.append(0.5 * rng.standard_normal(width))
            fan_in = width
        return _MLP(tuple(weights), tuple(biases))

    def layers(self, x: np.ndarray, depth: int) -> list[np.ndarray]:
        """``[u_0 = x, u_1, ..., u_depth]``: one forward pass serves both representations."""
        us = [x]
        for W, b in zip(self.weights[:depth], self.biases[:depth]):
            us.append(np.maximum(us[-1] @ W + b, 0.0))
        return us

    def hidden(self, x: np.ndarray, depth: int) -> np.ndarray:
        return self.layers(x, depth)[-1]


@dataclass(frozen=True)
class _FeatureMap:
    r""":math:`u \mapsto \mathrm{softmax}(\tau\,(uP - \mu)/\sigma)` with :math:`\mu, \sigma` fixed."""

    projection: np.ndarray  # (dim u, out)
    mean: np.ndarray  # (out,)
    scale: np.ndarray  # (out,)
    temperature: float

    @staticmethod
    def random(rng: np.random.Generator, reference_hidden: np.ndarray, out_dim: int,
               temperature: float) -> "_FeatureMap":
        hidden_dim = reference_hidden.shape[1]
        projection = rng.standard_normal((hidden_dim, out_dim)) / math.sqrt(hidden_dim)
        logits = reference_hidden @ projection
        scale = logits.std(axis=0)
        # A logit that is constant on the reference batch (all ReLUs it reads are dead there) carries no
        # information; leave it unscaled instead of dividing by ~0.
        scale = np.where(scale > 1e-12, scale, 1.0)
        return _FeatureMap(projection, logits.mean(axis=0), scale, float(temperature))

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        z = self.temperature * ((hidden @ self.projection - self.mean) / self.scale)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class _TaskFittedSoftmax:
    r"""The weak model's top layer, :math:`u \mapsto \mathrm{softmax}(uW + b)`, fitted to the task.

    With read-out :math:`\hat s = [u, 1]R` and prototypes :math:`c_j`, the soft assignment
    :math:`\mathrm{softmax}_j(-\tau\|\hat s - c_j\|^2/2v)` equals
    :math:`\mathrm{softmax}_j(\tau(\langle \hat s, c_j\rangle - \|c_j\|^2/2)/v)` (the :math:`\|\hat s\|^2` term
    is the same for every :math:`j`), an affine map of :math:`u`; ``weights`` and ``bias`` store it.
    """

    weights: np.ndarray  # (dim u, m_w)
    bias: np.ndarray  # (m_w,)

    #: Floor on the truth before its log is regressed on: a class the truth (almost) never uses would
    #: otherwise give targets near -700 that dominate the least-squares fit.
    LOG_FLOOR = 1e-12

    @staticmethod
    def fit(rng: np.random.Generator, reference_hidden: np.ndarray, reference_truth: np.ndarray,
            out_dim: int, temperature: float) -> "_TaskFittedSoftmax":
        log_truth = np.log(np.maximum(reference_truth, _TaskFittedSoftmax.LOG_FLOOR))
        centred_log_truth = log_truth - log_truth.mean(axis=1, keepdims=True)
        design = np.hstack([reference_hidden, np.ones((reference_hidden.shape[0], 1))])
        # Least squares through the (dim u + 1)-square normal equations: the tall SVD-based lstsq costs tens
        # of ms on 4096 rows; a minimum-norm solve of the small system handles dead (all-zero) ReLU units.
        readout = np.linalg.lstsq(design.T @ design, design.T @ centred_log_truth, rcond=None)[0]  # (dim u+1, k)
        scores = design @ readout
        spread = float(((scores - scores.mean(axis=0)) ** 2).sum(axis=1).mean())
        spread = spread if spread > 1e-12 else 1.0  # a read-out that is constant carries no signal anyway
        prototypes = _kmeans_plus_plus(rng, scores, out_dim)  # (m_w, k)
        coefficients = readout @ prototypes.T * (temperature / spread)  # (dim u + 1, m_w)
        bias = coefficients[-1] - temperature * (prototypes**2).sum(axis=1) / (2 * spread)
        return _TaskFittedSoftmax(coefficients[:-1], bias)

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        z = hidden @ self.weights + self.bias
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def _kmeans_plus_plus(rng: np.random.Generator, points: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows of ``points`` chosen by k-means++ seeding (Arthur & Vassilvitskii 2007): each next one
    with probability proportional to its squared distance to the nearest one already chosen, so the
    prototypes spread over the read-outs instead of clumping where they are dense."""
    chosen = [int(rng.integers(points.shape[0]))]
    nearest = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(count - 1):
        total = nearest.sum()
        if total > 0:
            index = int(rng.choice(points.shape[0], p=nearest / total))
        else:  # every point already coincides with a prototype (more prototypes than distinct read-outs)
            index = int(rng.integers(points.shape[0]))
        chosen.append(index)
        nearest = np.minimum(nearest, ((points - points[index]) ** 2).sum(axis=1))
    return points[chosen]


# ----------------------------------------------------------------------------------------------------------
# Worlds
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """``n`` draws from a world: inputs and the three maps evaluated on them (rows of the last three lie in
    the simplex)."""

    x: np.ndarray  # (n, input_dim)
    strong_features: np.ndarray  # (n, strong_dim): h_s(x)
    weak_features: np.ndarray  # (n, weak_dim): h_w(x)
    truth: np.ndarray  # (n, k): F*(x)

    def __len__(self) -> int:
        return self.x.shape[0]


class World:
    r"""A frozen synthetic world; build it with :func:`make_world`.

    ``strong_features(x)``, ``weak_features(x)`` and ``truth(x)`` evaluate :math:`h_s`, :math:`h_w` and
    :math:`F^\star` at any inputs; :meth:`sample` draws inputs from a split's own stream.
    """

    def __init__(self, config: WorldConfig, seed: int):
        self.config = config
        self.seed = seed
        c = config
        stream = lambda name: rng_for(seed, "synthetic", name)  # noqa: E731 - one stream per component

        self._strong_net = _MLP.random(stream("strong_net"), c.input_dim, c.width, c.strong_depth)
        reference_x = stream("reference_batch").standard_normal((_REFERENCE_BATCH, c.input_dim))
        reference_layers = self._strong_net.layers(reference_x, c.strong_depth)
        self._strong_map = _FeatureMap.random(stream("strong_projection"), reference_layers[c.strong_depth],
                                              c.strong_dim, c.temperature)
        self._truth_head = stream("truth_head").dirichlet(np.full(c.k, c.truth_concentration),
                                                          size=c.strong_dim).T  # (k, m_s)
        # numpy normalises each Dirichlet draw, but renormalise so the columns sum to 1 in this exact layout.
        self._truth_head /= self._truth_head.sum(axis=0, keepdims=True)
        # The misspecified part is built for every world (cheap) so that the realizable part of a world does
        # not depend on eps, and eps can be swept on one world.
        misspecified_depth = max(c.strong_depth, 1)
        self._misspecified_net = _MLP.random(stream("misspecified_net"), c.input_dim, c.width,
                                             misspecified_depth)
        self._misspecified_map = _FeatureMap.random(stream("misspecified_projection"),
                                                    self._misspecified_net.hidden(reference_x, misspecified_depth),
                                                    c.k, c.temperature)
        # Last: the weak model's top layer is fitted to the full truth (misspecified part included).
        reference_truth = self.truth(reference_x, self._strong_map(reference_layers[c.strong_depth]))
        self._weak_map = _TaskFittedSoftmax.fit(stream("weak_prototypes"), reference_layers[c.weak_depth],
                                                reference_truth, c.weak_dim, c.temperature)

    def __repr__(self) -> str:
        return f"World({self.config!r}, seed={self.seed})"

    # -- the maps ------------------------------------------------------------------------------------------

    def strong_features(self, x: np.ndarray) -> np.ndarray:
        r""":math:`h_s(x) \in \Delta^{m_s}` per row of ``x``."""
        return self._strong_map(self._strong_net.hidden(x, self.config.strong_depth))

    def weak_features(self, x: np.ndarray) -> np.ndarray:
        r""":math:`h_w(x) \in \Delta^{m_w}`: the same network cut after ``weak_depth`` blocks, with its
        task-fitted softmax layer on top."""
        return self._weak_map(self._strong_net.hidden(x, self.config.weak_depth))

    def misspecified_part(self, x: np.ndarray) -> np.ndarray:
        r""":math:`G(x) \in \Delta^k` from an independent network (outside the mixture class of :math:`h_s`)."""
        return self._misspecified_map(self._misspecified_net.hidden(x, len(self._misspecified_net.weights)))

    def truth_head(self) -> np.ndarray:
        r"""The column-stochastic :math:`A^\star` (``k x strong_dim``) of the realizable part (a copy)."""
        return self._truth_head.copy()

    def truth(self, x: np.ndarray, strong_features: np.ndarray | None = None) -> np.ndarray:
        r""":math:`F^\star(x) = (1-\varepsilon) A^\star h_s(x) + \varepsilon G(x)`; for :math:`\varepsilon = 0`
        exactly :math:`A^\star h_s(x)` (no :math:`G` term is added, not even a zero one)."""
        if strong_features is None:
            strong_features = self.strong_features(x)
        realizable_part = strong_features @ self._truth_head.T
        eps = float(self.config.misspecification)
        if eps == 0.0:
            return realizable_part
        return (1.0 - eps) * realizable_part + eps * self.misspecified_part(x)

    # -- sampling ------------------------------------------------------------------------------------------

    def sample(self, n: int, split: str) -> Sample:
        """``n`` i.i.d. draws from split ``split`` (one of ``"A"``, ``"B"``, ``"C"``).

        Each split reads its own stream ``rng_for(seed, "synthetic", "sample", split)`` from the start, so the
        result is a function of ``(config, seed, n, split)`` only, the inputs of ``sample(n, s)`` are exactly
        the first ``n`` rows of those of ``sample(n', s)`` for ``n' > n`` (the maps agree to rounding), and
        splits never influence one another.
        """
        _require_int("n", n, 1)
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        c = self.config
        x = rng_for(self.seed, "synthetic", "sample", split).standard_normal((n, c.input_dim))
        layers = self._strong_net.layers(x, c.strong_depth)
        strong_features = self._strong_map(layers[c.strong_depth])
        return Sample(x=x, strong_features=strong_features, weak_features=self._weak_map(layers[c.weak_depth]),
                      truth=self.truth(x, strong_features))


def make_world(config: WorldConfig, seed: int) -> World:
    """The world defined by ``config`` and ``seed``: the same pair gives bit-identical samples (on the same
    machine and library versions; the random draws themselves are identical everywhere)."""
    if not isinstance(config, WorldConfig):
        raise ValueError(f"config: expected a WorldConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return World(config, int(seed))


# ----------------------------------------------------------------------------------------------------------
# Weak teachers and label noise
# ----------------------------------------------------------------------------------------------------------


def _check_probs_matrix(name: str, probs) -> np.ndarray:
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2:
        raise ValueError(f"{name}: expected shape (n, k), got {probs.shape}; "
                         "for Bernoulli parameters p pass divergences.as_categorical(p)")
    check_distributions(name, probs)
    # Keep the caller's values (not the renormalised copy), so that unflipped rows come back bit-identical.
    return probs


def corrupt_truth(truth: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    r"""A weak teacher made by corrupting :math:`F^\star` in logit space, row-wise:

    .. math:: F_w(x_i) = \mathrm{softmax}\big(\log F^\star(x_i) + s\,Z_i\big),\qquad Z_i \sim \mathcal N(0, I_k),

    :math:`s` = ``scale`` :math:`\ge 0`. Equivalently :math:`F_{w,y} \propto F^\star_y e^{s Z_y}`: a
    multiplicative perturbation, so a class with :math:`F^\star_y = 0` keeps probability exactly 0
    (:math:`\log 0 = -\infty`, handled without NaN) and a one-hot row stays one-hot. ``scale = 0`` returns
    the truth (to rounding). One ``(n, k)`` normal draw is consumed whatever the zero pattern.
    """
    truth = _check_probs_matrix("truth", truth)
    _require_real("scale", scale, low=0.0, low_open=False)
    noise = rng.standard_normal(truth.shape)
    with np.errstate(divide="ignore"):
        logits = np.log(truth)
    # np.where keeps -inf + noise at -inf explicitly (it already is, but 0 * inf would not be).
    logits = np.where(truth > 0, logits + scale * noise, -np.inf)
    # Every row has a positive entry, so the row maximum is finite and the shift is safe.
    logits -= logits.max(axis=1, keepdims=True)
    teacher_probs = np.exp(logits)
    return teacher_probs / teacher_probs.sum(axis=1, keepdims=True)


def flip_labels(probs: np.ndarray, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    r"""Label noise: permute the classes of a fraction ``rate`` of the rows.

    Exactly ``round(rate * n)`` rows (Python's ``round``, half to even), chosen uniformly without
    replacement, are flipped. For ``k = 2`` a flip swaps the two classes, :math:`p \mapsto 1 - p` (the
    paper's noise model, Yao et al. 2025, Sec. 5); for ``k > 2`` each flipped row's classes are permuted by
    a uniformly random permutation other than the identity (drawn by rejection). Returns
    ``(noisy_probs, flipped_mask)`` with ``flipped_mask`` a boolean ``(n,)`` array.
    """
    probs = _check_probs_matrix("probs", probs)
    _require_real("rate", rate, low=0.0, high=1.0, low_open=False)
    n, k = probs.shape
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, size=int(round(rate * n)), replace=False)] = True
    rows = np.flatnonzero(flipped)
    noisy_probs = probs.copy()
    if k == 2:
        noisy_probs[rows] = probs[rows, ::-1]
        return noisy_probs, flipped
    identity = np.arange(k)
    permutations = np.argsort(rng.random((rows.size, k)), axis=1)  # uniform over all k! permutations
    redraw = (permutations == identity).all(axis=1)
    while redraw.any():  # rejection: each round keeps a row with probability 1 - 1/k! >= 5/6
        permutations[redraw] = np.argsort(rng.random((int(redraw.sum()), k)), axis=1)
        redraw = (permutations == identity).all(axis=1)
    noisy_probs[rows] = np.take_along_axis(probs[rows], permutations, axis=1)
    return noisy_probs, flipped


#: Teacher noise kinds (``RunSpec.noise_kind``) -> the function that corrupts a fraction of the rows.
NOISE_KINDS = ("flip", "confident_wrong", "uncertain")

#: Confidence that ``confident_wrong`` puts on the wrong class.
CONFIDENT_WRONG = 0.95


def _noisy_rows(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``round(rate * n)`` rows chosen uniformly without replacement (as in :func:`flip_labels`)."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=int(round(rate * n)), replace=False)] = True
    return mask


def confident_wrong_labels(probs: np.ndarray, rate: float, rng: np.random.Generator,
                           confidence: float = CONFIDENT_WRONG) -> tuple[np.ndarray, np.ndarray]:
    r"""Confidently wrong teacher rows: a fraction ``rate`` of the rows (exactly ``round(rate * n)``) is
    replaced by a distribution that puts ``confidence`` on one class other than the row's argmax (uniformly
    among the other :math:`k-1`) and spreads the rest evenly, :math:`(1-c)/(k-1)` each. Returns
    ``(noisy_probs, noisy_mask)``."""
    probs = _check_probs_matrix("probs", probs)
    _require_real("rate", rate, low=0.0, high=1.0, low_open=False)
    _require_real("confidence", confidence, low=0.0, high=1.0, low_open=False)
    n, k = probs.shape
    mask = _noisy_rows(n, rate, rng)
    rows = np.flatnonzero(mask)
    top = probs[rows].argmax(axis=1)
    wrong = (top + 1 + rng.integers(0, k - 1, size=rows.size)) % k  # uniform over the k - 1 other classes
    noisy_probs = probs.copy()
    noisy_probs[rows] = (1 - confidence) / (k - 1)
    noisy_probs[rows, wrong] = confidence
    return noisy_probs, mask


def uncertain_labels(probs: np.ndarray, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uncertain teacher rows: a fraction ``rate`` of the rows (exactly ``round(rate * n)``) becomes the
    uniform distribution :math:`1/k`. Returns ``(noisy_probs, noisy_mask)``."""
    probs = _check_probs_matrix("probs", probs)
    _require_real("rate", rate, low=0.0, high=1.0, low_open=False)
    mask = _noisy_rows(probs.shape[0], rate, rng)
    noisy_probs = probs.copy()
    noisy_probs[mask] = 1.0 / probs.shape[1]
    return noisy_probs, mask


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    r"""Teacher temperature: :math:`q_y \propto q_y^{1/T}`, i.e. the weak model's logits divided by :math:`T`
    (:math:`T > 1` flattens: an under-confident teacher; :math:`T < 1` sharpens: an over-confident one).
    Zeros stay zeros; ``temperature = 1`` returns ``probs`` itself."""
    _require_real("temperature", temperature, low=0.0, low_open=True)
    if temperature == 1:
        return probs
    probs = np.asarray(probs, dtype=float)
    with np.errstate(divide="ignore"):
        logits = np.where(probs > 0, np.log(probs), -np.inf) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=-1, keepdims=True)


def floor_probs(probs: np.ndarray, floor: float) -> np.ndarray:
    r"""A probability floor: :math:`q'_y = \max(q_y, \gamma) / \sum_z \max(q_z, \gamma)`, so every class keeps
    at least about :math:`\gamma` (exactly :math:`\ge \gamma/(1 + k\gamma)`); ``floor = 0`` returns ``probs``
    itself. Needs :math:`0 \le \gamma < 1/k` (a larger floor would make every row uniform)."""
    probs = np.asarray(probs, dtype=float)
    k = probs.shape[-1]
    _require_real("teacher_floor", floor, low=0.0, high=1.0 / k, low_open=False)
    if floor == 0:
        return probs
    out = np.maximum(probs, floor)
    return out / out.sum(axis=-1, keepdims=True)
