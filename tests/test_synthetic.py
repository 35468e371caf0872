"""Claims about the synthetic worlds (w2s_theory.synthetic): simplex-valued maps, (non-)realizability,
reproducibility and split independence, weak teachers by corruption, and label noise."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from w2s_theory.synthetic import (
    WorldConfig,
    corrupt_truth,
    flip_labels,
    make_world,
    rng_for,
)

CONFIGS = {
    "default": WorldConfig(),
    "multiclass": WorldConfig(k=4, strong_dim=16, weak_dim=5, truth_concentration=0.1),
    "misspecified": WorldConfig(realizable=False, misspecification=0.5),
    "shallowest": WorldConfig(strong_depth=0, weak_depth=0, input_dim=3, temperature=8.0),
}

SIMPLEX_ATOL = 1e-12


def assert_rows_in_simplex(name, rows):
    assert np.all(np.isfinite(rows)), f"{name} has NaN/inf"
    assert np.all(rows >= 0), f"{name} has negative entries"
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=0, atol=SIMPLEX_ATOL, err_msg=name)


def least_squares_residual(features, targets):
    """Mean squared residual of the best *linear* map ``features -> targets``. The mixture class
    {A h : A column-stochastic} lies in this linear span, so a positive residual here proves that the best
    mixture head cannot reproduce ``targets`` either."""
    coefficients = np.linalg.lstsq(features, targets, rcond=None)[0]
    return float(((features @ coefficients - targets) ** 2).sum(axis=1).mean())


# ------------------------------------------------------------------------------------------------------
# Worlds
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_features_and_truth_rows_lie_in_the_simplex_with_the_configured_shapes(name):
    config = CONFIGS[name]
    sample = make_world(config, seed=3).sample(300, "B")
    assert sample.x.shape == (300, config.input_dim)
    assert sample.strong_features.shape == (300, config.strong_dim)
    assert sample.weak_features.shape == (300, config.weak_dim)
    assert sample.truth.shape == (300, config.k)
    assert_rows_in_simplex("strong_features", sample.strong_features)
    assert_rows_in_simplex("weak_features", sample.weak_features)
    assert_rows_in_simplex("truth", sample.truth)
    for array in (sample.x, sample.strong_features, sample.weak_features, sample.truth):
        assert array.dtype == np.float64


@pytest.mark.parametrize("name", ["default", "multiclass"])
def test_truth_head_is_column_stochastic(name):
    config = CONFIGS[name]
    truth_head = make_world(config, seed=0).truth_head()
    assert truth_head.shape == (config.k, config.strong_dim)
    assert np.all(truth_head >= 0)
    np.testing.assert_allclose(truth_head.sum(axis=0), 1.0, rtol=0, atol=SIMPLEX_ATOL)


@pytest.mark.parametrize("name", ["default", "multiclass", "shallowest"])
def test_realizable_truth_is_the_truth_head_applied_to_the_strong_features(name):
    world = make_world(CONFIGS[name], seed=5)
    sample = world.sample(400, "A")
    np.testing.assert_allclose(sample.truth, sample.strong_features @ world.truth_head().T, rtol=0, atol=1e-12)
    assert least_squares_residual(sample.strong_features, sample.truth) < 1e-20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_misspecified_truth_leaves_the_mixture_class_of_the_strong_representation(seed):
    # n = 600 > strong_dim = 64, so a generic target is not in the span of the strong features.
    base = make_world(WorldConfig(), seed).sample(600, "B")
    residuals = []
    for eps in (0.1, 0.5, 1.0):
        world = make_world(WorldConfig(realizable=False, misspecification=eps), seed)
        sample = world.sample(600, "B")
        assert not np.allclose(sample.truth, sample.strong_features @ world.truth_head().T, rtol=0, atol=1e-6)
        residuals.append(least_squares_residual(sample.strong_features, sample.truth))
        # The realizable part is the same world's: only the truth moved.
        np.testing.assert_array_equal(sample.strong_features, base.strong_features)
    truth_variance = float(((base.truth - base.truth.mean(axis=0)) ** 2).sum(axis=1).mean())
    # F* - proj(F*) = eps * (G - proj G): the distance to the class grows with eps and is far from rounding.
    assert residuals[0] > 1e-6 * truth_variance
    assert residuals[0] < residuals[1] < residuals[2]


@pytest.mark.parametrize("name", ["default", "multiclass"])
def test_weak_representation_is_weaker_than_the_strong_one_yet_informative_about_truth(name):
    # Least squares on the weak features' span (which contains the constants, as rows sum to 1) versus the
    # constant predictor and the strong features, on held-out split C after fitting on split A.
    config = CONFIGS[name]
    for seed in range(4):
        world = make_world(config, seed)
        train, test = world.sample(1000, "A"), world.sample(1000, "C")

        def held_out_error(features_of):
            coefficients = np.linalg.lstsq(features_of(train), train.truth, rcond=None)[0]
            return float(((features_of(test) @ coefficients - test.truth) ** 2).sum(axis=1).mean())

        constant_error = float(((test.truth - train.truth.mean(axis=0)) ** 2).sum(axis=1).mean())
        weak_error = held_out_error(lambda s: s.weak_features)
        strong_error = held_out_error(lambda s: s.strong_features)
        assert strong_error < 1e-20  # realizable: the strong ceiling is exact
        assert weak_error > 1e-3 * constant_error, f"seed {seed}: weak representation as good as the strong one"
        assert weak_error < 0.9 * constant_error, f"seed {seed}: weak representation carries no signal"


def test_deeper_weak_model_is_less_weak():
    # The weak model's depth is a dial: averaged over worlds, reading a later layer leaves less error.
    def mean_weak_error(weak_depth):
        errors = []
        for seed in range(6):
            sample = make_world(WorldConfig(weak_depth=weak_depth), seed).sample(1000, "A")
            variance = ((sample.truth - sample.truth.mean(axis=0)) ** 2).sum(axis=1).mean()
            errors.append(least_squares_residual(sample.weak_features, sample.truth) / variance)
        return np.mean(errors)

    assert mean_weak_error(3) < mean_weak_error(0)


def test_same_config_and_seed_give_bit_identical_samples():
    config = CONFIGS["misspecified"]
    first, second = make_world(config, 11).sample(200, "A"), make_world(config, 11).sample(200, "A")
    for field in ("x", "strong_features", "weak_features", "truth"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    np.testing.assert_array_equal(make_world(config, 11).truth_head(), make_world(config, 11).truth_head())


def test_different_seeds_give_different_worlds():
    first, second = make_world(WorldConfig(), 0), make_world(WorldConfig(), 1)
    assert not np.array_equal(first.truth_head(), second.truth_head())
    a, b = first.sample(50, "A"), second.sample(50, "A")
    for field in ("x", "strong_features", "weak_features", "truth"):
        assert not np.allclose(getattr(a, field), getattr(b, field)), field
    # Different worlds also differ as maps, not only through their inputs.
    assert not np.allclose(first.strong_features(a.x), second.strong_features(a.x))


def test_splits_are_independent_streams():
    config = WorldConfig()
    untouched = make_world(config, 4).sample(100, "B")
    world = make_world(config, 4)
    world.sample(37, "A")
    world.sample(5000, "C")
    after_other_splits = world.sample(100, "B")
    np.testing.assert_array_equal(untouched.x, after_other_splits.x)
    np.testing.assert_array_equal(untouched.truth, after_other_splits.truth)
    xs = {split: world.sample(100, split).x for split in "ABC"}
    assert not np.allclose(xs["A"], xs["B"]) and not np.allclose(xs["B"], xs["C"])


def test_more_samples_extend_a_split_without_changing_its_first_rows():
    world = make_world(WorldConfig(), 2)
    small, large = world.sample(10, "A"), world.sample(1000, "A")
    np.testing.assert_array_equal(small.x, large.x[:10])
    np.testing.assert_allclose(small.truth, large.truth[:10], rtol=0, atol=1e-15)


def test_features_do_not_depend_on_the_batch_they_are_computed_in():
    # Standardisation uses statistics fixed at world creation, never the batch's own.
    world = make_world(WorldConfig(), 8)
    sample = world.sample(300, "C")
    np.testing.assert_allclose(world.strong_features(sample.x[:1]), sample.strong_features[:1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(world.weak_features(sample.x[7:9]), sample.weak_features[7:9], rtol=0, atol=1e-15)


def test_changing_the_weak_model_or_eps_leaves_the_strong_representation_and_truth_head_alone():
    x = make_world(WorldConfig(), 6).sample(100, "A").x
    reference = make_world(WorldConfig(), 6)
    for variant in (WorldConfig(weak_dim=3, weak_depth=2), WorldConfig(realizable=False, misspecification=0.2)):
        world = make_world(variant, 6)
        np.testing.assert_array_equal(world.strong_features(x), reference.strong_features(x))
        np.testing.assert_array_equal(world.truth_head(), reference.truth_head())


def test_sample_rejects_unknown_splits_and_empty_requests():
    world = make_world(WorldConfig(), 0)
    with pytest.raises(ValueError, match="split"):
        world.sample(10, "D")
    with pytest.raises(ValueError, match="n:"):
        world.sample(0, "A")


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_make_world_rejects_seeds_that_are_not_non_negative_integers(seed):
    with pytest.raises(ValueError, match="seed"):
        make_world(WorldConfig(), seed)


# ------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("k", 1), ("k", 0), ("k", 2.0), ("k", True),
        ("input_dim", 0), ("strong_dim", 0), ("weak_dim", 0), ("width", 0), ("width", -3),
        ("strong_depth", -1), ("weak_depth", -1), ("weak_depth", 4),  # weak deeper than strong (3)
        ("temperature", 0.0), ("temperature", -1.0), ("temperature", math.inf), ("temperature", math.nan),
        ("truth_concentration", 0.0), ("truth_concentration", -0.5),
        ("misspecification", -0.1), ("misspecification", 1.5), ("misspecification", math.nan),
        ("realizable", "yes"),
    ],
)
def test_world_config_rejects_bad_values_naming_the_field(field, value):
    overrides = {field: value}
    if field == "misspecification":
        overrides["realizable"] = False  # so that only the range can be at fault
    with pytest.raises(ValueError, match=f"^{field}:"):
        WorldConfig(**overrides)


def test_world_config_rejects_realizable_with_misspecification_and_vice_versa():
    with pytest.raises(ValueError, match="^misspecification:.*realizable"):
        WorldConfig(realizable=True, misspecification=0.2)
    with pytest.raises(ValueError, match="^misspecification:.*realizable"):
        WorldConfig(realizable=False, misspecification=0.0)


def test_world_config_accepts_the_boundaries_of_its_ranges():
    WorldConfig(k=2, input_dim=1, strong_dim=1, weak_dim=1, width=1, strong_depth=0, weak_depth=0)
    WorldConfig(realizable=False, misspecification=1.0)
    WorldConfig(strong_depth=2, weak_depth=2)


# ------------------------------------------------------------------------------------------------------
# Random streams
# ------------------------------------------------------------------------------------------------------


def test_rng_for_is_reproducible_and_keyed():
    draw = lambda *args: rng_for(*args).random(4)  # noqa: E731
    np.testing.assert_array_equal(draw(7, "sweep", 3), draw(7, "sweep", 3))
    assert not np.array_equal(draw(7, "sweep", 3), draw(7, "sweep", 4))
    assert not np.array_equal(draw(7, "sweep", 3), draw(8, "sweep", 3))
    assert not np.array_equal(draw(7, "a", "b"), draw(7, "b", "a"))


def test_rng_for_does_not_depend_on_the_python_process():
    # A golden value: Python's hash() of a str is salted per process, so a stream derived from it would
    # change from run to run. This pins the stream for (0, "run", 1) across processes and versions.
    assert rng_for(0, "run", 1).integers(2**32) == 2971195689


@pytest.mark.parametrize("study_seed", [-1, 2.0, None])
def test_rng_for_rejects_bad_study_seeds(study_seed):
    with pytest.raises(ValueError, match="study_seed"):
        rng_for(study_seed, "x")


# ------------------------------------------------------------------------------------------------------
# Weak teachers and label noise (property-based)
# ------------------------------------------------------------------------------------------------------


@st.composite
def probability_rows(draw, k=None, max_n=12):
    """(n, k) rows in the simplex that often contain exact 0s and 1s (one-hot rows), n >= 1."""
    k = draw(st.integers(2, 5)) if k is None else k
    n = draw(st.integers(1, max_n))
    weight = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0, allow_subnormal=False))
    weights = np.array(draw(st.lists(st.lists(weight, min_size=k, max_size=k), min_size=n, max_size=n)))
    empty = weights.sum(axis=1) == 0
    weights[empty, draw(st.integers(0, k - 1))] = 1.0  # an all-zero row becomes one-hot
    return weights / weights.sum(axis=1, keepdims=True)


rates = st.one_of(st.just(0.0), st.just(1.0), st.just(0.5), st.floats(0.0, 1.0))
seeds = st.integers(0, 2**32 - 1)


@settings(deadline=None, max_examples=150)
@given(probs=probability_rows(), rate=rates, seed=seeds)
def test_flip_labels_flips_exactly_round_rate_n_rows_by_class_permutations(probs, rate, seed):
    n, k = probs.shape
    noisy, flipped = flip_labels(probs, rate, np.random.default_rng(seed))
    assert flipped.dtype == bool and flipped.shape == (n,)
    assert int(flipped.sum()) == round(rate * n)
    np.testing.assert_array_equal(noisy[~flipped], probs[~flipped])  # untouched rows are bit-identical
    # A flipped row is a permutation of the original one (same multiset of probabilities)...
    np.testing.assert_array_equal(np.sort(noisy[flipped], axis=1), np.sort(probs[flipped], axis=1))
    # ...and not the identity: wherever the entries are distinct the row must change.
    distinct = np.array([len(set(row)) == k for row in probs])
    assert not np.any(np.all(noisy == probs, axis=1) & flipped & distinct)
    assert_rows_in_simplex("noisy probs", noisy)


@settings(deadline=None, max_examples=100)
@given(probs=probability_rows(k=2), rate=rates, seed=seeds)
def test_flip_labels_maps_binary_p_to_one_minus_p(probs, rate, seed):
    noisy, flipped = flip_labels(probs, rate, np.random.default_rng(seed))
    np.testing.assert_array_equal(noisy[flipped], probs[flipped][:, ::-1])
    np.testing.assert_allclose(noisy[flipped, 0], 1 - probs[flipped, 0], rtol=0, atol=1e-15)


def test_flip_labels_at_rate_zero_changes_nothing_and_at_rate_one_flips_every_row():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    noisy, flipped = flip_labels(probs, 0.0, rng)
    np.testing.assert_array_equal(noisy, probs)
    assert not flipped.any()
    noisy, flipped = flip_labels(probs, 1.0, rng)
    assert flipped.all()
    assert np.all(np.any(noisy != probs, axis=1))  # Dirichlet rows have distinct entries


def test_flip_labels_draws_every_non_identity_permutation_uniformly():
    # k = 3: five non-identity permutations, each should get ~1/5 of the flipped rows.
    n = 6000
    probs = np.tile([0.5, 0.3, 0.2], (n, 1))
    noisy, _ = flip_labels(probs, 1.0, np.random.default_rng(1))
    patterns, counts = np.unique(noisy, axis=0, return_counts=True)
    assert len(patterns) == 5 and not any(np.array_equal(p, probs[0]) for p in patterns)
    # Binomial(6000, 1/5): sd ~ 31, so +-150 is ~5 sd.
    assert np.all(np.abs(counts - n / 5) < 150), counts


@pytest.mark.parametrize("rate", [-0.01, 1.01, math.nan, math.inf, "0.5"])
def test_flip_labels_rejects_rates_outside_unit_interval(rate):
    with pytest.raises(ValueError, match="rate"):
        flip_labels(np.full((4, 2), 0.5), rate, np.random.default_rng(0))


def test_flip_labels_rejects_inputs_that_are_not_distributions():
    with pytest.raises(ValueError, match="probs"):
        flip_labels(np.array([[0.7, 0.7]]), 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="probs"):
        flip_labels(np.array([0.2, 0.9]), 0.5, np.random.default_rng(0))  # Bernoulli vector, not (n, k)


@settings(deadline=None, max_examples=150)
@given(truth=probability_rows(), scale=st.one_of(st.just(0.0), st.floats(0.0, 20.0)), seed=seeds)
def test_corrupt_truth_keeps_rows_in_the_simplex_and_zeros_at_zero(truth, scale, seed):
    teacher_probs = corrupt_truth(truth, scale, np.random.default_rng(seed))
    assert teacher_probs.shape == truth.shape
    assert_rows_in_simplex("teacher_probs", teacher_probs)
    # Multiplicative noise: a class with no truth mass gets none; one-hot rows stay exactly one-hot.
    assert np.all(teacher_probs[truth == 0] == 0)
    one_hot = (truth > 0).sum(axis=1) == 1
    np.testing.assert_array_equal(teacher_probs[one_hot], truth[one_hot])


def test_corrupt_truth_with_zero_scale_is_the_truth_and_noise_moves_it():
    truth = make_world(WorldConfig(k=3), 0).sample(200, "A").truth
    np.testing.assert_allclose(corrupt_truth(truth, 0.0, np.random.default_rng(0)), truth, rtol=0, atol=1e-14)
    teacher_probs = corrupt_truth(truth, 1.0, np.random.default_rng(0))
    assert np.abs(teacher_probs - truth).max() > 0.05


@pytest.mark.parametrize("scale", [-1.0, math.nan, math.inf])
def test_corrupt_truth_rejects_bad_scales(scale):
    with pytest.raises(ValueError, match="scale"):
        corrupt_truth(np.full((3, 2), 0.5), scale, np.random.default_rng(0))
