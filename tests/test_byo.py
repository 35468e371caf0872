"""Bring your own representations (``w2s-theory study``): the pipeline end to end on small arrays, its JSON
contract, its guarantee check, and one-line errors for bad inputs."""

import json

import numpy as np
import pytest

from w2s_theory.byo import ByoSettings, check_inputs, fit_softmax_ridge, run_byo
from w2s_theory.cli import main
from w2s_theory.validation import InputError

LOSSES = ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce")


def embeddings(n=150, k=3, seed=0):
    """A strong view that sees the class through 6 noisy features and a weak view that sees a nonlinear,
    noisier summary of 2 of them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    centres = rng.normal(size=(k, 6)) * 1.5
    strong = centres[labels] + rng.normal(size=(n, 6))
    weak = np.tanh(strong[:, :2] + rng.normal(scale=1.5, size=(n, 2)))
    return weak, strong, labels


@pytest.fixture
def arrays(tmp_path):
    weak, strong, labels = embeddings()
    paths = {}
    for name, a in (("W", weak), ("S", strong), ("y", labels)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], a)
    return paths


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_study_runs_end_to_end_and_writes_one_json_entry_per_loss(arrays, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code, out, _ = run_cli(["study", "--weak-features", str(arrays["W"]), "--strong-features", str(arrays["S"]),
                            "--labels", str(arrays["y"]), "--repeats", "2", "--json", str(report_path)], capsys)
    assert code == 0
    for loss in LOSSES:
        assert loss in out
    assert "weak teacher" in out and "strong ceiling" in out and "guarantee check" in out
    report = json.loads(report_path.read_text())
    for loss in LOSSES:
        for key in ("accuracy", "kl_error", "misfit", "gain", "pgr", "gain_ge_misfit", "sqrt_bound_holds"):
            assert key in report[loss], (loss, key)
        assert 0 <= report[loss]["accuracy"] <= 1
    for ref in ("weak", "ceiling"):
        assert 0 <= report[ref]["accuracy"] <= 1 and report[ref]["kl_error"] > 0
    assert report["ceiling"]["accuracy"] > report["weak"]["accuracy"]  # the strong view is better
    assert report["settings"]["n"] == 150 and report["settings"]["classes"] == 3
    assert report["settings"]["repeats"] == 2


def test_pgr_gain_and_the_guarantee_check_are_computed_as_documented():
    weak, strong, labels = embeddings(seed=1)
    report = run_byo(weak, strong, labels, ByoSettings(repeats=1))
    for loss in LOSSES:
        e = report[loss]
        weak, ceiling = report["weak"]["accuracy"], report["ceiling"]["accuracy"]
        expected_pgr = (e["accuracy"] - weak) / (ceiling - weak)
        assert e["pgr"] == pytest.approx(expected_pgr)
        assert e["gain"] == pytest.approx(report["weak"]["kl_error"] - e["kl_error"])
        assert e["misfit"] >= -1e-12
        if loss != "reverse_ce":
            assert e["sqrt_bound_holds"] == 1.0  # Lemma 1 with the provable constant is a theorem
    # forward KL and forward CE differ by a constant: the same students
    assert report["forward_kl"]["accuracy"] == pytest.approx(report["forward_ce"]["accuracy"], abs=1e-12)
    assert report["forward_kl"]["kl_error"] == pytest.approx(report["forward_ce"]["kl_error"], rel=1e-6)


def test_a_teacher_inside_the_student_class_is_copied_exactly():
    # Weak features that are linear in the strong ones make the softmax teacher a member of the students'
    # class: its projection (forward or reverse) is itself, so misfit and in-sample gain are 0.
    _, strong, labels = embeddings(seed=2)
    report = run_byo(strong[:, :2] @ np.array([[1.0, 0.5], [-0.3, 2.0]]), strong, labels,
                     ByoSettings(repeats=1, losses=("forward_kl", "reverse_kl")))
    for loss in ("forward_kl", "reverse_kl"):
        assert abs(report[loss]["misfit"]) < 1e-8
        assert abs(report[loss]["gain_train"]) < 1e-6


def test_results_are_reproducible_from_the_seed():
    weak, strong, labels = embeddings(seed=3)
    a = run_byo(weak, strong, labels, ByoSettings(repeats=1, seed=4, losses=("reverse_kl",)))
    b = run_byo(weak, strong, labels, ByoSettings(repeats=1, seed=4, losses=("reverse_kl",)))
    c = run_byo(weak, strong, labels, ByoSettings(repeats=1, seed=5, losses=("reverse_kl",)))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN standard errors compare as text
    assert a["reverse_kl"]["accuracy"] != c["reverse_kl"]["accuracy"] or a["weak"] != c["weak"]


def test_ridge_softmax_head_is_the_stationary_point_of_its_objective():
    weak, _, labels = embeddings(seed=4)
    W, b = fit_softmax_ridge(weak, labels, 3, 0.1)
    z = weak @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    Y = np.eye(3)[labels]
    grad_W = (p - Y).T @ weak / len(labels) + 0.1 * W
    assert np.abs(grad_W).max() < 1e-6 and np.abs((p - Y).mean(0)).max() < 1e-6


@pytest.mark.parametrize("case, fragment", [
    ("mismatched_rows", "rows"),
    ("negative_label", "class indices"),
    ("fractional_label", "class indices"),
    ("label_above_classes", "out of range"),
    ("nan_feature", "NaN"),
    ("one_class", "two classes"),
    ("labels_2d", "1-D"),
])
def test_bad_inputs_give_a_one_line_error_and_exit_2(arrays, tmp_path, capsys, case, fragment):
    weak, strong, labels = embeddings()
    labels = labels.astype(float)
    extra = []
    if case == "mismatched_rows":
        strong = strong[:-1]
    elif case == "negative_label":
        labels[3] = -1
    elif case == "fractional_label":
        labels[5] = 0.5
    elif case == "label_above_classes":
        extra = ["--classes", "2"]
    elif case == "nan_feature":
        weak[0, 1] = np.nan
    elif case == "one_class":
        labels[:] = 1
    elif case == "labels_2d":
        labels = np.stack([labels, labels], 1)
    for name, a in (("W", weak), ("S", strong), ("y", labels)):
        np.save(tmp_path / f"bad_{name}.npy", a)
    code, out, err = run_cli(["study", "--weak-features", str(tmp_path / "bad_W.npy"), "--strong-features",
                              str(tmp_path / "bad_S.npy"), "--labels", str(tmp_path / "bad_y.npy"), *extra], capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("w2s-theory study: error:")
    assert fragment in err


def test_missing_arrays_and_bad_settings_are_input_errors(arrays, capsys):
    code, _, err = run_cli(["study", "--weak-features", str(arrays["W"])], capsys)
    assert code == 2 and "--strong-features" in err and "--labels" in err
    with pytest.raises(InputError, match="repeats"):
        ByoSettings(repeats=0)
    with pytest.raises(InputError, match="losses"):
        ByoSettings(losses=("squared",))
    with pytest.raises(InputError, match="at least"):
        check_inputs(np.ones((4, 2)), np.ones((4, 3)), [0, 1, 0, 1])


def _save(fmt, path, array, name):
    """``array`` saved as ``fmt``; returns the path to give the CLI."""
    import pandas as pd
    import torch

    if fmt == "npy":
        np.save(path.with_suffix(".npy"), array)
        return path.with_suffix(".npy")
    if fmt == "npz":  # several named arrays: the one named after the argument is picked
        np.savez(path.with_suffix(".npz"), **{name: array, "other": np.zeros(3)})
        return path.with_suffix(".npz")
    if fmt == "pt":
        torch.save(torch.as_tensor(array), path.with_suffix(".pt"))
        return path.with_suffix(".pt")
    table = array.reshape(len(array), -1)
    frame = pd.DataFrame(table, columns=[f"c{i}" for i in range(table.shape[1])])
    if fmt == "parquet":
        frame.to_parquet(path.with_suffix(".parquet"))
        return path.with_suffix(".parquet")
    frame.to_csv(path.with_suffix(".csv"), index=False)
    return path.with_suffix(".csv")


def test_the_same_embeddings_as_npy_pt_npz_parquet_and_csv_give_identical_study_reports(tmp_path, capsys):
    pytest.importorskip("pyarrow")
    weak, strong, labels = embeddings(n=60)
    reports = {}
    for fmt in ("npy", "npz", "pt", "parquet", "csv"):
        paths = [_save(fmt, tmp_path / f"{name}_{fmt}", a, name)
                 for name, a in (("weak_features", weak), ("strong_features", strong), ("labels", labels))]
        out = tmp_path / f"{fmt}.json"
        code, _, err = run_cli(["study", "--weak-features", str(paths[0]), "--strong-features", str(paths[1]),
                                "--labels", str(paths[2]), "--repeats", "1", "--losses", "reverse_kl,forward_kl",
                                "--json", str(out)], capsys)
        assert code == 0, err
        reports[fmt] = json.loads(out.read_text())
    for fmt, report in reports.items():
        assert report == reports["npy"], fmt


@pytest.mark.parametrize("case,fragment", [
    ("non-numeric csv column", "column 'name' of"),
    ("npz without the argument's name", "holds 2 arrays (a, b); pick one as"),
    ("npz key that is not there", "has no array named 'zz'"),
    ("pt with a non-tensor", "holds a str, expected tensors"),
    ("corrupt parquet", "cannot read"),
    ("complex pt tensor", "complex values"),
])
def test_bad_files_of_every_format_give_the_same_one_line_errors(tmp_path, capsys, case, fragment):
    import torch

    weak, strong, labels = embeddings(n=30)
    np.save(tmp_path / "S.npy", strong)
    np.save(tmp_path / "y.npy", labels)
    bad = tmp_path / "W.npz"
    if case == "non-numeric csv column":
        bad = tmp_path / "W.csv"
        bad.write_text("name,x\nalpha,1\nbeta,2\n")
    elif case.startswith("npz"):
        np.savez(bad, a=weak, b=weak)
        if "key" in case:
            bad = f"{bad}:zz"
    elif case == "pt with a non-tensor":
        bad = tmp_path / "W.pt"
        torch.save({"x": "text"}, bad)
    elif case == "corrupt parquet":
        bad = tmp_path / "W.parquet"
        bad.write_bytes(b"PAR1 not really")
    else:
        bad = tmp_path / "W.pt"
        torch.save(torch.ones(30, 2, dtype=torch.complex64), bad)
    code, _, err = run_cli(["study", "--weak-features", str(bad), "--strong-features", str(tmp_path / "S.npy"),
                            "--labels", str(tmp_path / "y.npy"), "--repeats", "1"], capsys)
    assert code == 2
    assert fragment in err and "--weak-features" in err and len(err.strip().splitlines()) == 1, err


def test_an_npz_array_is_picked_by_file_colon_name(tmp_path):
    from w2s_theory.io import load_array

    np.savez(tmp_path / "e.npz", weak=np.ones((4, 2)), strong=np.zeros((4, 3)))
    assert load_array(f"{tmp_path / 'e.npz'}:strong", "--strong-features").shape == (4, 3)
    assert load_array(tmp_path / "e.npz", "--strong-features").shape == (4, 3)  # named after the argument
    np.savetxt(tmp_path / "h.csv", np.arange(6.0).reshape(3, 2), delimiter=",")  # no header row
    assert load_array(tmp_path / "h.csv", "--labels").tolist() == [[0, 1], [2, 3], [4, 5]]
