"""The sweep engine: memory-derived chunks, results independent of chunking, kill-and-resume, and the Ray
backend matching the local one row for row."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from w2s_theory.cli import main
from w2s_theory.config import load_study, parse_study
from w2s_theory.store import ResultsStore
from w2s_theory.sweep import (MEMORY_FRACTION, chunk_bytes, plan_chunks, run_sweep, student_bytes,
                              world_bytes)
from w2s_theory.validation import InputError

ROOT = Path(__file__).resolve().parent.parent


def grid(seeds=(0, 1, 2), noises=(0.0, 0.1, 0.2), n=60, strong_dim=8, **world):
    return parse_study({
        "study": {"name": "t", "seeds": list(seeds)},
        "world": {"strong_dim": strong_dim, "weak_dim": 3, **world},
        "run": {"loss": ["reverse_kl", "forward_kl"], "head": ["mixture", "softmax"], "noise": list(noises),
                "n_weak": n, "n_train": n, "n_test": n},
    }).specs


def unit_of(spec):
    return spec.world_key(), spec.head, spec.loss


# -- chunking ----------------------------------------------------------------------------------------------


def test_chunks_stay_under_the_memory_budget_and_cover_every_run_once():
    specs = grid()  # 3 worlds x 4 units x 3 students
    unit_cost = 3 * student_bytes(specs[0])
    world_cost = world_bytes(specs[0]) + 4 * unit_cost
    for budget in (world_cost * 3, world_cost * 2, world_cost, world_cost - unit_cost,
                   world_bytes(specs[0]) + 2 * unit_cost, world_bytes(specs[0]) + unit_cost):
        chunks = plan_chunks(specs, budget)
        assert sorted(s.run_id for c in chunks for s in c) == sorted(s.run_id for s in specs)
        assert all(chunk_bytes(c) <= budget for c in chunks)
        for chunk in chunks:  # a (world, head, loss) unit is never split when it fits
            for spec in chunk:
                assert sum(unit_of(s) == unit_of(spec) for s in chunk) == 3
    assert len(plan_chunks(specs, world_cost * 3)) == 1  # everything fits: one chunk
    assert [len(c) for c in plan_chunks(specs, world_cost * 2)] == [24, 12]  # whole worlds packed together
    assert [len(c) for c in plan_chunks(specs, world_cost)] == [12, 12, 12]  # one world per chunk
    assert [len(c) for c in plan_chunks(specs, world_cost - unit_cost)] == [9, 3] * 3  # worlds split by unit


def test_a_unit_larger_than_memory_is_split_into_pieces_that_fit():
    specs = grid(seeds=(0,), noises=tuple(i / 10 for i in range(10)))  # units of 10 students
    budget = world_bytes(specs[0]) + 4 * student_bytes(specs[0])
    chunks = plan_chunks(specs, budget)
    assert [len(c) for c in chunks] == [4, 4, 2] * 4
    assert all(chunk_bytes(c) <= budget for c in chunks)
    tiny = plan_chunks(specs, 1)  # not even one student fits: one student per chunk, nothing dropped
    assert len(tiny) == len(specs)


def test_the_soft_cap_closes_chunks_between_units_only():
    specs = grid()
    chunks = plan_chunks(specs, 10**12, max_students=5)
    assert all(len(c) == 3 for c in chunks)  # 5 would split a unit of 3; whole units of 3 instead


def test_run_sweep_derives_the_chunk_size_from_free_memory(tmp_path):
    specs = grid(seeds=(0,), noises=(0.0,))  # 1 world, 4 units of one student
    per_world = chunk_bytes(specs)
    with ResultsStore(tmp_path / "a.db") as store:
        roomy = run_sweep(specs, store, "t", device="cpu", progress=False, chunk_size=100,
                          free_memory=int(10 * per_world / MEMORY_FRACTION))
    with ResultsStore(tmp_path / "b.db") as store:
        tight = run_sweep(specs, store, "t", device="cpu", progress=False, chunk_size=100,
                          free_memory=int((world_bytes(specs[0]) + student_bytes(specs[0])) / MEMORY_FRACTION) + 8)
    assert (roomy.chunks, tight.chunks) == (1, 4)


@pytest.mark.parametrize("k", [2, 3])  # k = 2: every softmax logit product is a matrix-vector one
def test_rows_do_not_depend_on_how_the_sweep_is_chunked(tmp_path, k):
    specs = grid(seeds=(0, 1), noises=(0.0, 0.3), n=300, k=k)
    stored = []
    for name, chunk_size in (("one.db", 100), ("many.db", 1)):
        with ResultsStore(tmp_path / name) as store:
            run_sweep(list(reversed(specs)) if chunk_size == 1 else specs, store, "t", device="cpu",
                      progress=False, chunk_size=chunk_size)
            stored.append(dict(store._db.execute("SELECT run_id, metrics FROM runs")))
    assert len(stored[0]) == len(specs)
    assert stored[0] == stored[1]  # identical JSON: bit-identical numbers


def test_progress_shows_runs_done_of_total_and_a_summary(tmp_path, capsys):
    specs = grid(seeds=(0,), noises=(0.0,))
    with ResultsStore(tmp_path / "p.db") as store:
        run_sweep(specs[:2], store, "t", device="cpu", progress=True)
        summary = run_sweep(specs, store, "t", device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "run/s" in err
    assert "ran 2, skipped 2 already stored, 4 in the grid" in err
    assert (summary.ran, summary.skipped, summary.total) == (2, 2, 4) and summary.rate > 0


def test_bad_backend_and_missing_ray_are_clear_errors(tmp_path, monkeypatch):
    specs = grid(seeds=(0,), noises=(0.0,))
    with ResultsStore(tmp_path / "x.db") as store:
        with pytest.raises(InputError, match="unknown backend 'dask'"):
            run_sweep(specs, store, "t", backend="dask", progress=False)
        monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
        with pytest.raises(InputError, match=r"pip install 'w2s-theory\[ray\]'"):
            run_sweep(specs, store, "t", backend="ray", progress=False)
        assert store.count() == 0


def test_the_smoke_config_runs_to_completion(tmp_path):
    store_path = tmp_path / "smoke.db"
    assert main(["sweep", str(ROOT / "experiments" / "smoke.toml"), "--store", str(store_path), "--quiet"]) == 0
    with ResultsStore(store_path) as store:
        assert store.count("smoke") == len(load_study(ROOT / "experiments" / "smoke.toml").specs) == 32


# -- kill and resume ---------------------------------------------------------------------------------------

KILL_CONFIG = """
[study]
name = "killme"
seeds = [0, 1, 2, 3, 4, 5]

[world]
strong_dim = 16
weak_dim = 4

[run]
loss = ["reverse_kl", "forward_kl"]
noise = [0.0, 0.2]
n_weak = 150
n_train = 150
n_test = 150
"""


def sweep_command(config, store_path):
    return [sys.executable, "-m", "w2s_theory.cli", "sweep", str(config), "--store", str(store_path),
            "--chunk-size", "2", "--device", "cpu"]


def stored_count(store_path) -> int:
    if not store_path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=1)
        try:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:  # not created yet, or mid-creation
        return 0


def snapshot(store_path) -> dict:
    db = sqlite3.connect(store_path)
    try:
        assert db.execute("SELECT COUNT(*) = COUNT(DISTINCT run_id) FROM runs").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM (SELECT study, run_id FROM study_runs GROUP BY study, run_id "
                          "HAVING COUNT(*) > 1)").fetchone() == (0,)
        return {r: (m, t) for r, m, t in db.execute("SELECT run_id, metrics, finished_at FROM runs")}
    finally:
        db.close()


def hang_the_second_chunk(store_path):
    """Make the sweep hang inside the transaction of its second chunk (after the first is committed): an
    INSERT trigger that fires once more than one chunk's rows arrive and runs a practically endless query.
    The kill then lands mid-transaction, the hardest moment, and without any race against the clock."""
    ResultsStore(store_path).close()
    db = sqlite3.connect(store_path)
    db.executescript("""
        CREATE TABLE pad (x INTEGER);
        INSERT INTO pad WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000)
            SELECT x FROM c;
        CREATE TRIGGER hang AFTER INSERT ON study_runs WHEN (SELECT COUNT(*) FROM study_runs) > 2
        BEGIN SELECT COUNT(*) FROM pad a, pad b, pad c, pad d; END;
    """)
    db.close()


def remove_the_hang(store_path):
    db = sqlite3.connect(store_path)
    db.executescript("DROP TRIGGER hang; DROP TABLE pad;")
    db.close()


def test_a_sweep_killed_mid_way_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path):
    config = tmp_path / "kill.toml"
    config.write_text(textwrap.dedent(KILL_CONFIG))
    total = len(load_study(config).specs)  # 24 runs in 12 chunks of 2
    # One thread per process: the same arithmetic in all three runs, and no oversubscribed cores.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    store_path = tmp_path / "killed.db"
    hang_the_second_chunk(store_path)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(sweep_command(config, store_path), stdout=log, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and stored_count(store_path) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # let it get well into the second chunk's transaction
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    at_kill = stored_count(store_path)
    assert at_kill == 2  # the first chunk is committed; nothing of the second, killed mid-transaction
    remove_the_hang(store_path)
    before_resume = snapshot(store_path)

    resumed = subprocess.run(sweep_command(config, store_path), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"ran {total - at_kill}, skipped {at_kill} already stored" in resumed.stderr

    fresh_path = tmp_path / "fresh.db"
    fresh = subprocess.run(sweep_command(config, fresh_path), capture_output=True, text=True, env=env)
    assert fresh.returncode == 0, fresh.stderr

    after_resume, uninterrupted = snapshot(store_path), snapshot(fresh_path)
    assert len(after_resume) == len(uninterrupted) == total
    assert after_resume.keys() == uninterrupted.keys()
    for run_id, (metrics, _) in uninterrupted.items():
        assert after_resume[run_id][0] == metrics, f"run {run_id} differs after kill and resume"
    for run_id, kept in before_resume.items():  # rows written before the kill were kept, not rewritten
        assert after_resume[run_id] == kept


# -- Ray ---------------------------------------------------------------------------------------------------


def same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_the_ray_backend_gives_the_rows_of_the_local_backend(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'w2s-theory[ray]')")
    specs = grid(seeds=(0, 1), noises=(0.0, 0.3))  # 16 runs, 8 units
    with ResultsStore(tmp_path / "local.db") as store:
        run_sweep(specs, store, "t", device="cpu", progress=False)
        local_rows, local_specs = {r["run_id"]: r for r in store.rows("t")}, store.specs("t")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    try:
        with ResultsStore(tmp_path / "ray.db") as store:
            summary = run_sweep(specs, store, "t", device="cpu", backend="ray", progress=False)
            ray_rows, ray_specs = {r["run_id"]: r for r in store.rows("t")}, store.specs("t")
    finally:
        ray.shutdown()
    assert (summary.backend, summary.ran, summary.chunks > 1) == ("ray", len(specs), True)
    assert ray_rows.keys() == local_rows.keys() == {s.run_id for s in specs}
    assert ray_specs == local_specs
    for run_id, local in local_rows.items():
        assert ray_rows[run_id].keys() == local.keys()
        different = [k for k in local if not same_value(local[k], ray_rows[run_id][k])]
        assert not different, f"run {run_id}: {different}"
