"""Shared test fixtures: every op test runs on CPU always and on CUDA when it is available.

Randomness is reproducible. Each test seeds torch from a stable hash of its node id (CRC-32,
the same in every process, unlike ``hash()``, which Python salts per process); a failing test
prints its seed in a "mat_cuda seed" report section, and ``--mat-seed=N`` reruns the selected
tests with seed N. The property tests (tests/test_prop_*.py) use hypothesis profiles chosen by
``MAT_HYPOTHESIS_PROFILE`` (see docs/testing.md): ``ci`` (default, derandomized, a few minutes
for the whole set) or ``long`` (at least 10,000 cases per op).
"""
import importlib
import os
import sys
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

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

CUDA_AVAILABLE = torch.cuda.is_available() and mat_cuda.build_info()["cuda"]
# CUDA parametrisations always exist and are skipped (with the reason) where there is no GPU or
# no CUDA build, so a CPU run shows what it did not cover; scripts/gpu_check.sh selects them
# with `-k cuda` on a GPU machine.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA_AVAILABLE, reason="no CUDA device, or mat_cuda built without CUDA kernels"))]

# ---- hypothesis profiles ----
# deadline=None: per-example time varies with the drawn shapes and with the shared machine's load;
# a timing deadline would make failures depend on load, not on the op.
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
# ci: derandomized (the same examples on every run and machine), max_examples per test set so the
# whole property set stays within ~2-3 minutes on a 2-core CPU.
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
# long: at least 10,000 cases per property test; random (rerun a failure with the seed hypothesis
# prints, or fix one with --hypothesis-seed).
settings.register_profile("long", max_examples=int(os.environ.get("MAT_HYPOTHESIS_MAX_EXAMPLES",
                                                                  "10000")), **_COMMON)
settings.load_profile(os.environ.get("MAT_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--mat-seed", type=int, default=None,
                     help="seed torch with this value in every test instead of the per-test "
                          "hash of its node id (rerun a failure with the seed it printed)")


def stable_seed(nodeid: str) -> int:
    """The per-test seed: CRC-32 of the node id (stable across processes and machines)."""
    return zlib.crc32(nodeid.encode("utf-8")) & 0x7FFFFFFF


def pytest_generate_tests(metafunc):
    # Any test taking a `device` argument is parametrised over the available devices.
    if "device" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "device" in m.args[0] for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible from the test's id when a failure is rerun.
    override = request.config.getoption("--mat-seed")
    seed = stable_seed(request.node.nodeid) if override is None else override
    request.node._mat_seed = seed
    torch.manual_seed(seed)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_mat_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("mat_cuda seed", f"torch seed {seed} (stable hash of the node id); "
                                f"rerun with: python -m pytest '{item.nodeid}' --mat-seed={seed}"))
