"""ptxas' resource report for every kernel of csrc/*/*.cu on sm_80 and sm_90.

Compiles each .cu to a cubin (device code only: the .cu files include no torch header, only
csrc/ and the CUDA headers) with ``-Xptxas -v``, prints registers, shared memory, stack frame
and spills per kernel, and fails on any register spill, a stack frame above STACK_BUDGET or
registers above REG_BUDGET. Skipped where nvcc is not on PATH. The report is also a script:
``python tests/test_ptxas_resources.py`` prints the table.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
ARCHS = ("sm_80", "sm_90")
# Bytes of per-thread stack (local memory) a kernel may use, per .cu; 0 unless measured and
# explained. A frame means local memory: an array indexed at run time, an address taken, a call
# not inlined.
#  optim/masked_step.cu: 32 (SGD) / 48 (AdamW) bytes on nvcc 13.0, sm_80 and sm_90, no spills.
#    The update op takes its state by reference, chosen at run time
#    (`s0 != nullptr ? a.v[j] : unused0`), which puts the Pack4 state vectors and the unused
#    slots in local memory (L1-cached). Budget = the measured 48 bytes, so any growth fails.
STACK_BUDGET = {"optim/masked_step.cu": 48}
SPILL_BUDGET = 0
# Registers per thread a kernel may use: (kernel-name pattern, budget), first match wins. A
# budget sits a few registers above the measured count (nvcc 13.0, sm_80 / sm_90) or at the
# next occupancy step, whichever is the reason given, so that growth is noticed.
#  lanczos_kernel<S, true> (small and w in shared memory, n up to ~57k in f32): measured
#    100-102. 128 = two 256-thread blocks per SM (65536 / (2 * 256)); one block per matrix,
#    so small batched matrices want more than one block per SM.
#  lanczos_kernel<S, false> (global-memory fallback, large n or a low
#    MAT_CUDA_LANCZOS_SMEM_LIMIT): measured 144 / 154 (f32, sm_90 / sm_80) and 158 / 164 (f64);
#    docs/gpu.md quotes 146 / 160 from its build. Every pointer may be global here (generic
#    64-bit addresses), and above 128 registers one 256-thread block per SM is all that fits
#    whatever the count, up to 255; the matrix is large (n^2 read per matvec), so one block
#    per SM costs nothing measurable. 176 = the measured maximum plus 12 for nvcc drift: more
#    flags a change of the code, not of occupancy.
#  masked_step_kernel (__launch_bounds__(512)): measured 28-40; 64 = two 512-thread blocks per
#    SM (ptxas would cap it at 128 and spill, which SPILL_BUDGET refuses first).
#  all others: measured 12-40; 64.
REG_BUDGET = [
    (r"lanczos_kernel<(float|double), true>", 128),
    (r"lanczos_kernel<(float|double), false>", 176),
    (r"masked_step_kernel<", 64),
    (r"", 64),
]


def register_budget(kernel: str) -> int:
    return next(b for pat, b in REG_BUDGET if re.search(pat, kernel))

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def _demangle(names):
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    """mat_cuda::optim::(anonymous namespace)::masked_step_kernel<float, ...>(...) -> readable."""
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name)  # parameter list
    return name.replace("mat_cuda::", "")


def ptxas_report(nvcc: str, jobs: int = 2) -> list[dict]:
    """[{file, arch, kernel, registers, smem, stack, spill_stores, spill_loads}]."""
    units = [(os.path.join(d, f), arch) for d, _, fs in os.walk(CSRC) for f in sorted(fs)
             if f.endswith(".cu") for arch in ARCHS]

    def one(unit):
        path, arch = unit
        cmd = [nvcc, "-std=c++17", "-cubin", "-arch=" + arch, "-Xptxas", "-v", "-I", CSRC, path,
               "-o", os.devnull]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("nvcc failed: %s\n%s" % (" ".join(cmd), r.stderr[-4000:]))
        rows, cur = [], None
        for line in (r.stdout + r.stderr).splitlines():
            m = _ENTRY.search(line)
            if m:
                cur = {"file": os.path.relpath(path, CSRC), "arch": m.group(2),
                       "mangled": m.group(1), "stack": 0, "spill_stores": 0, "spill_loads": 0,
                       "registers": 0, "smem": 0}
                rows.append(cur)
                continue
            if cur is None:
                continue
            m = _PROPS.search(line)
            if m:
                cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
                continue
            m = _USED.search(line)
            if m:
                cur["registers"] = int(m.group(1))
                cur["smem"] = int(m.group(2) or 0)
        return rows

    with ThreadPoolExecutor(max_workers=jobs) as ex:
        rows = [r for part in ex.map(one, units) for r in part]
    names = _demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kernel"] = _short(names[r["mangled"]])
    return rows


def format_report(rows: list[dict]) -> str:
    lines = ["%-6s %-22s %5s %6s %6s %7s %7s  %s" % ("arch", "file", "regs", "smem", "stack",
                                                     "spillS", "spillL", "kernel")]
    for r in sorted(rows, key=lambda r: (r["file"], r["kernel"], r["arch"])):
        lines.append("%-6s %-22s %5d %6d %6d %7d %7d  %s" % (
            r["arch"], r["file"], r["registers"], r["smem"], r["stack"], r["spill_stores"],
            r["spill_loads"], r["kernel"]))
    return "\n".join(lines)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_no_register_spills_and_no_stack():
    rows = ptxas_report(shutil.which("nvcc"))
    print("\n" + format_report(rows))
    assert rows, "ptxas reported no kernel"
    found = {(r["file"], r["arch"]) for r in rows}
    for path in (os.path.join(d, f) for d, _, fs in os.walk(CSRC) for f in fs if f.endswith(".cu")):
        for arch in ARCHS:
            assert (os.path.relpath(path, CSRC), arch) in found, (path, arch)
    bad = [r for r in rows if r["spill_stores"] + r["spill_loads"] > SPILL_BUDGET or
           r["stack"] > STACK_BUDGET.get(r["file"], 0) or
           r["registers"] > register_budget(r["kernel"])]
    assert not bad, ("kernels over the budget (spills %d, stack %s bytes, else 0, registers %s):\n%s"
                     % (SPILL_BUDGET, STACK_BUDGET, REG_BUDGET, format_report(bad)))
    # Both Lanczos instantiations per dtype exist (the budgets above name them).
    kernels = {r["kernel"] for r in rows}
    for s in ("float", "double"):
        for b in ("true", "false"):
            assert any("lanczos_kernel<%s, %s>" % (s, b) in k for k in kernels), (s, b, kernels)


if __name__ == "__main__":
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("nvcc not on PATH")
    print(format_report(ptxas_report(nvcc)))
