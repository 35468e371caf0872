"""Shared verdict logic of the two non-realizable checks (reverse KL and Charikar's squared loss).

Each check sweeps the distance of the truth from the class (a mixing weight ``eps``; ``eps = 0`` is
realizable) and evaluates, on the same students,

* the *corrected* inequality (a theorem for every ``eps``): every instance must hold;
* the *plain* inequality with a certificate for the exact minimiser: at ``eps = 0`` it is the theorem (every
  instance must hold); for ``eps > 0`` docs/theory.md says it "does fail once F* leaves the class", so at least one
  certified violation must appear, else the sweep did not exercise what it claims to and the check is
  ``inconclusive``.

The check's verdict: ``violated`` if the corrected inequality, or the plain one at ``eps = 0``, has a certified
violation (a theorem refuted); ``holds`` if all of the above are met; ``inconclusive`` otherwise.
"""

from __future__ import annotations

from w2s_theory.checks import CheckOutcome, outcome_from_results


def combine(theorems: list, plain_by_eps: dict) -> CheckOutcome:
    """``theorems``: results that must hold (corrected inequality at every eps, plain/realizable at eps = 0);
    ``plain_by_eps``: eps -> the plain inequality's result (certified for the exact minimiser)."""
    outcome = outcome_from_results(theorems)
    sweep = {}
    for eps, result in sorted(plain_by_eps.items()):
        sweep[f"{eps:g}"] = {"plain_holds": result.count("holds"), "plain_violated": result.count("violated"),
                             "plain_inconclusive": result.count("inconclusive"), "instances": result.instances}
    plain_fails = sum(r.count("violated") for eps, r in plain_by_eps.items() if eps > 0)
    realizable_fails = sum(r.count("violated") for eps, r in plain_by_eps.items() if eps == 0)
    outcome.details.update(plain_by_eps=sweep, plain_failures_outside_class=plain_fails)
    if realizable_fails:
        outcome.verdict = "violated"
        outcome.details["note"] = "the plain inequality failed for a realizable truth (eps = 0): theorem refuted"
    elif outcome.verdict == "holds" and plain_fails == 0:
        outcome.verdict = "inconclusive"
        outcome.details["note"] = "the plain inequality never failed outside the class: the sweep tested nothing"
    return outcome
