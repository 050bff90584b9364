"""Every CUDA kernel of csrc/ run on the CPU under an emulated grid (tests/emu/), compared with
the CPU kernels.

tests/emu/emu_build.py compiles csrc/*/*.cu unchanged with g++ against the emulation header,
with AddressSanitizer and UndefinedBehaviorSanitizer; the driver runs the real host launchers
(chunk packing, Lanczos' plan, grid checks) and every block's threads as fibers under five
schedules (forward, reverse, three seeded random orders). The kernels are deterministic, so the
schedules must agree bit for bit: a difference is a race or a missing barrier. Each result is
then compared with the CPU op on the same inputs; tolerances are stated per family (nvcc
contracts a*b+c to FMA, the CPU path does not, so a GPU may differ by a few ulp where this
emulation, compiled without FMA, usually matches the CPU exactly).

The harness's own checks (self-test kernels with a missing barrier, a lane missing from a
shuffle, shared-memory overruns, a read of an unreadable page, refused launches) show that each
class of bug makes it fail.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

import mat_cuda  # noqa: F401  (registers torch.ops.mat_cuda)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "emu"))
import case_io  # noqa: E402
import emu_build  # noqa: E402

ops = torch.ops.mat_cuda
pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="needs g++")

# kernel name -> schedules it ran under (filled by every driver run of this module)
_RAN: dict[str, set] = {}
# kernel instantiation ("lanczos_kernel<float, true>") -> schedules it ran under
_RAN_INSTANCES: dict[str, set] = {}


@pytest.fixture(scope="module")
def driver():
    return emu_build.build(jobs=2)


def _run(driver, tmp_path, kind, scalars, arrays, schedules=case_io.SCHEDULES):
    case = str(tmp_path / "case.bin")
    out = str(tmp_path / "out.bin")
    case_io.write_case(case, scalars, arrays)
    r = case_io.run_driver(driver, kind, case, out, schedules)
    assert r.returncode == 0, r.describe()
    assert r.report is not None and not r.report["mismatches"], r.describe()
    for sched, names in r.report["kernels"].items():
        for n in names:
            _RAN.setdefault(n, set()).add(sched)
    for sched, names in r.report["instances"].items():
        for n in names:
            _RAN_INSTANCES.setdefault(n, set()).add(sched)
    return r


# ---------------------------------------------------------------------------------------------
# masked optimizer
# ---------------------------------------------------------------------------------------------
CHUNK = 65536  # masked_step.cu's elements per block


class OptimCase:
    """A list of tensors with layouts over M modules, built like ModuleMap.kernel_tables."""

    def __init__(self, num_modules, gen):
        self.M = num_modules
        self.gen = gen
        self.tensors = []  # (shape, dtype, layout row, misalign)
        self.groups: list[int] = []

    def _module(self):
        return int(torch.randint(0, self.M + 1, (1,), generator=self.gen))

    def whole(self, shape, dtype=torch.float32, module=None, misalign=0):
        m = self._module() if module is None else module
        self.tensors.append((shape, dtype, [0, m, 0, 0], misalign))

    def rows(self, shape, rows_per_group, dtype=torch.float32, modules=None, misalign=0):
        row = 1
        for s in shape[1:]:
            row *= s
        span = rows_per_group * row
        g = shape[0] // rows_per_group
        off = len(self.groups)
        self.groups += modules if modules is not None else [self._module() for _ in range(g)]
        self.tensors.append((shape, dtype, [1, off, span, 0], misalign))

    def cols(self, shape, group_size, dtype=torch.float32, modules=None, misalign=0):
        g = shape[-1] // group_size
        off = len(self.groups)
        self.groups += modules if modules is not None else [self._module() for _ in range(g)]
        self.tensors.append((shape, dtype, [2, off, group_size, shape[-1]], misalign))

    def element_modules(self, i, numel):
        code, off, span, last = self.tensors[i][2]
        gt = torch.tensor(self.groups, dtype=torch.int64)
        e = torch.arange(numel)
        if code == 0:
            return torch.full((numel,), off, dtype=torch.int64)
        if code == 1:
            return gt[off + e // span]
        return gt[off + (e % last) // span]


def _optim_run(driver, tmp_path, case: OptimCase, op, hyper, mask, steps, grad_scale=None,
               found_inf=None, maximize=False, schedules=case_io.SCHEDULES):
    gen = case.gen
    params, grads, s0, s1 = [], [], [], []
    for shape, dtype, _, _ in case.tensors:
        p = torch.randn(shape, generator=gen).to(dtype)
        g = (torch.randn(shape, generator=gen) * (grad_scale or 1.0)).to(dtype)
        params.append(p)
        grads.append(g)
        if op == "adamw":
            s0.append(torch.randn(shape, generator=gen) * 0.1)
            s1.append(torch.rand(shape, generator=gen) * 0.01)
        elif hyper["momentum"] != 0:
            s0.append(torch.randn(shape, generator=gen) * 0.1)
    layout = torch.tensor([t[2] for t in case.tensors], dtype=torch.int64).reshape(-1, 4)
    group_table = torch.tensor(case.groups, dtype=torch.int64)
    gs = torch.tensor([grad_scale], dtype=torch.float32) if grad_scale is not None else None
    fi = torch.tensor([found_inf], dtype=torch.float32) if found_inf is not None else None

    scalars = {"op": op, "n": len(case.tensors), "num_modules": case.M,
               "maximize": int(maximize)}
    scalars.update({k: (float(v) if not isinstance(v, bool) else int(v)) for k, v in hyper.items()})
    arrays = {"layout": layout, "group_table": group_table, "mask": mask, "steps": steps}
    if gs is not None:
        arrays["grad_scale"] = gs
    if fi is not None:
        arrays["found_inf"] = fi
    for i, (shape, dtype, _, mis) in enumerate(case.tensors):
        arrays["p%d" % i] = (params[i], mis)
        arrays["g%d" % i] = (grads[i], mis)
        if s0:
            arrays["s0_%d" % i] = (s0[i], mis)
        if s1:
            arrays["s1_%d" % i] = (s1[i], mis)
    r = _run(driver, tmp_path, "optim", scalars, arrays, schedules)

    # The CPU twin on copies of the same inputs.
    cp = [p.clone() for p in params]
    c0 = [s.clone() for s in s0]
    c1 = [s.clone() for s in s1]
    csteps = steps.clone()
    if op == "adamw":
        ops.masked_adamw_step_(cp, grads, c0, c1, steps, mask, layout, group_table, hyper["lr"],
                               hyper["beta1"], hyper["beta2"], hyper["weight_decay"],
                               hyper["eps"], maximize, gs, fi)
    else:
        ops.masked_sgd_step_(cp, grads, c0, steps, mask, layout, group_table, hyper["lr"],
                             hyper["momentum"], hyper["dampening"], hyper["weight_decay"],
                             bool(hyper["nesterov"]), maximize, gs, fi)
    ops.masked_module_steps_(csteps, mask, fi)

    out = r.outputs
    assert torch.equal(out["steps"], csteps)
    for i, (shape, dtype, _, _) in enumerate(case.tensors):
        numel = params[i].numel()
        em = case.element_modules(i, numel)
        # module slot M (unmanaged elements) is always active
        active = torch.cat([mask.to(torch.bool), torch.ones(1, dtype=torch.bool)])[em]
        if found_inf:
            active = torch.zeros(numel, dtype=torch.bool)
        got = out["p%d" % i]
        inp = params[i].reshape(-1)
        # Inactive elements (and their state) are untouched, bit for bit.
        assert torch.equal(got[~active], inp[~active]), "tensor %d: masked elements changed" % i
        # Active elements match the CPU kernel: fp32 to 8 ulp (FMA contraction on the GPU), a
        # 16-bit parameter to one ulp of its dtype (the fp32 result may round either way). In
        # this emulation (g++, no FMA) they have been bit-identical.
        rtol = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -7,
                torch.float16: 2.0 ** -10}[dtype]
        torch.testing.assert_close(got.float(), cp[i].reshape(-1).float(), rtol=rtol, atol=1e-7,
                                   msg=lambda m: "tensor %d %s: %s" % (i, dtype, m))
        for name, src, ref in (("s0_%d", s0, c0), ("s1_%d", s1, c1)):
            if not src:
                continue
            g2 = out[name % i]
            assert torch.equal(g2[~active], src[i].reshape(-1)[~active])
            torch.testing.assert_close(g2, ref[i].reshape(-1), rtol=2.0 ** -20, atol=1e-9)
    return r


ADAMW = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01, "eps": 1e-8}


def test_adamw_many_layouts_fp32(driver, tmp_path):
    """30 tensors of every layout: whole, row groups (a span that is not a
    multiple of 4 forces the scalar path), column groups whose chunks cross rows, column groups
    inside one long row (the chunk checks only its own groups), misaligned views (scalar path),
    an empty tensor, AMP grad scale."""
    r = _many_layouts(driver, tmp_path)
    assert [l[1][0] for l in r.report["launches"] if l[0] == "masked_step_kernel"] == [44]


def test_adamw_many_layouts_4kb_kernel_parameters(tmp_path):
    """The same case with the driver built as CUDA < 12.1 sees it (CUDART_VERSION 12000: the
    4 KB parameter limit, which the emulation enforces): masked_step.cu's 16-tensor /
    320-block layout, so the 26 non-empty tensors take two launches of at most 16 tensors."""
    drv = emu_build.build(out_dir=os.path.join(emu_build.ROOT, "build", "emu-cudart12000"),
                          jobs=2, cudart_version=12000)
    r = _many_layouts(drv, tmp_path)
    blocks = [l[1][0] for l in r.report["launches"] if l[0] == "masked_step_kernel"]
    assert len(blocks) == 2 and sum(blocks) == 44 and max(blocks) <= 320, blocks
    assert all(l[4] <= 4096 for l in r.report["launches"]), r.report["launches"]


def _many_layouts(driver, tmp_path):
    gen = torch.Generator().manual_seed(11)
    c = OptimCase(12, gen)
    for k in range(12):
        c.whole((7 + 13 * k,), module=k % 13)
    c.whole((0, 5), module=3)
    c.whole((3000,), misalign=1)
    c.whole((1, 70001), misalign=3)
    c.rows((300, 256), 10)
    c.rows((99, 7), 3)                                 # span 21: scalar path
    c.rows((1200, 128), 40, misalign=2)
    c.cols((200, 768), 64)                             # chunks cross rows
    c.cols((5000, 30), 6)                              # span 6: scalar path
    c.cols((2, 70000), 14000, modules=[0, 1, 2, 3, 5])  # chunk 2 lies inside row 1: group 4 only
    c.cols((3, 70000), 14000, modules=[5, 5, 5, 5, 4])
    c.cols((64, 48), 12, misalign=1)
    c.whole((65536 * 2 + 5,))
    c.rows((4, 65536), 1)
    c.cols((10, 4), 4)
    c.whole((1,))
    assert len(c.tensors) > 24  # > the 4 KB layout's 16 tensors
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    steps = torch.randint(0, 5, (c.M + 1,), generator=gen)
    r = _optim_run(driver, tmp_path, c, "adamw", ADAMW, mask, steps, grad_scale=1024.0,
                   found_inf=0.0)
    assert r.report["facts"]["protected_bytes"] > 0
    return r


def test_adamw_bf16_fp16_fp32_mixed_maximize(driver, tmp_path):
    """Three parameter dtypes in one call (one launch per dtype), beta1 = 0.3 (torch's lerp
    from the end point), maximize, no grad scale."""
    gen = torch.Generator().manual_seed(12)
    c = OptimCase(6, gen)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        c.whole((1000,), dtype=dt)
        c.rows((96, 50), 8, dtype=dt)
        c.cols((70, 40), 8, dtype=dt, misalign=1)
        c.cols((3, 65536 + 8), 8, dtype=dt)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    steps = torch.randint(0, 4, (c.M + 1,), generator=gen)
    hyper = dict(ADAMW, beta1=0.3, weight_decay=0.0)
    r = _optim_run(driver, tmp_path, c, "adamw", hyper, mask, steps, maximize=True)
    assert r.report["facts"]["dtype_launchers"] == 3


def test_sgd_many_chunks_bf16(driver, tmp_path):
    """~420 chunks and 28 tensors in one step (one launch with CUDA >= 12.1's 1024 blocks and
    192 tensors; 2+ launches under the 4 KB layout). Momentum, dampening, Nesterov, weight
    decay; 3 schedules (22M elements)."""
    gen = torch.Generator().manual_seed(13)
    c = OptimCase(80, gen)
    # one row group in 5 active (a group spans ~10 chunks, not chunk-aligned)
    c.rows((19260, 1024), 642, dtype=torch.bfloat16, modules=[70 if i % 5 == 0 else 71 for i in range(30)])
    c.rows((2560, 1024), 64, dtype=torch.bfloat16, modules=[72 + (i % 3 == 0) for i in range(40)])
    for k in range(26):
        c.whole((5 + k,), dtype=torch.bfloat16, module=k % 70)
    chunks = sum((torch.Size(t[0]).numel() + CHUNK - 1) // CHUNK for t in c.tensors)
    assert chunks > 320 and len(c.tensors) > 24
    mask = torch.zeros(80, dtype=torch.bool)
    mask[70] = True
    mask[72] = True
    mask[:70:3] = True
    steps = torch.randint(0, 3, (c.M + 1,), generator=gen)
    hyper = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-4, "nesterov": True}
    r = _optim_run(driver, tmp_path, c, "sgd", hyper, mask, steps,
                   schedules=("forward", "reverse", "random1"))
    blocks = [l[1][0] for l in r.report["launches"] if l[0] == "masked_step_kernel"]
    assert sum(blocks) == chunks and max(blocks) <= MAX_BLOCKS, blocks


MAX_BLOCKS, MAX_TENSORS = 1024, 192  # masked_step.cu's per-launch limits with CUDA >= 12.1


def test_sgd_more_than_1024_chunks_and_192_tensors(driver, tmp_path):
    """> 1024 chunks and > 192 tensors in one step: the first launch fills its 1024 blocks
    inside tensor 0 (1025 chunks, one row group per chunk), whose last chunk continues in slot
    0 of the next launch; then 200 one-chunk tensors overflow the 192 tensor slots into a third
    launch. Most chunks belong to inactive modules (their pages unreadable: a block that loads
    one faults); every 97th group and most small tensors are active. No momentum; 3 schedules
    (the largest case: 67M bf16 elements)."""
    gen = torch.Generator().manual_seed(16)
    c = OptimCase(6, gen)
    groups = 1025
    c.rows((groups * 16, 4096), 16, dtype=torch.bfloat16,
           modules=[0 if g % 97 == 0 else 1 for g in range(groups)])
    for k in range(200):
        c.whole((3 + k,), dtype=torch.bfloat16, module=2 + k % 4)
    chunks = sum((torch.Size(t[0]).numel() + CHUNK - 1) // CHUNK for t in c.tensors)
    assert chunks > MAX_BLOCKS and len(c.tensors) > MAX_TENSORS
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    steps = torch.randint(0, 3, (c.M + 1,), generator=gen)
    hyper = {"lr": 0.05, "momentum": 0.0, "dampening": 0.0, "weight_decay": 1e-4, "nesterov": False}
    r = _optim_run(driver, tmp_path, c, "sgd", hyper, mask, steps,
                   schedules=("forward", "reverse", "random1"))
    blocks = [l[1][0] for l in r.report["launches"] if l[0] == "masked_step_kernel"]
    # 1024 blocks of tensor 0; its last chunk + 191 small tensors; the 9 left.
    assert blocks == [MAX_BLOCKS, MAX_TENSORS, chunks - MAX_BLOCKS - MAX_TENSORS], blocks
    assert r.report["facts"]["protected_bytes"] > 0


def test_bad_group_table_value_is_an_out_of_bounds_read(driver, tmp_path):
    """Why group_table is validated on the host before any launch (group_table_check.h): a module
    id past num_modules makes the kernel read module_mask (and the step counts) out of bounds,
    which AddressSanitizer reports here (on a GPU: a silent wrong read). The registration's
    refusal itself (torch code, not compiled here) is the CPU op's: same function on both
    devices; it raises and writes nothing (also tests/test_optim_ops.py on every device)."""
    gen = torch.Generator().manual_seed(17)
    c = OptimCase(3, gen)
    c.rows((8, 16), 2, modules=[0, 1, 2, 3 + 2])  # 5: past the unmanaged slot 3
    mask = torch.ones(3, dtype=torch.bool)
    steps = torch.zeros(4, dtype=torch.int64)
    p = torch.randn(8, 16, generator=gen)
    arrays = {"layout": torch.tensor([c.tensors[0][2]], dtype=torch.int64),
              "group_table": torch.tensor(c.groups, dtype=torch.int64), "mask": mask,
              "steps": steps, "p0": (p, 0), "g0": (torch.randn(8, 16, generator=gen), 0),
              "s0_0": (torch.zeros(8, 16), 0), "s1_0": (torch.zeros(8, 16), 0)}
    case = str(tmp_path / "case.bin")
    case_io.write_case(case, dict({"op": "adamw", "n": 1, "num_modules": 3, "maximize": 0},
                                  **ADAMW), arrays)
    r = case_io.run_driver(driver, "optim", case, str(tmp_path / "o.bin"), ("forward",))
    assert r.returncode != 0 and "AddressSanitizer" in r.stderr, r.describe()
    assert "masked_step_kernel" in r.stderr or "thread_sees_active_module" in r.stderr, r.describe()
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"group_table\[3\] = 5 is out of range \[0, 3\]"):
        ops.masked_adamw_step_([p], [torch.ones_like(p)], [torch.zeros_like(p)],
                               [torch.zeros_like(p)], steps.clone(), mask, arrays["layout"],
                               arrays["group_table"], 1e-3, 0.9, 0.999, 0.0, 1e-8, False, None,
                               None)
    assert torch.equal(p, before)


def test_sgd_fp16_no_momentum_scaled(driver, tmp_path):
    gen = torch.Generator().manual_seed(14)
    c = OptimCase(4, gen)
    c.whole((513,), dtype=torch.float16)
    c.rows((40, 9), 5, dtype=torch.float16, misalign=1)
    c.cols((33, 16), 4, dtype=torch.float16)
    c.whole((300,), dtype=torch.bfloat16)  # every dtype's SGD instantiation, all 5 schedules
    c.rows((16, 12), 4, dtype=torch.float32)
    mask = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    steps = torch.zeros(5, dtype=torch.int64)
    hyper = {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    _optim_run(driver, tmp_path, c, "sgd", hyper, mask, steps, grad_scale=8.0, maximize=True)


def test_found_inf_reads_nothing(driver, tmp_path):
    """found_inf set: every page of every tensor is unreadable, nothing changes, no step counts."""
    gen = torch.Generator().manual_seed(15)
    c = OptimCase(3, gen)
    c.whole((5000,))
    c.rows((64, 128), 8)
    mask = torch.tensor([1, 1, 1], dtype=torch.bool)
    steps = torch.randint(0, 3, (4,), generator=gen)
    r = _optim_run(driver, tmp_path, c, "adamw", ADAMW, mask, steps, found_inf=1.0)
    assert r.report["facts"]["inactive_elements"] == r.report["facts"]["elements"]


# ---------------------------------------------------------------------------------------------
# Gram kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 8, 15, 16, 37, 225, 300])
def test_hadamard_block_sum_matches_cpu_kernel(driver, tmp_path, T):
    """The CPU kernel's output through linear_gram_ (ghost form, one tile, scale 1, one module
    per group, K = 0: K[g] is exactly the Hadamard kernel's tile), and the emulated CUDA kernel
    on the same S S^T and R R^T. Inputs in {-1, 0, 1}: every partial sum is an integer below
    2^24, exact in float32 in any order, so the comparison is exact (T >= 225 reaches
    gram_tile.h's 8-accumulator loop in the per-block kernel; T < 16 is the per-thread one)."""
    gen = torch.Generator().manual_seed(100 + T)
    n, dS, G, gs = 3, 5, 2, 4
    A = torch.randint(-1, 2, (n, T, dS), generator=gen).float()
    B = torch.randint(-1, 2, (n, T, G * gs), generator=gen).float()
    K = torch.zeros(G, n, n)
    ops.linear_gram_(K, A, B, torch.arange(G), 0, gs, True, False, 1.0, 1, 1 << 30, None)
    S = A.reshape(n * T, dS)
    SS = S @ S.t()
    Rg = B.reshape(n * T, G, gs).permute(1, 0, 2).contiguous()
    RR = torch.bmm(Rg, Rg.transpose(1, 2)).contiguous()
    r = _run(driver, tmp_path, "gram",
             {"op": "hadamard", "T": T, "G": G, "rI": n, "rJ": n, "ld": n * T,
              "r_batch": n * T * n * T}, {"S": SS, "R": RR})
    got = r.outputs["out"].view(G, n, n)
    exact = (SS.double().view(n, T, n, T).permute(0, 2, 1, 3).unsqueeze(0) *
             RR.double().view(G, n, T, n, T).permute(0, 1, 3, 2, 4)).sum((-1, -2))
    assert torch.equal(got.double(), exact)
    assert torch.equal(got, K)
    kernel = "hadamard_block_sum_per_block" if T >= 16 else "hadamard_block_sum_per_thread"
    assert {l[0] for l in r.report["launches"]} == {kernel}


@pytest.mark.parametrize("T", [15, 37, 225])
def test_hadamard_block_sum_rectangular_float(driver, tmp_path, T):
    """rI != rJ, G = 3, random floats: within 1e-5 of the float64 sum relative to sum |S∘R|
    (a block's missing row or column would be ~1/T of it)."""
    gen = torch.Generator().manual_seed(200 + T)
    G, rI, rJ = 3, 2, 3
    S = torch.randn(rI * T, rJ * T, generator=gen)
    R = torch.randn(G, rI * T, rJ * T, generator=gen)
    r = _run(driver, tmp_path, "gram",
             {"op": "hadamard", "T": T, "G": G, "rI": rI, "rJ": rJ, "ld": rJ * T,
              "r_batch": rI * T * rJ * T}, {"S": S, "R": R})
    got = r.outputs["out"].view(G, rI, rJ).double()
    prod = (S.double().view(rI, T, rJ, T).permute(0, 2, 1, 3).unsqueeze(0) *
            R.double().view(G, rI, T, rJ, T).permute(0, 1, 3, 2, 4))
    exact = prod.sum((-1, -2))
    scale = prod.abs().sum((-1, -2))
    assert ((got - exact).abs() <= 1e-5 * scale).all(), (got - exact).abs().max()


@pytest.mark.parametrize("T, G, rI, rJ", [(16, 1 << 16, 1 << 8, 1 << 8), (8, 1 << 20, 1 << 12, 1 << 12)])
def test_hadamard_grid_limit_refused(driver, tmp_path, T, G, rI, rJ):
    """More outputs than a grid holds (gridDim.x <= 2^31 - 1): the launcher returns
    cudaErrorInvalidConfiguration before launching (no memory is touched: the arrays are tiny)."""
    case = str(tmp_path / "case.bin")
    case_io.write_case(case, {"op": "hadamard", "T": T, "G": G, "rI": rI, "rJ": rJ, "ld": 1,
                              "r_batch": 1}, {"S": torch.zeros(1), "R": torch.zeros(1)})
    r = case_io.run_driver(driver, "gram", case, str(tmp_path / "o.bin"))
    assert r.returncode == 4 and "cudaErrorInvalidConfiguration" in r.stderr, r.describe()


def test_scatter_tile_matches_cpu_kernel(driver, tmp_path):
    """sample_gram_'s CPU kernel (K[m] += scale · tile[g], groups -1 and repeated modules) and
    the emulated scatter on the same tile: bit for bit (same float operations per element)."""
    gen = torch.Generator().manual_seed(300)
    n, p, gs = 37, 60, 6
    Gm = torch.randn(n, p, generator=gen)
    gm = torch.tensor([0, 2, -1, 1, 2, 0, 3, -1, 1, 2], dtype=torch.int64)
    K0 = torch.randn(4, n, n, generator=gen)
    K = K0.clone()
    ops.sample_gram_(K, Gm, gm, gs, 0.37)
    gg = Gm.view(n, p // gs, gs).transpose(0, 1)
    tile = torch.bmm(gg, gg.transpose(1, 2)).contiguous()
    r = _run(driver, tmp_path, "gram",
             {"op": "scatter", "M": 4, "n": n, "G": gm.numel(), "rI": n, "rJ": n, "i0": 0,
              "j0": 0, "mirror": 0, "scale": 0.37},
             {"K": K0, "tile": tile, "group_module": gm})
    assert torch.equal(r.outputs["K"].view(4, n, n), K)


def test_scatter_tile_offset_mirrored(driver, tmp_path):
    """An off-diagonal tile at (i0, j0), mirrored: against the same float32 operations in torch
    (v = scale · tile, then K[row, col] += v and K[col, row] += v, groups in order)."""
    gen = torch.Generator().manual_seed(301)
    M, n, rI, rJ, i0, j0 = 3, 50, 7, 11, 5, 30
    gm = torch.tensor([1, -1, 0, 1, 2], dtype=torch.int64)
    tile = torch.randn(gm.numel(), rI, rJ, generator=gen)
    K0 = torch.randn(M, n, n, generator=gen)
    ref = K0.clone()
    scale = torch.tensor(0.5, dtype=torch.float32)
    for g, m in enumerate(gm.tolist()):
        if m < 0:
            continue
        v = scale * tile[g]
        ref[m, i0:i0 + rI, j0:j0 + rJ] += v
        ref[m, j0:j0 + rJ, i0:i0 + rI] += v.t()
    r = _run(driver, tmp_path, "gram",
             {"op": "scatter", "M": M, "n": n, "G": gm.numel(), "rI": rI, "rJ": rJ, "i0": i0,
              "j0": j0, "mirror": 1, "scale": 0.5},
             {"K": K0, "tile": tile, "group_module": gm})
    assert torch.equal(r.outputs["K"].view(M, n, n), ref)


# ---------------------------------------------------------------------------------------------
# Lanczos
# ---------------------------------------------------------------------------------------------
def _spd(n, M, dtype, gen, rank=None):
    """M symmetric matrices with eigenvalues 0.8^i (a clear gap) or rank `rank`."""
    out = []
    for _ in range(M):
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        lam = 0.8 ** torch.arange(n, dtype=torch.float64)
        if rank is not None:
            lam[rank:] = 0
        out.append((Q * lam) @ Q.t())
    K = torch.stack(out)
    return ((K + K.transpose(1, 2)) / 2).to(dtype)


LANCZOS_N = [1, 33, 64, 65, 200, 300]

# placement -> (small, w, Q shared; K copied to shared; base_shared, i.e. lanczos_kernel<S, true>)
LANCZOS_PLACEMENTS = {
    "qk": (1, 1, 1, 1, 1),      # everything in shared memory
    "q": (1, 1, 1, 0, 1),       # K read from the input
    "base": (1, 1, 0, 0, 1),    # Q in the global workspace
    "small": (1, 0, 0, 0, 0),   # w and Q in the workspace: lanczos_kernel<S, false>
    "w": (0, 1, 0, 0, 0),       # the O(m) scratch in the workspace, w shared
    "global": (0, 0, 0, 0, 0),  # only the fixed 400 bytes shared (what large n gets)
}


def _lanczos_cases():
    # The full product of the three shared-base placements for n <= 65; the three
    # global-fallback placements (lanczos_kernel<S, false>) for n in {1, 33, 64, 65} without v0
    # and "global" with v0; for n in {200, 300} (the slow ones: every warp shuffle of the
    # warp-per-row matvec is 32 fiber switches) each placement without v0 and one with v0, under
    # 3 schedules (forward, reverse, random1).
    for n in LANCZOS_N:
        for dtype in (torch.float32, torch.float64):
            for placement in LANCZOS_PLACEMENTS:
                for with_v0 in (False, True):
                    fallback = placement in ("small", "w", "global")
                    if n >= 200 and with_v0 and placement != "q":
                        continue
                    if n >= 200 and fallback and placement != "global":
                        continue
                    if n < 200 and fallback and with_v0 and placement != "global":
                        continue
                    yield pytest.param(n, dtype, with_v0, placement,
                                       id="n%d-%s-%s-%s" % (n, "f32" if dtype == torch.float32
                                                            else "f64",
                                                            "v0" if with_v0 else "no_v0", placement))


@pytest.mark.parametrize("n, dtype, with_v0, placement", list(_lanczos_cases()))
def test_lanczos_matches_cpu(driver, tmp_path, n, dtype, with_v0, placement):
    """Each placement of lanczos_plan.h forced through the shared-memory budget, as
    MAT_CUDA_LANCZOS_SMEM_LIMIT caps it (tests/emu/drive_lanczos.cpp: the budget is the exact
    end of the last region to be shared), with a global workspace for the rest; the driver
    checks the plan it got. Against the CPU kernel: the top Ritz values to 1e-4 (f32) / 1e-9
    (f64) of λ_max, the Ritz vector to |cos| >= 1 - 1e-3 / 1 - 1e-9, the residual to
    1e-3 / 1e-8 of λ_max, steps within 2."""
    gen = torch.Generator().manual_seed(n * 7 + (dtype == torch.float64) + 2 * with_v0)
    M = 2 if n <= 65 else 1
    rank = 5 if n in (33, 65) else None
    K = _spd(n, M, dtype, gen, rank)
    v0 = torch.randn(M, n, generator=gen, dtype=dtype) if with_v0 else None
    iters = min(n, 60 if n < 200 else 40)
    topk = min(3, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    seed = 5
    arrays = {"K": K}
    if v0 is not None:
        arrays["v0"] = v0
    r = _run(driver, tmp_path, "lanczos",
             {"dtype": "f32" if dtype == torch.float32 else "f64", "M": M, "n": n,
              "iters": iters, "tol": tol, "topk": topk, "seed": seed, "placement": placement},
             arrays, case_io.SCHEDULES if n < 200 else case_io.SCHEDULES[:3])
    facts = r.report["facts"]
    assert (facts["small_shared"], facts["w_shared"], facts["q_shared"], facts["k_copy"],
            facts["base_shared"]) == LANCZOS_PLACEMENTS[placement]
    assert (facts["global_bytes"] > 0) == (LANCZOS_PLACEMENTS[placement][2] == 0)
    s_name = "float" if dtype == torch.float32 else "double"
    base = "true" if LANCZOS_PLACEMENTS[placement][4] else "false"
    assert set(r.report["instances"]["forward"]) == {"lanczos_kernel<%s, %s>" % (s_name, base)}
    lam, vec, its, res = ops.lanczos_lambda_max(K, iters, tol, v0, topk, seed)
    out = r.outputs
    f32 = dtype == torch.float32
    scale = lam[:, :1].abs().clamp_min(1e-30)
    glam = out["lambdas"].view(M, topk)
    assert ((glam - lam).abs() <= (1e-4 if f32 else 1e-9) * scale).all(), (glam, lam)
    gvec = out["vectors"].view(M, n)
    cos = (gvec.double() * vec.double()).sum(1).abs()
    assert (cos >= 1 - (1e-3 if f32 else 1e-9)).all(), cos
    assert ((out["iterations"] - its).abs() <= 2).all(), (out["iterations"], its)
    assert (out["residuals"].view(M).abs() <= (1e-3 if f32 else 1e-8) * scale[:, 0]).all()


# ---------------------------------------------------------------------------------------------
# the harness itself
# ---------------------------------------------------------------------------------------------
def test_half_and_bfloat16_conversions_round_like_hardware(driver, tmp_path):
    """__float2half / __float2bfloat16 round to nearest even (cvt.rn), as torch's conversions
    do: bit-exact on random values at every scale, exact ties, subnormals, overflow and specials."""
    gen = torch.Generator().manual_seed(400)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (200000,), generator=gen, dtype=torch.int64)
    x = [bits.to(torch.int32).view(torch.float32)]
    h = torch.randint(0, 0x7bff, (20000,), generator=gen, dtype=torch.int32).to(torch.int16)
    hf = h.view(torch.float16).double()
    hn = (h + 1).view(torch.float16).double()
    x.append(((hf + hn) / 2).float())  # exact f16 ties
    b = torch.randint(0, 0x7f7f, (20000,), generator=gen, dtype=torch.int32).to(torch.int16)
    bf = b.view(torch.bfloat16).double()
    bn = (b + 1).view(torch.bfloat16).double()
    x.append(((bf + bn) / 2).float())  # exact bf16 ties
    x.append(torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.98e-8, 5.96e-8, 6.1e-5,
                           3e38, float("inf"), float("-inf"), float("nan"), 1.0 + 2 ** -11,
                           1.0 + 3 * 2 ** -11, 2 ** -24 * 1.5, 2 ** -25, 2 ** -25 * 1.0001]))
    x = torch.cat(x)
    x = torch.cat([x, -x])
    case = str(tmp_path / "c.bin")
    out = str(tmp_path / "o.bin")
    case_io.write_case(case, {}, {"x": x})
    r = case_io.run_driver(driver, "convert", case, out)
    assert r.returncode == 0, r.describe()
    o = r.outputs
    nan = torch.isnan(x)
    assert torch.equal(o["f16"][~nan].view(torch.int16), x[~nan].half().view(torch.int16))
    assert torch.equal(o["bf16"][~nan].view(torch.int16), x[~nan].bfloat16().view(torch.int16))
    assert torch.isnan(o["f16"][nan].float()).all() and torch.isnan(o["bf16"][nan].float()).all()
    assert torch.equal(o["f16_back"][~nan], x[~nan].half().float())
    assert torch.equal(o["bf16_back"][~nan], x[~nan].bfloat16().float())


SELFTESTS = {
    # name: (expected exit code, text that must appear in the output)
    "with_barrier": (0, r'"mismatches":\[\]'),
    "missing_barrier": (1, "disagree on out"),
    "uninitialised_shared": (1, "disagree on out"),
    "shuffle_lane_missing": (3, "never arrives|exited, but lane"),
    "divergent_barrier": (3, "barrier in divergent code"),
    "dynamic_shared_overrun": (None, "AddressSanitizer: heap-buffer-overflow"),
    "static_shared_overrun": (None, "out of bounds|heap-buffer-overflow"),
    "protected_read": (3, "SIGSEGV at .* in protected_read .*a page the driver made unreadable"),
    "oversized_block": (0, "cudaErrorInvalidConfiguration"),
    "oversized_shared": (0, "cudaErrorInvalidValue"),
    "oversized_parameter": (3, "bytes of parameters, more than CUDA's 32764"),
}


@pytest.mark.parametrize("name", sorted(SELFTESTS))
def test_harness_catches_bug_class(driver, tmp_path, name):
    import re
    code, pattern = SELFTESTS[name]
    r = case_io.run_driver(driver, "selftest:" + name, "-", str(tmp_path / "o.bin"))
    text = r.stdout + r.stderr
    if code is None:
        assert r.returncode != 0, r.describe()
    else:
        assert r.returncode == code, r.describe()
    assert re.search(pattern, text), r.describe()


def test_every_global_kernel_ran_under_every_schedule(driver, tmp_path):
    """Every __global__ function of csrc/*/*.cu ran under all five schedules in this module
    (the cases above; when run alone, a small case of each family fills the record)."""
    declared = {k for names in emu_build.global_kernels().values() for k in names}
    assert declared, "no __global__ function found in csrc/"
    missing = lambda: {k for k in declared if _RAN.get(k, set()) != set(case_io.SCHEDULES)}  # noqa: E731
    if missing():
        test_hadamard_block_sum_matches_cpu_kernel(driver, tmp_path, 8)
        test_hadamard_block_sum_matches_cpu_kernel(driver, tmp_path, 16)
        test_scatter_tile_matches_cpu_kernel(driver, tmp_path)
        test_sgd_fp16_no_momentum_scaled(driver, tmp_path)
        test_found_inf_reads_nothing(driver, tmp_path)
        test_lanczos_matches_cpu(driver, tmp_path, 33, torch.float32, True, "q")
    assert not missing(), "kernels not run under every schedule: %s" % sorted(missing())
    # Every instantiation: both Lanczos kernels (shared base / global fallback) per dtype, the
    # optimizer kernel per parameter dtype and update (AdamW and SGD).
    lanczos = {"lanczos_kernel<%s, %s>" % (s, b) for s in ("float", "double")
               for b in ("true", "false")}
    fallbacks = {"float": torch.float32, "double": torch.float64}
    for name in sorted(lanczos):
        if _RAN_INSTANCES.get(name, set()) != set(case_io.SCHEDULES):
            s_name, b = name[len("lanczos_kernel<"):-1].split(", ")
            test_lanczos_matches_cpu(driver, tmp_path, 33, fallbacks[s_name], True,
                                     "q" if b == "true" else "global")
    step = {i for i in _RAN_INSTANCES if i.startswith("masked_step_kernel<")}
    if len(step) < 6:
        test_adamw_bf16_fp16_fp32_mixed_maximize(driver, tmp_path)
        test_sgd_fp16_no_momentum_scaled(driver, tmp_path)
        test_sgd_many_chunks_bf16(driver, tmp_path)
    step = {i for i in _RAN_INSTANCES if i.startswith("masked_step_kernel<")}
    for dt in ("float", "__half", "__nv_bfloat16"):
        for op in ("AdamwOp", "SgdOp"):
            assert any(dt + "," in i and op in i for i in step), (dt, op, sorted(step))
    incomplete = {i: sorted(s) for i, s in _RAN_INSTANCES.items() if s != set(case_io.SCHEDULES)}
    assert lanczos <= set(_RAN_INSTANCES) and not incomplete, incomplete


def test_rewrite_is_mechanical_and_complete():
    """The build rewrites every launch and __shared__ of csrc/ and leaves comments alone."""
    src = ("// a <<<comment>>> and __shared__ in words\n"
           "extern __shared__ __align__(16) unsigned char smem[];\n"
           "__shared__ float sums[kRows][2];\n"
           "ns::k<T, U><<<g, dim3(1, 2), 0, s>>>(a, b);\n")
    out, nl, ns = emu_build.rewrite_source(src)
    assert (nl, ns) == (1, 2)
    assert "// a <<<comment>>> and __shared__ in words" in out
    assert "unsigned char* smem = ::emu::dynamic_shared<unsigned char>();" in out
    assert "auto& sums = ::emu::static_shared<float[kRows][2]>(__FILE__, __LINE__);" in out
    assert '::emu::launcher<&ns::k<T, U>>("k", ns::k<T, U>, g, dim3(1, 2), 0, s)(a, b);' in out
    with pytest.raises(emu_build.RewriteError):
        emu_build.rewrite_source("__shared__ float a, b;\n")
    launches = 0
    for path in emu_build.cu_files():
        with open(path) as f:
            launches += emu_build.rewrite_source(f.read())[1]
    assert launches >= len({k for v in emu_build.global_kernels().values() for k in v})
