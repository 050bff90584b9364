"""Shared test fixtures: every op test runs on CPU always and on CUDA when it is available."""
import pytest
import torch

import mat_cuda

CUDA_AVAILABLE = torch.cuda.is_available() and mat_cuda.build_info()["cuda"]
# CUDA parametrisations always exist and are skipped (with the reason) where there is no GPU or
# no CUDA build, so a CPU run shows what it did not cover; scripts/gpu_check.sh selects them
# with `-k cuda` on a GPU machine.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA_AVAILABLE, reason="no CUDA device, or mat_cuda built without CUDA kernels"))]


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
