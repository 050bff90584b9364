#!/usr/bin/env bash
# One prepared check for a machine with a GPU (its python3 already has a CUDA torch, ninja and
# pytest): build in place, run the whole test suite (CUDA parametrisations included) and the
# kernel benchmarks; logs and tables go to $OUT (or ./gpu-check-out). Sized to finish well
# inside 8 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# Build for this GPU only (fast); the build never asks the local GPU by itself.
cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
( time MAT_CUDA_BUILD=cuda TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS=16 \
    timeout 240 python3 setup.py build_ext --inplace ) > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
tail -3 "$OUT/build.log"

timeout 200 python3 -m pytest tests -q -x --durations=10 2>&1 | tee "$OUT/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 150 python3 -m benchmarks kernels --device cuda --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
cp "$OUT/bench/summary.md" "$OUT/bench_summary.md" 2>/dev/null
exit $status
