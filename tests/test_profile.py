"""The sweep profile: every second of wall time charged to exactly one phase (shares sum to 100 %), nested
phases timed exclusively, and a profiled sweep storing the same rows, bit for bit, as an unprofiled one."""

import json
import re
import textwrap
import time

import pytest

from w2s_theory.cli import main
from w2s_theory.profile import OVERHEAD, PhaseTimer, phase
from w2s_theory.store import ResultsStore


class FakeClock:
    """A clock that advances only when told to, so that the phase times are exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_nested_phases_are_charged_exclusively_and_the_shares_sum_to_one():
    clock = FakeClock()
    with PhaseTimer(clock) as timer:
        clock.advance(1)  # no phase open: overhead
        with phase("world"):
            clock.advance(3)
            with phase("solver: teacher"):  # charged to the solver, not to the world around it
                clock.advance(5)
            clock.advance(1)
        with phase("solver: students"):
            clock.advance(2)
            with phase("solver: students"):  # re-entering a phase adds to it
                clock.advance(4)
        clock.advance(0.5)  # after the last phase: overhead again
    assert timer.seconds == {OVERHEAD: 1.5, "world": 4, "solver: teacher": 5, "solver: students": 6}
    assert timer.total == 16.5
    assert sum(timer.shares().values()) == pytest.approx(1.0, abs=1e-12)
    assert timer.group_share("solver") == pytest.approx(11 / 16.5)


def test_the_real_clock_charges_every_second_to_one_phase():
    with PhaseTimer() as timer:
        with phase("a"):
            time.sleep(0.01)
            with phase("b"):
                time.sleep(0.01)
    assert timer.seconds["a"] >= 0.01 and timer.seconds["b"] >= 0.01
    assert sum(timer.seconds.values()) == pytest.approx(timer.total, rel=1e-9)


def test_a_phase_outside_a_timer_does_nothing_and_an_exception_closes_open_phases():
    with phase("solver: students"):  # no timer active: a no-op
        pass
    with pytest.raises(RuntimeError):
        with PhaseTimer() as timer:
            with phase("world"):
                raise RuntimeError("boom")
    assert set(timer.seconds) <= {OVERHEAD, "world"} and "world" in timer.seconds
    assert sum(timer.seconds.values()) == pytest.approx(timer.total, abs=1e-9)
    with phase("world"):  # the failed timer is no longer active
        pass


CONFIG = textwrap.dedent("""
    [study]
    name = "profiled"
    seeds = [0, 1]
    [world]
    k = 2
    strong_dim = 8
    weak_dim = 3
    [run]
    loss = ["forward_kl", "reverse_kl"]
    head = ["softmax", "mixture"]
    n_weak = 60
    n_train = 60
    n_test = 60
""")


def _profile_rows(text: str) -> dict[str, float]:
    shares = {}
    for line in text.splitlines():
        match = re.match(r"^(\S.*?)\s{2,}([0-9][0-9.e+-]*)\s+([0-9][0-9.e+-]*)$", line)
        if match:
            shares[match.group(1)] = float(match.group(3))
    return shares


def test_sweep_profile_prints_shares_that_sum_to_100_percent_and_leaves_rows_unchanged(tmp_path, capsys):
    config = tmp_path / "profiled.toml"
    config.write_text(CONFIG)
    plain, profiled = tmp_path / "plain.db", tmp_path / "profiled.db"
    assert main(["sweep", str(config), "--store", str(plain), "--device", "cpu", "--quiet"]) == 0
    assert "profile" not in capsys.readouterr().out
    assert main(["sweep", str(config), "--store", str(profiled), "--device", "cpu", "--quiet", "--profile"]) == 0
    out = capsys.readouterr().out
    shares = _profile_rows(out)
    phases = {name: share for name, share in shares.items() if name not in ("total (wall)", "all solvers")}
    assert {"solver: students", "solver: weak teachers and ceilings", "worlds (sampling, teacher outputs)",
            "metrics and rows", "store", "overhead"} <= set(phases)
    assert sum(phases.values()) == pytest.approx(100, abs=0.05)  # each printed to 4 significant digits
    assert shares["total (wall)"] == 100
    assert shares["all solvers"] == pytest.approx(shares["solver: students"]
                                                  + shares["solver: weak teachers and ceilings"], abs=0.01)
    with ResultsStore(plain) as a, ResultsStore(profiled) as b:
        rows_a, rows_b = a.rows(), b.rows()
    assert len(rows_a) == 8
    assert [r["run_id"] for r in rows_a] == [r["run_id"] for r in rows_b]
    # repr of a float round-trips its bits, and NaN prints as NaN: equal text <=> bit-identical rows
    assert [json.dumps(r, sort_keys=True) for r in rows_a] == [json.dumps(r, sort_keys=True) for r in rows_b]


def test_sweep_profile_needs_the_local_backend(tmp_path, capsys):
    config = tmp_path / "profiled.toml"
    config.write_text(CONFIG)
    assert main(["sweep", str(config), "--store", str(tmp_path / "r.db"), "--backend", "ray", "--profile"]) == 2
    err = capsys.readouterr().err
    assert "--profile" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.db").exists()
