"""The practice trainer: it reaches the exact minimiser when trained long with a small learning rate, a
student's numbers do not depend on its batch, the teacher's knobs do what they say, and bad practice configs
are one-line errors that leave the store alone."""

import json
import textwrap

import numpy as np
import pytest
import torch

from w2s_theory.cli import main
from w2s_theory.divergences import get_loss
from w2s_theory.pipeline import RunSpec, _noisy_teacher, run_specs
from w2s_theory import practice
from w2s_theory.practice import (PRACTICE_LOSSES, PracticeConfig, expected_calibration_error, loop_student,
                                  probabilities, train, training_loss)
from w2s_theory.solvers.reference import fit_reference_batch
from w2s_theory.synthetic import (WorldConfig, confident_wrong_labels, floor_probs, rng_for, temper,
                                  uncertain_labels)


def small_instance(B=3, n=40, m=5, k=2, seed=0):
    g = np.random.default_rng(seed)
    logits = 1.5 * g.standard_normal((B, n, m))
    X = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    Q = g.dirichlet(np.ones(k) * 2.0, size=(B, n))
    return X, Q


@pytest.mark.parametrize("head", ["mixture", "softmax"])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_long_training_with_a_small_learning_rate_reaches_the_exact_minimiser(head, loss):
    # The reference optimum comes from cvxpy (an independent solver), not from the batched solvers.
    X, Q = small_instance(B=2, n=30, m=4)
    reference = fit_reference_batch(torch.as_tensor(X), torch.as_tensor(Q), loss, "mixture" if head == "mixture"
                                    else "softmax") if head == "mixture" else None
    if reference is None:  # softmax: no cvxpy reference for reverse KL (non-convex); use the batched solver's
        from w2s_theory.solvers import fit  # certified forward fit and its uncertified reverse fit, checked
        reference = fit(X, Q, loss=loss, head=head)  # below only as an upper bound on the optimum
    config = PracticeConfig(epochs=1500, batch_size=30, eval_every=0)  # full batch: deterministic descent
    result = train(head, loss, X, Q, lr=2e-2, config=config, rngs=[rng_for(j, "t") for j in range(2)])
    objective = get_loss(loss).per_sample
    practice = objective(Q, probabilities(head, result.params, X).numpy()).mean(-1)
    exact = objective(Q, torch.as_tensor(reference.probs).numpy()).mean(-1)
    assert np.all(practice - exact < 1e-4), practice - exact
    assert np.all(practice - exact > -1e-6)  # never below a certified optimum (up to its certificate)


@pytest.mark.parametrize("head", ["mixture", "softmax"])
@pytest.mark.parametrize("loss", ["reverse_ce", "hard_ce", "aux_conf"])
def test_a_students_numbers_are_the_same_alone_and_inside_a_batch(head, loss):
    X, Q = small_instance(B=4, n=50, m=6, k=3, seed=1)
    config = PracticeConfig(epochs=2, batch_size=7, eval_every=3, early_stopping="weak", weight_decay=0.01,
                            schedule="cosine", warmup_steps=2)
    V, VQ = small_instance(B=4, n=20, m=6, k=3, seed=2)
    kw = dict(config=config, init="random", val_features=V, val_targets=VQ)
    together = train(head, loss, X, Q, lr=np.array([1e-2, 3e-2, 1e-1, 2e-2]),
                     rngs=[rng_for(j, "s") for j in range(4)], **kw)
    alone = train(head, loss, X[2:3], Q[2:3], lr=1e-1, rngs=[rng_for(2, "s")], config=config, init="random",
                  val_features=V[2:3], val_targets=VQ[2:3])
    for name in together.params:
        assert torch.equal(together.params[name][2:3], alone.params[name])
    assert together.stop_step[2] == alone.stop_step[0]
    assert together.curves(2) == alone.curves(0)


@pytest.mark.parametrize("loss", PRACTICE_LOSSES)
@pytest.mark.parametrize("k, size", [(2, 1), (2, 9), (3, 7)])
def test_the_closed_form_softmax_gradient_is_autograds_gradient_of_the_training_loss(loss, k, size):
    g = np.random.default_rng(k * size)
    B, m = 3, 4
    X = torch.as_tensor(g.random((B, size, m)))
    Q = torch.as_tensor(g.dirichlet(np.ones(k), size=(B, size)))
    Q[0, 0] = torch.full((k,), 1e-9)  # near-zero teacher probabilities (renormalised below)
    Q[0, 0, 0] = 1.0
    Q = Q / Q.sum(-1, keepdim=True)
    flat = torch.as_tensor(g.standard_normal((B, k, m + 1)) * 3, dtype=torch.float64)
    W, b = flat[:, :, :m].clone().requires_grad_(True), flat[:, :, m].clone().requires_grad_(True)
    log_p = torch.log_softmax(torch.bmm(X, W.transpose(1, 2)) + b[:, None, :], dim=-1)
    objective = training_loss(loss, Q, log_p, aux_alpha=0.3).mean(-1).sum()
    gW, gb = torch.autograd.grad(objective, [W, b])
    classes = Q.transpose(1, 2)  # the trainer's class-major layout (B, k, s)
    closed = practice._softmax_gradient(loss, flat, X, classes, torch.log(classes), 0.3)
    assert torch.allclose(closed[:, :, :m], gW, rtol=1e-10, atol=1e-13)
    assert torch.allclose(closed[:, :, m], gb, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("head", ["mixture", "softmax"])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "aux_conf"])
def test_training_students_in_chunks_changes_no_students_numbers(head, loss, monkeypatch):
    X, Q = small_instance(B=5, n=30, m=4, k=3, seed=4)
    config = PracticeConfig(epochs=2, batch_size=8, eval_every=3, weight_decay=0.01)
    kw = dict(lr=np.array([1e-2, 3e-2, 1e-1, 2e-2, 5e-2]), config=config, init="random",
              test_features=X, test_truth=Q)
    whole = train(head, loss, X, Q, rngs=[rng_for(j, "k") for j in range(5)], **kw)
    monkeypatch.setattr(practice, "_CHUNK_BYTES", 8 * 8 * (4 + 6) * 2)  # two students per chunk: 2, 2, 1
    chunked = train(head, loss, X, Q, rngs=[rng_for(j, "k") for j in range(5)], **kw)
    for name in whole.params:
        assert torch.equal(whole.params[name], chunked.params[name])
    assert [c.tolist() for c in whole.curve_test_accuracy] == [c.tolist() for c in chunked.curve_test_accuracy]


@pytest.mark.parametrize("loss", PRACTICE_LOSSES)
def test_the_benchmarks_per_student_torch_loop_trains_the_same_student_as_the_batched_trainer(loss):
    X, Q = small_instance(B=3, n=70, m=5, k=2, seed=5)
    config = PracticeConfig(epochs=2, batch_size=16, eval_every=0)
    batched = train("softmax", loss, X, Q, lr=3e-2, config=config, rngs=[rng_for(j, "l") for j in range(3)])
    for j in range(3):
        alone = loop_student(loss, X[j], Q[j], lr=3e-2, config=config, rng=rng_for(j, "l"))
        assert torch.allclose(alone["W"], batched.params["W"][j], rtol=0, atol=1e-12)
        assert torch.allclose(alone["b"], batched.params["b"][j], rtol=0, atol=1e-12)
        assert float(alone["W"].abs().max()) > 1e-3  # it moved


def test_early_stopping_keeps_the_parameters_of_the_best_validation_step():
    X, Q = small_instance(B=2, n=40, m=5, seed=3)
    Q = temper(Q, 0.3)  # a sharp teacher; the validation labels are a flattened copy of it on the same inputs,
    V, VQ = X, temper(Q, 4.0)  # so training from the uniform head passes by them: validation loss dips, then rises
    config = PracticeConfig(epochs=20, batch_size=10, eval_every=4, early_stopping="weak")
    result = train("softmax", "forward_kl", X, Q, lr=0.3, config=config, rngs=[rng_for(j, "e") for j in range(2)],
                   val_features=V, val_targets=VQ)
    curve = np.array(result.curve_val_loss)
    steps = np.array(result.curve_steps)
    assert np.array_equal(result.stop_step, steps[curve.argmin(0)])
    assert np.allclose(result.val_loss, curve.min(0))
    assert np.all((0 < result.stop_step) & (result.stop_step < steps[-1]))  # it stopped mid-way
    kept = get_loss("forward_kl").per_sample(VQ, probabilities("softmax", result.params, V).numpy()).mean(-1)
    assert np.allclose(kept, curve.min(0), rtol=1e-12)  # the parameters returned are the best step's


def test_temperature_one_and_rate_zero_leave_the_teacher_unchanged():
    spec = RunSpec(noise=0.0, teacher_temperature=1.0, noise_kind="uncertain")
    clean = np.random.default_rng(0).dirichlet([1, 1, 1], size=20)
    assert np.array_equal(_noisy_teacher(spec, clean), clean)
    assert temper(clean, 1.0) is clean and floor_probs(clean, 0.0) is clean


def test_temperature_sharpens_below_one_and_flattens_above():
    q = np.array([[0.8, 0.2]])
    # q^(1/T) normalised: T = 2 -> sqrt(.8) / (sqrt(.8) + sqrt(.2)) = 2/3; T = 1/2 -> .64 / (.64 + .04) = 16/17.
    assert np.allclose(temper(q, 2.0), [[2 / 3, 1 / 3]])
    assert np.allclose(temper(q, 0.5), [[16 / 17, 1 / 17]])


def test_each_noise_kind_does_what_it_says_on_a_hand_checked_example():
    q = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])
    noisy, mask = uncertain_labels(q, 0.5, np.random.default_rng(0))
    assert mask.sum() == 2
    assert np.allclose(noisy[mask], 1 / 3) and np.array_equal(noisy[~mask], q[~mask])
    noisy, mask = confident_wrong_labels(q, 1.0, np.random.default_rng(0))
    assert mask.all()
    assert np.allclose(noisy.max(1), 0.95)
    assert np.all(noisy.argmax(1) != q.argmax(1))  # the confident class is a wrong one
    assert np.allclose(np.sort(noisy, 1)[:, :2], 0.025)  # the other two share 5%
    binary = np.array([[0.9, 0.1], [0.3, 0.7]])
    noisy, _ = confident_wrong_labels(binary, 1.0, np.random.default_rng(0))
    assert np.allclose(noisy, [[0.05, 0.95], [0.95, 0.05]])
    spec = RunSpec(world=WorldConfig(k=2), noise=1.0, noise_kind="flip")
    assert np.allclose(_noisy_teacher(spec, binary), binary[:, ::-1])


def test_the_floor_lifts_zeros_and_a_reverse_loss_on_teacher_zeros_without_one_is_an_error():
    q = np.array([[1.0, 0.0], [0.5, 0.5]])
    floored = floor_probs(q, 0.01)
    assert np.allclose(floored[0], [1 / 1.01, 0.01 / 1.01]) and np.allclose(floored[1], [0.5, 0.5])
    X = np.full((1, 2, 3), 1 / 3)
    from w2s_theory.validation import InputError
    with pytest.raises(InputError, match="teacher_floor"):
        train("softmax", "reverse_kl", X, q[None], lr=0.1, config=PracticeConfig(), rngs=[rng_for(0, "z")])


def test_ece_is_zero_for_a_calibrated_model_and_matches_a_hand_computed_value():
    truth = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    ece, se = expected_calibration_error(truth, truth, bins=2)
    assert ece == pytest.approx(0.0, abs=1e-15)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    # confidences .9 .9 .8 .8, expected correctness .9 .6 .8 .7; bins by confidence: {.8,.8} and {.9,.9}:
    # |.8 - .75| / 2 + |.9 - .75| / 2 = 0.1
    ece, se = expected_calibration_error(probs, truth, bins=2)
    assert ece == pytest.approx(0.1) and se > 0


def test_practice_rows_store_their_columns_and_a_tuned_lr_comes_from_the_grid():
    world = WorldConfig(strong_dim=8, weak_dim=4)
    common = dict(world=world, head="softmax", n_weak=60, n_train=60, n_test=60, trainer="practice", epochs=2,
                  batch_size=16, n_val=30, eval_every=2)
    specs = [RunSpec(loss="reverse_ce", lr_grid=(1e-3, 1e-1), early_stopping="weak", **common),
             RunSpec(loss="forward_kl", **common)]
    rows = run_specs(specs)
    for row in rows:
        for column in ("stop_step", "weight_norm", "exact_objective_gap", "ece", "ece_se"):
            assert np.isfinite(row[column]), column
        assert row["exact_objective_gap"] > -1e-9  # never below the certified exact minimiser
        curve = json.loads(row["curve"])
        assert curve["step"][0] == 0 and curve["step"][-1] == 8 and len(curve["test_accuracy"]) == len(curve["step"])
    assert rows[0]["lr_selected"] in (1e-3, 1e-1)


def test_new_fields_leave_the_run_ids_of_existing_specs_unchanged():
    # Computed on main before the trainer and teacher fields existed.
    assert RunSpec().run_id == "be94a9f1ff29afbb74be"
    assert RunSpec(loss="forward_kl", head="softmax", noise=0.2, seed=3).run_id == "4ffb3186fd2785e0ed61"
    assert RunSpec(world=WorldConfig(k=3, strong_dim=16), n_train=200, seed=7).run_id == "4849811b92dbf93ed3ca"
    assert RunSpec(trainer="practice").run_id != RunSpec().run_id
    assert RunSpec.from_dict(json.loads(json.dumps(RunSpec(trainer="practice", lr_grid=(0.1, 0.01)).as_dict()))) \
        == RunSpec(trainer="practice", lr_grid=(0.1, 0.01))


BASE = """
[study]
name = "p"
seeds = [0]
[world]
strong_dim = 8
[run]
head = "softmax"
n_weak = 30
n_train = 30
n_test = 30
"""


@pytest.mark.parametrize("line, message", [
    ('trainer = "fancy"', "[run] trainer"),
    ("lr = -0.1", "[run] lr"),
    ('noise_kind = "gaussian"', "[run] noise_kind"),
    ("noise = 1.5", "[run] noise"),
    ("noise = -0.1", "[run] noise"),
    ("teacher_temperature = 0", "[run] teacher_temperature"),
    ("teacher_temperature = -1.0", "[run] teacher_temperature"),
    ('loss = "hard_ce"', "needs trainer = 'practice'"),
    ("lr_grid = [0.1, -0.01]", "[run] lr_grid"),
    ('trainer = "practice"\nhead = "linear"', "head"),
])
def test_bad_practice_config_values_are_one_line_errors_that_leave_the_store_untouched(tmp_path, capsys, line,
                                                                                       message):
    text = BASE.replace('head = "softmax"\n', "") if "head =" in line else BASE
    config = tmp_path / "bad.toml"
    config.write_text(textwrap.dedent(text) + line + "\n")
    store = tmp_path / "store.db"
    store.write_bytes(b"")  # an existing (empty) file must stay byte for byte as it was
    assert main(["sweep", str(config), "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert store.read_bytes() == b""


def test_bench_practice_reports_both_rates_on_a_tiny_workload():
    from w2s_theory.practice import bench_practice

    for dtype, tolerance in (("float64", 1e-12), ("float32", 1e-5)):
        result = bench_practice(4, n=64, m=8, epochs=1, batch_size=16, loop_students=2, dtype=dtype)
        assert result["workload"]["steps"] == 4 and result["workload"]["B"] == 4
        assert result["workload"]["dtype"] == dtype
        assert result["batched_students_per_s"] > 0 and result["loop_students_per_s"] > 0
        assert result["speedup"] == pytest.approx(result["batched_students_per_s"] / result["loop_students_per_s"])
        assert result["speedup_vs_one_at_a_time"] == pytest.approx(
            result["batched_students_per_s"] / result["one_at_a_time_students_per_s"])
        assert result["loop_max_abs_difference"] < tolerance  # the loop trains the same students
