"""The results store: idempotent, transactional writes; resumable sweeps; studies that share runs; exports."""

import json
import math
import sqlite3

import pandas as pd
import pytest

from w2s_theory.cli import main
from w2s_theory.pipeline import RunSpec, run_specs
from w2s_theory.store import ResultsStore
from w2s_theory.sweep import run_sweep
from w2s_theory.synthetic import WorldConfig
from w2s_theory.validation import InputError

TINY = dict(n_weak=60, n_train=60, n_test=60, world=WorldConfig(strong_dim=8, weak_dim=3))


def fake_rows(ids, value=1.0):
    return [{"run_id": i, "gain_test": value, "pgr": float("nan"), "verdict": "holds"} for i in ids]


def fake_specs(ids):
    return [{"seed": n} for n, _ in enumerate(ids)]


@pytest.fixture
def store(tmp_path):
    with ResultsStore(tmp_path / "results.db") as s:
        yield s


@pytest.fixture(scope="module")
def tiny_rows():
    specs = [RunSpec(seed=seed, loss=loss, head=head, noise=noise, **TINY)
             for seed in (0, 1) for head in ("mixture", "softmax") for loss in ("reverse_kl", "forward_kl")
             for noise in (0.0, 0.25)]
    return specs, run_specs(specs)


def test_writing_the_same_runs_twice_stores_them_once_and_keeps_the_first(store):
    ids = ["a", "b", "c"]
    assert store.write("s", fake_rows(ids, 1.0), fake_specs(ids)) == 3
    assert store.write("s", fake_rows(ids, 2.0), fake_specs(ids)) == 0
    assert store.write("s", fake_rows(["c", "d"], 3.0), fake_specs(["c", "d"])) == 1
    rows = store.rows("s")
    assert [r["run_id"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["gain_test"] for r in rows] == [1.0, 1.0, 1.0, 3.0]
    assert math.isnan(rows[0]["pgr"])  # NaN survives the round trip
    assert store._db.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM runs").fetchone() == (4, 4)


def test_a_resumed_sweep_skips_finished_runs_and_runs_only_the_rest(store, tiny_rows):
    specs, rows = tiny_rows
    half = len(specs) // 2
    store.write("tiny", rows[:half], [s.as_dict() for s in specs[:half]])
    assert store.done_ids([s.run_id for s in specs]) == {s.run_id for s in specs[:half]}
    summary = run_sweep(specs, store, "tiny", device="cpu", progress=False)
    assert (summary.total, summary.skipped, summary.ran) == (len(specs), half, len(specs) - half)
    again = run_sweep(specs, store, "tiny", device="cpu", progress=False)
    assert (again.skipped, again.ran) == (len(specs), 0)
    assert store.count("tiny") == len(specs)
    stored = {r["run_id"]: r for r in store.rows("tiny")}
    for spec, row in zip(specs[:half], rows):  # the pre-written rows were kept as they were
        assert json.dumps(stored[spec.run_id], sort_keys=True) == json.dumps({"study": "tiny", **row}, sort_keys=True)
    for spec, row in zip(specs[half:], rows[half:]):  # the rest were computed (in other batches: to rounding)
        for key in ("objective", "student_test_kl_error", "gain_train"):
            assert math.isclose(stored[spec.run_id][key], row[key], rel_tol=1e-9, abs_tol=1e-15)


class FailingConnection:
    """A connection that fails on the statement that lists runs in a study: the second of write()'s two."""

    def __init__(self, db):
        self.db = db

    def __getattr__(self, name):
        return getattr(self.db, name)

    def __enter__(self):
        return self.db.__enter__()

    def __exit__(self, *exc):
        return self.db.__exit__(*exc)

    def executemany(self, sql, params):
        if "study_runs" in sql:
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return self.db.executemany(sql, params)


def test_a_failing_write_leaves_nothing_partial(store):
    store.write("s", fake_rows(["a"]), fake_specs(["a"]))
    real = store._db
    store._db = FailingConnection(real)
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        store.write("s", fake_rows(["b", "c"]), fake_specs(["b", "c"]))
    store._db = real
    assert store._db.execute("SELECT run_id FROM runs").fetchall() == [("a",)]  # b and c rolled back
    assert store.count("s") == 1
    with pytest.raises(TypeError, match="cannot store"):  # a bad value in the last row: nothing of the chunk
        store.write("s", fake_rows(["d", "e"]) + [{"run_id": "f", "x": object()}], fake_specs("def"))
    assert store.done_ids() == {"a"}


def test_a_run_shared_by_two_studies_is_computed_once_and_listed_in_both(store):
    store.write("first", fake_rows(["a", "b"]), fake_specs(["a", "b"]))
    assert store.done_ids(["a", "b", "c"], study="second") == set()
    assert store.link("second", ["b", "zzz"]) == 1  # an id not in the store is ignored
    assert [r["run_id"] for r in store.rows("second")] == ["b"]
    assert store.studies() == ["first", "second"]
    assert store.count("first") == 2 and store.count() == 3
    assert store._db.execute("SELECT COUNT(*) FROM runs").fetchone() == (2,)


def test_a_schema_1_store_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    _schema_1_store(path)
    with ResultsStore(path) as store:
        assert store.rows("old") == [{"study": "old", "run_id": "x", "gain_test": 0.25}]
        assert store.done_ids(["x"], study="old") == {"x"}


def test_export_round_trips_through_csv_and_parquet_and_leaves_the_store_alone(store, tiny_rows, tmp_path):
    specs, rows = tiny_rows
    store.write("tiny", rows, [s.as_dict() for s in specs])
    frame = store.dataframe("tiny")
    assert len(frame) == len(specs) and {"run_id", "study", "world_strong_dim", "loss", "gain_test"} <= set(frame)
    assert frame["theorem_verdict"].isna().any()  # softmax rows have no theorem check: the columns still align
    store.close()
    before = store.path.read_bytes()
    assert main(["export", "--store", str(store.path), "--out", str(tmp_path / "t.csv"), "--study", "tiny"]) == 0
    assert store.path.read_bytes() == before  # reading a store never writes to it
    back = pd.read_csv(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    pytest.importorskip("pyarrow")
    assert main(["export", "--store", str(store.path), "--out", str(tmp_path / "t.parquet")]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), frame)


@pytest.mark.parametrize("case,args,words", [
    ("unknown suffix", ["--out", "{tmp}/t.xlsx"], "unknown format '.xlsx'"),
    ("unknown study", ["--out", "{tmp}/t.csv", "--study", "nope"], "'nope' is not in"),
    ("missing store", ["--store", "{tmp}/none.db", "--out", "{tmp}/t.csv"], "results store not found"),
])
def test_export_errors_are_one_line_and_leave_the_output_alone(store, tmp_path, capsys, case, args, words):
    store.write("s", fake_rows(["a"]), fake_specs(["a"]))
    out = tmp_path / "t.csv"
    out.write_text("keep me")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--store" not in args:
        args = ["--store", str(store.path), *args]
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert out.read_text() == "keep me"
    assert not (tmp_path / "none.db").exists()


def _schema_1_store(path):
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, study TEXT NOT NULL, spec TEXT NOT NULL, metrics TEXT NOT NULL,
                           finished_at REAL NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        INSERT INTO runs VALUES ('x', 'old', '{}', '{"run_id": "x", "gain_test": 0.25}', 0.0);
    """)
    db.commit()
    db.close()


def test_a_store_opened_read_only_is_read_without_writing_even_an_old_schema(tmp_path):
    path = tmp_path / "old.db"
    _schema_1_store(path)
    before = path.read_bytes()
    with ResultsStore(path, read_only=True) as store:
        assert store.rows("old") == [{"study": "old", "run_id": "x", "gain_test": 0.25}]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.write("new", fake_rows(["y"]), fake_specs(["y"]))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.db"]


@pytest.mark.parametrize("content", ["sqlite", "csv", "empty-named-sqlite"])
def test_only_a_results_store_is_opened_for_writing_anything_else_is_left_byte_identical(tmp_path, content):
    path = tmp_path / "data.db"
    if content == "csv":
        path.write_text("a,b\n1,2\n")
    else:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE meta (key TEXT, value TEXT)" if content == "empty-named-sqlite" else "CREATE TABLE t (x)")
        db.commit()
        db.close()
    before = path.read_bytes()
    for read_only in (False, True):
        with pytest.raises(InputError, match="not a w2s-theory results store|damaged or not a results store"):
            ResultsStore(path, read_only=read_only)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["data.db"]
