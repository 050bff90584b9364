"""Shared test fixtures: every op test runs on CPU always and on CUDA when it is available."""
import importlib
import sys

import pytest
import torch

import mat_cuda

# The repository's benchmarks/ folder installs as mat_cuda.benchmarks, and tests import it by that
# name. In a source tree built in place and not installed (`python -m pytest` from the repository
# root), mat_cuda/ has no benchmarks subpackage: alias the folder under the installed name (its
# imports are relative, so its modules load as mat_cuda.benchmarks.*).
try:
    importlib.import_module("mat_cuda.benchmarks")
except ModuleNotFoundError as exc:
    if exc.name != "mat_cuda.benchmarks":
        raise
    sys.modules["mat_cuda.benchmarks"] = importlib.import_module("benchmarks")
    mat_cuda.benchmarks = sys.modules["mat_cuda.benchmarks"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and mat_cuda.build_info()["cuda"] else [])


def pytest_generate_tests(metafunc):
    # Any test taking a `device` argument is parametrised over the available devices.
    if "device" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "device" in m.args[0] for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, but reproducible from the test's id when a failure is rerun.
    seed = hash(request.node.nodeid) % (2**31)
    torch.manual_seed(seed)
    yield
