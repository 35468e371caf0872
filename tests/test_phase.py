"""``w2s-theory phase``: paired differences with standard errors over a grid, heatmaps with non-significant
cells masked, and a kill-and-resume without duplicates."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

from tests.test_sweep import remove_the_hang, snapshot, stored_count
from w2s_theory.cli import main
from w2s_theory.phase import paired_differences

PHASE_CONFIG = """
[study]
name = "phase_test"
seeds = {start = 0, count = 10}

[world]
strong_dim = 8
weak_dim = 4

[run]
trainer = "practice"
loss = ["reverse_ce", "forward_kl"]
head = "softmax"
teacher_temperature = [0.5, 1.0, 2.0]
noise = [0.0, 0.1, 0.3]
epochs = 1
batch_size = 16
n_weak = 40
n_train = 40
n_test = 40
"""


def test_paired_differences_pair_runs_by_seed_and_report_the_standard_error():
    rows = []
    for seed, (a, b) in enumerate([(0.7, 0.6), (0.8, 0.6), (0.9, 0.6)]):
        rows += [{"loss": "reverse_ce", "seed": seed, "noise": 0.1, "student_test_accuracy": a},
                 {"loss": "forward_kl", "seed": seed, "noise": 0.1, "student_test_accuracy": b}]
    rows.append({"loss": "forward_kl", "seed": 9, "noise": 0.1, "student_test_accuracy": 0.0})  # unpaired: ignored
    table = paired_differences(pd.DataFrame(rows), [("reverse_ce", "forward_kl")], ["noise"])
    (row,) = table.to_dict("records")
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, se 0.1 / sqrt(3)
    assert row["n"] == 3 and row["mean"] == pytest.approx(0.2)
    assert row["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert row["significant"]  # 0.2 >= 2 * 0.0577


def hang_after(store_path, rows: int):
    """As tests/test_sweep.py's hang_the_second_chunk, for chunks of ``rows`` runs: the sweep hangs inside
    the transaction of its second chunk, after the first is committed, so the kill lands mid-transaction."""
    from w2s_theory.store import ResultsStore
    import sqlite3

    ResultsStore(store_path).close()
    db = sqlite3.connect(store_path)
    db.executescript(f"""
        CREATE TABLE pad (x INTEGER);
        INSERT INTO pad WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000)
            SELECT x FROM c;
        CREATE TRIGGER hang AFTER INSERT ON study_runs WHEN (SELECT COUNT(*) FROM study_runs) > {rows}
        BEGIN SELECT COUNT(*) FROM pad a, pad b, pad c, pad d; END;
    """)
    db.close()


def phase_command(config, store, out):
    return [sys.executable, "-m", "w2s_theory.cli", "phase", str(config), "--store", str(store), "--axes",
            "noise,teacher_temperature", "--compare", "reverse_ce:forward_kl", "--out", str(out), "--chunk-size", "9",
            "--device", "cpu"]


def test_phase_killed_mid_way_resumes_without_duplicates_and_writes_the_csv_and_heatmap(tmp_path):
    config = tmp_path / "phase.toml"
    config.write_text(textwrap.dedent(PHASE_CONFIG))
    total = 3 * 3 * 2 * 10
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    store = tmp_path / "phase.db"
    hang_after(store, 9)  # a chunk is one unit: the 9 cells of one seed and loss
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(phase_command(config, store, tmp_path / "out"), stdout=log, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and stored_count(store) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    at_kill = stored_count(store)
    assert at_kill == 9  # the first chunk committed, nothing of the second
    remove_the_hang(store)
    resumed = subprocess.run(phase_command(config, store, tmp_path / "out"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"ran {total - at_kill}, skipped {at_kill} already stored" in resumed.stderr
    assert len(snapshot(store)) == total  # snapshot also asserts no duplicated run or study link

    table = pd.read_csv(tmp_path / "out" / "phase_differences.csv")
    assert len(table) == 9 and (table["n"] == 10).all()
    assert set(table["noise"]) == {0.0, 0.1, 0.3} and set(table["teacher_temperature"]) == {0.5, 1.0, 2.0}
    assert np.all(table["significant"] == (table["mean"].abs() >= 2 * table["se"]))
    assert (tmp_path / "out" / "phase_reverse_ce_vs_forward_kl.png").stat().st_size > 10_000


def test_phase_rejects_an_axis_the_study_does_not_sweep_before_touching_the_store(tmp_path, capsys):
    config = tmp_path / "phase.toml"
    config.write_text(textwrap.dedent(PHASE_CONFIG))
    store = tmp_path / "phase.db"
    assert main(["phase", str(config), "--store", str(store), "--axes", "noise,lr", "--out", str(tmp_path)]) == 2
    assert "--axes" in capsys.readouterr().err and not store.exists()
    assert main(["phase", str(config), "--store", str(store), "--axes", "noise,teacher_temperature",
                 "--compare", "reverse_kl:forward_kl", "--out", str(tmp_path)]) == 2
    assert "--compare" in capsys.readouterr().err and not store.exists()
