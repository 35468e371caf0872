"""`w2s-theory check`: every claim of docs/theory.md is a discovered paper check that declares its statement, source,
expectation and sizes, meets its expectation, and can fail when the mathematics it checks is broken."""

import json

import numpy as np
import pytest

import paper_checks
from w2s_theory.bounds import sharp_binary_constant
from w2s_theory.checks import EXPECTATIONS, discover, run_check
from w2s_theory.cli import main

REQUIRED = {
    "theorem2_reverse_kl", "forward_kl_counterexample", "softmax_forward_identity", "charikar_realizable",
    "charikar_nonrealizable", "reverse_kl_nonrealizable", "sqrt_bound_upper_forward", "sqrt_bound_upper_reverse",
    "sqrt_bound_lower_forward", "sqrt_bound_lower_reverse", "sharp_constant_attainment", "guarantee_table",
    "finite_sample_heldout", "softmax_reverse_large_violation",
}


def test_check_discovers_every_required_claim():
    assert REQUIRED <= {c.name for c in discover()}


@pytest.mark.parametrize("check", discover(), ids=lambda c: c.name)
def test_every_check_declares_statement_source_expectation(check):
    assert check.expected in EXPECTATIONS
    assert check.source.strip() and check.claim.strip()
    assert ":math:" in check.statement or ".. math::" in check.statement, "the statement needs its LaTeX"
    module = __import__(f"paper_checks.{check.name}", fromlist=["run"])
    assert "size" in (module.__doc__ or "").lower() or hasattr(module, "SIZES") or check.name in (
        "forward_kl_counterexample",), "declare a fast default size"


def test_check_quick_meets_every_expectation_and_the_json_lists_them_all(tmp_path, capsys):
    out = tmp_path / "checks.json"
    code = main(["check", "--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["checks"]]
    assert set(names) == {c.name for c in discover()}
    failed = [(c["name"], c["verdict"], c.get("error")) for c in report["checks"] if not c["met"]]
    assert code == 0 and report["all_met"], failed
    for c in report["checks"]:
        assert {"name", "claim", "source", "expected", "verdict", "met", "worst_slack", "certificate",
                "instances"} <= set(c)
        assert c["instances"] > 0
    assert "checks met their expectation" in printed


# -------------------------------------------------------------------------------------------------------------
# Checks can fail: break the mathematics they rely on and watch the verdict change
# -------------------------------------------------------------------------------------------------------------


def _run(name, **kw):
    check = next(c for c in discover() if c.name == name)
    return run_check(check, quick=True, **kw)


def test_sqrt_bound_check_fails_for_a_constant_below_the_sharp_one(monkeypatch):
    import paper_checks._sqrt_bound as helper
    from w2s_theory import bounds

    original = bounds.sqrt_bound

    def too_small(*args, **kwargs):
        kwargs["constant"] = lambda g: 0.9 * sharp_binary_constant(g)
        return original(*args, **kwargs)

    monkeypatch.setattr(helper, "sqrt_bound", too_small)
    row = _run("sqrt_bound_lower_reverse")
    assert row["verdict"] == "violated" and not row["met"]


def test_sharp_constant_check_fails_if_the_constant_were_smaller(monkeypatch):
    import paper_checks.sharp_constant_attainment as module

    monkeypatch.setattr(module, "sharp_binary_constant", lambda g: 0.999 * sharp_binary_constant(g))
    row = _run("sharp_constant_attainment")
    assert row["verdict"] == "violated" and not row["met"]


def test_nonrealizable_check_fails_without_its_correction(monkeypatch):
    from w2s_theory import bregman

    monkeypatch.setattr(bregman, "misspecification_bound", lambda *a: np.zeros(np.shape(a[0])[:-2]))
    row = _run("reverse_kl_nonrealizable")
    assert row["verdict"] == "violated" and not row["met"]


def test_nonrealizable_check_is_inconclusive_when_the_truth_never_leaves_the_class(monkeypatch):
    import paper_checks.charikar_nonrealizable as module

    monkeypatch.setattr(module, "EPSILONS", (0.0,))
    row = _run("charikar_nonrealizable")
    assert row["verdict"] == "inconclusive" and not row["met"]


def test_guarantee_table_check_fails_when_a_row_expects_the_wrong_pattern(monkeypatch):
    from dataclasses import replace

    from w2s_theory import guarantees

    rows = list(guarantees.ROWS)
    rows[4] = replace(rows[4], expected="holds")  # mixture + forward KL "holds": refuted by certified failures
    monkeypatch.setattr(guarantees, "ROWS", rows)
    row = _run("guarantee_table")
    assert row["verdict"] == "violated" and not row["met"]


def test_finite_sample_check_sees_a_shrinking_discrepancy(monkeypatch):
    import paper_checks.finite_sample_heldout as module

    outcome = module.run(True, 0)
    rms = [r["rms_train_minus_heldout"] for r in outcome.details["by_n"]]
    assert rms == sorted(rms, reverse=True)
    # with one sample size only there is nothing to shrink: the statistical part cannot pass vacuously
    monkeypatch.setitem(module.SIZES, "quick", {"seeds": 12, "n": (200, 200)})
    assert module.run(True, 0).verdict == "inconclusive"


def test_paper_checks_package_skips_private_helpers():
    names = {c.name for c in discover()}
    assert not any(name.startswith("_") for name in names)
    assert paper_checks.__name__ == "paper_checks"


@pytest.mark.slow
def test_full_size_checks_meet_every_expectation(tmp_path):
    out = tmp_path / "full.json"
    assert main(["check", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["all_met"]
