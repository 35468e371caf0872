"""``w2s-theory study``: the full weak-to-strong pipeline on your own representations (docs/design.md)."""

from __future__ import annotations

import sys


#: As :data:`w2s_theory.byo.DEMOS` and :data:`w2s_theory.pipeline.CLASSIFICATION_LOSSES`, repeated so that
#: building the CLI imports nothing heavy (a test keeps them equal).
DEMOS = ("digits",)
CLASSIFICATION_LOSSES = ("forward_kl", "reverse_kl", "forward_ce", "reverse_ce")


def register(sub) -> None:
    p = sub.add_parser(
        "study", help="run the weak-to-strong pipeline on your own embeddings (weak head -> students -> test)",
        description="Weak head on split A (labels), teacher probabilities on split B, students under the four "
                    "losses on split B, evaluation on split C; prints the loss-comparison table and the guarantee "
                    "check. Row i of every array is sample i.")
    p.add_argument("--weak-features", metavar="W.npy", help="(n, m_w) weak representation: .npy, .npz, .pt, "
                                                            ".parquet or .csv (FILE.npz:NAME picks an array)")
    p.add_argument("--strong-features", metavar="S.npy", help="(n, m_s) strong representation")
    p.add_argument("--labels", metavar="y.npy", help="(n,) integer class labels 0..k-1")
    p.add_argument("--demo", choices=DEMOS, help="instead of files: a dataset bundled with scikit-learn "
                                                        "(pip install 'w2s-theory[demo]')")
    p.add_argument("--classes", type=int, default=None, help="number of classes k (default: largest label + 1)")
    p.add_argument("--repeats", type=int, default=5, help="random splits into thirds, averaged (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits and the label noise (default 0)")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of teacher rows flipped on split B "
                                                            "(default 0)")
    p.add_argument("--l2", type=float, default=1e-2, help="L2 penalty of the weak head and the ceiling, on "
                                                          "standardised features (default 0.01)")
    p.add_argument("--losses", default=",".join(CLASSIFICATION_LOSSES),
                   help=f"comma-separated student losses (default {','.join(CLASSIFICATION_LOSSES)})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from ..byo import ByoSettings, check_inputs, format_report, load_demo, run_byo
    from ..io import check_output_paths, load_array, save_json
    from ..validation import InputError, check_device

    files = (args.weak_features, args.strong_features, args.labels)
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    check_device(args.device)
    check_output_paths({"--json": args.json}, {"--weak-features": args.weak_features,
                                               "--strong-features": args.strong_features, "--labels": args.labels})
    if args.demo:
        if any(files):
            raise InputError("give either --demo or the three arrays (--weak-features, --strong-features, --labels)")
        weak, strong, labels = load_demo(args.demo)
    else:
        missing = [flag for flag, value in zip(("--weak-features", "--strong-features", "--labels"), files)
                   if not value]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or use --demo digits)")
        weak = load_array(args.weak_features, "--weak-features")
        strong = load_array(args.strong_features, "--strong-features")
        labels = load_array(args.labels, "--labels")
    settings = ByoSettings(seed=args.seed, repeats=args.repeats, l2=args.l2, noise=args.noise,
                           losses=tuple(s.strip() for s in args.losses.split(",") if s.strip()), device=args.device)
    check_inputs(weak, strong, labels, args.classes)  # shapes, labels and sizes, before any work
    report = run_byo(weak, strong, labels, settings, classes=args.classes,
                     progress=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:  # written before anything is printed: a closed stdout cannot lose it
        save_json(args.json, report)
    s = report["settings"]
    print(f"n = {s['n']} samples, k = {s['classes']} classes, weak {s['weak_dim']} / strong {s['strong_dim']} "
          f"features; splits A/B/C = {'/'.join(map(str, s['split_sizes']))}; {s['repeats']} random splits "
          f"(mean ± s.e.); teacher noise {s['noise']:g}")
    print(format_report(report))
    print("\nguarantee check on split B (fraction of splits where it held):\n"
          "  gain>=misfit  Theorem-2 form; guaranteed only for reverse KL with a head convex in probability space\n"
          "                that contains the truth -- not the case for a softmax head on real labels (observed only)\n"
          "  sqrt-bound    |gain| <= sqrt(misfit) / (sqrt(2) gamma), gamma = smallest teacher/student probability\n"
          "                (Lemma 1, provable constant; always true)")
    return 0
