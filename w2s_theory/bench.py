r"""``w2s-theory bench``: throughput of certified students against cvxpy and a per-student Adam loop.

Workload (DESIGN.md): ``B`` students, ``n = 2000`` samples, ``m = 64`` features, ``k = 2``, reverse KL,
mixture head, certified gap ``<= 1e-9``. Each student solves

.. math:: \min_{A\ \text{column-stochastic}}\ \frac1n\sum_i \mathrm{KL}(A h_i\,\|\,q_i).

Data: features are the softmax of ``1.5 * N(0, I_m)`` rows (flat, overlapping mixture components, as a
frozen representation mapped into the simplex gives), and each teacher is a realizable truth
:math:`A^* h` corrupted in logit space by ``N(0, 0.5^2)`` noise, so optima have active bounds.

Three solvers, timed in the same run:

* **cvxpy** (Clarabel, exponential cones) on a few students, one fresh problem per student (construction
  included, as a user pays it); its certificate is our Frank–Wolfe gap at its solution mapped into the class.
* **Adam loop**: what most W2SG research code does — a per-student loop of AdamW (lr 1e-3, batch 32,
  a fixed number of epochs, no weight decay so it aims at the same objective) on logits ``W`` with
  ``A = softmax(W)`` over classes; its certified gap at the end is *measured*, not assumed.
* **batched** projected Newton (:mod:`w2s_theory.solvers.mixture`) for ``B`` in ``sizes``, in two layouts:
  one feature matrix per student ``(B, n, m)`` — the general case, used for the headline ratios — and one
  matrix shared by all students ``(n, m)`` — many teachers on one representation, as in a sweep.

Timing: one warm-up run of the same size, then the median of ``repeats`` runs (allocating gigabytes of
fresh memory the first time costs page faults that a sweep pays once). Peak memory: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the peak resident set size sampled every 2 ms during the
solve, minus the resident size before it (inputs excluded).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time

import numpy as np
import torch

from ._backend import resolve_device
from .divergences import get_loss
from .heads import MixtureHead

__all__ = ["workload", "bench_cvxpy", "bench_adam", "bench_batched", "run_bench"]

N, M, K = 2000, 64, 2


def workload(students: int, *, n: int = N, m: int = M, k: int = K, shared: bool = False, seed: int = 0,
             device="cpu"):
    """Features ``(B, n, m)`` (or shared ``(n, m)``) and teachers ``(B, n, k)``, float64."""
    g = torch.Generator().manual_seed(seed)
    features = torch.softmax(1.5 * torch.randn(1 if shared else students, n, m, generator=g, dtype=torch.float64), -1)
    heads = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample((students, m))
    truth = features @ heads  # (B, n, k): heads is (B, m, k), i.e. A^T
    logits = torch.log(truth) + 0.5 * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    teacher = torch.softmax(logits, -1)
    features = features[0] if shared else features
    return features.to(device), teacher.to(device)


class _PeakRSS:
    """Peak resident memory of this process during a block, sampled from /proc (CPU)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def bench_cvxpy(students: int = 3, *, n: int = N, m: int = M, k: int = K, seed: int = 1) -> dict:
    """Seconds per student of the exact reference (cvxpy + Clarabel), with its certified gap."""
    import cvxpy as cp

    features, teacher = workload(students, n=n, m=m, k=k, seed=seed)
    loss = get_loss("reverse_kl")
    times, gaps = [], []
    for b in range(students):
        X, Q = features[b].numpy(), teacher[b].numpy()
        start = time.perf_counter()
        A = cp.Variable((k, m), nonneg=True)
        problem = cp.Problem(cp.Minimize(cp.sum(cp.rel_entr(X @ A.T, Q)) / n), [cp.sum(A, axis=0) == 1])
        problem.solve(solver="CLARABEL")
        times.append(time.perf_counter() - start)
        if problem.status != "optimal":
            raise RuntimeError(f"cvxpy returned status {problem.status!r} on benchmark student {b}")
        A_fea = MixtureHead.project_to_class(torch.as_tensor(A.value))[None]
        probs = MixtureHead.predict(A_fea, features[b : b + 1])
        G = torch.bmm(loss.grad_student(teacher[b : b + 1], probs).transpose(1, 2), features[b : b + 1]) / n
        gaps.append(float(MixtureHead.frank_wolfe_gap(G, A_fea)))
    return {"students": students, "s_per_student": statistics.mean(times), "worst_gap": max(gaps),
            "times": times}


def bench_adam(students: int = 3, *, epochs: int = 20, batch: int = 32, lr: float = 1e-3, n: int = N,
               m: int = M, k: int = K, seed: int = 1) -> dict:
    """Seconds per student of a per-student AdamW loop, and the certified gap it reaches."""
    features, teacher = workload(students, n=n, m=m, k=k, seed=seed)
    loss = get_loss("reverse_kl")
    times, gaps = [], []
    g = torch.Generator().manual_seed(seed)
    for b in range(students):
        X, Q = features[b].float(), teacher[b].float()
        start = time.perf_counter()
        W = torch.zeros(k, m, requires_grad=True)
        opt = torch.optim.AdamW([W], lr=lr, weight_decay=0.0)
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for s in range(0, n, batch):
                idx = order[s : s + batch]
                probs = X[idx] @ torch.softmax(W, dim=0).T
                value = loss.per_sample(Q[idx], probs).mean()
                opt.zero_grad()
                value.backward()
                opt.step()
        times.append(time.perf_counter() - start)
        A = torch.softmax(W.detach().double(), dim=0)[None]
        probs = MixtureHead.predict(A, features[b : b + 1])
        G = torch.bmm(loss.grad_student(teacher[b : b + 1], probs).transpose(1, 2), features[b : b + 1]) / n
        gaps.append(float(MixtureHead.frank_wolfe_gap(G, A)))
    return {"students": students, "epochs": epochs, "batch": batch, "lr": lr,
            "s_per_student": statistics.mean(times), "worst_gap": max(gaps), "times": times}


def bench_batched(B: int, *, shared: bool, device: torch.device, repeats: int = 3, tol: float = 1e-9,
                  n: int = N, m: int = M, k: int = K, seed: int = 2) -> dict:
    """Seconds per student of the batched solver for ``B`` students, worst certified gap, peak memory."""
    from .solvers.mixture import fit_mixture_batched

    features, teacher = workload(B, n=n, m=m, k=k, shared=shared, seed=seed, device=device)
    loss = get_loss("reverse_kl")

    def solve():
        result = fit_mixture_batched(features, teacher, loss, tol=tol)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result

    solve()  # warm-up of the same size
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            result = solve()
            times.append(time.perf_counter() - start)
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            with _PeakRSS() as mem:
                start = time.perf_counter()
                result = solve()
                times.append(time.perf_counter() - start)
            peaks.append(mem.extra_mb)
    seconds = statistics.median(times)
    return {
        "B": B, "layout": "shared" if shared else "per_student", "s_per_student": seconds / B,
        "students_per_s": B / seconds, "worst_gap": float(result.gap.max()),
        "all_converged": bool(result.converged.all()), "mean_iterations": float(result.iterations.float().mean()),
        "peak_mem_mb": max(peaks), "times": times,
    }


def run_bench(*, device: str | None = None, sizes=(1, 10, 100, 1000), cvxpy_students: int = 3,
              adam_students: int = 3, adam_epochs: int = 20, repeats: int = 3, tol: float = 1e-9,
              n: int = N, m: int = M, progress=print) -> dict:
    """The whole benchmark; returns the JSON document of DESIGN.md (plus the shared-layout rows)."""
    dev = resolve_device(device)
    progress(f"cvxpy on {cvxpy_students} students ...")
    cvx = bench_cvxpy(cvxpy_students, n=n, m=m)
    progress(f"  {cvx['s_per_student']:.3f} s/student, worst gap {cvx['worst_gap']:.2e}")
    progress(f"AdamW loop on {adam_students} students ({adam_epochs} epochs) ...")
    adam = bench_adam(adam_students, epochs=adam_epochs, n=n, m=m)
    progress(f"  {adam['s_per_student']:.3f} s/student, worst gap {adam['worst_gap']:.2e}")
    rows = {"per_student": [], "shared": []}
    for layout in ("per_student", "shared"):
        for B in sizes:
            row = bench_batched(B, shared=layout == "shared", device=dev, repeats=repeats, tol=tol, n=n, m=m)
            rows[layout].append(row)
            progress(f"batched {layout:11s} B={B:5d}: {row['s_per_student'] * 1e3:8.3f} ms/student, "
                     f"worst gap {row['worst_gap']:.2e}, peak {row['peak_mem_mb']:.0f} MB")
    largest = rows["per_student"][-1]
    largest_shared = rows["shared"][-1]
    return {
        "machine": {"device": str(dev), "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "torch": torch.__version__},
        "workload": {"n": n, "m": m, "k": K, "loss": "reverse_kl", "head": "mixture", "tol": tol},
        "cvxpy_s_per_student": cvx["s_per_student"],
        "cvxpy_worst_gap": cvx["worst_gap"],
        "adam_s_per_student": adam["s_per_student"],
        "adam_worst_gap": adam["worst_gap"],
        "adam": {k: v for k, v in adam.items() if k != "times"},
        "batched": [{k: r[k] for k in ("B", "s_per_student", "worst_gap", "peak_mem_mb", "students_per_s",
                                        "mean_iterations")} for r in rows["per_student"]],
        "batched_shared": [{k: r[k] for k in ("B", "s_per_student", "worst_gap", "peak_mem_mb", "students_per_s",
                                               "mean_iterations")} for r in rows["shared"]],
        "ratio_vs_cvxpy": cvx["s_per_student"] / largest["s_per_student"],
        "ratio_vs_adam": adam["s_per_student"] / largest["s_per_student"],
        "ratio_vs_cvxpy_shared": cvx["s_per_student"] / largest_shared["s_per_student"],
        "ratio_vs_adam_shared": adam["s_per_student"] / largest_shared["s_per_student"],
        "all_gaps_certified_below_tol": all(r["worst_gap"] <= tol for r in rows["per_student"] + rows["shared"]),
    }
