"""Paper checks: one per claim, discovered from the ``paper_checks`` package and run by ``w2s-theory check``.

A check module defines ``CHECK = PaperCheck(...)``: its claim, source, what it expects (``holds`` or
``counterexample``) and a ``run(quick, seed)`` function that returns a :class:`CheckOutcome`. The verdict of
a check aggregates the verdicts of its instances (:func:`w2s_theory.bregman.verdict`):

* ``violated`` if any instance is a certified violation;
* ``holds`` if every instance holds;
* ``inconclusive`` otherwise.

A check expecting ``holds`` is met when its verdict is ``holds``; one expecting ``counterexample`` is met
when its verdict is ``violated`` (a certified counterexample was found).

Each check says where its statement comes from (``provenance``): ``paper`` when the checked inequality is the
source's own form, ``reconstructed`` when the form or the constant was reconstructed or derived in this
project (the source states it differently, or not at all). A check that does not say is classified from its
``source`` text (:func:`provenance_of`).
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .theorems import TheoremResult

__all__ = ["PaperCheck", "CheckOutcome", "outcome_from_results", "discover", "run_check", "EXPECTATIONS",
           "PROVENANCES", "provenance_of"]

EXPECTATIONS = ("holds", "counterexample")

#: Where a check's statement comes from (see the module docstring).
PROVENANCES = ("paper", "reconstructed")

#: Words in a ``source`` that mark a statement as reconstructed rather than quoted from the paper.
_RECONSTRUCTED_MARKERS = ("theory.md", "docs/", "derived", "here", "form per", "reconstruct", "numerical",
                          "measured")


@dataclass
class CheckOutcome:
    verdict: str
    worst_slack: float
    certificate: float
    instances: int
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PaperCheck:
    name: str
    claim: str
    source: str
    expected: str
    run: Callable[[bool, int], CheckOutcome]
    statement: str = ""
    provenance: str = ""  # "paper" or "reconstructed"; "" = classified from the source (provenance_of)

    def __post_init__(self):
        if self.expected not in EXPECTATIONS:
            raise ValueError(f"check {self.name}: expected must be one of {EXPECTATIONS}, not {self.expected!r}")
        if self.provenance not in ("", *PROVENANCES):
            raise ValueError(f"check {self.name}: provenance must be one of {PROVENANCES}, not {self.provenance!r}")


def provenance_of(check: PaperCheck) -> str:
    """The check's ``provenance`` when it declares one; otherwise ``reconstructed`` when its ``source`` names
    the project's own derivation (the theory notes, "derived here", "form per ...", a numerical finding) and
    ``paper`` when it cites a paper only."""
    if check.provenance:
        return check.provenance
    source = check.source.lower()
    return "reconstructed" if any(marker in source for marker in _RECONSTRUCTED_MARKERS) else "paper"


def outcome_from_results(results: Sequence[TheoremResult], **details) -> CheckOutcome:
    """Aggregate the per-instance verdicts of one or more :class:`TheoremResult` into one outcome; the worst
    instance (smallest slack + certificate) supplies ``worst_slack`` and ``certificate``."""
    verdicts = np.concatenate([np.ravel(r.verdict) for r in results]) if results else np.array([])
    if (verdicts == "violated").any():
        overall = "violated"
    elif verdicts.size and (verdicts == "holds").all():
        overall = "holds"
    else:
        overall = "inconclusive"
    worst = None
    for r in results:
        s = r.summary()
        score = s["worst_slack"] + (0 if np.isnan(s["certificate"]) else s["certificate"])
        if r.equality:
            score = -(abs(s["worst_slack"]) - s["certificate"])
        if worst is None or score < worst[0]:
            worst = (score, s)
    counts = {v: int((verdicts == v).sum()) for v in ("holds", "violated", "inconclusive")}
    return CheckOutcome(
        verdict=overall,
        worst_slack=float(worst[1]["worst_slack"]) if worst else float("nan"),
        certificate=float(worst[1]["certificate"]) if worst else float("nan"),
        instances=int(verdicts.size),
        details={**counts, **({"worst": worst[1]} if worst else {}), **details},
    )


def discover(package: str = "paper_checks") -> list[PaperCheck]:
    """Every ``CHECK`` defined by a module of ``package``, sorted by module name."""
    pkg = importlib.import_module(package)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        check = getattr(module, "CHECK", None)
        if isinstance(check, PaperCheck):
            found.append(check)
    return found


def run_check(check: PaperCheck, *, quick: bool, seed: int = 0) -> dict:
    """Run one check and return its row for the table and the JSON report (docs/design.md contract)."""
    start = time.perf_counter()
    try:
        outcome = check.run(quick, seed)
        error = None
    except Exception as exc:  # a crashing check is reported as not met, never hidden
        outcome = CheckOutcome("error", float("nan"), float("nan"), 0, {})
        error = f"{type(exc).__name__}: {exc}"
    met = (outcome.verdict == "holds") if check.expected == "holds" else (outcome.verdict == "violated")
    row = {
        "name": check.name,
        "claim": check.claim,
        "source": check.source,
        "expected": check.expected,
        "provenance": provenance_of(check),
        "verdict": outcome.verdict,
        "met": bool(met and error is None),
        "worst_slack": outcome.worst_slack,
        "certificate": outcome.certificate,
        "instances": outcome.instances,
        "seconds": round(time.perf_counter() - start, 2),
        "details": outcome.details,
    }
    if error:
        row["error"] = error
    return row
