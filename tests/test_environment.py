"""`python -m mat_cuda`: the environment report for bug reports, and the build facts it shows."""
import os
import subprocess
import sys

import torch

import mat_cuda
from mat_cuda.environment import environment, format_report


def test_build_info_records_compiler_and_toolkit():
    info = mat_cuda.build_info()
    assert info["torch_version"] == torch.__version__ == info["torch_runtime_version"]
    assert info["cxx_compiler"].split()[0] in ("gcc", "clang")
    if info["cuda"]:
        assert info["cuda_toolkit"] and info["cuda_home"] and info["cuda_arch_list"]
    else:  # a CPU build names no toolkit
        assert info["cuda_toolkit"] == info["cuda_home"] == info["cuda_arch_list"] == ""


def test_environment_has_what_a_bug_report_needs(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = environment()
    assert env["mat_cuda"]["version"] == mat_cuda.__version__
    assert env["torch"]["version"] == torch.__version__
    assert env["build_info"] == mat_cuda.build_info()
    assert env["devices"]["cuda_available"] == torch.cuda.is_available()
    assert len(env["devices"]["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert env["threads"]["OMP_NUM_THREADS"] == "3"
    assert env["threads"]["torch_num_threads"] == torch.get_num_threads()
    text = format_report(env)
    for needle in (f"version: {mat_cuda.__version__}", f"version: {torch.__version__}",
                   f"cxx_compiler: {env['build_info']['cxx_compiler']}", "OMP_NUM_THREADS: 3",
                   "cuda_toolkit:", "torch_num_threads:"):
        assert needle in text, needle


def test_python_m_mat_cuda_prints_the_report():
    root = os.path.dirname(os.path.dirname(os.path.abspath(mat_cuda.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "mat_cuda"], capture_output=True, text=True,
                         env=env, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("mat_cuda environment report")
    assert f"version: {torch.__version__}" in out.stdout
    assert "build_info:" in out.stdout and "threads:" in out.stdout


def test_import_refuses_another_torch_than_the_build():
    """The extension is bound to the exact torch it was compiled against: importing it under
    another torch version stops with the fix instead of loading it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(mat_cuda.__file__)))
    code = ("import torch; torch.__version__ = '0.0.1+other'\n"
            "try:\n    import mat_cuda\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (f"mat_cuda was compiled against torch {torch.__version__} but torch 0.0.1+other is "
            "installed") in out.stdout
    assert "--no-build-isolation" in out.stdout
