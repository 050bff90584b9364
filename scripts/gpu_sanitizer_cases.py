"""Every CUDA kernel of mat_cuda once, on small inputs, for compute-sanitizer.

scripts/gpu_check.sh runs this under `compute-sanitizer --tool memcheck|racecheck|synccheck`
(small sizes: the tools slow kernels down by 10-100x). Each case is also compared with the CPU
kernel, so a run that the sanitizer passes but that computes garbage still fails. Exit code 0 =
every case ran and matched.

Kernels covered: masked_step_kernel (fp32, bf16, fp16; vector and scalar paths; rows, cols and
whole layouts; a step spanning two launches), adam_coeffs_kernel, module_steps_kernel,
lanczos_kernel (float and double; base-shared and global placements, forced with
MAT_CUDA_LANCZOS_SMEM_LIMIT), hadamard_block_sum_per_block / _per_thread and
scatter_tile_kernel (linear_gram_ ghost with T = 300 (the per-block kernel's 8-accumulator
loop), T = 20 and T < 16, explicit, sample_gram_,
embedding_gram_ sync-free).
"""
from __future__ import annotations

import os
import sys

import torch

import mat_cuda
from mat_cuda import gram
from mat_cuda._ops import ops
from mat_cuda.modules import ModuleMap


def check(name, a, b, tol):
    err = float((a.double().cpu() - b.double().cpu()).norm() / max(b.double().norm(), 1e-30))
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)
    return ok


def optim_cases():
    ok = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        shapes = [(8, 12), (5, 6), (3, 7), (70000,)]  # (70000,): two 64K chunks
        params = [torch.randn(s).to(dtype) for s in shapes]
        mm = ModuleMap()
        ids = [mm.add_module(f"m{i}") for i in range(3)]
        mm.assign_row_groups(params[0], 2, [ids[0], ids[1], -1, ids[2]])   # vector path
        mm.assign_col_groups(params[1], 3, [ids[1], ids[2]])               # scalar path (span 3)
        mm.assign_whole(params[2], ids[0])
        layout, groups_cpu = mm.kernel_tables(params, "cpu")  # the map knows `params` by identity
        groups_gpu = groups_cpu.cuda()
        grads = [torch.randn_like(p) for p in params]
        steps = torch.tensor([0, 2, 1, 5])
        mask = torch.tensor([True, False, True])
        outs = {}
        for dev, groups in (("cpu", groups_cpu), ("cuda", groups_gpu)):
            p = [t.clone().to(dev) for t in params]
            m = [torch.zeros(t.shape, device=dev) for t in params]
            v = [torch.zeros(t.shape, device=dev) for t in params]
            ops.masked_adamw_step_(p, [g.to(dev) for g in grads], m, v, steps.to(dev),
                                   mask.to(dev), layout, groups.to(dev), 1e-2, 0.9, 0.999, 0.01,
                                   1e-8, False, None, None)
            b = [torch.zeros(t.shape, device=dev) for t in params]
            ops.masked_sgd_step_(p, [g.to(dev) for g in grads], b, steps.to(dev), mask.to(dev),
                                 layout, groups.to(dev), 1e-2, 0.9, 0.0, 0.0, True, False, None,
                                 None)
            s = steps.clone().to(dev)
            ops.masked_module_steps_(s, mask.to(dev), None)
            outs[dev] = (torch.cat([t.float().flatten() for t in p]), s)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        ok &= check(f"masked adamw+sgd {dtype}", outs["cuda"][0], outs["cpu"][0], tol)
        ok &= check("module steps", outs["cuda"][1].double(), outs["cpu"][1].double(), 0)
    return ok


def lanczos_cases():
    ok = True
    for dtype in (torch.float32, torch.float64):
        for n in (33, 65):
            for limit in ("", "400"):  # device limit (base shared) / only the fixed scratch shared
                os.environ["MAT_CUDA_LANCZOS_SMEM_LIMIT"] = limit
                G = torch.randn(2, n, n // 2, dtype=torch.float64)
                K = (G @ G.transpose(1, 2)).to(dtype)
                lam_c = ops.lanczos_lambda_max(K, 16, 0.0, None, 2, 0)[0]
                lam_g = ops.lanczos_lambda_max(K.cuda(), 16, 0.0, None, 2, 0)[0]
                tol = 1e-4 if dtype == torch.float32 else 1e-10
                ok &= check(f"lanczos {dtype} n={n} smem_limit={limit or 'device'}", lam_g, lam_c, tol)
    os.environ.pop("MAT_CUDA_LANCZOS_SMEM_LIMIT", None)
    return ok


def gram_cases():
    ok = True
    for T, algo in ((300, "ghost"), (20, "ghost"), (4, "ghost"), (6, "explicit")):
        A, B = torch.randn(5, T, 12), torch.randn(5, T, 8)
        gm = torch.tensor([0, 1])
        Ks = {}
        for dev in ("cpu", "cuda"):
            K = torch.zeros(2, 5, 5, device=dev)
            gram.linear_gram_(K, A.to(dev), B.to(dev), gm.to(dev), group_size=4, bias=True,
                              algorithm=algo)
            Ks[dev] = K
        ok &= check(f"linear_gram {algo} T={T}", Ks["cuda"], Ks["cpu"], 1e-5)
    Gs = torch.randn(6, 10)
    Ks = {dev: gram.sample_gram_(torch.zeros(2, 6, 6, device=dev), Gs.to(dev),
                                 torch.tensor([1, 0], device=dev), group_size=5) for dev in ("cpu", "cuda")}
    ok &= check("sample_gram", Ks["cuda"], Ks["cpu"], 1e-5)
    idx, Bq = torch.randint(0, 9, (3, 7)), torch.randn(3, 7, 4)
    Ks = {dev: gram.embedding_gram_(torch.zeros(1, 3, 3, device=dev), idx.to(dev), Bq.to(dev), 0,
                                    algorithm="sync_free", num_embeddings=9) for dev in ("cpu", "cuda")}
    ok &= check("embedding_gram sync_free", Ks["cuda"], Ks["cpu"], 1e-5)
    return ok


def main() -> int:
    assert torch.cuda.is_available() and mat_cuda.build_info()["cuda"], "needs CUDA"
    torch.manual_seed(0)
    ok = optim_cases() & lanczos_cases() & gram_cases()
    torch.cuda.synchronize()
    print("ALL OK" if ok else "MISMATCHES", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
