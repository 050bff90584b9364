"""mNTK Gram kernels vs PyTorch: the exact per-module Grams of one transformer layer.

A BERT-shaped attention + FFN layer's four linear maps (packed QKV with heads as row groups,
W_O with heads as column groups, FFN fc1 and fc2 as one module), M = heads + 1 modules, biases
included (W_O's bias belongs to no head and is left out everywhere). Given each linear map's
inputs A (n, T, d_in) and output gradients B (n, T, d_out), every method produces the same
(M, n, n) Grams:

  mat_cuda     mat_cuda.gram.linear_gram_ (algorithm "auto": explicit at long T, ghost at short),
               with a reusable 256 MiB workspace kept across calls (gram.gram_workspace)
  torch.func   vmap(grad) per-sample gradients of ⟨linear(a_i), b_i⟩, then per-module Grams
  explicit     plain PyTorch: per-sample gradients by einsum (bmm), Grams by matmul
  layer f+b    for scale: the four linear maps' own forward + backward (dX and dW)

The explicit form's FLOP floor is (T+n)/(3T) of the layer's forward+backward (per-sample
gradients: 2nT·d_in·d_out, the Gram: 2n²·d_in·d_out, the layer: 3·2nT·d_in·d_out);
"vs floor" = mat_cuda time / (that fraction x the layer's measured forward+backward time).
"""
from __future__ import annotations

import statistics

import torch
from torch.func import grad, vmap

from mat_cuda import gram

from .timing import time_fn

# name, n, T, d_model, heads, d_ff
SHAPES_FULL = [
    ("BERT-base", 32, 128, 768, 12, 3072),
    ("BERT-small", 32, 128, 512, 8, 2048),
    ("BERT-small T=16", 32, 16, 512, 8, 2048),
]
SHAPES_QUICK = [
    ("BERT-small", 32, 128, 512, 8, 2048),
    ("BERT-small T=16", 32, 16, 512, 8, 2048),
]


def _layer(n, T, d, H, d_ff, device):
    """The four linear maps: (name, W (d_out, d_in), b, A, B, group_dim, group_size, module ids)."""
    def r(*s):
        return torch.randn(*s, device=device)

    dh = d // H
    heads = list(range(H))
    return [
        ("qkv", r(3 * d, d), r(3 * d), r(n, T, d), r(n, T, 3 * d), 0, dh, heads * 3, True),
        ("out", r(d, d), None, r(n, T, d), r(n, T, d), 1, dh, heads, False),
        ("fc1", r(d_ff, d), r(d_ff), r(n, T, d), r(n, T, d_ff), 0, d_ff, [H], True),
        ("fc2", r(d, d_ff), r(d), r(n, T, d_ff), r(n, T, d), 0, d, [H], True),
    ]


def _mat_cuda(K, layer, device, workspace=None):
    for _, W, b, A, B, gdim, gs, gm, bias in layer:
        gram.linear_gram_(K, A, B, torch.tensor(gm, device=device), group_dim=gdim,
                          group_size=gs, bias=bias, validate=False, workspace=workspace)
    return K


def _grams_from_per_sample(K, gW, gb, gdim, gs, gm):
    """Per-sample gradients gW (n, d_out, d_in), gb (n, d_out) or None -> K[module] += Gram."""
    n, d_out, d_in = gW.shape
    if gdim == 0:
        parts = [gW.reshape(n, d_out // gs, gs * d_in)]
        if gb is not None:
            parts.append(gb.reshape(n, d_out // gs, gs))
        flat = torch.cat(parts, 2).transpose(0, 1)  # (groups, n, p)
    else:
        flat = gW.reshape(n, d_out, d_in // gs, gs).permute(2, 0, 1, 3).reshape(d_in // gs, n, -1)
    grams = flat @ flat.transpose(1, 2)  # (groups, n, n)
    K.index_add_(0, torch.tensor(gm, device=K.device), grams)


def _explicit(K, layer):
    for _, W, b, A, B, gdim, gs, gm, bias in layer:
        gW = torch.einsum("nto,nti->noi", B, A)
        _grams_from_per_sample(K, gW, B.sum(1) if bias else None, gdim, gs, gm)
    return K


def _surrogate(W, b, a, g):
    # Sample i's loss surrogate whose gradient w.r.t. (W, b) is the layer's per-sample gradient.
    y = a @ W.T + (b if b is not None else 0)
    return (y * g).sum()


def _torch_func(K, layer):
    for _, W, b, A, B, gdim, gs, gm, bias in layer:
        if bias:
            gW, gb = vmap(grad(_surrogate, argnums=(0, 1)), in_dims=(None, None, 0, 0))(W, b, A, B)
        else:
            gW = vmap(grad(_surrogate), in_dims=(None, None, 0, 0))(W, None, A, B)
            gb = None
        _grams_from_per_sample(K, gW, gb, gdim, gs, gm)
    return K


def _layer_forward_backward(layer):
    # Own leaf copies, so the other methods' inputs never require grad.
    maps = [(W.clone().requires_grad_(True), None if b is None else b.clone().requires_grad_(True),
             A.clone().requires_grad_(True), B) for _, W, b, A, B, *_ in layer]

    def run():
        for W, b, A, B in maps:
            torch.nn.functional.linear(A, W, b).backward(B)
    return run


def _interleaved_medians(methods: dict, device: str, warmup: int, repeat: int) -> dict:
    """Median ms of each method, timed round-robin (one call of each per round) so that load
    from other processes on a shared machine falls on all methods alike."""
    times = {key: [] for key in methods}
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeat):
        for key, fn in methods.items():
            times[key].append(time_fn(fn, device, warmup=0, repeat=1)["median_ms"])
    return {key: statistics.median(v) for key, v in times.items()}


def _peak_extra_mb(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run(devices: list[str], quick: bool) -> dict:
    rows = []
    repeat, warmup = (2, 1) if quick else (7, 1)
    for device in devices:
        for name, n, T, d, H, d_ff in (SHAPES_QUICK if quick else SHAPES_FULL):
            torch.manual_seed(0)
            layer = _layer(n, T, d, H, d_ff, device)
            M = H + 1
            K = torch.zeros(M, n, n, device=device)
            check = _explicit(torch.zeros_like(K), layer)
            err = ((_mat_cuda(torch.zeros_like(K), layer, device) - check).norm() / check.norm()).item()
            # Peak memory without the reusable workspace: what one call needs from scratch.
            methods = {"mat_cuda": lambda: _mat_cuda(K, layer, device),
                       "torch.func": lambda: _torch_func(K, layer),
                       "explicit": lambda: _explicit(K, layer)}
            peak = {key: _peak_extra_mb(fn, device) for key, fn in methods.items()}
            workspace = gram.gram_workspace(device)  # kept across calls, as a probe does
            methods["mat_cuda"] = lambda: _mat_cuda(K, layer, device, workspace)
            methods["layer"] = _layer_forward_backward(layer)
            t = _interleaved_medians(methods, device, warmup, repeat)
            floor = (T + n) / (3 * T) * t["layer"]
            rows.append({
                "device": device, "shape": f"{name} (n={n}, T={T}, d={d}, H={H}, ffn={d_ff})",
                "mat_cuda ms": t["mat_cuda"], "torch.func ms": t["torch.func"],
                "explicit ms": t["explicit"], "layer f+b ms": t["layer"],
                "vs torch.func": t["torch.func"] / t["mat_cuda"],
                "vs explicit": t["explicit"] / t["mat_cuda"],
                "x layer f+b": t["mat_cuda"] / t["layer"],
                "vs floor": t["mat_cuda"] / floor,
                "peak extra MB (mat_cuda / explicit)":
                    "n/a (CPU)" if peak["mat_cuda"] is None
                    else f"{peak['mat_cuda']:.0f} / {peak['explicit']:.0f}",
                "rel err": err,
            })
    return {
        "title": "mNTK Gram of one transformer layer (heads + FFN modules) vs PyTorch",
        "columns": ["device", "shape", "mat_cuda ms", "torch.func ms", "explicit ms",
                    "layer f+b ms", "vs torch.func", "vs explicit", "x layer f+b", "vs floor",
                    "peak extra MB (mat_cuda / explicit)", "rel err"],
        "rows": rows,
        "notes": [
            "vs torch.func / vs explicit: speedup of mat_cuda (higher is better); x layer f+b: "
            "mat_cuda time as a multiple of the layer's own forward+backward",
            "vs floor: mat_cuda time / ((T+n)/(3T) x layer f+b), the explicit form's FLOP floor "
            "(1.0 = at the floor; < 1 possible with the ghost form at short T)",
            "peak extra memory measured on CUDA only (torch.cuda.max_memory_allocated); on CPU "
            "mat_cuda's temporaries are bounded by workspace_bytes (256 MiB default) plus fp32 "
            "copies of half-precision inputs",
        ],
    }
