#!/usr/bin/env bash
# One-command GPU check for calibops: fits 8 minutes on one H100/H200, needs no internet, and returns the
# benchmark numbers before anything else that could run out of time.
#
#   bash scripts/gpu_check.sh              # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run    # no GPU: the same steps, order, budget and archive on CPU
#                                          # (tiny test selections, Triton through TRITON_INTERPRET=1)
#
# Steps, in this order (each one's failure is reported and the script goes on; the step table is printed
# after every step; a step that would not fit the time left is skipped, one that overruns is stopped):
#    1 env          nvidia-smi, torch / triton / CUDA versions, the CUDA toolkit found (CUDA_HOME)
#    2 build        CALIBOPS_REQUIRE_EXT=1 pip install --no-deps --no-build-isolation -e . (falls back to
#                   setup.py build_ext --inplace); FAILS unless the CUDA kernels are registered
#    3 tests_quick  GPU tests, quick pass (-m "not slow"): tests/test_triton_backend.py, tests/test_cuda_backend.py
#                   in several pytest processes at once (scripts/pytest_parallel.py: most of the time is Triton
#                   compiling kernel variants, one core per process); tests_slow below likewise
#    4 bench        benchmarks/bench_gpu.py, fwd+bwd, triton / cuda / torch-vectorised at 2x4x224x224x144 and
#                   2x16x176x176x64, hard + soft, then the forward op alone per engine variant (marginal,
#                   top-label, R = 3 raters, moments: issue 10's targets; brier: moments with one bin, the call
#                   brier_score makes, issue 23); every row is appended to the CSV as it is measured; then
#                   benchmarks/bench_monai.py --device cuda (calibops vs MONAI 1.7's losses)
#    5 selfcheck    python -m calibops selfcheck --record (only after the quick tests passed; without --record
#                   otherwise): adds the (backend, arch) pairs that pass to calibops/backends/verified.json;
#                   then benchmarks/bench_selfcheck.py (at most 60 s): auto's per-new-specialisation self-check
#                   cost (cold: compiling; warm: the check alone; target <= 100 ms) and the cached per-call
#                   lookup (target <= 10 us), lines "PER CALL" and "SUMMARY" of the log
#    6 memcheck_cuda    compute-sanitizer memcheck of scripts/sanitize_case.py (PYTORCH_NO_CUDA_MEMORY_CACHING=1:
#    7 memcheck_triton  every tensor its own allocation, so small overruns are not hidden inside pooled blocks)
#    8 tests_slow   the GPU tests marked slow (more Triton variants)
#    9 tests_rest   the rest of the test suite (-m "not slow")
#   10 tiles        a Triton block-size sweep (forward / backward ops alone)
#
# Time budget: GPU_CHECK_BUDGET_S (default 480). Every step has a cap and keeps back the time the essential
# steps after it need (the build keeps 190 s for the quick tests and the benchmark; the quick tests keep 130 s
# for the benchmark; the later steps 10 s for the archive), all scaled by budget/480; a step runs with timeout
# min(cap, time left - reserve) and is skipped when that is under 10 s. Caps (s): env 30, build 240,
# tests_quick 150, bench 150, selfcheck 150, memcheck 90 + 60, tests_slow 150, tests_rest 200, tiles 60.
#
# Outputs, in $OUT (default ${TMPDIR:-/tmp}/calibops_gpu_check; at most 8 files, names of letters, digits,
# '.', '_', '-'; refreshed after every step):
#    gpu_check_logs.tar.gz   every step's log, the environment and the step table
#    gpu_bench.csv           benchmark rows (card, versions and environment in every row)
#    gpu_bench_monai.csv     calibops vs MONAI 1.7's HardL1ACELoss / SoftL1ACELoss (benchmarks/bench_monai.py)
#    gpu_tiles.csv           block-size sweep rows
#    verified.diff           the change `selfcheck --record` made to calibops/backends/verified.json (review, commit)
#    summary.txt             the step table
# Knobs: PYTHON (default python3), GPU_CHECK_BUDGET_S, CALIBOPS_CUDA_ARCH (default: this GPU's compute
# capability), MAX_JOBS (default 16), CUDA_HOME (default: found, see step 1), GPU_CHECK_DRY_RUN=1 (= --dry-run),
# GPU_CHECK_STALL=<step> (dry run only: that step hangs, to test that the budget stops it).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
OUT_DIR=${OUT:-${TMPDIR:-/tmp}/calibops_gpu_check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_logs.XXXXXX")
ARCHIVE="$OUT_DIR/gpu_check_logs.tar.gz"
BENCH_CSV="$OUT_DIR/gpu_bench.csv"
TILES_CSV="$OUT_DIR/gpu_tiles.csv"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PY
declare -a SUMMARY=()
STEP_NO=0
QUICK_OK=0

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
scaled() { echo $(( $1 * BUDGET / 480 )); }

summary_table() {
  printf '%-3s %-16s %-26s %6s  %s\n' "#" "step" "result" "secs" "log (in gpu_check_logs.tar.gz)"
  local line
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  echo "elapsed $(elapsed)s of ${BUDGET}s$( ((DRY)) && echo ' (dry run)')"
}

# Writes the step table and refreshes the archive in $OUT (so a run stopped from outside keeps its logs).
publish() {
  summary_table > "$LOG_DIR/summary.txt"
  cp "$LOG_DIR/summary.txt" "$OUT_DIR/summary.txt"
  tar -czf "$ARCHIVE.tmp" -C "$LOG_DIR" . && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}

record() {  # record NAME RESULT SECONDS LOG
  SUMMARY+=("$(printf '%-3s %-16s %-26s %6s  %s' "$STEP_NO" "$1" "$2" "$3" "$4")")
}

# run_step NAME CAP RESERVE COMMAND: runs COMMAND (a bash string) with a timeout of min(CAP, time left - RESERVE),
# CAP and RESERVE given for the default 480 s budget and scaled to this one; skips the step when that leaves
# less than 10 s (scaled, at least 2 s). Output goes to the terminal and to $LOG_DIR/NN_NAME.log.
run_step() {
  local name=$1 cap reserve minimum limit
  cap=$(scaled "$2")
  reserve=$(scaled "$3")
  minimum=$(scaled 10)
  (( minimum < 2 )) && minimum=2
  local cmd=$4
  STEP_NO=$((STEP_NO + 1))
  local log
  log=$(printf '%02d_%s.log' "$STEP_NO" "$name")
  local now_left
  now_left=$(left)
  limit=$(( now_left - reserve ))
  (( limit > cap )) && limit=$cap
  echo
  if (( limit < minimum )); then
    echo "=== $STEP_NO $name: SKIPPED, ${now_left}s left in the budget and ${reserve}s kept for later steps" | tee "$LOG_DIR/$log"
    record "$name" "SKIPPED (time budget)" 0 "$log"
    summary_table
    publish
    return 0
  fi
  if (( DRY )) && [[ "${GPU_CHECK_STALL:-}" == "$name" ]]; then
    cmd="echo 'dry run: GPU_CHECK_STALL=$name, this step hangs'; sleep 100000"
  fi
  echo "=== $STEP_NO $name (timeout ${limit}s: ${now_left}s left, ${reserve}s kept for later steps) ===" | tee "$LOG_DIR/$log"
  echo "\$ $cmd" >> "$LOG_DIR/$log"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG_DIR/$log"
  rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 )) verdict="ok"
  if (( rc == 124 || rc == 137 )); then
    verdict="TIMEOUT (stopped at ${limit}s)"
  elif (( rc != 0 )); then
    verdict="FAILED (exit $rc)"
  fi
  echo "=== $STEP_NO $name: $verdict in ${dt}s" | tee -a "$LOG_DIR/$log"
  record "$name" "$verdict" "$dt" "$log"
  echo
  summary_table
  publish
  return "$rc"
}

skip_step() {  # skip_step NAME WHY
  STEP_NO=$((STEP_NO + 1))
  local log
  log=$(printf '%02d_%s.log' "$STEP_NO" "$1")
  echo "=== $STEP_NO $1: SKIPPED ($2)" | tee "$LOG_DIR/$log"
  record "$1" "SKIPPED ($2)" 0 "$log"
  summary_table
  publish
}

PYTEST="$PY -m pytest -o addopts= -q -p no:cacheprovider -ra"

# --- CUDA toolkit ----------------------------------------------------------------------------------------
# torch looks for CUDA above `which nvcc`; where nvcc is a wrapper script outside the toolkit the build fails
# (cuda_runtime.h: No such file) or silently leaves the CUDA ops out. setup.py finds the toolkit the same way.
if [[ -z "${CUDA_HOME:-}" && -z "${CUDA_PATH:-}" ]] && (( ! DRY )); then
  NVCC=$(command -v nvcc || true)
  TORCH_CUDA=$($PY -c "import torch; print(torch.version.cuda or '')" 2>/dev/null | tail -n 1)
  for d in ${NVCC:+"$(dirname "$(dirname "$NVCC")")" "$(dirname "$(dirname "$(readlink -f "$NVCC")")")"} \
           ${TORCH_CUDA:+/usr/local/cuda-$TORCH_CUDA} /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV) \
           /opt/cuda; do
    if [[ -x "$d/bin/nvcc" && -f "$d/include/cuda_runtime.h" ]]; then
      export CUDA_HOME=$d
      break
    fi
  done
fi
if [[ -n "${CUDA_HOME:-}" ]]; then
  export PATH="$PATH:$CUDA_HOME/bin"
fi

# --- 1. environment ----------------------------------------------------------------------------------------
run_step env 30 420 '
echo "dry run: '"$DRY"'; python: $PY ($(command -v "$PY")); CUDA_HOME=${CUDA_HOME:-<unset>}; nvcc: $(command -v nvcc || echo none)"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 || echo "nvidia-smi not available"
$PY - <<EOF
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability:", torch.cuda.get_device_capability())
try:
    import triton, numpy
    print("triton", triton.__version__, "numpy", numpy.__version__)
except Exception as exc:
    print("triton import failed:", exc)
EOF
env | grep -E "^(CUDA|CALIBOPS|TORCH|TRITON|PYTORCH|MAX_JOBS)" | sort || true'

if (( ! DRY )); then
  unset TRITON_INTERPRET
  if [[ -z "${CALIBOPS_CUDA_ARCH:-}" ]]; then
    CALIBOPS_CUDA_ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null | tail -n 1)
    [[ "$CALIBOPS_CUDA_ARCH" =~ ^[0-9]+\.[0-9]+$ ]] || CALIBOPS_CUDA_ARCH=""
  fi
  export CALIBOPS_CUDA_ARCH
  export MAX_JOBS=${MAX_JOBS:-16}
  KEY=CUDA
else
  export TRITON_INTERPRET=1
  KEY=CPU
fi

# --- 2. build + install; fails unless the kernels are registered ----------------------------------------------
CHECK_KERNELS="\$PY - <<EOF
import sys, torch
from calibops.backends import extension as _ops
try:
    ok = torch._C._dispatch_has_kernel_for_dispatch_key('calibops::binned_stats', '$KEY')
except RuntimeError as exc:
    ok = False
    print('calibops::binned_stats is not registered:', exc)
print('calibops._C loaded:', _ops.extension_loaded(), '(error: %s)' % _ops.EXTENSION_ERROR)
print('$KEY kernels of calibops::binned_stats registered:', ok)
sys.exit(0 if ok else 1)
EOF"
if (( DRY )); then
  run_step build 240 190 "echo 'dry run: no build (CI built the extension); checking the CPU kernels instead'
$CHECK_KERNELS"
else
  run_step build 240 190 "CALIBOPS_REQUIRE_EXT=1 \$PY -m pip install --no-deps --no-build-isolation -e . || {
  echo 'pip install failed; trying an in-place build (setup.py build_ext --inplace)'
  CALIBOPS_REQUIRE_EXT=1 \$PY setup.py build_ext --inplace; } || exit 1
$CHECK_KERNELS"
fi

# --- 3. GPU tests, quick pass --------------------------------------------------------------------------------
# several pytest processes: most of this time is Triton compiling kernel variants, one per core
PARALLEL="\$PY scripts/pytest_parallel.py --log-dir '$LOG_DIR'"
if (( DRY )); then
  QUICK="$PARALLEL -j 2 --name tests_quick -- tests/test_triton_backend.py tests/test_cuda_backend.py \
-k 'test_top_label_ties or test_no_class'"
else
  QUICK="$PARALLEL -j 6 --name tests_quick -- -m 'not slow' tests/test_triton_backend.py tests/test_cuda_backend.py"
fi
run_step tests_quick 150 130 "$QUICK" && QUICK_OK=1

# --- 4. benchmark: every row reaches the CSV as soon as it is measured ----------------------------------------
if (( DRY )); then
  # the engine rows are forward-only: the dry run checks the fwd+bwd loss rows (tests/test_gpu_check.py)
  BENCH="\$PY benchmarks/bench_gpu.py --device cpu --dry-run --shapes 1x3x4x4x4,1x5x3x3x3 --modes fwd+bwd \
--backends torch-vectorised,triton,cuda --engine '' --out '$BENCH_CSV'"
else
  BENCH="\$PY benchmarks/bench_gpu.py --shapes 2x4x224x224x144,2x16x176x176x64 --modes fwd+bwd \
--backends torch-vectorised,triton,cuda --engine marginal,top_label,raters3,moments,brier --budget-s $(scaled 100) \
--out '$BENCH_CSV'"
fi
# then calibops' MONAI-signature losses against MONAI 1.7's own (benchmarks/bench_monai.py; calibops rows only where
# MONAI 1.7 is not installed), forward+backward at issue 22's shapes, to gpu_bench_monai.csv; the step's exit status
# is the first failure of the two
if (( DRY )); then
  MONAI_BENCH="\$PY benchmarks/bench_monai.py --dry-run --out '$OUT_DIR/gpu_bench_monai.csv'"
else
  MONAI_BENCH="\$PY benchmarks/bench_monai.py --device cuda --out '$OUT_DIR/gpu_bench_monai.csv'"
fi
BENCH="$BENCH; r=\$?; timeout $(scaled 40) $MONAI_BENCH || r=\$?; exit \$r"
run_step bench 150 10 "$BENCH"

# --- 5. self-check, and the record of verified architectures -------------------------------------------------
cp calibops/backends/verified.json "$LOG_DIR/verified.before.json" 2>/dev/null || : > "$LOG_DIR/verified.before.json"
if (( DRY )); then  # the Triton kernels through the interpreter; nothing is recorded; the cpu kernels stand in
  SELFCHECK="\$PY -m calibops selfcheck --device cpu --backends triton --dtypes float32 --cases 1"
  SELFCHECK_COST="\$PY benchmarks/bench_selfcheck.py --device cpu --dry-run --backends cpu --calls 5000"
else
  if (( QUICK_OK )); then
    SELFCHECK="\$PY -m calibops selfcheck --record"
  else
    SELFCHECK="\$PY -m calibops selfcheck"  # the quick tests failed: check, record nothing
  fi
  SELFCHECK_COST="\$PY benchmarks/bench_selfcheck.py --backends cuda,triton --calls 20000"
fi
# the step fails when the self-check fails; the cost block (per new specialisation, per cached call) reports
run_step selfcheck 150 10 "$SELFCHECK; rc=\$?
echo '--- self-check cost (benchmarks/bench_selfcheck.py) ---'
timeout --kill-after=5 60 $SELFCHECK_COST || echo \"self-check cost: FAILED or stopped at 60 s (exit \$?)\"
exit \$rc"
diff -u --label a/calibops/backends/verified.json --label b/calibops/backends/verified.json \
  "$LOG_DIR/verified.before.json" calibops/backends/verified.json > "$OUT_DIR/verified.diff" 2>/dev/null
cp "$OUT_DIR/verified.diff" "$LOG_DIR/verified.diff"
echo "verified.diff: $(grep -c '^+[^+]' "$OUT_DIR/verified.diff") added line(s)"

# --- 6, 7. compute-sanitizer memcheck, caching allocator off -------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-/usr/local/cuda}" /usr/local/cuda; do
  [[ -z "$SANITIZER" && -x "$d/bin/compute-sanitizer" ]] && SANITIZER="$d/bin/compute-sanitizer"
  [[ -z "$SANITIZER" && -x "$d/compute-sanitizer/compute-sanitizer" ]] && SANITIZER="$d/compute-sanitizer/compute-sanitizer"
done
cat > "$LOG_DIR/sanitize_triton.py" <<'EOF'
"""Every Triton launch path once, small and odd shapes, every mode / rater count / moments, for memcheck."""
import torch

import calibops.backends.triton  # noqa: F401 - registers calibops::triton_binned_stats
from calibops.reference import bin_centres, bin_edges

op = torch.ops.calibops.triton_binned_stats
torch.manual_seed(0)
for soft in (False, True):
    for C, N, act, mode, R, moments in ((3, 1037, 1, 0, 1, False), (37, 211, 1, 1, 3, True), (1, 77, 2, 0, 3, True),
                                        (4, 0, 1, 1, 1, False), (5, 3001, 1, 1, 1, True)):
        x = torch.randn(2, C, N, device="cuda", requires_grad=True)
        y = torch.randint(-1, C + 1, (2, R, N), device="cuda")
        e = (bin_centres if soft else bin_edges)(7, "cuda")
        out = op(x, y, e, 7, int(soft), act, 0, mode, moments, -1, False)
        (out[1] * torch.randn_like(out[1])).sum().backward()
torch.cuda.synchronize()
print("sanitize_triton: ok")
EOF
MEMCHECK_ENV="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
if (( DRY )); then
  # no GPU: run the cases' Python through the same step (budget, logs); no sanitizer, no CUDA
  run_step memcheck_cuda 90 10 "$MEMCHECK_ENV \$PY -c \"import os; print('dry run: would run compute-sanitizer --tool memcheck on scripts/sanitize_case.py with PYTORCH_NO_CUDA_MEMORY_CACHING=' + os.environ['PYTORCH_NO_CUDA_MEMORY_CACHING'])\""
  run_step memcheck_triton 60 10 "$MEMCHECK_ENV \$PY -c \"import ast, os; ast.parse(open('$LOG_DIR/sanitize_triton.py').read()); print('dry run: sanitize_triton.py parses; PYTORCH_NO_CUDA_MEMORY_CACHING=' + os.environ['PYTORCH_NO_CUDA_MEMORY_CACHING'])\""
elif [[ -z "$SANITIZER" ]]; then
  skip_step memcheck_cuda "no compute-sanitizer on PATH or in CUDA_HOME"
  skip_step memcheck_triton "no compute-sanitizer on PATH or in CUDA_HOME"
else
  MEMCHECK="$MEMCHECK_ENV '$SANITIZER' --tool memcheck --error-exitcode 1 --print-limit 20"
  run_step memcheck_cuda 90 10 "$MEMCHECK \$PY scripts/sanitize_case.py"
  run_step memcheck_triton 60 10 "$MEMCHECK \$PY '$LOG_DIR/sanitize_triton.py'"
fi

# --- 8, 9. the rest of the tests -----------------------------------------------------------------------------
if (( DRY )); then
  run_step tests_slow 150 10 "$PARALLEL -j 2 --name tests_slow -- tests/test_triton_backend.py -k 'launch_config_heuristic'"
  run_step tests_rest 200 10 "$PYTEST tests/test_cuda_backend.py -k 'opcheck'"
else
  run_step tests_slow 150 10 "$PARALLEL -j 6 --name tests_slow -- -m slow tests/test_triton_backend.py tests/test_cuda_backend.py"
  run_step tests_rest 200 10 "$PYTEST -m 'not slow' tests --ignore=tests/test_triton_backend.py \
--ignore=tests/test_cuda_backend.py --ignore=tests/test_gpu_check.py"
fi

# --- 10. Triton block-size sweep (which TILE_ELEMS / num_warps to make the default) ---------------------------
if (( DRY )); then
  TILES="\$PY benchmarks/bench_gpu.py --device cpu --dry-run --shapes 1x3x4x4x4 --binning hard \
--sweep-tiles fwd:256:4,bwd:256:4 --out '$TILES_CSV'"
else
  TILES="\$PY benchmarks/bench_gpu.py --shapes 2x4x224x224x144,2x16x176x176x64 \
--sweep-tiles fwd:512:4,fwd:1024:4,fwd:2048:4,fwd:1024:8,bwd:512:4,bwd:1024:8,bwd:2048:8 --out '$TILES_CSV'"
fi
run_step tiles 60 5 "$TILES"

# --- summary -------------------------------------------------------------------------------------------------
echo
echo "================================ GPU CHECK SUMMARY ================================"
summary_table
BENCH_LOG=$(ls "$LOG_DIR"/*_bench.log 2>/dev/null | head -n 1)
if [[ -n "$BENCH_LOG" ]]; then
  echo
  sed -n '/^SUMMARY/,/^=== /p' "$BENCH_LOG" | sed '$d'
fi
publish
echo "outputs in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
FAILED=$(printf '%s\n' "${SUMMARY[@]}" | grep -c -E 'FAILED|TIMEOUT')
exit $(( FAILED > 0 ? 1 : 0 ))
