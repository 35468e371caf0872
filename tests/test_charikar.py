"""Charikar et al.'s synthetic setup: Theorem 1 is an equality in the realizable variant, pre-training learns,
and everything is reproducible from the seed."""

import numpy as np
import pytest

from w2s_theory.charikar import CharikarConfig, pretrain_representation, random_mlp, run_charikar, _generator

TINY = CharikarConfig(pretrain_tasks=3, pretrain_samples=64, pretrain_epochs=2, fresh_tasks=6, n_weak=200,
                      n_train=200, n_test=200)


@pytest.fixture(scope="module")
def rows():
    return run_charikar(TINY)


def test_realizable_students_have_gain_equal_to_misfit_in_sample(rows):
    realizable = [r for r in rows if r["variant"] == "realizable"]
    assert len(realizable) == TINY.fresh_tasks
    for r in realizable:
        # Least squares onto a class that contains f* is an orthogonal projection: Pythagoras, exactly.
        assert r["gain_train"] == pytest.approx(r["misfit_train"], rel=1e-8, abs=1e-10)
        assert r["theorem_verdict"] == "holds"
        assert r["best_error_train"] < 1e-12 * (1 + r["weak_error_train"])  # f* is in the strong class


def test_non_realizable_variants_report_how_far_the_truth_is_from_the_class(rows):
    for variant in ("pretrained", "perturbed"):
        eps = [r["best_error_train"] for r in rows if r["variant"] == variant]
        assert min(eps) > 0
        assert {r["theorem_verdict"] for r in rows if r["variant"] == variant} <= {"holds", "violated", "inconclusive"}


def test_pretraining_with_frozen_task_heads_reduces_the_loss():
    config = CharikarConfig(pretrain_tasks=3, pretrain_samples=200, pretrain_epochs=3)
    target = random_mlp(_generator(0, "target"), config.input_dim, config.width, config.target_depth).detached()
    _, history = pretrain_representation(target, config.weak_depth, config, "weak")
    assert len(history) == 3
    assert history[-1] < 0.8 * history[0]


def test_rows_are_reproducible_from_the_seed(rows):
    again = run_charikar(TINY)
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in again]
    for a, b in zip(rows, again):
        assert a["gain"] == b["gain"] and a["misfit_train"] == b["misfit_train"]
    other = run_charikar(CharikarConfig(**{**TINY.as_dict(), "seed": 1}), variants=("realizable",))
    assert other[0]["run_id"] != rows[0]["run_id"]
    assert not np.isclose(other[0]["weak_error"], rows[0]["weak_error"])


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown variant"):
        run_charikar(TINY, variants=("pretrained", "noisy"))
