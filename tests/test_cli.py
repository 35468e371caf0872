"""The command line as a user meets it: exit codes, one-line errors, files written or left alone."""

import json
import subprocess
import sys

import numpy as np
import pytest

from w2s_theory.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "w2s_theory.cli", *args], capture_output=True, text=True)


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for name, value in {
        "F": rng.dirichlet(np.ones(4), size=40),
        "ones": np.ones((9, 1)),
        "Q": rng.dirichlet(np.ones(3), size=(2, 40)),
        "Q9": rng.dirichlet(np.ones(3), size=(4, 9)),
        "logits": rng.normal(size=(40, 3)),
    }.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], value)
    return paths


@pytest.mark.parametrize("loss,closed_form", [
    ("reverse_kl", lambda q: np.exp(np.log(q).mean(-2)) / np.exp(np.log(q).mean(-2)).sum(-1, keepdims=True)),
    ("forward_kl", lambda q: q.mean(-2)),
])
def test_fit_on_constant_features_reproduces_the_closed_forms(arrays, tmp_path, loss, closed_form):
    out = tmp_path / "out.npz"
    assert main(["fit", "--features", str(arrays["ones"]), "--teacher", str(arrays["Q9"]), "--loss", loss,
                 "--head", "mixture", "--out", str(out)]) == 0
    saved = np.load(out)
    q = np.load(arrays["Q9"])
    assert np.allclose(saved["probs"], closed_form(q)[:, None, :], atol=1e-9)
    assert saved["gap"].shape == (4,) and (saved["gap"] <= 1e-9).all()
    assert saved["objective"].shape == (4,)


def test_fit_writes_a_json_report_with_errors_when_the_truth_is_given(arrays, tmp_path):
    truth = tmp_path / "T.npy"
    np.save(truth, np.load(arrays["Q"])[0])
    report = tmp_path / "r.json"
    code = main(["fit", "--features", str(arrays["F"]), "--teacher", str(arrays["Q"]), "--loss", "reverse_kl",
                 "--out", str(tmp_path / "o.npz"), "--truth", str(truth), "--json", str(report)])
    assert code == 0
    students = json.loads(report.read_text())["students"]
    assert len(students) == 2
    assert {"student_error", "gain", "misfit", "gap"} <= set(students[0])



def test_fit_with_the_strong_convexity_certificate_reaches_the_same_objectives_and_names_it(tmp_path, capsys):
    # two classes, reverse KL: the opt-in bound on objective - optimum is at most tol, and the objectives agree
    # with the default (Frank-Wolfe) fit within the two tolerances
    rng = np.random.default_rng(3)
    np.save(tmp_path / "F.npy", rng.dirichlet(np.ones(5), size=60))
    np.save(tmp_path / "Q.npy", rng.dirichlet(np.ones(2), size=(3, 60)))
    outs = {}
    for flag in ([], ["--strong-convexity"]):
        out = tmp_path / f"o{len(flag)}.npz"
        assert main(["fit", "--features", str(tmp_path / "F.npy"), "--teacher", str(tmp_path / "Q.npy"), "--loss",
                     "reverse_kl", "--out", str(out), "--tol", "1e-9", *flag]) == 0
        outs[len(flag)] = np.load(out)
        assert (outs[len(flag)]["gap"] <= 1e-9).all()
    assert "certificate: frank_wolfe_or_strong_convexity" in capsys.readouterr().out
    assert np.abs(outs[1]["objective"] - outs[0]["objective"]).max() <= 2e-9


def test_fit_says_why_a_student_is_uncertified(arrays, tmp_path, capsys):
    # simplex rows beside the linear head's bias are collinear: no certificate, and the summary says why
    code = main(["fit", "--features", str(arrays["F"]), "--teacher", str(arrays["Q"]), "--loss", "forward_kl",
                 "--head", "linear", "--out", str(tmp_path / "o.npz")])
    assert code == 0
    assert np.isnan(np.load(tmp_path / "o.npz")["gap"]).all()
    lines = capsys.readouterr().out.splitlines()
    assert "2 student(s) uncertified: the features' span is numerically rank-deficient" in lines[-1]

@pytest.mark.parametrize("bad_args,message", [
    (["--teacher", "logits", "--loss", "reverse_kl"], "negative probabilities"),
    (["--teacher", "Q", "--loss", "kl"], "unknown loss 'kl'"),
    (["--teacher", "Q", "--loss", "reverse_kl", "--head", "tree"], "unknown head 'tree'"),
    (["--teacher", "Q9", "--loss", "reverse_kl"], "rows"),
    (["--teacher", "missing", "--loss", "reverse_kl"], "file not found"),
    (["--teacher", "Q", "--loss", "forward_kl", "--head", "softmax", "--strong-convexity"],
     "the strong-convexity certificate is for the mixture head"),
    (["--teacher", "Q", "--loss", "reverse_kl", "--strong-convexity"],  # three classes
     "the strong-convexity certificate is for two classes"),
])
def test_bad_input_gives_one_line_error_exit_2_and_keeps_existing_output(arrays, tmp_path, bad_args, message):
    out = tmp_path / "out.npz"
    out.write_bytes(b"precious")
    args = ["fit", "--features", str(arrays["F"]), "--out", str(out)]
    for i, a in enumerate(bad_args):
        args.append(str(arrays.get(a, tmp_path / "missing.npy")) if i > 0 and bad_args[i - 1] == "--teacher" else a)
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert out.read_bytes() == b"precious"


def test_check_quick_prints_the_table_and_writes_the_json_contract(tmp_path):
    report = tmp_path / "check.json"
    proc = run_cli("check", "--quick", "--only", "theorem2_reverse_kl", "--json", str(report))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "theorem2_reverse_kl" in proc.stdout and "holds" in proc.stdout
    data = json.loads(report.read_text())
    assert data["all_met"] is True
    row = data["checks"][0]
    assert {"name", "claim", "source", "expected", "verdict", "met", "worst_slack", "certificate",
            "instances"} <= set(row)


def test_check_exit_code_is_1_when_a_check_misses_its_expectation(monkeypatch, capsys):
    from w2s_theory.checks import CheckOutcome, PaperCheck

    failing = PaperCheck("always_violated", "a claim that fails", "test", "holds",
                         lambda quick, seed: CheckOutcome("violated", -1.0, 0.0, 1))
    monkeypatch.setattr("w2s_theory.commands.check.discover", lambda: [failing])
    assert main(["check", "--quick"]) == 1
    assert "always_violated" in capsys.readouterr().out
