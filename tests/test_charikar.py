"""Charikar et al.'s setup after the authors' notebook: the draws are the notebook's, the written-out pre-training
is AdamW on nn.Module to rounding, the numbers do not depend on threads or on which networks are trained
together, they match numbers committed once, the cache is safe, and Theorem 1 is an equality when realizable.

Regenerate the committed reference (only when a change is meant to change the numbers; bump
``PRETRAIN_VERSION`` then too): ``python tests/test_charikar.py``.
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from w2s_theory import charikar as ck
from w2s_theory.charikar import (
    AUTHORS_SEED,
    CharikarConfig,
    RepresentationCache,
    adamw_step,
    notebook_draw,
    pretrain,
    pretrained_pair,
    run_charikar,
    summarise,
)

REFERENCE = Path(__file__).parent / "data" / "charikar_reference.json"
#: Float64 throughout; on one machine the numbers are identical, across CPUs whose BLAS kernels round
#: differently they may move by rounding, amplified over the few dozen AdamW steps of TINY: 1e-9 relative.
REFERENCE_RTOL = 1e-9

TINY = CharikarConfig(seeds=(AUTHORS_SEED, 3), pretrain_tasks=3, pretrain_samples=128, pretrain_epochs=2,
                      fresh_tasks=6, n_transfer=200, n_test=200)


@pytest.fixture(scope="module")
def rows():
    return run_charikar(TINY)


class NotebookMLP(nn.Module):
    """The notebook's ``MLP(input_dim, hidden_dim, 1, num_layers)``: Linear+ReLU blocks, then a head."""

    def __init__(self, depth: int):
        super().__init__()
        self.representation = nn.Sequential(*[nn.Sequential(nn.Linear(8 if i == 0 else 16, 16), nn.ReLU())
                                              for i in range(depth)])
        self.finetune = nn.Linear(16, 1)

    def forward(self, x):
        return self.finetune(self.representation(x))


def _notebook_objects(seed: int, config: CharikarConfig):
    """What the notebook creates, in its order, with the global torch and numpy generators."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        target = NotebookMLP(config.target_depth)
        heads = [nn.Linear(16, 1) for _ in range(config.pretrain_tasks)]
        strong, weak = NotebookMLP(config.strong_depth), NotebookMLP(config.weak_depth)
        transfer = [nn.Linear(16, 1) for _ in range(config.fresh_tasks)]
    rng = np.random.RandomState(seed)  # what np.random.seed(seed) sets
    x = [rng.normal(0, 500, (config.pretrain_samples, 8)) for _ in range(config.pretrain_tasks)]
    return target, heads, strong, weak, transfer, x


def _same_representation(module: NotebookMLP, rep) -> bool:
    return all(torch.equal(block[0].weight.T.double(), W) and torch.equal(block[0].bias.double(), b)
               for block, W, b in zip(module.representation, rep.weights, rep.biases))


def test_draws_are_the_notebooks_nn_linear_initialisations_and_numpy_inputs():
    config = CharikarConfig(fresh_tasks=5)
    draw = notebook_draw(AUTHORS_SEED, config)
    target, heads, strong, weak, transfer, x = _notebook_objects(AUTHORS_SEED, config)
    assert _same_representation(target, draw.target)
    assert _same_representation(strong, draw.strong_init) and _same_representation(weak, draw.weak_init)
    assert torch.equal(torch.stack([h.weight[0] for h in heads]).double(), draw.a)
    assert torch.equal(torch.stack([h.bias[0] for h in heads]).double(), draw.c)
    assert torch.equal(torch.stack([h.weight[0] for h in transfer]).double(), draw.transfer_a)
    assert np.array_equal(np.stack(x), draw.x.numpy())
    # The pre-training targets are the target network with each task's head (bias included).
    with torch.no_grad():
        target.finetune = copy.deepcopy(heads[4]).double()
        y = target.double()(draw.x[4])[:, 0]
    torch.testing.assert_close(draw.y[4], y, rtol=1e-13, atol=1e-12)


def _torch_reference(init: NotebookMLP, draw, config: CharikarConfig, steps: int) -> NotebookMLP:
    """The notebook's training loop (nn.Module, autograd, torch.optim.AdamW) in float64, for ``steps`` steps."""
    model = copy.deepcopy(init).double()
    opt = torch.optim.AdamW(model.representation.parameters(), lr=config.learning_rate,
                            weight_decay=config.weight_decay)
    orders = ck._orders(draw.orders_state, config)
    done = 0
    while done < steps:
        epoch = next(orders)
        for t in range(config.pretrain_tasks):
            head = nn.Linear(16, 1).double()
            with torch.no_grad():
                head.weight.copy_(draw.a[t][None])
                head.bias.copy_(draw.c[t][None])
            head.requires_grad_(False)
            model.finetune = head
            x, y = draw.x[t][epoch[t]], draw.y[t][epoch[t]][:, None]
            for start in range(0, len(x), config.batch_size):
                opt.zero_grad()
                nn.MSELoss()(model(x[start:start + config.batch_size]), y[start:start + config.batch_size]).backward()
                opt.step()
                done += 1
                if done == steps:
                    return model
    return model


@pytest.mark.parametrize("depth_name", ["weak", "strong"])
def test_written_out_pretraining_is_torch_adamw_on_nn_module_to_rounding(depth_name):
    # Two epochs of 3 tasks x 63 minibatches (62 of 32 inputs, the last of 16) = 378 AdamW steps.
    config = CharikarConfig(pretrain_tasks=3, pretrain_samples=2000)
    draw = notebook_draw(AUTHORS_SEED, config)
    _, _, strong, weak, _, _ = _notebook_objects(AUTHORS_SEED, config)
    reference = _torch_reference({"weak": weak, "strong": strong}[depth_name], draw, config, steps=2 * 3 * 63)
    init = getattr(draw, f"{depth_name}_init")
    (ours,), _ = pretrain([init], [draw], [ck._orders(draw.orders_state, config)], config, epochs=2)
    for block, W, b in zip(reference.representation, ours.weights, ours.biases):
        torch.testing.assert_close(W, block[0].weight.detach().T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, block[0].bias.detach(), rtol=1e-10, atol=1e-12)
    assert (ours.weights[0] - init.weights[0]).abs().max() > 1e-3  # it trained


def test_adamw_step_is_torch_adamw_to_rounding():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(50, generator=gen, dtype=torch.float64)
    ref = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.01)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 201):
        g = torch.randn(50, generator=gen, dtype=torch.float64)
        ref.grad = g.clone()
        opt.step()
        adamw_step(p, g, m, v, step, 1e-3, 0.01)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-13, atol=1e-15)


def test_networks_trained_together_equal_networks_trained_alone():
    config = CharikarConfig(pretrain_tasks=3, pretrain_samples=100)
    draws = [notebook_draw(s, config) for s in (AUTHORS_SEED, 5, 7)]
    for init in ("strong_init", "weak_init"):
        together, h3 = pretrain([getattr(d, init) for d in draws], draws,
                                [ck._orders(d.orders_state, config) for d in draws], config, epochs=2)
        alone, h1 = pretrain([getattr(draws[1], init)], [draws[1]], [ck._orders(draws[1].orders_state, config)],
                             config, epochs=2)
        for a, b in zip(together[1].weights + together[1].biases, alone[0].weights + alone[0].biases):
            assert torch.equal(a, b)
        assert np.array_equal(h3[:, 1], h1[:, 0])


def test_rows_are_identical_with_one_and_two_threads(rows):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run_charikar(TINY)
        torch.set_num_threads(1)
        one = run_charikar(TINY)
    finally:
        torch.set_num_threads(threads)
    assert one == two == rows


def _reference_numbers() -> dict:
    pairs = pretrained_pair(TINY)
    out = {"config": TINY.as_dict(), "pretrain": {}, "rows": []}
    for seed, (_, strong, weak, history) in pairs.items():
        out["pretrain"][str(seed)] = {"strong_W0": strong.weights[0][:3].flatten().tolist(),
                                      "strong_b7": strong.biases[7].tolist(), "weak_W1": weak.weights[1][0].tolist(),
                                      "history": history.tolist()}
    keys = ("gain", "misfit", "best_error_train", "weak_error", "gain_train", "misfit_train")
    out["rows"] = [{"run_id": r["run_id"], **{k: r[k] for k in keys}} for r in run_charikar(TINY)]
    return out


def test_numbers_match_the_reference_computed_once_and_committed():
    reference = json.loads(REFERENCE.read_text())
    assert reference["config"] == TINY.as_dict()
    now = _reference_numbers()
    for seed, values in reference["pretrain"].items():
        for key, expected in values.items():
            np.testing.assert_allclose(now["pretrain"][seed][key], expected, rtol=REFERENCE_RTOL, atol=1e-12)
    assert [r["run_id"] for r in now["rows"]] == [r["run_id"] for r in reference["rows"]]
    for got, expected in zip(now["rows"], reference["rows"]):
        for key in expected:
            if key != "run_id":
                # Realizable in-sample gain and misfit differ from each other at rounding level only: compare
                # them absolutely at that level.
                assert got[key] == pytest.approx(expected[key], rel=REFERENCE_RTOL, abs=1e-12), (got["run_id"], key)


def test_cache_returns_what_was_trained_and_skips_training(tmp_path, monkeypatch):
    cache = RepresentationCache(tmp_path / "cache")
    first = pretrained_pair(TINY, cache=cache)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == len(TINY.seeds)
    monkeypatch.setattr(ck, "pretrain", lambda *a, **k: pytest.fail("trained although cached"))
    second = pretrained_pair(TINY, cache=cache)
    for seed in TINY.seeds:
        (_, s1, w1, _), (_, s2, w2, _) = first[seed], second[seed]
        for a, b in zip(s1.weights + s1.biases + w1.weights + w1.biases,
                        s2.weights + s2.biases + w2.weights + w2.biases):
            assert torch.equal(a, b)
        assert np.array_equal(first[seed][3], second[seed][3])


def test_a_corrupt_or_deleted_cache_entry_is_recomputed(tmp_path):
    cache = RepresentationCache(tmp_path / "cache")
    first = pretrained_pair(TINY, cache=cache)
    victim = tmp_path / "cache" / f"{TINY.pretrain_key(AUTHORS_SEED)}.npz"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    assert cache.load(TINY.pretrain_key(AUTHORS_SEED), TINY) is None
    again = pretrained_pair(TINY, cache=cache)
    assert torch.equal(first[AUTHORS_SEED][1].weights[3], again[AUTHORS_SEED][1].weights[3])
    assert cache.load(TINY.pretrain_key(AUTHORS_SEED), TINY) is not None  # rewritten whole
    import shutil

    shutil.rmtree(tmp_path / "cache")
    third = pretrained_pair(TINY, cache=cache)
    assert torch.equal(first[3][2].weights[1], third[3][2].weights[1])


def test_cache_key_covers_what_determines_the_representations():
    keys = {TINY.pretrain_key(AUTHORS_SEED), TINY.pretrain_key(3),
            CharikarConfig(**{**TINY.as_dict(), "pretrain_epochs": 3}).pretrain_key(AUTHORS_SEED),
            CharikarConfig(**{**TINY.as_dict(), "learning_rate": 2e-3}).pretrain_key(AUTHORS_SEED)}
    assert len(keys) == 4
    # Transfer sizes and the other seeds do not change a draw's pre-training.
    same = CharikarConfig(**{**TINY.as_dict(), "fresh_tasks": 9, "seeds": (AUTHORS_SEED,), "perturbation": 0.1})
    assert same.pretrain_key(AUTHORS_SEED) == TINY.pretrain_key(AUTHORS_SEED)


def test_default_cache_is_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("W2S_THEORY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ck.default_cache_dir() == tmp_path / "w2s-theory" / "charikar"
    monkeypatch.setenv("W2S_THEORY_CACHE", str(tmp_path / "elsewhere"))
    assert ck.default_cache_dir() == tmp_path / "elsewhere" / "charikar"


def test_realizable_students_have_gain_equal_to_misfit_in_sample(rows):
    realizable = [r for r in rows if r["variant"] == "realizable"]
    assert len(realizable) == TINY.fresh_tasks * len(TINY.seeds)
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


def test_perturbation_size_moves_the_strong_class_away_from_the_truth():
    config = CharikarConfig(**{**TINY.as_dict(), "seeds": (AUTHORS_SEED,)})
    eps = {}
    for size in (0.01, 0.1):
        out = run_charikar(CharikarConfig(**{**config.as_dict(), "perturbation": size}), variants=("perturbed",))
        eps[size] = np.median([r["best_error_train"] for r in out])
    assert 0 < eps[0.01] < eps[0.1]


def test_summary_statistics_are_the_stated_formulas():
    import pandas as pd

    gain = np.array([0.1, 0.2, 0.4])
    misfit = np.array([0.2, 0.1, 0.5])
    frame = pd.DataFrame({"variant": "pretrained", "seed": AUTHORS_SEED, "gain": gain, "misfit": misfit,
                          "best_error_train": [0.01, 0.03, 0.02], "weak_error": [1.0, 2.0, 3.0],
                          "weak_error_train": [1.0, 2.0, 3.0], "strong_pretrain_loss": 5.0,
                          "weak_pretrain_loss": 6.0})
    (s,) = summarise(frame)
    assert s["draw"] == "authors"
    assert s["median_eps"] == pytest.approx(0.02)
    assert s["weak_error"] == pytest.approx(2.0)
    assert s["mean_abs_gain_minus_misfit"] == pytest.approx(0.1)
    assert s["misfit_over_gain"] == pytest.approx(0.8 / 0.7)
    assert s["median_misfit_over_median_gain"] == pytest.approx(0.2 / 0.2)
    assert s["fraction_gain_ge_misfit"] == pytest.approx(1 / 3)
    assert s["weak_strong_gap"] == pytest.approx(np.median([0.99, 1.97, 2.98]))


def test_rows_depend_on_the_seed(rows):
    assert len({r["run_id"] for r in rows}) == len(rows)
    a = [r["weak_error"] for r in rows if r["seed"] == AUTHORS_SEED and r["variant"] == "pretrained"]
    b = [r["weak_error"] for r in rows if r["seed"] == 3 and r["variant"] == "pretrained"]
    assert not np.allclose(a, b)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown variant"):
        run_charikar(TINY, variants=("pretrained", "noisy"))


if __name__ == "__main__":
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(_reference_numbers(), indent=1) + "\n")
    print(f"wrote {REFERENCE}")
