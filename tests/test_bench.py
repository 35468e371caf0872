"""The benchmark's JSON contract (docs/design.md) on tiny workloads, its workloads and baselines, and its CLI
validation; speed itself is measured by `w2s-theory bench`, never asserted in a unit test."""

import json
import statistics

import numpy as np
import pytest
import torch

import w2s_theory.bench as bench
from w2s_theory.bench import (HEADS, bench_head, bench_sparse, mixture_multiply_adds, run_bench, workload)
from w2s_theory.cli import main
from w2s_theory.solvers import fit

TINY = dict(n=120, m=6, progress=lambda s: None)


def test_bench_reports_every_field_of_the_design_contract():
    out = run_bench(device="cpu", sizes=(1, 4), cvxpy_students=1, adam_students=1, adam_epochs=1, repeats=3,
                    heads=("mixture",), sparse=False, peak_matrix_size=256, **TINY)
    for key in ("cvxpy_s_per_student", "adam_s_per_student", "adam_worst_gap", "batched", "ratio_vs_cvxpy",
                "ratio_vs_adam"):
        assert key in out
    assert [row["B"] for row in out["batched"]] == [1, 4]
    for row in out["batched"] + out["batched_shared"]:
        assert {"B", "s_per_student", "worst_gap", "peak_mem_mb", "gflop_per_s"} <= set(row)
        assert row["worst_gap"] <= 1e-9 and row["s_per_student"] > 0
        # achieved rate = 2 flops per counted multiply-add, over the median time of the batch
        median = statistics.median(row["times"])
        assert row["gflop_per_s"] == pytest.approx(2 * row["multiply_adds_per_student"] * row["B"] / median / 1e9)
    for row in out["batched"]:  # per-student features: the solver's counted work and its floor at measured rates
        work, floor = row["work_per_student"], row["floor"]
        assert work["feature_reads"] >= 2 and work["hessians"] >= 1
        assert floor["s_per_student"] == pytest.approx(work["feature_reads"] * floor["read_s_per_student"]
                                                       + work["hessians"] * floor["hessian_s_per_student"])
        assert floor["share_of_measured"] == pytest.approx(floor["s_per_student"] / row["s_per_student"])
    assert all(row["floor"] is None for row in out["batched_shared"])
    target = out["mixture_target"]  # the 1500x target as time per student, beside the counted work
    assert target["budget_s_per_student"] == pytest.approx(out["cvxpy_s_per_student"] / 1500)
    assert target["budget_over_floor"] == pytest.approx(target["budget_s_per_student"]
                                                        / out["batched"][-1]["floor"]["s_per_student"])
    sc = out["strong_convexity"]  # the largest B again, with the opt-in certificate
    assert sc["B"] == 4 and sc["certificate"] == "frank_wolfe_or_strong_convexity" and sc["worst_gap"] <= 1e-9
    assert sc["ratio_vs_cvxpy"] == pytest.approx(out["cvxpy_s_per_student"] / sc["s_per_student"])
    assert out["adam_worst_gap"] > 0  # measured at the Adam loop's end point, not assumed
    assert out["ratio_vs_cvxpy"] == pytest.approx(out["cvxpy_s_per_student"] / out["batched"][-1]["s_per_student"])
    # the headline ratio is the median of the per-run ratios (odd number of timed runs)
    assert len(out["ratio_vs_cvxpy_runs"]) == 3
    assert out["ratio_vs_cvxpy"] == pytest.approx(statistics.median(out["ratio_vs_cvxpy_runs"]))
    flops = out["flops"]
    assert flops["peak_gflop_per_s"] > 0
    assert flops["mixture_fraction_of_peak"] == pytest.approx(flops["mixture_gflop_per_s"] / flops["peak_gflop_per_s"])
    assert out["heads"] == {} and "sparse" not in out and out["all_heads_certified_below_tol"] is True


def test_the_multiply_add_count_is_the_newton_step_formula():
    # per iteration (k-1) n m^2 for the curvature blocks + 4 n m k; 2 n m k once for the certificate
    n, m = 10, 3
    assert mixture_multiply_adds(n, m, 2, torch.tensor([2, 4])) == 3 * (n * m * m + 4 * n * m * 2) + 2 * n * m * 2
    assert mixture_multiply_adds(n, m, 3, 1) == 2 * n * m * m + 4 * n * m * 3 + 2 * n * m * 3


def test_every_head_is_timed_against_its_baseline_on_the_same_instances():
    out = {head: bench_head(head, sizes=(1, 3), device=torch.device("cpu"), baseline_students=2, repeats=1,
                            seed=5, **TINY) for head in ("linear", "softmax", "squared")}
    for head, h in out.items():
        assert h["baseline"]["s_per_student"] > 0
        if not h["batched_available"]:  # only the linear head may still lack a batched solver
            assert head == "linear" and h["ratio_vs_cvxpy"] is None and "cvxpy" in h["note"]
            continue
        assert [r["B"] for r in h["sizes"]] == [1, 3] and h["B"] == 3
        assert h["worst_gap"] <= 1e-9 and h["all_gaps_certified_below_tol"]
        key = {"linear": "ratio_vs_cvxpy", "softmax": "ratio_vs_lbfgs", "squared": "ratio_vs_numpy"}[head]
        assert h[key] == pytest.approx(h["baseline"]["s_per_student"] / h["s_per_student"])
    # L-BFGS reached the batched objective (it stops within tol of it), and numpy's least squares agrees
    assert out["softmax"]["baseline"]["reached_objective"]
    assert out["softmax"]["baseline"]["worst_excess_objective"] <= 1e-9
    soft = out["softmax"]
    assert soft["torch_baseline"]["reached_objective"] and soft["torch_baseline"]["worst_excess_objective"] <= 1e-9
    assert soft["ratio_vs_torch_lbfgs"] == pytest.approx(soft["torch_lbfgs_s_per_student"] / soft["s_per_student"])
    # the 50x target as a budget of reads of a student's features, from the same baseline time
    budget = soft["read_budget"]
    assert budget["target_ratio"] == 50 and budget["read_s_per_student"] > 0
    assert budget["budget_s_per_student"] == pytest.approx(soft["baseline"]["s_per_student"] / 50)
    assert budget["budget_reads"] == pytest.approx(budget["budget_s_per_student"] / budget["read_s_per_student"])
    assert soft["baseline"]["mean_evaluations"] >= soft["baseline"]["mean_iterations"] >= 1
    assert abs(out["squared"]["baseline"]["worst_objective_difference"]) <= 1e-12


def test_lbfgs_reaches_the_certified_optimum_of_an_independent_instance():
    # The baseline is an independent solver: from zero it must get within tol of the batched optimum, whose
    # certified gap bounds how far that optimum can be from the true one.
    features, teacher = workload(2, n=200, m=5, seed=9, representation="real")
    result = fit(features, teacher, loss="forward_kl", head="softmax", tol=1e-10)
    objectives = [float(v) for v in result.objective]
    lbfgs = bench._baseline_lbfgs(features, teacher, 2, objectives, 1e-9)
    assert lbfgs["reached_objective"]
    assert lbfgs["worst_excess_objective"] >= -float(result.gap.max()) - 1e-12  # not below the optimum
    torch_lbfgs = bench._baseline_torch_lbfgs(features, teacher, 2, objectives, 1e-9)
    assert torch_lbfgs["reached_objective"]
    assert torch_lbfgs["worst_excess_objective"] >= -float(result.gap.max()) - 1e-12


def test_workloads_are_seeded_in_the_simplex_and_as_described():
    features, teacher = workload(3, n=50, m=4, seed=0)
    assert features.shape == (3, 50, 4) and teacher.shape == (3, 50, 2)
    assert abs(float(features.sum(-1).mean()) - 1) < 1e-12 and abs(float(teacher.sum(-1).mean()) - 1) < 1e-12
    shared, _ = workload(3, n=50, m=4, seed=0, shared=True)
    assert shared.shape == (50, 4)
    again, _ = workload(3, n=50, m=4, seed=0)
    assert torch.equal(features, again)  # every draw from a seeded generator
    real, real_teacher = workload(3, n=50, m=4, seed=0, representation="real")
    assert torch.equal(torch.softmax(real, -1), features) and torch.equal(real_teacher, teacher)
    sparse, q = workload(2, n=2000, m=64, seed=1, kind="dirichlet")
    assert torch.allclose(sparse.sum(-1), torch.ones(2, 2000, dtype=torch.float64), atol=1e-12)
    assert float((sparse < 1e-3).double().mean()) > 0.5  # Dirichlet(0.1): most entries are tiny
    assert torch.isfinite(q).all() and float(q.min()) > 0
    hot, _ = workload(2, n=300, m=8, seed=1, kind="near_one_hot")
    assert float(hot.max(-1).values.min()) >= 0.99 and torch.allclose(hot.sum(-1), torch.ones(2, 300, dtype=hot.dtype))
    _, zeros = workload(2, n=1000, m=8, seed=1, kind="teacher_zeros")
    one_hot_rows = (zeros == 0).any(-1).double().mean()
    assert 0.15 < float(one_hot_rows) < 0.25  # one row in five, with an exact zero
    assert torch.allclose(zeros.sum(-1), torch.ones(2, 1000, dtype=zeros.dtype))


def test_the_sparse_workloads_are_timed_against_cvxpy_on_the_same_instances():
    out = bench_sparse(B=2, device=torch.device("cpu"), cvxpy_students=1, repeats=1, **TINY)
    assert set(out) == {"dirichlet_0.1", "near_one_hot", "teacher_zeros"}
    for w in out.values():
        assert w["worst_gap"] <= 1e-9 and w["cvxpy_worst_gap"] < 1e-3
        assert w["ratio_vs_cvxpy"] == pytest.approx(w["cvxpy_s_per_student"] / w["s_per_student"])
    assert out["teacher_zeros"]["loss"] == "forward_kl"


def test_bench_cli_rejects_bad_sizes_and_cuda_without_a_gpu(tmp_path, capsys):
    assert main(["bench", "--sizes", "1,x"]) == 2
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--sizes", "1", "--n", "50", "--m", "3"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.fixture
def never_runs(monkeypatch):
    """Fail the test if the benchmark starts computing: validation must come first."""
    def refuse(**kwargs):
        raise AssertionError("run_bench was called although the options are invalid")

    monkeypatch.setattr(bench, "run_bench", refuse)


@pytest.mark.parametrize("options", [
    ["--device", "tpu"], ["--adam-epochs", "-1"], ["--adam-epochs", "0"], ["--repeats", "0"], ["--n", "-5"],
    ["--m", "0"], ["--cvxpy-students", "0"], ["--lbfgs-students", "-1"], ["--linear-m", "0"], ["--sizes", "0"],
    ["--sizes", "1,-2"], ["--sizes", ""], ["--tol", "nan"], ["--tol", "-1"], ["--tol", "inf"], ["--tol", "0"],
    ["--heads", "mixture,tree"], ["--heads", ","], ["--peak-matrix", "0"], ["--head-repeats", "0"], ["--sizes", "100000000", "--n", "100000"],
])
def test_bench_cli_rejects_bad_options_in_one_line_before_computing(options, never_runs, capsys):
    assert main(["bench", *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("w2s-theory bench: error:")


def test_bench_cli_rejects_non_numbers_with_exit_2(never_runs, capsys):
    for options in (["--adam-epochs", "nan"], ["--repeats", "1.5"], ["--tol", "abc"]):
        with pytest.raises(SystemExit) as exc:  # argparse's own type check: usage and one error line
            main(["bench", *options])
        assert exc.value.code == 2
        assert "invalid" in capsys.readouterr().err


def test_bench_cli_checks_the_json_path_before_computing(tmp_path, never_runs, capsys):
    regular = tmp_path / "file.txt"
    regular.write_text("keep me")
    for path in (regular / "bench.json", regular / "deeper" / "bench.json", tmp_path):
        assert main(["bench", "--json", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--json" in err[0]
    assert regular.read_text() == "keep me"


def test_bench_cli_writes_json_with_every_head(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    code = main(["bench", "--sizes", "2", "--cvxpy-students", "1", "--adam-students", "1", "--adam-epochs", "1",
                 "--lbfgs-students", "1", "--numpy-students", "1", "--repeats", "1", "--n", "80", "--m", "4",
                 "--linear-m", "3", "--peak-matrix", "256", "--json", str(path)])
    assert code == 0
    out = json.loads(path.read_text())
    assert out["batched"][0]["B"] == 2 and out["heads_run"] == list(HEADS)
    assert set(out["heads"]) == {"linear", "softmax", "squared"}
    assert {"ratio_vs_lbfgs", "worst_gap", "s_per_student"} <= set(out["heads"]["softmax"])
    assert {"ratio_vs_numpy", "s_per_student"} <= set(out["heads"]["squared"])
    assert {"ratio_vs_cvxpy", "worst_gap", "s_per_student"} <= set(out["heads"]["linear"])
    assert set(out["sparse"]) == {"dirichlet_0.1", "near_one_hot", "teacher_zeros"}
    printed = capsys.readouterr().out
    for section in ("mixture head", "linear head", "softmax head", "squared head", "sparse workloads",
                    "GFLOP/s", "all batched gaps certified <= tol: yes"):
        assert section in printed


def test_bench_cli_runs_a_subset_of_heads(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--heads", "squared", "--sizes", "1,3", "--repeats", "1", "--numpy-students", "2",
                 "--n", "60", "--m", "3", "--peak-matrix", "128", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert set(out["heads"]) == {"squared"} and out["batched"] is None and out["ratio_vs_cvxpy"] is None
    assert [r["B"] for r in out["heads"]["squared"]["sizes"]] == [1, 3]
    assert "mixture head" not in capsys.readouterr().out


def test_bench_practice_times_the_batched_trainer_against_a_per_student_loop(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--heads", "squared", "--sizes", "1", "--repeats", "1", "--numpy-students", "1",
                 "--n", "64", "--m", "3", "--peak-matrix", "128", "--practice", "3", "--practice-loop-students", "2",
                 "--json", str(path)]) == 0
    practice = json.loads(path.read_text())["practice"]
    assert practice["workload"]["B"] == 3 and practice["workload"]["loop_students"] == 2
    assert practice["batched_students_per_s"] == pytest.approx(3 / practice["batched_seconds"])
    assert practice["loop_students_per_s"] == pytest.approx(2 / practice["loop_seconds"])
    assert practice["speedup"] == pytest.approx(practice["batched_students_per_s"] / practice["loop_students_per_s"])
    assert "practice trainer (softmax" in capsys.readouterr().out
