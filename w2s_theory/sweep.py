r"""Run a study's grid of students, batched and memory-aware, into a results store; resumable at any point.

:func:`run_sweep` is the engine behind ``w2s-theory sweep``:

1. **Skip what is done.** Runs whose ``run_id`` is already stored are skipped (a run another study computed
   is listed in this study too, not recomputed).
2. **Batch.** Pending runs are grouped into *units*: the students of one world (same
   :meth:`~w2s_theory.pipeline.RunSpec.world_key`) trained with the same (head, loss). A unit is exactly
   what :func:`w2s_theory.pipeline.run_specs` fits as one tensor batch on shared features, so it is never
   split unless memory forces it. Units are packed into *chunks*, whole worlds together where they fit.
3. **Chunk from free memory.** The chunk size is derived from the free memory of the device
   (:func:`free_memory_bytes`), not a constant: the estimate :func:`chunk_bytes` of a chunk stays below
   :data:`MEMORY_FRACTION` of it (divided among the workers that share it). A second, softer cap spreads
   the work over about :data:`PROGRESS_CHUNKS` chunks per worker so that the progress bar moves, a kill
   loses little and every Ray worker gets work; it never splits a unit.
4. **Write as chunks finish.** Each chunk's rows are written in one transaction
   (:meth:`w2s_theory.store.ResultsStore.write`) as soon as it finishes, by this process only — also with
   ``backend="ray"``, where chunks travel to Ray workers as plain spec dicts and rows come back.

**Determinism.** A unit is fitted the same way whatever else is in its chunk, and chunk boundaries fall
between units, and every chunk is solved with :data:`SOLVE_THREADS` threads (torch and BLAS, set around each
chunk here and on Ray workers; the thread count changes the order of floating-point sums), so on one machine
and device the rows do not depend on the chunking, the order, an interruption, the backend or the caller's
thread settings: they are equal bit for bit. (Other CPUs or library builds may differ in the last bits.)
The one exception: a
unit too large for memory is split into pieces whose size depends on the free memory; its students then
agree with an unsplit run to within their solver certificates, not bit for bit.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass

import torch

from ._backend import proc_kib_entry, resolve_device
from .pipeline import RunSpec, run_specs
from .profile import phase
from .store import ResultsStore
from .validation import InputError

__all__ = ["SweepSummary", "run_sweep", "plan_chunks", "student_bytes", "world_bytes", "chunk_bytes",
           "free_memory_bytes", "MEMORY_FRACTION", "OVERHEAD", "PROGRESS_CHUNKS", "BACKENDS"]

BACKENDS = ("local", "ray")

#: A chunk's memory estimate may use at most this fraction of the free memory (the rest is headroom for
#: the estimate's error, the allocator and whatever else runs on the machine).
MEMORY_FRACTION = 0.5

#: Safety factor on the float64 tensors a student needs. Measured peak resident memory of one batched fit
#: (n = 2000, m = 64) is 0.3-1.3 x ``n * m * k * 8`` bytes per student across heads and losses (mixture and
#: softmax, forward and reverse, k = 2 and 5); 4 leaves room for the rest of the pipeline (predictions,
#: metrics, theorem checks) and for solvers that keep more temporaries.
OVERHEAD = 4

#: Aim for at least this many chunks per worker (progress granularity, work lost by a kill, Ray balance).
PROGRESS_CHUNKS = 20

#: Rows in the fixed reference batch of a world (w2s_theory.synthetic._REFERENCE_BATCH); it is allocated
#: once per world.
_REFERENCE_ROWS = 4096


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def student_bytes(spec: RunSpec) -> int:
    r"""Estimated peak bytes one student adds to a batched fit:
    :math:`8\cdot\text{OVERHEAD}\cdot\big(n_{\text{train}}\,(m_s + 1)\,k + (k\,(m_s+1))^2\big)` — the
    per-sample products of features and classes, and one (dense, worst case) Hessian of a head with
    :math:`k(m_s+1)` parameters."""
    k, m = spec.world.k, spec.world.strong_dim
    return 8 * OVERHEAD * (spec.n_train * (m + 1) * k + (k * (m + 1)) ** 2)


def world_bytes(spec: RunSpec) -> int:
    """Estimated bytes of one world's data (three splits, every representation, the reference batch) plus
    its two auxiliary fits (the weak teacher and the strong ceiling, one student each)."""
    w = spec.world
    hidden = w.width * (w.strong_depth + 1)
    samples = spec.n_weak + spec.n_train + spec.n_test
    per_row = w.input_dim + hidden + w.strong_dim + w.weak_dim + w.k
    return 8 * OVERHEAD * (samples * per_row + _REFERENCE_ROWS * (w.input_dim + hidden)) + 2 * student_bytes(spec)


def chunk_bytes(specs: list[RunSpec]) -> int:
    """Estimated peak bytes of fitting ``specs`` in one :func:`run_specs` call: every world's data plus every
    student (an upper bound: run_specs fits one (world, head, loss) unit at a time)."""
    worlds = {s.world_key(): s for s in specs}
    return sum(world_bytes(s) for s in worlds.values()) + sum(student_bytes(s) for s in specs)


def free_memory_bytes(device="cpu") -> int:
    """Free memory of ``device`` in bytes: ``torch.cuda.mem_get_info`` on CUDA; on CPU ``MemAvailable`` from
    ``/proc/meminfo`` (memory the kernel can hand out without swapping), else ``os.sysconf`` free pages."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    available = proc_kib_entry("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not on this platform: assume a small machine
        return 2 * 1024**3


# ----------------------------------------------------------------------------------------------------------
# Chunks
# ----------------------------------------------------------------------------------------------------------


def _units(specs: list[RunSpec]) -> list[list[list[RunSpec]]]:
    """``specs`` grouped by world, then by (head, loss) within the world, in first-appearance order; the
    students of a unit are sorted by run id, so that a unit is the same tensor batch (same order, hence
    the same rounding) whatever the order of ``specs``."""
    worlds: dict[tuple, dict[tuple, list[RunSpec]]] = {}
    for spec in specs:
        worlds.setdefault(spec.world_key(), {}).setdefault((spec.head, spec.loss), []).append(spec)
    return [[sorted(unit, key=lambda s: s.run_id) for unit in units.values()] for units in worlds.values()]


def plan_chunks(specs: list[RunSpec], budget_bytes: int, max_students: int | None = None) -> list[list[RunSpec]]:
    """Pack ``specs`` into chunks whose :func:`chunk_bytes` stays within ``budget_bytes``.

    Whole worlds go together while they fit; a world that does not fit alone is split between its
    (head, loss) units; a unit is split only if it alone exceeds the budget (into equal pieces, one student
    at least). ``max_students`` is a soft cap on students per chunk: it closes chunks and splits worlds,
    never units. Every spec appears in exactly one chunk; the plan depends only on the inputs.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    cap = math.inf if max_students is None else max(1, int(max_students))
    chunks: list[list[RunSpec]] = []
    current: list[RunSpec] = []
    cost = 0  # chunk_bytes(current), kept incrementally
    worlds_in_current: set = set()

    def flush():
        nonlocal current, cost, worlds_in_current
        if current:
            chunks.append(current)
        current, cost, worlds_in_current = [], 0, set()

    def added_cost(part: list[RunSpec]) -> int:
        extra = sum(student_bytes(s) for s in part)
        return extra if part[0].world_key() in worlds_in_current else extra + world_bytes(part[0])

    def fits(part: list[RunSpec]) -> bool:
        return cost + added_cost(part) <= budget_bytes and len(current) + len(part) <= cap

    def add(part: list[RunSpec]):
        nonlocal cost
        cost += added_cost(part)
        current.extend(part)
        worlds_in_current.add(part[0].world_key())

    for units in _units(specs):
        world = [s for unit in units for s in unit]
        if fits(world):
            add(world)
            continue
        flush()
        if fits(world):
            add(world)
            continue
        for unit in units:
            if current and not fits(unit):
                flush()
            if not current and chunk_bytes(unit) > budget_bytes:
                # Only memory splits a unit: the largest piece that fits, one student at least.
                room = budget_bytes - world_bytes(unit[0])
                piece = max(1, room // student_bytes(unit[0]))
                for start in range(0, len(unit), piece):
                    add(unit[start : start + piece])
                    flush()
                continue
            add(unit)  # a unit larger than the soft cap still goes whole, alone
    flush()
    return chunks


# ----------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    """What a sweep did: ``total`` runs in the grid, ``skipped`` already in the store, ``ran`` now, in
    ``seconds`` (``rate`` = ran / seconds, runs per second)."""

    study: str
    total: int
    skipped: int
    ran: int
    seconds: float
    rate: float
    chunks: int
    device: str
    backend: str

    def __str__(self) -> str:
        return (f"sweep {self.study}: ran {self.ran}, skipped {self.skipped} already stored, {self.total} in the "
                f"grid; {self.seconds:.1f} s ({self.rate:.2f} runs/s) in {self.chunks} chunks on {self.device} "
                f"({self.backend})")


def run_sweep(specs: list[RunSpec], store: ResultsStore, study: str, *, device: str | None = None,
              backend: str = "local", progress: bool = True, chunk_size: int | None = None,
              free_memory: int | None = None) -> SweepSummary:
    """Fit every spec not yet in ``store`` and write its row under ``study``, chunk by chunk.

    Args:
        specs: the grid (duplicates by ``run_id`` count once).
        store: where rows go; only this process writes to it.
        study: the study name the rows are listed under.
        device: ``cpu``, ``cuda``, ``auto`` or ``None`` (cuda when available). With ``backend="ray"``
            every worker uses its own device of that type.
        backend: ``local`` (this process) or ``ray`` (chunks run as Ray tasks; ``ray.init()`` is called
            unless Ray is already initialised).
        progress: show a progress bar and a summary line on stderr.
        chunk_size: at most this many students per chunk instead of the default spread (the memory cap
            still applies).
        free_memory: bytes of free memory to plan with instead of measuring it (for tests and dry runs).

    Returns:
        A :class:`SweepSummary`.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk size must be an integer >= 1, got {chunk_size!r}")
    if not isinstance(study, str) or not study:
        raise InputError("study: give a non-empty study name")
    unique: dict[str, RunSpec] = {}
    for spec in specs:
        if not isinstance(spec, RunSpec):
            raise InputError(f"specs: expected RunSpec objects, got {type(spec).__name__}")
        unique.setdefault(spec.run_id, spec)

    start = time.perf_counter()
    executor = _RayExecutor(device) if backend == "ray" else _LocalExecutor(device)  # checks the device first
    try:
        with phase("store"):
            done = store.done_ids(unique)
            # computed by another study: list it
            store.link(study, [run_id for run_id in unique if run_id in done])
        pending = [spec for run_id, spec in unique.items() if run_id not in done]
        free = executor.free_memory() if free_memory is None else int(free_memory)
        budget = max(1, int(MEMORY_FRACTION * free / executor.workers_per_memory))
        spread = chunk_size or max(1, math.ceil(len(pending) / (PROGRESS_CHUNKS * executor.workers)))
        chunks = plan_chunks(pending, budget, spread) if pending else []
        if progress:
            print(f"sweep {study}: {len(unique)} runs, {len(done)} already stored, {len(pending)} to run in "
                  f"{len(chunks)} chunks on {executor.device_name} ({backend}; chunk budget "
                  f"{budget / 2**20:.0f} MiB of {free / 2**20:.0f} MiB free)", file=sys.stderr, flush=True)
            over = [c for c in chunks if chunk_bytes(c) > budget]
            if over:
                print(f"sweep {study}: warning: {len(over)} chunks hold a single student or world estimated "
                      f"above the memory budget; they run anyway", file=sys.stderr, flush=True)
        from tqdm import tqdm

        with tqdm(total=len(unique), initial=len(done), desc=study, unit="run", file=sys.stderr,
                  disable=not progress, smoothing=0.1) as bar:
            with closing(executor.map(chunks)) as finished:  # closing: cancel Ray work left on an error
                for chunk, rows in finished:
                    # A row filed under the wrong id would be skipped as done for good: check before writing.
                    if len(rows) != len(chunk) or any(r["run_id"] != s.run_id for r, s in zip(rows, chunk)):
                        raise RuntimeError(f"a chunk of {len(chunk)} specs came back with rows that do not match")
                    with phase("store"):
                        store.write(study, rows, [spec.as_dict() for spec in chunk])
                    bar.update(len(chunk))
    finally:
        executor.close()
    seconds = time.perf_counter() - start
    ran = len(pending)
    summary = SweepSummary(study=study, total=len(unique), skipped=len(done), ran=ran, seconds=seconds,
                           rate=ran / seconds if seconds > 0 else 0.0, chunks=len(chunks),
                           device=executor.device_name, backend=backend)
    if progress:
        print(summary, file=sys.stderr, flush=True)
    return summary


class _LocalExecutor:
    """Chunks run one after another in this process; a world split over consecutive chunks is prepared
    once."""

    workers = 1
    workers_per_memory = 1

    def __init__(self, device):
        try:
            self.device = resolve_device(device)
        except (ValueError, RuntimeError) as exc:
            raise InputError(str(exc)) from None
        self.device_name = str(self.device)

    def free_memory(self) -> int:
        return free_memory_bytes(self.device)

    def map(self, chunks):
        worlds: dict = {}
        for chunk in chunks:
            keys = {spec.world_key() for spec in chunk}
            for key in [k for k in worlds if k not in keys]:
                del worlds[key]  # keep only what this chunk shares with the last one
            # what run_specs spends outside its worlds and solvers counts as metrics
            with solve_threads(), phase("metrics and rows"):
                rows = run_specs(chunk, device=self.device_name, worlds=worlds)
            yield chunk, rows

    def close(self):
        pass


#: Threads of every chunk's solve (torch intra-op and BLAS). Fixed, so that a row does not depend on how the
#: sweep is distributed: one thread is what a Ray worker (one CPU per task) has; parallelism comes from
#: batching students and from running chunks on several workers.
SOLVE_THREADS = 1


@contextmanager
def solve_threads(threads: int = SOLVE_THREADS):
    """Run the block with ``threads`` torch and BLAS threads, restoring the previous settings after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # numpy's BLAS then keeps its own setting
            yield
        else:
            with threadpool_limits(limits=threads):
                yield
    finally:
        torch.set_num_threads(previous)


def _run_chunk(spec_dicts: list[dict], device: str) -> list[dict]:
    """A Ray task: fit one chunk on this worker's device and return its rows (the driver stores them)."""
    with solve_threads():
        return run_specs([RunSpec.from_dict(d) for d in spec_dicts], device=device)


def _probe_free_memory(device: str) -> int:
    return free_memory_bytes(device)


class _RayExecutor:
    """Chunks run as Ray tasks, each on its worker's own device (one CPU, or one GPU, per task); at most two
    chunks per worker are in flight, and rows are yielded in the order chunks finish."""

    def __init__(self, device):
        try:
            import ray
        except ImportError:
            raise InputError("backend 'ray' needs Ray: install the ray extra: pip install 'w2s-theory[ray]'") from None
        if device not in (None, "auto", "cpu", "cuda"):
            raise InputError(f"device {device!r}: with backend 'ray' use cpu, cuda or auto (each worker uses its "
                             "own device)")
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(log_to_driver=False, include_dashboard=False)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if device == "cuda" and gpus == 0:
            self.close()
            raise InputError("device 'cuda' was asked for but the Ray cluster has no GPUs; use --device cpu")
        self.use_gpu = device == "cuda" or (device in (None, "auto") and gpus > 0)
        self.worker_device = "cuda" if self.use_gpu else "cpu"
        self.device_name = f"{self.worker_device} per Ray worker"
        nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
        if self.use_gpu:
            self.workers, self.workers_per_memory = gpus, 1  # each worker has a GPU of its own
            self.options = {"num_gpus": 1, "num_cpus": 1}
        else:
            self.workers = max(1, int(resources.get("CPU", 1)))
            self.workers_per_memory = max(1, math.ceil(self.workers / nodes))  # CPU workers share a node's RAM
            self.options = {"num_cpus": 1}
        self.task = ray.remote(**self.options)(_run_chunk)

    def free_memory(self) -> int:
        probe = self.ray.remote(**self.options)(_probe_free_memory)
        return int(self.ray.get(probe.remote(self.worker_device)))

    def map(self, chunks):
        ray = self.ray
        queue = list(reversed(chunks))
        in_flight: dict = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < 2 * self.workers:
                    chunk = queue.pop()
                    in_flight[self.task.remote([s.as_dict() for s in chunk], self.worker_device)] = chunk
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    yield in_flight.pop(ref), ray.get(ref)
        finally:
            for ref in in_flight:  # interrupted: do not leave work running for nobody
                ray.cancel(ref, force=True)

    def close(self):
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
