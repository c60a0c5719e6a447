#!/usr/bin/env bash
# One-command GPU check for calibops (target: under 8 minutes on one H100; no internet needed).
#
#   bash scripts/gpu_check.sh
#
# Steps (each one's failure is reported and the script goes on; a summary is printed at the end):
#   1. environment (nvidia-smi, torch / triton / CUDA versions)
#   2. build + install: CALIBOPS_REQUIRE_EXT=1 pip install --no-deps --no-build-isolation -e .
#      (builds the C++ CPU and CUDA ops for this GPU's arch; falls back to `setup.py build_ext --inplace`)
#   3. GPU tests, quick pass (-m "not slow"): Triton backend, CUDA backend, torch.compile
#   4. compute-sanitizer memcheck: scripts/sanitize_case.py (CUDA kernels) and a tiny Triton case
#      (skipped with a note when compute-sanitizer is absent)
#   5. benchmarks/bench_gpu.py: fwd / bwd / fwd+bwd at the issue's shapes, hard + soft, every backend
#      -> benchmarks/results/gpu_<card>.csv and a table
#   6. a Triton block-size sweep (forward / backward ops alone) -> benchmarks/results/gpu_<card>_tiles.csv
#   7. the rest of the test suite (-m "not slow"), if time is left
# Knobs: GPU_CHECK_BUDGET_S (default 450: total seconds the steps may use), CALIBOPS_CUDA_ARCH (default: this
# GPU's compute capability), GPU_CHECK_LOG_DIR (default $OUT/gpu_check_logs or /tmp/gpu_check_logs).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
LOG_DIR=${GPU_CHECK_LOG_DIR:-${OUT:-/tmp}/gpu_check_logs}
mkdir -p "$LOG_DIR"
unset TRITON_INTERPRET
declare -a SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# run_step NAME MAX_SECONDS RESERVE_SECONDS CMD...: runs CMD with a timeout of min(MAX, time left - RESERVE)
run_step() {
  local name=$1 max=$2 reserve=$3
  shift 3
  local limit=$(( $(left) - reserve ))
  (( limit > max )) && limit=$max
  if (( limit < 10 )); then
    SUMMARY+=("$(printf '%-28s SKIPPED (time budget: %ss left)' "$name" "$(left)")")
    echo "=== $name: skipped, $(left)s left in the budget"
    return 0
  fi
  local log="$LOG_DIR/${name// /_}.log" t0 rc
  echo
  echo "=== $name (timeout ${limit}s) ==="
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  local dt=$(( $(date +%s) - t0 ))
  local verdict="ok"
  if (( rc == 124 || rc == 137 )); then verdict="TIMEOUT after ${dt}s"; elif (( rc != 0 )); then verdict="FAILED (exit $rc)"; fi
  SUMMARY+=("$(printf '%-28s %-22s %4ss  log: %s' "$name" "$verdict" "$dt" "$log")")
  return $rc
}

# --- 1. environment ----------------------------------------------------------------------------------------
echo "=== environment ==="
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 || echo "nvidia-smi not available"
$PY - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability:", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton import failed:", exc)
EOF
if [[ -z "${CALIBOPS_CUDA_ARCH:-}" ]]; then
  CALIBOPS_CUDA_ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null | tail -n 1 || true)
  [[ "$CALIBOPS_CUDA_ARCH" =~ ^[0-9]+\.[0-9]+$ ]] || CALIBOPS_CUDA_ARCH=""
fi
export CALIBOPS_CUDA_ARCH
export MAX_JOBS=${MAX_JOBS:-16}
echo "CALIBOPS_CUDA_ARCH=${CALIBOPS_CUDA_ARCH:-<torch default>} MAX_JOBS=$MAX_JOBS budget=${BUDGET}s logs=$LOG_DIR"

# --- 2. build + install -----------------------------------------------------------------------------------
export PY
run_step "build+install" 240 200 bash -c '
  CALIBOPS_REQUIRE_EXT=1 $PY -m pip install --no-deps --no-build-isolation -e . && exit 0
  echo "pip install failed; trying an in-place build (python setup.py build_ext --inplace)"
  CALIBOPS_REQUIRE_EXT=1 $PY setup.py build_ext --inplace'
run_step "backends" 60 190 $PY -c "
import calibops
for k, v in calibops.available_backends().items():
    print(f'{k:10s}', 'available' if v is None else f'unavailable: {v}')
"

# --- 3. GPU tests (quick pass) ----------------------------------------------------------------------------
run_step "tests triton" 200 170 $PY -m pytest tests/test_triton_backend.py -q -m "not slow" -p no:cacheprovider
if [[ -f tests/test_cuda_backend.py ]]; then
  run_step "tests cuda" 120 160 $PY -m pytest tests/test_cuda_backend.py -q -m "not slow" -p no:cacheprovider
else
  SUMMARY+=("$(printf '%-28s %s' "tests cuda" "SKIPPED (tests/test_cuda_backend.py not present)")")
fi
if [[ -f tests/test_compile.py ]]; then
  run_step "tests compile" 90 150 $PY -m pytest tests/test_compile.py -q -m "not slow" -p no:cacheprovider
fi

# --- 4. compute-sanitizer memcheck ------------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
[[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
if [[ -z "$SANITIZER" ]]; then
  SUMMARY+=("$(printf '%-28s %s' "memcheck" "SKIPPED (compute-sanitizer not found on PATH or in /usr/local/cuda/bin)")")
  echo "=== memcheck: compute-sanitizer is absent, skipped"
else
  if [[ -f scripts/sanitize_case.py ]]; then
    run_step "memcheck cuda" 90 140 "$SANITIZER" --tool memcheck --error-exitcode 1 $PY scripts/sanitize_case.py
  else
    SUMMARY+=("$(printf '%-28s %s' "memcheck cuda" "SKIPPED (scripts/sanitize_case.py not present)")")
  fi
  run_step "memcheck triton" 90 130 "$SANITIZER" --tool memcheck --error-exitcode 1 $PY -c "
import torch
from calibops.reference import bin_centres, bin_edges
from calibops.triton import binned_stats
torch.manual_seed(0)
for soft in (False, True):
    for C, N, act in ((3, 1037, 1), (37, 211, 1), (1, 77, 2)):
        x = torch.randn(2, C, N, device='cuda', requires_grad=True)
        y = torch.randint(-1, C + 1, (2, N), device='cuda')
        e = (bin_centres if soft else bin_edges)(7, 'cuda')
        out = binned_stats(x, y, e, 7, soft, act, True, -1, False)
        (out[1] * torch.randn_like(out[1])).sum().backward()
torch.cuda.synchronize()
print('triton memcheck case ran')
"
fi

# --- 5. benchmark -----------------------------------------------------------------------------------------
BENCH_LIMIT=$(( $(left) - 60 ))
(( BENCH_LIMIT > 300 )) && BENCH_LIMIT=300
run_step "benchmark" "$BENCH_LIMIT" 10 $PY benchmarks/bench_gpu.py --budget-s $(( BENCH_LIMIT * 2 / 3 ))
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp benchmarks/results/gpu_*.csv "$OUT"/ 2>/dev/null || true
fi

# --- 6. Triton block-size sweep (which TILE_ELEMS / num_warps to make the default), if time is left ----------
run_step "tile sweep" 120 40 $PY benchmarks/bench_gpu.py --shapes 2x4x224x224x144,2x16x176x176x64 \
  --sweep-tiles fwd:512:4,fwd:1024:4,fwd:2048:4,fwd:1024:8,bwd:512:4,bwd:1024:8,bwd:2048:8
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp benchmarks/results/gpu_*.csv "$OUT"/ 2>/dev/null || true
fi

# --- 7. the rest of the suite, if time is left -------------------------------------------------------------
run_step "tests rest" 240 5 $PY -m pytest tests -q -m "not slow" -p no:cacheprovider \
  --ignore=tests/test_triton_backend.py \
  --ignore=tests/test_cuda_backend.py --ignore=tests/test_compile.py

# --- summary ----------------------------------------------------------------------------------------------
echo
echo "================================ GPU CHECK SUMMARY ================================"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [[ -f "$LOG_DIR/benchmark.log" ]]; then
  echo
  sed -n '/^SUMMARY/,$p' "$LOG_DIR/benchmark.log"
fi
echo "total $(elapsed)s (budget ${BUDGET}s); logs in $LOG_DIR; CSV: $(ls benchmarks/results/gpu_*.csv 2>/dev/null | tr '\n' ' ')"
