"""Checks only a GPU can run (skipped without CUDA; scripts/gpu_check.sh runs them on a GPU
machine): a non-probe MAT step makes no host synchronisation; Lanczos on CUDA in every memory
placement of its plan (forced by MAT_CUDA_LANCZOS_SMEM_LIMIT) against the CPU kernel; the Gram
GEMMs follow torch's float32 matmul precision.

The CPU halves of these properties are tested elsewhere (test_lanczos_plan.py for the plan,
test_optim_ops.py for the group-table check (device-parametrised), test_gram.py for the sync-free embedding form).
"""
import pytest
import torch

import mat_cuda
from mat_cuda import MAT, MATPolicy, ModularPolicy, gram
from mat_cuda._ops import ops
from mat_cuda.models import BertEncoderMLM, mlm_loss

CUDA = torch.cuda.is_available() and mat_cuda.build_info()["cuda"]
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a CUDA build of mat_cuda")


def _mat_on_cuda(V=50, n=4, T=8):
    torch.manual_seed(0)
    model = BertEncoderMLM(V, hidden=32, layers=2, heads=4, ffn=64, max_len=T).cuda()
    kinds = mat_cuda.discover(model, ("head", "ffn")).module_map.kinds
    policy = MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.5),
                       warmup=0, probe_every=3)
    mat = MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-3), policy=policy)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (n, T), generator=g).cuda()
    y = torch.where(torch.rand(n, T, generator=g) < 0.5, x.cpu(), -100).cuda()
    y[:, 0] = x[:, 0]
    return model, mat, x, y


def test_cuda_non_probe_step_makes_no_host_sync():
    model, mat, x, y = _mat_on_cuda()

    def train_step():
        mlm_loss(model(x), y).backward()
        mat.step()
        mat.zero_grad()

    # Step 0 probes (its λ is read on the host for the policy: allowed at a probe); step 1 is
    # the first with frozen modules, and checks the group table once (group_table_check.h).
    assert mat.probes_on_step
    train_step()
    assert not mat.probes_on_step
    train_step()
    assert not mat.probes_on_step and not bool(mat.optimizer.module_mask.all())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step()  # step 2: frozen modules skipped in backward and optimizer, no probe
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    mat.close()


def test_cuda_probe_embedding_gram_is_sync_free():
    # The probe's embedding layers take the sync-free form on CUDA ("auto" would count the
    # batch's distinct ids with unique: a synchronisation per layer per probe).
    n, T, d, V = 4, 16, 8, 100
    idx = torch.randint(0, V, (n, T), device="cuda")
    B = torch.randn(n, T, d, device="cuda")
    K = torch.zeros(1, n, n, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gram.embedding_gram_(K, idx, B, 0, algorithm="sync_free", num_embeddings=V)
        gram.embedding_gram_(K, idx, B, 0, algorithm="sync_free")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    K_cpu = torch.zeros(1, n, n)
    gram.embedding_gram_(K_cpu, idx.cpu(), B.cpu(), 0, algorithm="explicit")
    torch.testing.assert_close(K.cpu(), 2 * K_cpu, rtol=1e-5, atol=1e-5)


# Budgets (bytes of shared memory per block) that push the plan's regions out one after
# another for the sizes below: None = the device's own limit (everything that fits shared).
BUDGETS = [None, 20000, 4000, 1200, 400]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 33, 65, 200])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("with_v0", [False, True])
def test_cuda_lanczos_every_placement_matches_cpu(monkeypatch, dtype, n, budget, with_v0):
    if budget is not None:
        monkeypatch.setenv("MAT_CUDA_LANCZOS_SMEM_LIMIT", str(budget))
    g = torch.Generator().manual_seed(n)
    G = torch.randn(3, n, max(1, n // 2), generator=g, dtype=torch.float64)
    K = (G @ G.transpose(1, 2)).to(dtype)
    v0 = torch.randn(3, n, generator=g, dtype=torch.float64).to(dtype) if with_v0 else None
    iters = min(n, 24)
    # tol=0: both run the whole budget, so the comparison does not hinge on a stopping decision.
    lam_cpu, _, it_cpu, _ = ops.lanczos_lambda_max(K, iters, 0.0, v0, 1, 0)
    lam_gpu, vec_gpu, it_gpu, _ = ops.lanczos_lambda_max(
        K.cuda(), iters, 0.0, None if v0 is None else v0.cuda(), 1, 0)
    # nvcc contracts to FMA and the block sums in another order: rounding-level differences.
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(lam_gpu.cpu(), lam_cpu, rtol=tol, atol=tol * float(K.abs().max()))
    assert bool(torch.isfinite(vec_gpu).all())


def test_cuda_lanczos_budget_below_the_fixed_scratch_names_the_limit(monkeypatch):
    monkeypatch.setenv("MAT_CUDA_LANCZOS_SMEM_LIMIT", "100")
    K = torch.eye(8, device="cuda").expand(2, 8, 8).contiguous()
    with pytest.raises(RuntimeError, match="needs 400 bytes of shared memory per block"):
        ops.lanczos_lambda_max(K, 4, 0.0, None, 1, 0)


def test_cuda_gram_follows_torch_float32_matmul_precision():
    # fp32 factors: the Gram GEMMs are ATen's, so torch's setting decides TF32. Highest
    # precision agrees with a float64 reference to fp32 rounding; TF32 ("high") is measurably
    # rounder (10-bit mantissa inputs) but within the bound documented in docs/gpu.md.
    n, T, din, dout = 16, 32, 256, 256
    A = torch.randn(n, T, din, device="cuda")
    B = torch.randn(n, T, dout, device="cuda")
    gm = torch.zeros(1, dtype=torch.long, device="cuda")
    g = torch.einsum("nto,nti->noi", B.double(), A.double()).reshape(n, -1)
    K64 = (g @ g.T).cpu()
    old = torch.get_float32_matmul_precision()
    errs = {}
    try:
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            K = torch.zeros(1, n, n, device="cuda")
            gram.linear_gram_(K, A, B, gm, algorithm="explicit")
            errs[precision] = float((K[0].double().cpu() - K64).norm() / K64.norm())
    finally:
        torch.set_float32_matmul_precision(old)
    assert errs["highest"] < 1e-5
    if torch.cuda.get_device_capability() >= (8, 0):
        assert errs["high"] > 2 * errs["highest"], errs  # TF32 tensor cores were used
    assert errs["high"] < 5e-3, errs



def test_cuda_step_spanning_launches_matches_cpu():
    # Past one launch's 192 tensors and 1024 blocks (CUDA >= 12.1): a 1100-chunk tensor in row
    # groups (cut between launches) and 230 small tensors in every layout, against the CPU kernel
    # on the same inputs (nvcc contracts to FMA: rounding-level differences).
    from mat_cuda.modules import ModuleMap
    mm = ModuleMap()
    ids = [mm.add_module(f"m{i}") for i in range(4)]
    big = torch.randn(1100 * 64, 1024)
    params = [big] + [torch.randn(3 + i % 4, 8) for i in range(230)]
    mm.assign_row_groups(big, 64 * 25, [ids[j % 4] for j in range(44)])
    for i, p in enumerate(params[1:]):
        if i % 3 == 0:
            mm.assign_col_groups(p, 2, [ids[(i + j) % 4] for j in range(4)])
        elif i % 3 == 1:
            mm.assign_whole(p, ids[i % 4])
    grads = [torch.randn_like(p) for p in params]
    layout, groups_cpu = mm.kernel_tables(params, "cpu")  # the map knows `params` by identity
    mask = torch.tensor([True, False, True, True])
    steps = torch.tensor([0, 3, 1, 2, 4])
    outs = {}
    for dev in ("cpu", "cuda"):
        p = [t.clone().to(dev) for t in params]
        m = [torch.zeros(t.shape, device=dev) for t in params]
        v = [torch.zeros(t.shape, device=dev) for t in params]
        ops.masked_adamw_step_(p, [g.to(dev) for g in grads], m, v, steps.to(dev), mask.to(dev),
                               layout, groups_cpu.to(dev), 1e-2, 0.9, 0.999, 0.01, 1e-8, False, None, None)
        outs[dev] = [t.cpu() for t in p]
    for i, (a, b) in enumerate(zip(outs["cuda"], outs["cpu"])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"tensor {i}")


@pytest.mark.parametrize("T", [1, 15, 16, 37, 225, 300])
def test_cuda_ghost_gram_every_block_path_matches_cpu(T):
    # T < 16: one thread per output; T >= 16: a block per output, whose 8-accumulator loop
    # (gram_tile.h) only starts at T >= 225 (8 steps of its 32-wide column stride).
    A, B = torch.randn(3, T, 6), torch.randn(3, T, 4)
    gm = torch.tensor([0, 1])
    Ks = {}
    for dev in ("cpu", "cuda"):
        K = torch.zeros(2, 3, 3, device=dev)
        gram.linear_gram_(K, A.to(dev), B.to(dev), gm.to(dev), group_size=2, algorithm="ghost")
        Ks[dev] = K.cpu()
    torch.testing.assert_close(Ks["cuda"], Ks["cpu"], rtol=1e-5, atol=1e-4)
