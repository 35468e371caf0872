"""The CUDA path: the same students on the GPU as on the CPU. Skipped (with the reason) without CUDA."""

import numpy as np
import pytest
import torch

from w2s_theory.solvers import fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl"])
def test_mixture_students_on_cuda_match_cpu_within_certificates(shared, loss):
    rng = np.random.default_rng(0)
    X = rng.dirichlet(np.ones(16), size=300)
    Q = rng.dirichlet(np.ones(2), size=(64, 300))
    features = X if shared else np.broadcast_to(X, (64, 300, 16)).copy()
    cpu = fit(features, Q, loss=loss, device="cpu")
    gpu = fit(features, Q, loss=loss, device="cuda")
    assert gpu.probs.device.type == "cuda"
    assert (gpu.gap <= 1e-9).all()
    diff = (gpu.objective.cpu() - cpu.objective).abs()
    assert (diff <= torch.maximum(gpu.gap.cpu(), cpu.gap) + 1e-12).all()


def test_softmax_and_squared_heads_run_on_cuda():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(8, 200, 5))
    Q = rng.dirichlet(np.ones(3), size=(8, 200))
    soft = fit(X, Q, loss="forward_kl", head="softmax", device="cuda")
    assert soft.probs.device.type == "cuda" and torch.isfinite(soft.gap).all()
    sq = fit(X, rng.normal(size=(8, 200, 1)), loss="squared", head="squared", device="cuda")
    assert sq.probs.device.type == "cuda" and (sq.gap <= 1e-9).all()


def test_bench_runs_on_cuda():
    from w2s_theory.bench import run_bench

    out = run_bench(device="cuda", sizes=(1, 16), cvxpy_students=1, adam_students=1, adam_epochs=1, repeats=1,
                    n=200, m=8, practice=4, practice_loop_students=1, progress=lambda s: None)
    assert out["machine"]["gpu"] and out["all_gaps_certified_below_tol"]
    assert out["practice"]["workload"]["device"].startswith("cuda")
    assert out["practice"]["loop_max_abs_difference"] < 1e-3  # the per-student loop trains the same students


def test_practice_trainer_on_cuda_trains_the_cpu_students():
    from w2s_theory.practice import PracticeConfig, train

    rng = np.random.default_rng(2)
    X, Q = rng.dirichlet(np.ones(6), size=(4, 64)), rng.dirichlet(np.ones(3), size=(4, 64))
    V, VQ = rng.dirichlet(np.ones(6), size=(4, 32)), rng.dirichlet(np.ones(3), size=(4, 32))
    T, TQ = rng.dirichlet(np.ones(6), size=(4, 32)), rng.dirichlet(np.ones(3), size=(4, 32))
    for stopping in ("none", "weak"):
        config = PracticeConfig(epochs=3, batch_size=16, eval_every=2, early_stopping=stopping, weight_decay=0.01)
        for head, loss, standardize in (("softmax", "reverse_kl", True), ("softmax", "aux_conf", False),
                                        ("mixture", "forward_kl", False)):
            cpu, gpu = (train(head, loss, X, Q, lr=0.05, config=config,
                              rngs=[np.random.default_rng(j) for j in range(4)], standardize=standardize,
                              val_features=V, val_targets=VQ, test_features=T, test_truth=TQ, device=device)
                        for device in ("cpu", "cuda"))
            assert np.array_equal(cpu.stop_step, gpu.stop_step)
            np.testing.assert_allclose(gpu.val_loss, cpu.val_loss, rtol=0, atol=1e-10)
            for curve in ("curve_val_loss", "curve_weight_norm", "curve_test_accuracy"):  # the whole training
                np.testing.assert_allclose(np.stack(getattr(gpu, curve)), np.stack(getattr(cpu, curve)),
                                           rtol=0, atol=1e-10, err_msg=f"{head} {loss} {curve}")
            for name, value in cpu.params.items():
                assert gpu.params[name].device.type == "cpu"
                assert torch.allclose(gpu.params[name], value, rtol=0, atol=1e-9), (head, loss, name)
