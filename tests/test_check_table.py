"""``w2s-theory check`` reads at a glance: the default table fits a 100-column terminal, ``--wide`` adds claim
and source, ``--explain``/``--list``/``--only`` select, and the JSON contract is unchanged (issue 13)."""

import json
import subprocess
import sys

import pytest

from w2s_theory.checks import PaperCheck, discover, provenance_of
from w2s_theory.cli import main
from w2s_theory.commands.check import TABLE_WIDTH

LONG_NAME = "a_check_with_a_very_long_name_that_would_not_fit_in_any_ordinary_terminal_row"


def _worst_case_row(check, *, quick, seed):
    """A row with the widest values a check can report (the table's width must not depend on luck)."""
    return {"name": check.name, "claim": check.claim, "source": check.source, "expected": check.expected,
            "provenance": provenance_of(check), "verdict": "inconclusive", "met": False,
            "worst_slack": -1.2345678e-123, "certificate": float("nan"), "instances": 1234567,
            "seconds": 12345.67, "details": {}}


@pytest.fixture
def every_check_plus_a_long_one(monkeypatch):
    checks = discover() + [PaperCheck(LONG_NAME, "a claim", "nowhere", "counterexample",
                                      lambda quick, seed: None)]
    monkeypatch.setattr("w2s_theory.commands.check.discover", lambda: checks)
    monkeypatch.setattr("w2s_theory.commands.check.run_check", _worst_case_row)
    return checks


def test_the_default_table_fits_100_columns_even_with_long_names_and_values(every_check_plus_a_long_one, capsys):
    assert main(["check", "--quick"]) == 1  # the worst-case rows are not met
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= TABLE_WIDTH == 100
    header = lines[0].split()
    assert header == ["check", "expected", "verdict", "met", "worst", "slack", "certificate", "instances", "s"]
    # a shortened name keeps both ends, so that it can still be told apart
    shortened = [line.split()[0] for line in lines if line.startswith("a_check")]
    assert len(shortened) == 1 and ".." in shortened[0] and shortened[0].endswith("row")
    # one row per check, each name whole or shortened to its two ends, and still told apart
    shown = [line.split()[0] for line in lines[2:] if line.strip()][:len(every_check_plus_a_long_one)]
    assert len(set(shown)) == len(every_check_plus_a_long_one)
    for name, check in zip(shown, every_check_plus_a_long_one):
        head, _, tail = name.partition("..")
        assert name == check.name or (check.name.startswith(head) and check.name.endswith(tail))


def test_wide_adds_claim_and_source(every_check_plus_a_long_one, capsys):
    main(["check", "--quick", "--wide"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["check", "claim", "source"]
    assert LONG_NAME in out and every_check_plus_a_long_one[0].claim in out


def test_the_real_quick_table_fits_100_columns():
    proc = subprocess.run([sys.executable, "-m", "w2s_theory.cli", "check", "--quick", "--only",
                           "forward_kl_counterexample,theorem2_reverse_kl"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert sum(1 for line in lines if line.split()[:1] in (["forward_kl_counterexample"], ["theorem2_reverse_kl"])) == 2


def test_explain_prints_statement_source_and_provenance(capsys):
    assert main(["check", "--explain", "theorem2_reverse_kl"]) == 0
    out = capsys.readouterr().out
    check = next(c for c in discover() if c.name == "theorem2_reverse_kl")
    assert "source:     Yao et al. 2025, Thm 2" in out
    assert "provenance: paper" in out
    assert check.statement.strip().splitlines()[0] in out


def test_provenance_is_declared_or_derived_from_the_source():
    def make(source, provenance=""):
        return PaperCheck("x", "claim", source, "holds", lambda q, s: None, provenance=provenance)

    assert provenance_of(make("Yao et al. 2025, Thm 2")) == "paper"
    assert provenance_of(make("Yao et al. 2025, Lemma 1 (form per docs/theory.md)")) == "reconstructed"
    assert provenance_of(make("Charikar et al. 2024 (constant 2 derived here)")) == "reconstructed"
    assert provenance_of(make("anything", provenance="paper")) == "paper"
    with pytest.raises(ValueError, match="provenance"):
        make("x", provenance="folklore")


def test_list_names_every_check_and_only_takes_comma_separated_names(every_check_plus_a_long_one, capsys):
    assert main(["check", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(c.name in out for c in every_check_plus_a_long_one)
    main(["check", "--quick", "--only", "theorem2_reverse_kl,charikar_realizable"])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()]
    assert rows[:2] == ["charikar_realizable", "theorem2_reverse_kl"]


@pytest.mark.parametrize("args", [["--only", "theorem2_reverse_kl,nope"], ["--explain", "nope"], ["--only", ","]])
def test_an_unknown_check_name_is_a_one_line_error(args, capsys):
    assert main(["check", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown check" in err and "\n" not in err


def test_the_json_contract_keeps_its_fields_and_adds_provenance(every_check_plus_a_long_one, tmp_path, capsys):
    report = tmp_path / "c.json"
    main(["check", "--quick", "--json", str(report)])
    data = json.loads(report.read_text())
    assert set(data) == {"all_met", "checks"} and data["all_met"] is False
    row = data["checks"][-1]
    assert {"name", "claim", "source", "expected", "verdict", "met", "worst_slack", "certificate", "instances",
            "seconds", "details", "provenance"} <= set(row)
    assert row["expected"] == "counterexample"  # the JSON keeps the declared expectation
