"""Embedding mNTK Gram: mat_cuda's ghost vs explicit vs auto forms vs plain PyTorch.

An embedding of V rows of d features, used at n·T positions with indices (n, T) drawn uniformly
(the worst case for the explicit form: real text repeats ids more, so U is smaller), and
output gradients B (n, T, d). Every method adds the same (n, n) Gram of the per-sample weight
gradients:

  ghost      mat_cuda.gram.embedding_gram_(algorithm="ghost"): [idx_it == idx_js] ∘ B Gram,
             ~(nT)²·d, sync-free
  explicit   algorithm="explicit": per-sample gradients over the batch's U distinct ids,
             (n, U, d), then one GEMM, ~nT·d + n²·U·d
  auto       algorithm="auto": the cheaper of the two by that cost model
  dense      plain PyTorch: per-sample gradients (n, V, d) by index_put_(accumulate=True), Gram
             by matmul
"""
from __future__ import annotations

import torch

from mat_cuda import gram

from .bench_gram import _interleaved_medians, peak_extra_mb

# V, d, n, T
SHAPES_FULL = [(V, d, 32, T) for V in (8192, 1000) for d in (128, 256) for T in (64, 128)] + [
    (30522, 128, 32, 16)]
SHAPES_QUICK = [(8192, 128, 32, 64), (1000, 128, 32, 128)]


def _dense(K, idx, B, V):
    n, T, d = B.shape
    g = torch.zeros(n, V, d, device=B.device)
    rows = torch.arange(n, device=B.device).unsqueeze(1).expand(n, T)
    g.index_put_((rows, idx), B, accumulate=True)
    flat = g.view(n, V * d)
    K[0] += flat @ flat.T
    return K


def run(devices: list[str], quick: bool) -> dict:
    rows = []
    repeat, warmup = (2, 1) if quick else (5, 1)
    for device in devices:
        for V, d, n, T in (SHAPES_QUICK if quick else SHAPES_FULL):
            torch.manual_seed(0)
            idx = torch.randint(0, V, (n, T), device=device)
            B = torch.randn(n, T, d, device=device)
            K = torch.zeros(1, n, n, device=device)
            methods = {a: (lambda a=a: gram.embedding_gram_(K, idx, B, 0, algorithm=a))
                       for a in ("ghost", "explicit", "auto")}
            methods["dense"] = lambda: _dense(K, idx, B, V)
            check = _dense(torch.zeros_like(K), idx, B, V)
            errs = {}
            for a in ("ghost", "explicit"):
                out = gram.embedding_gram_(torch.zeros_like(K), idx, B, 0, algorithm=a)
                errs[a] = ((out - check).norm() / check.norm()).item()
            peak = {key: peak_extra_mb(fn, device) for key, fn in methods.items()}
            t = _interleaved_medians(methods, device, warmup, repeat)
            rows.append({
                "device": device, "shape": f"V={V}, d={d}, n={n}, T={T}",
                "U": int(torch.unique(idx).numel()),
                "ghost ms": t["ghost"], "explicit ms": t["explicit"], "auto ms": t["auto"],
                "dense ms": t["dense"], "auto vs ghost": t["ghost"] / t["auto"],
                "auto vs dense": t["dense"] / t["auto"],
                "peak extra MB (ghost / explicit / dense)":
                    f"{peak['ghost']:.1f} / {peak['explicit']:.1f} / {peak['dense']:.1f}",
                "rel err (ghost / explicit)": f"{errs['ghost']:.1e} / {errs['explicit']:.1e}",
            })
    return {
        "title": "Embedding mNTK Gram: ghost vs explicit vs auto vs plain PyTorch",
        "columns": ["device", "shape", "U", "ghost ms", "explicit ms", "auto ms", "dense ms",
                    "auto vs ghost", "auto vs dense", "peak extra MB (ghost / explicit / dense)",
                    "rel err (ghost / explicit)"],
        "rows": rows,
        "notes": [
            "U: distinct ids in the batch (uniform random ids); auto vs ghost / dense: speedup "
            "of auto (higher is better)",
            "peak extra MB: tensor memory one call allocates beyond what is live before it "
            "(CUDA: torch.cuda.max_memory_allocated; CPU: profiler allocator events)",
        ],
    }
