"""The CUDA Lanczos kernel's memory plan (csrc/linalg/lanczos_plan.h) on the host: invariants
of every placement, large n planned with global memory, and the shared driver run on the carved
scratch of each forced placement (tests/cpp/lanczos_plan_test.cpp, plain C++, no torch)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cpp", "lanczos_plan_test.cpp")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="needs a C++ compiler")
def test_lanczos_plan_and_carving(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    exe = str(tmp_path / "lanczos_plan_test")
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-fsanitize=address,undefined",
                            "-fno-sanitize-recover=all", "-I", os.path.join(ROOT, "csrc"), SOURCE,
                            "-o", exe], capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip("the C++ compiler has no AddressSanitizer")
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " 0 failures" in run.stdout
