#!/usr/bin/env bash
# One prepared check for a machine with a GPU (its python3 already has a CUDA torch, ninja and
# pytest): build in place for this GPU, run the whole test suite (CUDA parametrisations
# included), then each kernel benchmark on CUDA with its own time limit. Logs and tables go to
# $OUT (or ./gpu-check-out); at most 8 files come back from a device run, so benchmark outputs
# are concatenated. Sized to finish well inside 8 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  git log --oneline -1 2>/dev/null; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# Build for this GPU only (fast); setup.py never asks the local GPU by itself.
cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
( time MAT_CUDA_BUILD=cuda TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=16 \
    timeout 240 python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
tail -3 "$OUT/build.log"

# CUDA-parametrised tests first (the part no CPU run covers), then the rest.
timeout 150 python3 -m pytest tests -q -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests_cuda.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 150 python3 -m pytest tests -q -k "not cuda" -p no:cacheprovider 2>&1 | tee "$OUT/tests_rest.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

: > "$OUT/bench.md"
for b in optim lanczos gram probe skip mat; do
  echo "== bench $b" | tee -a "$OUT/bench.md"
  timeout 60 python3 -m benchmarks kernels --only "$b" --device cuda --out "$OUT/bench_$b" \
    >> "$OUT/bench.md" 2>&1 || { echo "bench $b failed or timed out" | tee -a "$OUT/bench.md"; status=1; }
  rm -rf "$OUT/bench_$b"
done
tail -120 "$OUT/bench.md"
exit $status
