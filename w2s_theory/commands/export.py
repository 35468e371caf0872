"""``w2s-theory export --store results.db --out FILE.csv|FILE.parquet``: the stored rows as one flat table."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("export", help="export a results store to CSV or Parquet (one column per field)")
    p.add_argument("--store", default="results.db", help="SQLite results store (default results.db)")
    p.add_argument("--out", required=True, metavar="FILE", help="output table: .csv, or .parquet (needs pyarrow)")
    p.add_argument("--study", default=None, help="only this study (default: every study, with a study column)")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from ..io import check_output_paths
    from ..store import ResultsStore

    store_files = {"--store": args.store, "--store (its write-ahead log)": f"{args.store}-wal",
                   "--store (its shared memory)": f"{args.store}-shm"}
    check_output_paths({"--out": args.out}, store_files)
    with ResultsStore(args.store, read_only=True) as store:  # only read: the store file is never written
        n = store.export(args.out, study=args.study)
    print(f"wrote {n} rows to {args.out}", file=sys.stderr)
    return 0
