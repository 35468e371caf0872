#!/usr/bin/env bash
# Every check that needs a GPU, in one command: the CUDA tests (`pytest -m gpu`), then `w2s-theory bench
# --device cuda` with the practice-trainer workload. Written for a GPU machine that is lent for minutes: a
# Python that already has a CUDA build of torch (and numpy, scipy, pandas, matplotlib, sympy, mpmath, pytest,
# hypothesis), no network, and not this package's other dependencies. Those travel as wheels in .whl/
# (`make gpu-wheels` downloads them on a machine with network) and are installed into a temporary folder; the
# package itself is imported from this checkout, nothing is installed into the machine's Python.
#
#   make gpu-wheels                          # beforehand, on a machine with network: .whl/ (git ignores it)
#   bash experiments/gpu_check.sh            # on the GPU machine, from a copy of the repository with .whl/
#
# .whl/ is ignored by git, so a tool that copies the working tree must be told to take it along. Without the
# wheels (no cvxpy there) the script still runs the CUDA tests and the bench of the heads that need no cvxpy.
#
# Outputs go to $OUT if it is set, else results/gpu_check/: pytest_gpu.log, bench.log, bench_<device>.json and
# machine.txt. The exit status is 0 only if the tests passed and the bench certified every gap (2: bad settings,
# 3: no CUDA).
#
# Settings (environment): W2S_PYTHON (default python3), W2S_WHEELS (the folder of wheels, default .whl; empty:
# none), W2S_GPU_CHECK_DEVICE (cuda; `cpu` rehearses the
# script on a machine without a GPU: the CUDA tests then skip with their reason), W2S_BENCH_ARGS (extra
# arguments of the bench, e.g. smaller sizes for a rehearsal; default: the full bench with --practice 1000),
# W2S_TEST_TIMEOUT and W2S_BENCH_TIMEOUT (seconds, default 150 and 330: together under ten minutes).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${W2S_PYTHON:-python3}
DEVICE=${W2S_GPU_CHECK_DEVICE:-cuda}
OUT_DIR=${OUT:-results/gpu_check}
BENCH_ARGS=${W2S_BENCH_ARGS:---practice 1000}
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }
# Bad settings: one line and exit 2, before anything runs.
case "$DEVICE" in cuda|cpu) ;; *) log "error: W2S_GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'"; exit 2;; esac
command -v "$PY" >/dev/null || { log "error: no Python at W2S_PYTHON='$PY'"; exit 2; }
{ mkdir -p "$OUT_DIR" && [ -w "$OUT_DIR" ]; } 2>/dev/null || { log "error: cannot write to '$OUT_DIR' (set OUT)"; exit 2; }

WHEELS=${W2S_WHEELS-.whl}
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d)
    log "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $site"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl; then
        # no pip, or it refused: a wheel is a zip archive of what goes into site-packages
        log "pip could not install the wheels; unpacking them instead"
        for wheel in "$WHEELS"/*.whl; do
            "$PY" -m zipfile -e "$wheel" "$site" || { log "error: $wheel does not unpack"; exit 1; }
        done
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - "$DEVICE" <<'EOF' | tee "$OUT_DIR/machine.txt"
import platform, sys
import torch
device = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} multiprocessors")
import w2s_theory  # the package from this checkout
print(f"w2s_theory from {w2s_theory.__file__}")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(3)
try:
    import cvxpy  # a dependency carried as a wheel
except ImportError as exc:
    print(f"cvxpy missing ({exc})")
    sys.exit(4)
print(f"cvxpy {cvxpy.__version__}, solvers {', '.join(cvxpy.installed_solvers())}")
EOF
status=${PIPESTATUS[0]}
# The test files that hold CUDA tests (collecting only them: other modules need cvxpy at import).
TEST_FILES=$(grep -l "mark\.gpu" tests/test_*.py)
SELECT=()
if [ "$status" -eq 4 ]; then
    log "warning: no cvxpy here (carry .whl/ from make gpu-wheels): the bench runs the softmax and squared heads only"
    BENCH_ARGS="$BENCH_ARGS --heads softmax,squared --no-sparse"
    SELECT=(-k "not test_bench_runs_on_cuda")  # its bench has cvxpy baselines
elif [ "$status" -ne 0 ]; then
    [ "$status" -eq 3 ] && log "error: no CUDA device here (W2S_GPU_CHECK_DEVICE=cpu rehearses the script)"
    [ "$status" -ne 3 ] && log "error: the environment is not ready (see above)"
    exit "$status"
fi

log "pytest -m gpu"
timeout -k 10 "${W2S_TEST_TIMEOUT:-150}" "$PY" -m pytest -q -m gpu -p no:cacheprovider ${SELECT[@]+"${SELECT[@]}"} $TEST_FILES 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
tests=${PIPESTATUS[0]}

log "w2s-theory bench --device $DEVICE $BENCH_ARGS"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout -k 10 "${W2S_BENCH_TIMEOUT:-330}" "$PY" -m w2s_theory.cli bench --device "$DEVICE" \
    --json "$OUT_DIR/bench_$DEVICE.json" $BENCH_ARGS 2>&1 | tee "$OUT_DIR/bench.log"
bench=${PIPESTATUS[0]}

log "pytest exit $tests, bench exit $bench (124: stopped at its time limit)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
