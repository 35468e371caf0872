"""``w2s-theory sweep CONFIG.toml``: run a study's grid into a results store; re-running resumes.

The config is validated in full before the store is opened, so a bad config changes nothing on disk.
"""

from __future__ import annotations

from contextlib import nullcontext


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep config (TOML) into a resumable SQLite results store",
                       description="Run every (world, setting, seed) of a sweep config and store one row per "
                                   "run. Re-running the same command resumes: finished runs are skipped.")
    p.add_argument("config", metavar="CONFIG.toml", help="sweep config, e.g. experiments/smoke.toml")
    p.add_argument("--store", default="results.db", help="SQLite results store (default results.db; created "
                                                         "if missing)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
    p.add_argument("--backend", default="local", choices=("local", "ray"),
                   help="local (this process) or ray (chunks on Ray workers; pip install 'w2s-theory[ray]')")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="at most N students per chunk (default: spread the work; free memory caps it anyway)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--profile", action="store_true",
                   help="after the sweep, print the share of its wall time spent in the solvers, world "
                        "sampling, metrics, store writes and overhead (local backend)")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from .._backend import resolve_device
    from ..config import load_study
    from ..io import check_output_paths
    from ..profile import SWEEP_GROUPS, PhaseTimer
    from ..store import ResultsStore
    from ..sweep import run_sweep
    from ..validation import InputError

    study = load_study(args.config)  # everything about the config is checked before the store is touched
    if args.chunk_size is not None and args.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.profile and args.backend != "local":
        raise InputError("--profile times phases in this process; use it with --backend local")
    if args.backend == "local":
        try:
            resolve_device(args.device)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"--device: {exc}") from None
    else:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise InputError("--backend ray needs Ray: install the ray extra: pip install 'w2s-theory[ray]'") from None
    check_output_paths({"--store": args.store}, {"CONFIG": args.config})
    timer = PhaseTimer()
    # An existing file must be a results store: anything else is refused.
    with timer if args.profile else nullcontext(), ResultsStore(args.store) as store:
        run_sweep(study.specs, store, study.name, device=args.device, backend=args.backend,
                  progress=not args.quiet, chunk_size=args.chunk_size)
    if args.profile:
        print(f"profile of sweep {study.name} (wall time from opening the store to closing it):")
        print(timer.table(SWEEP_GROUPS))
    return 0
