#!/usr/bin/env bash
# One prepared check for a machine with a GPU (its python3 already has a CUDA torch, ninja and
# pytest): build in place for this GPU, run the CUDA tests (MAT end to end on CUDA, the HF models,
# the sync-free step, Lanczos' memory placements, ...), the rest of the suite, each kernel
# benchmark on CUDA, and compute-sanitizer (memcheck, racecheck, synccheck) on
# scripts/gpu_sanitizer_cases.py when the machine has it. Logs and tables go to $OUT (or
# ./gpu-check-out); at most 8 files come back from a device run, so this writes 7:
#   gpu.txt build.log tests_cuda.log tests_rest.log bench.md sanitizer.log summary.txt
# Sized to finish well inside 8 minutes on one H100/H200: every step has its own time limit and
# the optional ones (benchmarks, the sanitizer's later tools) are skipped once the budget
# (GPU_CHECK_BUDGET_S, default 420 s) is spent; summary.txt says what ran and what failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
status=0
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
left() { echo $((BUDGET - SECONDS)); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  git log --oneline -1 2>/dev/null; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# Build for this GPU only (fast); setup.py never asks the local GPU by itself.
cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
( time MAT_CUDA_BUILD=cuda TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=16 \
    timeout 240 python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 \
  || { note "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
tail -3 "$OUT/build.log"
note "build ok for sm_$cap at ${SECONDS}s"

# CUDA-parametrised and CUDA-only tests first (the part no CPU run covers), then the rest. The
# emulated-grid and ptxas tests check the kernels without a GPU and run in CI; here they would only
# spend the budget (their names contain "cuda", so -k cuda would pick them).
CPU_ONLY="--ignore=tests/test_cuda_emulation.py --ignore=tests/test_ptxas_resources.py"
timeout 180 python3 -m pytest tests -q -k cuda $CPU_ONLY -p no:cacheprovider -rs 2>&1 \
  | tee "$OUT/tests_cuda.log" | tail -30
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=1
note "cuda tests rc=$rc: $(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUT/tests_cuda.log" | tail -1) at ${SECONDS}s"
timeout 120 python3 -m pytest tests -q -k "not cuda" $CPU_ONLY -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests_rest.log" | tail -8
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=1
note "other tests rc=$rc: $(tail -1 "$OUT/tests_rest.log") at ${SECONDS}s"

# compute-sanitizer on every kernel once (small inputs; each tool has its own limit). Without
# the caching allocator, memcheck sees each tensor's true bounds.
: > "$OUT/sanitizer.log"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck synccheck; do
    if [ "$(left)" -lt 60 ]; then note "sanitizer $tool skipped: time budget spent"; continue; fi
    echo "== compute-sanitizer --tool $tool" >> "$OUT/sanitizer.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 90 compute-sanitizer --tool "$tool" \
      --error-exitcode 3 python3 scripts/gpu_sanitizer_cases.py >> "$OUT/sanitizer.log" 2>&1
    rc=$?; [ "$rc" -eq 0 ] || status=1
    note "sanitizer $tool rc=$rc ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer.log") clean summaries so far) at ${SECONDS}s"
  done
else
  note "compute-sanitizer not found: sanitizer step skipped"
fi

: > "$OUT/bench.md"
for b in optim lanczos gram probe skip mat; do
  if [ "$(left)" -lt 45 ]; then note "bench $b skipped: time budget spent"; continue; fi
  echo "== bench $b" | tee -a "$OUT/bench.md"
  timeout 45 python3 -m benchmarks kernels --only "$b" --device cuda --out "$OUT/bench_$b" \
    >> "$OUT/bench.md" 2>&1 || { note "bench $b failed or timed out"; status=1; }
  rm -rf "$OUT/bench_$b"
done
tail -120 "$OUT/bench.md"
note "done at ${SECONDS}s, status=$status"
exit $status
