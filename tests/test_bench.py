"""The benchmark's JSON contract (DESIGN.md) on a tiny workload; speed itself is measured by `w2s-theory bench`,
never asserted in a unit test."""

import json

import pytest

from w2s_theory.bench import run_bench, workload
from w2s_theory.cli import main


def test_bench_reports_every_field_of_the_design_contract():
    out = run_bench(device="cpu", sizes=(1, 4), cvxpy_students=1, adam_students=1, adam_epochs=1, repeats=1,
                    n=120, m=6, progress=lambda s: None)
    for key in ("cvxpy_s_per_student", "adam_s_per_student", "adam_worst_gap", "batched", "ratio_vs_cvxpy",
                "ratio_vs_adam"):
        assert key in out
    assert [row["B"] for row in out["batched"]] == [1, 4]
    for row in out["batched"] + out["batched_shared"]:
        assert {"B", "s_per_student", "worst_gap", "peak_mem_mb"} <= set(row)
        assert row["worst_gap"] <= 1e-9 and row["s_per_student"] > 0
    assert out["adam_worst_gap"] > 0  # measured at the Adam loop's end point, not assumed
    assert out["ratio_vs_cvxpy"] == pytest.approx(out["cvxpy_s_per_student"] / out["batched"][-1]["s_per_student"])


def test_bench_workload_is_realizable_then_corrupted_and_in_the_simplex():
    features, teacher = workload(3, n=50, m=4, seed=0)
    assert features.shape == (3, 50, 4) and teacher.shape == (3, 50, 2)
    assert abs(float(features.sum(-1).mean()) - 1) < 1e-12 and abs(float(teacher.sum(-1).mean()) - 1) < 1e-12
    shared, _ = workload(3, n=50, m=4, seed=0, shared=True)
    assert shared.shape == (50, 4)


def test_bench_cli_rejects_bad_sizes_and_cuda_without_a_gpu(tmp_path, capsys):
    assert main(["bench", "--sizes", "1,x"]) == 2
    import torch

    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--sizes", "1", "--n", "50", "--m", "3"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_bench_cli_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    code = main(["bench", "--sizes", "2", "--cvxpy-students", "1", "--adam-students", "1", "--adam-epochs", "1",
                 "--repeats", "1", "--n", "80", "--m", "4", "--json", str(path)])
    assert code == 0
    assert json.loads(path.read_text())["batched"][0]["B"] == 2
