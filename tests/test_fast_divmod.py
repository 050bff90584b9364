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
@pytest.mark.parametrize("portable", [False, True], ids=["int128", "portable"])
def test_fast_divmod_matches_division(tmp_path, portable):
    cxx = shutil.which("c++") or shutil.which("g++")
    exe = str(tmp_path / "fast_divmod_test")
    # portable: the 32-bit-halves mulhi used where the host compiler has no __int128.
    flags = ["-U__SIZEOF_INT128__"] if portable else []
    build = subprocess.run([cxx, "-std=c++17", "-O2", *flags, "-I", os.path.join(ROOT, "csrc"),
                            SOURCE, "-o", exe], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " 0 mismatches" in run.stdout
