"""``w2s-theory figures``: run (or read from the results store) the studies behind the paper-style figures and
write each as PNG and PDF."""

from __future__ import annotations

import sys


#: The figure names (as :data:`w2s_theory.figures.FIGURES`; repeated here so that building the CLI does not
#: import the plotting stack; a test keeps the two equal).
FIGURES = ("mode_seeking", "gain_vs_misfit", "noise_robustness", "bound_tightness", "guarantee_table",
           "k_heads", "f_divergences", "loss_comparison", "demo_digits", "phase_diagram", "learning_curves",
           "paper_tables")


def register(sub) -> None:
    p = sub.add_parser("figures", help="regenerate the paper-style figures (PNG + PDF) from the results store",
                       description="Run the studies each figure needs (runs already in the store are read, not "
                                   "recomputed) and write <name>.png and <name>.pdf for: " + ", ".join(FIGURES))
    p.add_argument("--store", default="results.db", help="SQLite results store (default results.db; created if "
                                                         "missing)")
    p.add_argument("--out", default="figures", help="output folder (default figures/)")
    p.add_argument("--quick", action="store_true",
                   help="smaller studies (fewer seeds and samples; stored as <study>_quick), under 2 minutes")
    p.add_argument("--only", metavar="NAME", action="append", choices=FIGURES,
                   help="build only this figure (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto for the sweeps (default cpu)")
    p.add_argument("--experiments", metavar="DIR", default=None,
                   help="folder of the sweep configs (default: the repository's experiments/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    import os
    import time

    from ..io import check_output_paths
    from ..validation import check_device

    # Everything is checked before the first study runs: a bad device or output path changes nothing.
    check_device(args.device)
    check_output_paths({"--out": args.out}, {"--store": args.store, "--experiments": args.experiments},
                       folder=True)
    check_output_paths({"--store": args.store}, {"--experiments": args.experiments})
    if os.path.exists(args.store) and os.path.getsize(args.store) > 0:
        from ..store import ResultsStore

        ResultsStore(args.store, read_only=True).close()  # recognised as a results store before any run

    from ..figures import make_figures

    start = time.perf_counter()
    say = (lambda s: print(s, file=sys.stderr, flush=True))
    done = make_figures(args.store, args.out, quick=args.quick, only=args.only, device=args.device,
                        progress=not args.quiet, say=say, experiments=args.experiments)
    files = [f for d in done.values() for f in d["files"]]
    print(f"wrote {len(files)} files to {args.out} in {time.perf_counter() - start:.1f} s"
          f"{' (quick)' if args.quick else ''}:")
    for name, d in done.items():
        print(f"  {name:<17} {d['seconds']:7.1f} s  {' '.join(f.split('/')[-1] for f in d['files'])}")
    computed, stored = sum(d["computed"] for d in done.values()), sum(d["stored"] for d in done.values())
    print(f"store {args.store}: {computed} runs computed now, {stored} read back")
    return 0
