"""Sweep configs: a TOML file under ``experiments/`` -> a :class:`Study`, a named list of :class:`RunSpec`.

The format (one study per file)::

    [study]
    name = "smoke"                     # study name in the results store (required)
    description = "one line"           # optional
    seeds = [0, 1]                     # required: a list of ints, or a table {start = 0, count = 10}

    [world]                            # WorldConfig fields (w2s_theory.synthetic); optional
    k = 2
    strong_dim = [16, 32]              # a LIST means: sweep over these values

    [run]                              # RunSpec fields other than `world` and `seed`; optional
    loss = ["reverse_kl", "forward_kl"]
    head = "mixture"
    noise = [0.0, 0.2]
    n_weak = 200
    n_train = 200
    n_test = 200

The grid is the Cartesian product of every list-valued field (world and run) and the seeds; a field left out
takes its default. Integers given for real-valued fields are stored as floats (``noise = 0`` and
``noise = 0.0`` are the same run). If ``[world]`` does not set ``realizable``, it follows
``misspecification`` (realizable exactly when it is 0), so that ``misspecification = [0.0, 0.1]`` sweeps
from a realizable to a misspecified world; set explicitly, a contradiction is an error.

The practice trainer (:mod:`w2s_theory.practice`) is one more ``[run]`` axis: ``trainer = ["exact",
"practice"]`` with its knobs (``optimizer``, ``lr``, ``lr_grid``, ``schedule``, ``warmup_steps``,
``batch_size``, ``epochs``, ``weight_decay``, ``init``, ``standardize``, ``early_stopping``, ``n_val``,
``eval_every``); exact runs ignore those knobs, so crossing them with ``trainer`` lists each exact run once
(likewise ``noise_kind`` at ``noise = 0``).
``lr_grid`` is itself a list (``lr_grid = [0.001, 0.01, 0.1]`` is one value: tune the learning rate per loss
on the validation split); a list of lists sweeps it (``lr_grid = [[], [0.001, 0.01, 0.1]]``: shared vs
tuned). The teacher's knobs ``teacher_temperature``, ``noise_kind`` and ``teacher_floor`` apply to every
trainer.

Everything is checked on load: a bad file is one :class:`~w2s_theory.validation.InputError` naming the file,
the table and key, and the fix — before anything runs or any store is opened.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from .pipeline import CLASSIFICATION_LOSSES, PRACTICE_KNOBS, TRAINERS, RunSpec
from .practice import EARLY_STOPPING, INITS, OPTIMIZERS, PRACTICE_HEADS, PRACTICE_LOSSES, SCHEDULES
from .solvers import SOLVABLE
from .synthetic import NOISE_KINDS, WorldConfig
from .validation import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Study", "load_study", "parse_study", "MAX_GRID", "RUN_KEYS", "WORLD_KEYS"]

#: Heads the pipeline can train as students or weak teachers: they output class probabilities. (The
#: ``squared`` head is a regression head and has no probabilities to score against the truth.)
PIPELINE_HEADS = ("mixture", "linear", "softmax")

#: A guard against a typo that multiplies the grid by orders of magnitude (it would only exhaust memory).
MAX_GRID = 1_000_000

#: Largest arrays one run may allocate (entries; 5e8 float64 = 4 GB): samples x widest layer (features,
#: hidden width or classes) and widest layer squared. Checked here so that a typo such as
#: ``strong_dim = 10000000000`` is a one-line error, not an out-of-memory crash half-way through a sweep.
MAX_RUN_ENTRIES = 500_000_000

TABLES = ("study", "world", "run")
STUDY_KEYS = ("name", "description", "seeds")
WORLD_KEYS = tuple(f.name for f in fields(WorldConfig))
RUN_KEYS = tuple(f.name for f in fields(RunSpec) if f.name not in ("world", "seed"))
#: [run] keys that only the practice trainer reads (dropped from exact runs, so they are not duplicated).
PRACTICE_ONLY = (*PRACTICE_KNOBS, "lr")


@dataclass
class Study:
    """A named grid of runs: ``specs`` is the full Cartesian product, in a fixed order (world fields, then run
    fields, each in declaration order, seeds last); ``axes`` maps each swept field (``world.<field>``,
    ``run.<field>``, ``seed``) to its values."""

    name: str
    description: str
    specs: list[RunSpec]
    source: str
    axes: dict[str, list] = field(default_factory=dict)


def load_study(path) -> Study:
    """Read and validate a sweep config (see the module docstring); raises :class:`InputError` (one line)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: config file not found; give the path of a TOML sweep config "
                         "such as experiments/smoke.toml")
    if p.is_dir():
        raise InputError(f"{p}: is a directory; give the path of a TOML sweep config file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the config as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read the config ({exc.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{p}: not valid TOML: {_one_line(str(exc))}") from None
    return parse_study(data, source=str(p))


def parse_study(data: dict, source: str = "<dict>") -> Study:
    """Validate a parsed config (the dict of a TOML file) and expand its grid into a :class:`Study`."""
    if not isinstance(data, dict):
        _fail(source, "config", f"expected a table of tables, got {type(data).__name__}")
    unknown = [t for t in data if t not in TABLES]
    if unknown:
        _fail(source, f"[{unknown[0]}]", f"unknown table; valid tables: {', '.join(f'[{t}]' for t in TABLES)}")
    for table in TABLES:
        if table in data and not isinstance(data[table], dict):
            _fail(source, table, f"expected a table [{table}], got a {_type_name(data[table])}")
    if "study" not in data:
        _fail(source, "[study]", 'missing table; add [study] with name = "..." and seeds = [...]')

    study = data["study"]
    _reject_unknown(source, "study", study, STUDY_KEYS)
    name = study.get("name")
    if not isinstance(name, str) or not name.strip():
        _fail(source, "[study] name", 'required: a non-empty string, e.g. name = "noise_sweep"')
    description = study.get("description", "")
    if not isinstance(description, str):
        _fail(source, "[study] description", f"expected a string, got a {_type_name(description)}")
    seeds = _parse_seeds(source, study)

    world_table = data.get("world", {})
    run_table = data.get("run", {})
    _reject_unknown(source, "world", world_table, WORLD_KEYS)
    _reject_unknown(source, "run", run_table, RUN_KEYS)
    world_hints = typing.get_type_hints(WorldConfig)
    run_hints = typing.get_type_hints(RunSpec)
    world_axes = {key: _parse_values(source, "world", key, value, world_hints[key])
                  for key, value in world_table.items()}
    run_axes = {key: _parse_values(source, "run", key, value, run_hints[key])
                for key, value in run_table.items()}
    _check_run_values(source, run_axes)

    size = len(seeds)
    for values in (*world_axes.values(), *run_axes.values()):
        size *= len(values)
    if size > MAX_GRID:
        _fail(source, "grid", f"{size} runs is more than {MAX_GRID}; split the study into several configs")

    world_keys = [k for k in WORLD_KEYS if k in world_axes]  # declaration order, whatever the file's order
    worlds = []
    for combo in itertools.product(*(world_axes[k] for k in world_keys)):
        values = dict(zip(world_keys, combo))
        if "realizable" not in values:
            values["realizable"] = values.get("misspecification", 0.0) == 0
        try:
            worlds.append(WorldConfig(**values))
        except ValueError as exc:
            _fail(source, "[world]", f"{_one_line(str(exc))}{_combo_note(values, world_axes)}")

    run_keys = [k for k in RUN_KEYS if k in run_axes]
    specs: list[RunSpec] = []
    seen: set[str] = set()
    for world in worlds:
        for combo in itertools.product(*(run_axes[k] for k in run_keys)):
            values = dict(zip(run_keys, combo))
            _check_head_loss(source, values)
            _check_size(source, world, values, world_axes, run_axes)
            if values.get("trainer", "exact") == "exact":
                # The practice knobs mean nothing to the exact trainer: a grid that crosses trainer with them
                # holds each exact run once.
                values = {k: v for k, v in values.items() if k not in PRACTICE_ONLY}
            if values.get("noise", 0.0) == 0:  # no noisy rows: the kind of noise does not matter
                values.pop("noise_kind", None)
            for seed in seeds:
                try:
                    spec = RunSpec(world=world, seed=seed, **values)
                except ValueError as exc:
                    _fail(source, "[run]", f"{_one_line(str(exc))}{_combo_note(values, run_axes)}")
                if spec.run_id not in seen:
                    seen.add(spec.run_id)
                    specs.append(spec)

    axes = {f"world.{k}": list(v) for k, v in world_axes.items() if len(v) > 1}
    axes.update({f"run.{k}": list(v) for k, v in run_axes.items() if len(v) > 1})
    if len(seeds) > 1:
        axes["seed"] = list(seeds)
    return Study(name=name, description=description, specs=specs, source=source, axes=axes)


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(source: str, where: str, message: str) -> typing.NoReturn:
    raise InputError(_one_line(f"{source}: {where}: {message}"))


def _type_name(value) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "list",
            dict: "table"}.get(type(value), type(value).__name__)


def _reject_unknown(source: str, table: str, values: dict, valid: tuple) -> None:
    for key in values:
        if key not in valid:
            hint = " (seed goes in [study] as seeds = [...])" if key in ("seed", "seeds") and table != "study" else ""
            _fail(source, f"[{table}] {key}", f"unknown key{hint}; valid keys: {', '.join(valid)}")


def _parse_seeds(source: str, study: dict) -> list[int]:
    where = "[study] seeds"
    if "seeds" not in study:
        _fail(source, where, "required: a list such as seeds = [0, 1, 2] or a table seeds = {start = 0, count = 10}")
    seeds = study["seeds"]
    if isinstance(seeds, dict):
        for key in seeds:
            if key not in ("start", "count"):
                _fail(source, f"{where}.{key}", "unknown key; valid keys: start, count")
        start, count = seeds.get("start", 0), seeds.get("count")
        if not _is_int(start) or start < 0:
            _fail(source, f"{where}.start", f"expected an integer >= 0, got {start!r}")
        if count is None:
            _fail(source, f"{where}.count", "required: the number of seeds, e.g. {start = 0, count = 10}")
        if not _is_int(count) or count < 0:
            _fail(source, f"{where}.count", f"expected an integer >= 1, got {count!r}")
        if count == 0:
            _fail(source, where, "count = 0 makes the grid empty; give count >= 1")
        seeds = list(range(start, start + count))
    elif isinstance(seeds, list):
        if not seeds:
            _fail(source, where, "empty list makes the grid empty; give at least one seed, e.g. seeds = [0]")
        for s in seeds:
            if not _is_int(s) or s < 0:
                _fail(source, where, f"expected integers >= 0, got {s!r}")
        _reject_duplicates(source, where, seeds)
    else:
        _fail(source, where, f"expected a list of integers or a table {{start, count}}, got {seeds!r}")
    return [int(s) for s in seeds]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _parse_values(source: str, table: str, key: str, value, hint) -> list:
    """The values a field takes: a list sweeps, a scalar is one value; each is type-checked (and an integer
    given for a real field becomes a float, so that run ids do not depend on how a number was written)."""
    where = f"[{table}] {key}"
    if hint is tuple:  # a list-valued field (lr_grid): a list of numbers is ONE value, a list of lists sweeps
        if not isinstance(value, list):
            _fail(source, where, f"expected a list of numbers such as [0.001, 0.01, 0.1], got {value!r}")
        grids = value if value and all(isinstance(v, list) for v in value) else [value]
        out = []
        for grid in grids:
            for v in grid:
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                    _fail(source, where, f"expected learning rates > 0, got {v!r}")
            _reject_duplicates(source, where, list(grid))
            out.append(tuple(float(v) for v in grid))
        _reject_duplicates(source, where, out)
        return out
    values = value if isinstance(value, list) else [value]
    if not values:
        _fail(source, where, "empty list makes the grid empty; give at least one value (or remove the key)")
    out = []
    for v in values:
        if hint is bool:
            if not isinstance(v, bool):
                _fail(source, where, f"expected true or false, got {v!r}")
        elif hint is int:
            if not _is_int(v):
                _fail(source, where, f"expected an integer, got {v!r} ({_type_name(v)})")
        elif hint is float:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                _fail(source, where, f"expected a number, got {v!r} ({_type_name(v)})")
            if not math.isfinite(v):
                _fail(source, where, f"expected a finite number, got {v!r}")
            v = float(v)
        elif hint is str:
            if not isinstance(v, str):
                _fail(source, where, f"expected a string, got {v!r} ({_type_name(v)})")
        out.append(v)
    _reject_duplicates(source, where, out)
    return out


def _reject_duplicates(source: str, where: str, values: list) -> None:
    seen = []
    for v in values:
        if v in seen:
            _fail(source, where, f"lists {v!r} twice; each value may appear once (a duplicate would be the same run)")
        seen.append(v)


def _check_run_values(source: str, run_axes: dict) -> None:
    """Per-value checks of [run] whose message names the key (combinations are checked by RunSpec itself)."""
    for key in ("head", "weak_head"):
        for v in run_axes.get(key, []):
            if v not in PIPELINE_HEADS:
                _fail(source, f"[run] {key}",
                      f"unknown or unsupported head {v!r}; use one of: {', '.join(PIPELINE_HEADS)}")
    from .fdivergences import extra_loss_names

    valid_losses = tuple(dict.fromkeys((*CLASSIFICATION_LOSSES, "squared", *PRACTICE_LOSSES, *extra_loss_names())))
    for key in ("loss", "weak_loss"):
        for v in run_axes.get(key, []):
            if v not in valid_losses:
                _fail(source, f"[run] {key}", f"unknown loss {v!r}; use one of: {', '.join(valid_losses)}")
    for v in run_axes.get("noise", []):
        if not 0 <= v <= 1:
            _fail(source, "[run] noise", f"{v!r} is not a label-noise rate; give a fraction in [0, 1]")
    for key in ("n_weak", "n_train", "n_test", "n_val"):
        for v in run_axes.get(key, []):
            if v < 1:
                _fail(source, f"[run] {key}", f"expected a sample size >= 1, got {v!r}")
    for key, allowed in (("trainer", TRAINERS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("init", INITS),
                         ("early_stopping", EARLY_STOPPING), ("noise_kind", NOISE_KINDS)):
        for v in run_axes.get(key, []):
            if v not in allowed:
                _fail(source, f"[run] {key}", f"unknown value {v!r}; use one of: {', '.join(allowed)}")
    for key, what in (("lr", "a learning rate > 0"), ("teacher_temperature", "a temperature > 0")):
        for v in run_axes.get(key, []):
            if v <= 0:
                _fail(source, f"[run] {key}", f"{v!r} is not {what}")
    for v in run_axes.get("weight_decay", []):
        if v < 0:
            _fail(source, "[run] weight_decay", f"expected a weight decay >= 0, got {v!r}")
    for v in run_axes.get("teacher_floor", []):
        if not 0 <= v < 0.5:
            _fail(source, "[run] teacher_floor", f"{v!r} is not a probability floor; give a value in [0, 1/k)")
    for key, low in (("batch_size", 1), ("epochs", 1), ("warmup_steps", 0), ("eval_every", 0)):
        for v in run_axes.get(key, []):
            if v < low:
                _fail(source, f"[run] {key}", f"expected an integer >= {low}, got {v!r}")


def _check_head_loss(source: str, values: dict) -> None:
    defaults = RunSpec()
    if values.get("trainer", defaults.trainer) == "practice":
        head, loss = values.get("head", defaults.head), values.get("loss", defaults.loss)
        if head not in PRACTICE_HEADS:
            _fail(source, "[run] head", f"head {head!r} is not available for trainer 'practice'; "
                  f"use one of: {', '.join(PRACTICE_HEADS)}")
        if loss not in PRACTICE_LOSSES:
            _fail(source, "[run] loss", f"loss {loss!r} is not available for trainer 'practice'; "
                  f"use one of: {', '.join(PRACTICE_LOSSES)}")
        values = {**values, "loss": "forward_kl"}  # the weak head's pair is checked below
    elif values.get("loss", defaults.loss) not in SOLVABLE["mixture"]:
        _fail(source, "[run] loss", f"loss {values['loss']!r} needs trainer = 'practice' (it has no exact solver)")
    for head_key, loss_key in (("head", "loss"), ("weak_head", "weak_loss")):
        head = values.get(head_key, getattr(defaults, head_key))
        loss = values.get(loss_key, getattr(defaults, loss_key))
        if loss not in SOLVABLE[head]:
            _fail(source, f"[run] {loss_key}", f"loss {loss!r} is not available for {head_key} {head!r}; "
                  f"use one of: {', '.join(SOLVABLE[head])} (or split the grid into two configs)")


def _check_size(source: str, world: WorldConfig, values: dict, world_axes: dict, run_axes: dict) -> None:
    defaults = RunSpec()
    samples = max(values.get(key, getattr(defaults, key)) for key in ("n_weak", "n_train", "n_test"))
    widest = max(world.k, world.input_dim, world.strong_dim, world.weak_dim, world.width)
    entries = max(samples * widest, widest * widest)
    if entries > MAX_RUN_ENTRIES:
        note = _combo_note({**world.as_dict(), **values}, {**world_axes, **run_axes})
        _fail(source, "size", f"{samples} samples x {widest} (widest of k, input_dim, strong_dim, weak_dim, width) "
              f"needs arrays of {entries:.3g} entries, more than {MAX_RUN_ENTRIES:.0e}; use smaller sizes{note}")


def _combo_note(values: dict, axes: dict) -> str:
    swept = {k: v for k, v in values.items() if len(axes.get(k, ())) > 1}
    if not swept:
        return ""
    return " (in the grid point " + ", ".join(f"{k} = {v!r}" for k, v in swept.items()) + ")"
