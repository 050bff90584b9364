"""torch.library.opcheck for every op of TORCH_LIBRARY(mat_cuda, ...), on every available device.

The op list is read from csrc/ops.cpp (the one place schemas are declared), so an op added there
without sample inputs here fails ``test_every_declared_op_has_samples``. opcheck runs all of its
checks: the schema (mutation annotations match what the kernel writes), the autograd
registration, the fake (meta) kernel against the real one, and AOT dispatch with dynamic shapes.
"""
import re
from pathlib import Path

import pytest
import torch

import mat_cuda  # noqa: F401  (registers the ops and their fake kernels)
from mat_cuda import ModuleMap

ops = torch.ops.mat_cuda
OPS_CPP = Path(__file__).resolve().parent.parent / "csrc" / "ops.cpp"


def _library_block() -> str:
    """The body of ``TORCH_LIBRARY(mat_cuda, m) { ... }`` in csrc/ops.cpp."""
    text = OPS_CPP.read_text()
    start = text.index("TORCH_LIBRARY(mat_cuda")
    return text[start:text.index("\n}", start)]


def declared_ops() -> list[str]:
    """The op names the library block defines with ``m.def("name(...``."""
    return sorted(set(re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)\(', _library_block())))


def _optim_problem(device):
    # Three parameters: row groups, column groups (one unmanaged), a whole tensor; module 2 masked.
    mm = ModuleMap()
    ids = [mm.add_module(f"m{i}") for i in range(3)]
    params = [torch.randn(4, 6, device=device), torch.randn(5, 6, device=device),
              torch.randn(7, device=device)]
    mm.assign_row_groups(params[0], 2, [ids[0], ids[1]])
    mm.assign_col_groups(params[1], 3, [-1, ids[2]])
    mm.assign_whole(params[2], ids[1])
    layout, groups = mm.kernel_tables(params, device)
    grads = [torch.randn_like(p) for p in params]
    steps = torch.tensor([0, 3, 1, 2], dtype=torch.int64, device=device)
    mask = torch.tensor([True, True, False], device=device)
    return params, grads, steps, mask, layout, groups


def _samples(device):
    """op name -> list of argument tuples (each a separate opcheck call)."""
    params, grads, steps, mask, layout, groups = _optim_problem(device)
    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    scale = torch.full((1,), 2.0, device=device)
    no_inf, inf = torch.zeros(1, device=device), torch.ones(1, device=device)
    n = 3
    K = lambda: torch.zeros(2, n, n, device=device)  # noqa: E731
    A, B = torch.randn(n, 4, 5, device=device), torch.randn(n, 4, 6, device=device)
    gm = torch.tensor([0, 1, -1], device=device)
    idx = torch.randint(0, 3, (n, 4), device=device)
    S = torch.randn(3, 8, 8, device=device, dtype=torch.float64)
    Kpsd = S @ S.transpose(1, 2)
    return {
        "masked_module_steps_": [(steps.clone(), mask, None), (steps.clone(), mask, no_inf),
                                 (steps.clone(), mask, inf)],
        "masked_adamw_step_": [
            (params, grads, zeros(), zeros(), steps, mask, layout, groups, 0.1, 0.9, 0.99, 0.01,
             1e-8, False, None, None),
            (params, grads, zeros(), zeros(), steps, mask, layout, groups, 0.1, 0.9, 0.99, 0.0,
             1e-8, True, scale, no_inf),
        ],
        "masked_sgd_step_": [
            (params, grads, zeros(), steps, mask, layout, groups, 0.1, 0.9, 0.1, 0.01, False,
             False, None, None),
            (params, grads, [], steps, mask, layout, groups, 0.1, 0.0, 0.0, 0.0, False, True,
             scale, inf),
        ],
        "lanczos_lambda_max": [(Kpsd, 8, 1e-6, None, 1, 0),
                               (Kpsd.float(), 5, 0.0, torch.randn(3, 8, device=device), 3, 7)],
        "linear_gram_": [
            (K(), A, B, gm, 0, 2, True, True, 0.5, 1, 1 << 20),                        # ghost
            (K(), A, B, gm, 0, 2, True, True, 0.5, 2, 1 << 20,
             torch.empty(1000, device=device)),                                       # explicit
            (K(), A, B, torch.tensor([1, 0, 1, -1, 0], device=device), 1, 1, True, False, 1.0, 0,
             1 << 20),                                                                # column groups
        ],
        "embedding_gram_": [(K(), idx, B, 1, 0, 1.0, a, 1 << 20) for a in (0, 1, 2)]
                           + [(K(), idx, B, 0, None, 2.0, 1, 1 << 20)],
        "sample_gram_": [(K(), torch.randn(n, 6, device=device), gm, 2, 1.0),
                         (K(), torch.randn(n, 5, device=device), torch.tensor([1], device=device),
                          5, 0.25)],
    }


def test_every_declared_op_has_samples():
    names = declared_ops()
    defs = _library_block().count("m.def(")
    assert names and len(names) == defs, (
        f"parsed {names} from {defs} m.def calls in {OPS_CPP}: has the m.def format changed?")
    assert sorted(_samples("cpu")) == names, (
        "an op declared in csrc/ops.cpp has no opcheck samples here (or a sample names an op "
        f"that is gone): declared {names}, sampled {sorted(_samples('cpu'))}")
    for name in names:
        assert hasattr(ops, name), f"mat_cuda::{name} is declared in ops.cpp but not registered"


HAS_CUDA = torch.cuda.is_available() and mat_cuda.build_info()["cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device and a CUDA build of mat_cuda"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", declared_ops())
def test_opcheck(device, name):
    op = getattr(ops, name).default
    for i, args in enumerate(_samples(device)[name]):
        result = torch.library.opcheck(op, args)  # raises on any failed check
        assert set(result.values()) == {"SUCCESS"}, f"sample {i}: {result}"


def test_lanczos_backward_raises_instead_of_a_silent_zero_gradient():
    # torch's autograd-not-implemented fallback would hand K a zero gradient with a warning.
    S = torch.randn(2, 5, 5)
    K = (S @ S.transpose(1, 2)).requires_grad_()
    lam = mat_cuda.lambda_max(K)
    with pytest.raises(RuntimeError, match="lanczos_lambda_max .* is not differentiable"):
        lam.sum().backward()
    assert K.grad is None
