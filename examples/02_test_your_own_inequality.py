"""Example 2: test your own inequality on certified students across a sweep.

Theorem 2 (docs/theory.md) bounds the gain of a reverse-KL student by its *reverse* misfit. Suppose you
conjecture more: that the student also beats its teacher by the *forward* misfit,

    gain = E KL(F*||F_w) - E KL(F*||F_sw)  >=  E KL(F_w||F_sw) = misfit_forward      (conjecture)

This script runs a small sweep (a grid of synthetic worlds x label noise x seeds; the same machinery as
`w2s-theory sweep`) into a results store, reads the store into pandas, evaluates the conjecture on every
certified student, and prints the worst instance: the run_id and settings to reproduce it.

How to read a violation: the conjecture is about exact minimisers and every student here carries a certified
gap g >= objective - optimum. A slack far below -g cannot be blamed on the solver. (To turn that into a
proof, bound how much your quantity can move when the objective moves by g, as docs/theory.md does for
Theorem 2, where the bound is g itself.) Run: python examples/02_test_your_own_inequality.py [STORE.db]
"""

import sys
import tempfile
from pathlib import Path

from w2s_theory.config import parse_study
from w2s_theory.store import ResultsStore
from w2s_theory.sweep import run_sweep

# A study as a plain dict: the same keys as a TOML file under experiments/ (see docs/design.md).
study = parse_study({
    "study": {"name": "forward_misfit_conjecture", "seeds": {"start": 0, "count": 6}},
    "world": {"k": [2, 3], "strong_dim": 16, "weak_dim": 4},
    "run": {"loss": "reverse_kl", "head": "mixture", "noise": [0.0, 0.2], "n_weak": 300, "n_train": 300,
            "n_test": 300},
})

store_path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "results.db"
with ResultsStore(store_path) as store:
    summary = run_sweep(study.specs, store, study.name, progress=False)  # resumable: re-runs skip stored rows
    frame = store.dataframe(study.name)
print(f"{len(frame)} students in {store_path}")

certified = frame[frame["gap"] <= 1e-9].copy()
certified["slack"] = certified["gain_train"] - certified["misfit_forward"]
certified["theorem2_slack"] = certified["gain_train"] - certified["misfit_reverse"]
print(f"{len(certified)} certified (gap <= 1e-9); worst certified gap {certified['gap'].max():.1e}")
print(f"Theorem 2   (gain >= reverse misfit): min slack {certified['theorem2_slack'].min():+.2e}")
violations = certified[certified["slack"] < -certified["gap"]]
print(f"conjecture  (gain >= forward misfit): min slack {certified['slack'].min():+.2e}, "
      f"violated on {len(violations)}/{len(certified)} students")

worst = certified.loc[certified["slack"].idxmin()]
print("worst instance:")
print(worst[["run_id", "world_k", "noise", "seed", "gain_train", "misfit_reverse", "misfit_forward", "slack",
             "gap"]].to_string())
