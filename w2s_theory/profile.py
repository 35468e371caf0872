r"""Where a sweep's wall time goes: exclusive time per phase, measured by a stack of timers.

Code marks a phase with ``with phase("solver: students"): ...``; while no :class:`PhaseTimer` is active (the
default) that costs one global lookup. Inside ``with PhaseTimer() as timer:`` every second of wall time is
charged to exactly one phase: the innermost one open at that moment (a weak-teacher fit inside world
preparation counts as solver time, not as world time), or to ``overhead`` when none is open, so the shares
sum to 100 % by construction:

.. math:: T_{\text{wall}} = \sum_{p} T_p + T_{\text{overhead}}.

Timing only reads the clock; it never touches the data, so a profiled run computes the same numbers.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

__all__ = ["PhaseTimer", "phase", "OVERHEAD", "SOLVER", "SWEEP_GROUPS"]

#: The phase charged with the time no marked phase covers (Python glue, planning, progress bar, ...).
OVERHEAD = "overhead"

#: Phases whose names start with this are solver calls (:func:`w2s_theory.solvers.fit`).
SOLVER = "solver"

#: Summary lines of a sweep's profile: label -> prefix of the phases it adds up.
SWEEP_GROUPS = {"all solvers": SOLVER}

_active: "PhaseTimer | None" = None


class PhaseTimer:
    """Accumulates exclusive wall time per phase while active (``with PhaseTimer() as t``; not re-entrant,
    one thread). ``clock`` returns seconds (default :func:`time.perf_counter`)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.total = 0.0
        self._stack: list[str] = []
        self._mark = 0.0
        self._start = 0.0
        self._previous = None

    def __enter__(self) -> "PhaseTimer":
        global _active
        self._previous, _active = _active, self
        self._start = self._mark = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        now = self.clock()
        while self._stack:  # an exception left phases open: close them at this instant
            self._charge(self._stack.pop(), now)
        self._charge(OVERHEAD, now)
        self.total += now - self._start
        _active = self._previous

    def _charge(self, name: str, now: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    def enter(self, name: str) -> None:
        now = self.clock()
        self._charge(self._stack[-1] if self._stack else OVERHEAD, now)
        self._stack.append(name)

    def exit(self) -> None:
        self._charge(self._stack.pop(), self.clock())

    def shares(self) -> dict[str, float]:
        """Fraction of the total wall time per phase (``overhead`` included; they sum to 1)."""
        if self.total <= 0:
            return {}
        return {name: seconds / self.total for name, seconds in self.seconds.items()}

    def group_share(self, prefix: str) -> float:
        """Fraction of the total wall time in the phases whose names start with ``prefix``."""
        return sum(share for name, share in self.shares().items() if name.startswith(prefix))

    def table(self, groups: dict[str, str] | None = None) -> str:
        """A plain-text table of the phases by decreasing time, with their shares, then one line per group
        (label -> name prefix, e.g. all solver phases together)."""
        from .io import format_table

        rows = [{"phase": name, "s": seconds, "share": 100 * seconds / self.total if self.total else 0.0}
                for name, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1])]
        rows.append({"phase": "total (wall)", "s": self.total, "share": 100.0 if self.total else 0.0})
        for label, prefix in (groups or {}).items():
            seconds = sum(value for name, value in self.seconds.items() if name.startswith(prefix))
            rows.append({"phase": label, "s": seconds, "share": 100 * seconds / self.total if self.total else 0.0})
        return format_table(rows, [("phase", "phase"), ("s", "seconds"), ("share", "share %")])


@contextmanager
def phase(name: str):
    """Charge the time inside the block to ``name`` (the innermost open phase wins) when a
    :class:`PhaseTimer` is active; a no-op otherwise."""
    timer = _active
    if timer is None:
        yield
        return
    timer.enter(name)
    try:
        yield
    finally:
        timer.exit()
