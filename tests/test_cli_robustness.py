"""The command line never loses data and never answers bad input with a traceback (issue 8, items 6-10).

Every case is a command as a user would type it; each must exit 2 with one line on stderr naming the problem
and leave every file as it was. Cases that must fail *before* any computation patch the computation to
raise, so that validating late (after minutes of work) fails the test.
"""

import json
import math
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from w2s_theory.cli import EXIT_BROKEN_PIPE, main
from w2s_theory.store import ResultsStore

SMOKE = os.path.join(os.path.dirname(__file__), "..", "experiments", "smoke.toml")


@pytest.fixture
def files(tmp_path):
    """Small inputs of every command, a regular file to put paths under, a store, a non-store SQLite file."""
    rng = np.random.default_rng(0)
    paths = {"tmp": tmp_path}
    arrays = {
        "F": rng.normal(size=(30, 3)),
        "Q": rng.dirichlet(np.ones(3), size=30),
        "F0": np.zeros((0, 30, 3)),
        "Q0": np.zeros((0, 30, 3)),
        "Fc": rng.normal(size=(30, 3)) + 1j,
        "W": rng.normal(size=(30, 2)),
        "S": rng.normal(size=(30, 4)),
        "y": np.arange(30) % 2,
    }
    for name, value in arrays.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], value)
    paths["file"] = tmp_path / "regular"
    paths["file"].write_text("a regular file")
    other = paths["other"] = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE mine (x)")
    db.execute("INSERT INTO mine VALUES (1)")
    db.commit()
    db.close()
    store = paths["store"] = tmp_path / "r.db"
    with ResultsStore(store) as s:
        s.write("s", [{"run_id": "a", "gain_test": 1.0}], [{"seed": 0}])
    db = sqlite3.connect(store)  # fold the write-ahead log in, so that the store is one file
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return paths


def snapshot(folder):
    """Every file under ``folder`` and its bytes."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _corrupt(files, how):
    path = files["tmp"] / f"{how}.db"
    path.write_bytes(files["store"].read_bytes())
    if how == "bad_page":
        data = bytearray(path.read_bytes())
        page = int.from_bytes(data[16:18], "big")
        data[page : 2 * page] = b"\xab" * page
        path.write_bytes(bytes(data))
    else:
        db = sqlite3.connect(path)
        if how == "meta_without_runs":
            db.executescript("DROP TABLE study_runs; DROP TABLE runs;")
        else:
            db.execute("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'")
        db.commit()
        db.close()
    return path


def _copy(path, name):
    copy = path.with_name(name)
    copy.write_bytes(path.read_bytes())
    return copy


def _link(path, name):
    link = path.with_name(name)
    os.link(path, link)
    return link


def _fit(files, *extra, features="F", teacher="Q"):
    return ["fit", "--features", str(files[features]), "--teacher", str(files[teacher]), "--loss", "reverse_kl",
            "--head", "softmax", "--out", str(files["tmp"] / "o.npz"), *extra]


def _study(files, *extra):
    return ["study", "--weak-features", str(files["W"]), "--strong-features", str(files["S"]), "--labels",
            str(files["y"]), "--repeats", "1", "--losses", "reverse_kl", *extra]


def _huge_config(files):
    path = files["tmp"] / "huge.toml"
    path.write_text('[study]\nname = "huge"\nseeds = [0]\n[world]\nstrong_dim = 10000000000\n')
    return path


def _computing_is_an_error(monkeypatch):
    """Patch every long computation to fail: a case that validates first never reaches them."""
    def computed(*args, **kwargs):
        raise AssertionError("the command computed before validating its arguments")

    monkeypatch.setattr("w2s_theory.byo.run_byo", computed)
    monkeypatch.setattr("w2s_theory.commands.check.run_check", computed)
    monkeypatch.setattr("w2s_theory.commands.audit_constant.audit_constant", computed)
    monkeypatch.setattr("w2s_theory.figures.make_figures", computed)
    monkeypatch.setattr("w2s_theory.sweep.run_sweep", computed)


#: (case, argv builder, words of the error). Each exits 2 with one line and leaves every file as it was.
CASES = [
    # issue 8 item 8: tracebacks and exit 1 where exit 2 was promised
    ("empty batch B = 0", lambda f: _fit(f, features="F0", teacher="Q0"), "B = 0"),
    ("fit --device tpu", lambda f: _fit(f, "--device", "tpu"), "--device: unknown device 'tpu'"),
    ("study --device tpu", lambda f: _study(f, "--device", "tpu"), "--device: unknown device 'tpu'"),
    ("figures --device tpu", lambda f: ["figures", "--device", "tpu", "--store", str(f["tmp"] / "new.db"),
                                        "--out", str(f["tmp"] / "figs"), "--quick"], "unknown device 'tpu'"),
    ("fit --out under a file", lambda f: _fit(f)[:-2] + ["--out", str(f["file"] / "o.npz")], "is a file"),
    ("fit --json under a file", lambda f: _fit(f, "--json", str(f["file"] / "r.json")), "is a file"),
    ("study --json under a file", lambda f: _study(f, "--json", str(f["file"] / "r.json")), "is a file"),
    ("check --json under a file", lambda f: ["check", "--quick", "--json", str(f["file"] / "c.json")], "is a file"),
    ("audit-constant --json under a file",
     lambda f: ["audit-constant", "2", "--gamma", "0.1", "--json", str(f["file"] / "a.json")], "is a file"),
    ("export --out under a file", lambda f: ["export", "--store", str(f["store"]), "--out",
                                             str(f["file"] / "t.csv")], "is a file"),
    ("figures --out under a file", lambda f: ["figures", "--store", str(f["tmp"] / "new.db"), "--out",
                                              str(f["file"] / "figs"), "--quick"], "is a file"),
    ("sweep --store under a file", lambda f: ["sweep", SMOKE, "--store", str(f["file"] / "r.db"), "--quiet"],
     "is a file"),
    ("export: store with a bad page", lambda f: ["export", "--store", str(_corrupt(f, "bad_page")), "--out",
                                                 str(f["tmp"] / "t.csv")], "damaged"),
    ("sweep: store with a bad page", lambda f: ["sweep", SMOKE, "--store", str(_corrupt(f, "bad_page")),
                                                "--quiet"], "damaged"),
    ("export: meta without runs", lambda f: ["export", "--store", str(_corrupt(f, "meta_without_runs")),
                                             "--out", str(f["tmp"] / "t.csv")], "without table runs"),
    ("sweep: meta without runs", lambda f: ["sweep", SMOKE, "--store", str(_corrupt(f, "meta_without_runs")),
                                            "--quiet"], "without table runs"),
    ("export: schema_version 'abc'", lambda f: ["export", "--store", str(_corrupt(f, "abc")), "--out",
                                                str(f["tmp"] / "t.csv")], "schema_version 'abc'"),
    ("sweep: schema_version 'abc'", lambda f: ["sweep", SMOKE, "--store", str(_corrupt(f, "abc")), "--quiet"],
     "schema_version 'abc'"),
    ("huge config value", lambda f: ["sweep", str(_huge_config(f)), "--store", str(f["tmp"] / "new.db")],
     "use smaller sizes"),
    ("huge --classes", lambda f: _study(f, "--classes", "10000000000"), "too many"),
    ("check --seed -1", lambda f: ["check", "--quick", "--seed", "-1"], "--seed must be >= 0"),
    # item 6: an output over an input or the store
    ("export --out is the store", lambda f: ["export", "--store", str(f["store"]), "--out", str(f["store"])],
     "same file as --store"),
    ("export --out is the store, named .csv", lambda f: ["export", "--store", str(_copy(f["store"], "r.csv")),
                                                         "--out", str(f["tmp"] / "r.csv")], "same file as --store"),
    ("export --out is a hard link to the store",
     lambda f: ["export", "--store", str(f["store"]), "--out", str(_link(f["store"], "link.csv"))], "same file"),
    ("fit --out is the features", lambda f: _fit(f)[:-2] + ["--out", str(f["F"])], "same file as --features"),
    ("fit --json is the teacher", lambda f: _fit(f, "--json", str(f["Q"])), "same file as --teacher"),
    ("fit --json is --out", lambda f: _fit(f, "--json", str(f["tmp"] / "o.npz")), "same file"),
    ("study --json is the labels", lambda f: _study(f, "--json", str(f["y"])), "same file as --labels"),
    ("sweep --store is the config", lambda f: ["sweep", SMOKE, "--store", SMOKE], "same file as CONFIG"),
    # item 7: read-only means read-only; only a results store is written to
    ("export from a non-store SQLite file", lambda f: ["export", "--store", str(f["other"]), "--out",
                                                       str(f["tmp"] / "t.csv")], "not a w2s-theory results store"),
    ("sweep into a non-store SQLite file", lambda f: ["sweep", SMOKE, "--store", str(f["other"]), "--quiet"],
     "not a w2s-theory results store"),
    ("sweep into a non-SQLite file", lambda f: ["sweep", SMOKE, "--store", str(f["F"]), "--quiet"],
     "not an SQLite database"),
    ("figures into a non-store SQLite file", lambda f: ["figures", "--store", str(f["other"]), "--out",
                                                        str(f["tmp"] / "figs"), "--quick"],
     "not a w2s-theory results store"),
    # item 9: silently accepted bad values
    ("complex features", lambda f: _fit(f, features="Fc"), "complex values"),
    ("fit --tol -1", lambda f: _fit(f, "--tol", "-1"), "--tol: expected a finite number > 0"),
    ("fit --tol nan", lambda f: _fit(f, "--tol", "nan"), "--tol: expected a finite number > 0"),
    ("fit --tol inf", lambda f: _fit(f, "--tol", "inf"), "--tol: expected a finite number > 0"),
    ("audit-constant 9^9^9^9", lambda f: ["audit-constant", "9^9^9^9", "--gamma", "0.1"], "EXPR: constant: an exponent"),
    ("audit-constant --seed -1", lambda f: ["audit-constant", "2", "--gamma", "0.1", "--seed", "-1"], "--seed:"),
    ("audit-constant --gamma 0.5", lambda f: ["audit-constant", "2", "--gamma", "0.5"], "--gamma:"),
]


@pytest.mark.parametrize("case,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_before_computing_and_touches_no_file(files, capsys, monkeypatch, case,
                                                                              argv, words):
    args = argv(files)
    before = snapshot(files["tmp"])
    _computing_is_an_error(monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err, err
    assert err.startswith(f"w2s-theory {args[0]}: error: ") and "\n" not in err and "Traceback" not in err
    assert snapshot(files["tmp"]) == before  # byte-identical, nothing created (no -wal, no new store)


def test_a_memory_error_anywhere_is_a_one_line_exit_2(files, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.46 TiB")

    monkeypatch.setattr("w2s_theory.commands.fit.fit", exhausted)
    assert main(_fit(files)) == 2
    err = capsys.readouterr().err.strip()
    assert "out of memory" in err and "\n" not in err


def test_audit_constant_help_states_the_gamma_range_that_the_check_accepts(capsys):
    with pytest.raises(SystemExit):
        main(["audit-constant", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "in (0, 0.5)" in help_text and "(0, 1/2]" not in help_text
    assert main(["audit-constant", "2", "--gamma", "0.49", "--budget", "10"]) in (0, 1)  # just inside: accepted


def test_a_closed_stdout_exits_141_without_traceback_and_the_files_are_complete(files):
    report, out = files["tmp"] / "r.json", files["tmp"] / "o.npz"
    proc = subprocess.Popen([sys.executable, "-m", "w2s_theory.cli", *_fit(files, "--json", str(report))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader went away at once, as `... | true` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_BROKEN_PIPE
    assert b"Traceback" not in err and b"Exception ignored" not in err
    assert len(json.loads(report.read_text())["students"]) == 1
    assert np.load(out)["probs"].shape == (30, 3)


def test_export_and_sweep_leave_a_non_store_sqlite_file_byte_identical_without_a_journal(files):
    other = files["other"]
    before = other.read_bytes()
    for args in (["export", "--store", str(other), "--out", str(files["tmp"] / "t.csv")],
                 ["sweep", SMOKE, "--store", str(other), "--quiet"]):
        assert main(args) == 2
    assert other.read_bytes() == before
    assert not any(other.with_name(other.name + s).exists() for s in ("-wal", "-shm", "-journal"))
    db = sqlite3.connect(other)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    db.close()


def test_sweep_rows_are_bit_identical_whatever_the_callers_thread_count(tmp_path):
    """README: rows never depend on how a sweep is distributed. The thread count of the caller (2 here, 1 on
    a Ray worker) changed the last bits of float sums before every chunk was solved with fixed threads."""
    from w2s_theory.config import load_study
    from w2s_theory.sweep import _run_chunk, run_sweep

    specs = load_study(SMOKE).specs[:8]
    previous = torch.get_num_threads()
    rows = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with ResultsStore(tmp_path / f"t{threads}.db") as store:
                run_sweep(specs, store, "smoke", device="cpu", progress=False)
                rows[threads] = {r["run_id"]: r for r in store.rows("smoke")}
        torch.set_num_threads(2)
        ray_rows = {r["run_id"]: r for r in _run_chunk([s.as_dict() for s in specs], "cpu")}  # a Ray task's body
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous
    assert set(rows[1]) == set(rows[2]) == set(ray_rows) and len(rows[1]) == len(specs)

    def same(a, b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

    for run_id, row in rows[1].items():
        for key, value in row.items():
            if key == "study":
                continue
            assert same(value, rows[2][run_id][key]), (run_id, key, value, rows[2][run_id][key])
            assert same(value, json.loads(json.dumps(ray_rows[run_id]))[key]), (run_id, key)
