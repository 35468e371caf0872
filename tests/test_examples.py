"""The scripts under examples/ run (each well under a minute) and print what their docstrings promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bin_dir = str(Path(sys.executable).parent)  # the `w2s-theory` console script of this environment
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(
        ["01_theorem2_with_certificates.py", "02_test_your_own_inequality.py", "03_bring_your_own_embeddings.py"])


def test_example_1_reverse_kl_student_satisfies_theorem2_with_its_certificate():
    out = run_example("01_theorem2_with_certificates.py")
    reverse = re.search(r"reverse_kl:.*\n\s+gain (\S+)\s+misfit (\S+)\s+slack (\S+)\s+certificate (\S+).*-> (\w+)", out)
    assert reverse, out
    gain, misfit, slack, certificate = map(float, reverse.groups()[:4])
    assert reverse.group(5) == "holds"
    assert slack >= -certificate and abs(slack - (gain - misfit)) < 1e-5
    assert re.search(r"forward_kl:.*\n.*-> (holds|violated|inconclusive)", out)


def test_example_2_finds_the_worst_instance_of_a_user_inequality_in_the_store(tmp_path):
    store = tmp_path / "results.db"
    out = run_example("02_test_your_own_inequality.py", str(store))
    students = int(re.search(r"(\d+) students in", out).group(1))
    assert students == 24
    theorem2 = float(re.search(r"Theorem 2 .*min slack (\S+)", out).group(1))
    assert theorem2 >= -1e-9  # Theorem 2 on certified reverse-KL students (gap <= 1e-9)
    run_id = re.search(r"run_id\s+(\w+)", out).group(1)
    from w2s_theory.store import ResultsStore

    with ResultsStore(store) as s:
        assert run_id in set(s.dataframe()["run_id"])
    # a second run resumes from the store: the same rows, nothing recomputed or duplicated
    again = run_example("02_test_your_own_inequality.py", str(store))
    assert f"{students} students in" in again


def test_example_3_runs_the_pipeline_on_user_arrays():
    pytest.importorskip("sklearn")
    out = run_example("03_bring_your_own_embeddings.py")
    assert "weak teacher" in out and "strong ceiling" in out
    best = re.search(r"best student: (\w+), test accuracy (\S+)", out)
    assert best and best.group(1) in ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce")
    assert 0.1 < float(best.group(2)) <= 1.0
