"""Division by invariant integers (csrc/common/fast_divmod.h), used by the masked optimizer's
element-to-module lookup on CPU and CUDA, checked against the hardware `/` and `%` by a plain
C++ program (tests/cpp/fast_divmod_test.cpp, no torch)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cpp", "fast_divmod_test.cpp")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="needs a C++ compiler")
@pytest.mark.parametrize("variant", ["int128", "portable", "device_branch"])
def test_fast_divmod_matches_division(tmp_path, variant):
    cxx = shutil.which("c++") or shutil.which("g++")
    exe = str(tmp_path / "fast_divmod_test")
    # portable: the 32-bit-halves mulhi used where the host compiler has no __int128.
    # device_branch: the `#if defined(__CUDA_ARCH__)` branch nvcc's device pass takes, with
    # __umul64hi from the CUDA emulation header (tests/emu/cuda_emulation.h: the high 64 bits of
    # the 128-bit product, the definition of the hardware's mul.hi.u64); that nvcc really takes
    # this branch is test_device_code_uses_mul_hi below.
    flags = {"int128": [], "portable": ["-U__SIZEOF_INT128__"],
             "device_branch": ["-D__CUDA_ARCH__=900", "-include",
                               os.path.join(ROOT, "tests", "emu", "cuda_emulation.h"),
                               "-I", os.path.join(ROOT, "tests", "emu"),
                               "-I", os.path.join(ROOT, "tests", "emu", "include")]}[variant]
    build = subprocess.run([cxx, "-std=c++20", "-O2", *flags, "-I", os.path.join(ROOT, "csrc"),
                            SOURCE, "-o", exe], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " 0 mismatches" in run.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_device_code_uses_mul_hi(tmp_path):
    """nvcc's device pass takes fast_divmod.h's __CUDA_ARCH__ branch: the masked optimizer
    kernels' PTX multiplies with mul.hi.u64 (the lookup), and each holds at most two 64-bit
    divides, both once per thread outside the element loops (nvcc 13.0, sm_90: the group count
    of a chunk that spans rows, in thread_sees_active_module, and the scalar loop's trip count
    by blockDim.x that nvcc computes to unroll it, on a 32-bit path when it fits)."""
    ptx = str(tmp_path / "masked_step.ptx")
    r = subprocess.run([shutil.which("nvcc"), "-std=c++17", "-ptx", "-arch=sm_90", "-I",
                        os.path.join(ROOT, "csrc"),
                        os.path.join(ROOT, "csrc", "optim", "masked_step.cu"), "-o", ptx],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = {}
    name = None
    with open(ptx) as f:
        for line in f:
            if ".entry" in line:
                name = line.split(".entry")[1].strip().split("(")[0]
                entries[name] = {"mulhi": 0, "div": 0}
            elif name is not None and "masked_step_kernel" in name:
                entries[name]["mulhi"] += "mul.hi.u64" in line
                entries[name]["div"] += any(op in line for op in ("div.u64", "rem.u64",
                                                                    "div.s64", "rem.s64"))
    kernels = {k: v for k, v in entries.items() if "masked_step_kernel" in k}
    assert len(kernels) == 6, sorted(entries)
    for k, v in kernels.items():
        assert v["mulhi"] > 0 and v["div"] <= 2, (k, v)
