"""MNTKProbe mode "loss" on a whole model against the torch.func route.

Model: a BERT-style encoder (token + position embeddings, pre-LN blocks of multi-head attention
with packed QKV built from nn.Linear, GELU FFN, LM head) with the MAT module map: one module per
head (its Q/K/V rows, biases and W_O columns), one per FFN block, one per LayerNorm, the
embedding and the head. Batch loss: token-mean masked-LM cross-entropy.

A second model, an MLP (no sequence axis: T = 1), shows the other end of the cost model.

Routes, each producing K (M, n, n) of sample i's own loss-term gradients:
- probe: begin(), the training step's forward and backward, gram() (the step included);
- torch.func: vmap(grad) per-sample gradients of every parameter, then each module's Gram
  (fp32 batched matmuls on the device);
- step: the plain forward + backward, to show the probe's overhead over the step it rides on.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timing import time_fn

COLUMNS = ["device", "model", "n", "T", "modules", "step_ms", "probe_ms", "probe_extra_ms",
           "torch_func_ms", "speedup_extra", "speedup_total"]


class _Block(nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):                                   # (n, T, d)
        n, T, d = x.shape
        q, k, v = (t.reshape(n, T, self.h, self.dh).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(d, dim=-1))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, dim=-1) @ v
        x = x + self.out(a.transpose(1, 2).reshape(n, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class _Encoder(nn.Module):
    def __init__(self, vocab, d, heads, ffn, layers, max_len):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d, padding_idx=0), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(_Block(d, heads, ffn) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tok(ids) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def _module_map(model: _Encoder):
    from mat_cuda.modules import ModuleMap

    mm = ModuleMap()
    mm.assign_whole(model.tok.weight, mm.add_module("tok", "embedding"))
    for li, b in enumerate(model.blocks):
        heads = [mm.add_module(f"l{li}.head{h}", "head") for h in range(b.h)]
        mm.assign_row_groups(b.qkv.weight, b.dh, heads * 3)
        mm.assign_row_groups(b.qkv.bias, b.dh, heads * 3)
        mm.assign_col_groups(b.out.weight, b.dh, heads)
        ffn = mm.add_module(f"l{li}.ffn", "ffn")
        for p in (b.fc1.weight, b.fc1.bias, b.fc2.weight, b.fc2.bias, b.out.bias):
            mm.assign_whole(p, ffn)
        for ln in (b.ln1, b.ln2):
            norm = mm.add_module(f"l{li}.ln", "norm")
            mm.assign_whole(ln.weight, norm)
            mm.assign_whole(ln.bias, norm)
    norm = mm.add_module("ln", "norm")
    mm.assign_whole(model.ln.weight, norm)
    mm.assign_whole(model.ln.bias, norm)
    head = mm.add_module("head", "head_out")
    mm.assign_whole(model.head.weight, head)
    mm.assign_whole(model.head.bias, head)
    return mm


def _grams_fp32(model, mm, grads: dict, n: int, device) -> torch.Tensor:
    """Each module's Gram from explicit per-sample gradients {name: (n, *shape)}, fp32."""
    K = torch.zeros(mm.num_modules, n, n, device=device)
    for name, p in model.named_parameters():
        lay = mm.layout(p)
        if lay is None:
            continue
        g = grads[name]
        if lay.kind == "whole":
            G = g.reshape(n, -1)
            K[lay.module] += G @ G.T
            continue
        ng = len(lay.group_module)
        G = (g.reshape(n, ng, -1) if lay.kind == "rows"
             else g.reshape(n, -1, ng, lay.group_size).transpose(1, 2).reshape(n, ng, -1))
        grams = torch.einsum("igp,jgp->gij", G, G)          # (groups, n, n)
        idx = torch.tensor(lay.group_module, device=device)
        keep = idx >= 0
        K.index_add_(0, idx[keep], grams[keep])
    return K


class _MLP(nn.Module):
    def __init__(self, d_in, d, layers, classes):
        super().__init__()
        dims = [d_in] + [d] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for lin in self.layers:
            x = F.gelu(lin(x))
        return self.head(x)


def _encoder_case(device, n, T, d, heads, layers, vocab):
    """(label, model, module map, step loss fn, per-sample loss fn, per-sample args)."""
    model = _Encoder(vocab, d, heads, 4 * d, layers, T).to(device)
    ids = torch.randint(1, vocab, (n, T), device=device)
    target = torch.randint(1, vocab, (n, T), device=device)
    mask = torch.rand(n, T, device=device) < 0.15
    mask[:, 0] = True
    N = mask.sum()

    def loss():
        return F.cross_entropy(model(ids)[mask], target[mask])

    def sample_loss(logits, t_i, m_i):                       # ℓ_i = (n / N) Σ_t m·l_it
        return (n / N) * (F.cross_entropy(logits, t_i, reduction="none") * m_i).sum()

    return (f"encoder L{layers} d{d} H{heads}", model, _module_map(model), loss, sample_loss,
            (ids, target, mask.float()))


def _mlp_case(device, n, d, layers, classes=10):
    from mat_cuda.modules import ModuleMap

    model = _MLP(d, d, layers, classes).to(device)
    mm = ModuleMap()
    for i, lin in enumerate(list(model.layers) + [model.head]):
        m = mm.add_module(f"layer{i}", "layer")
        mm.assign_whole(lin.weight, m)
        mm.assign_whole(lin.bias, m)
    x = torch.randn(n, d, device=device)
    y = torch.randint(0, classes, (n,), device=device)

    def loss():
        return F.cross_entropy(model(x), y)

    def sample_loss(logits, y_i):
        return F.cross_entropy(logits.unsqueeze(0), y_i.unsqueeze(0))

    return f"MLP L{layers} d{d}", model, mm, loss, sample_loss, (x, y)


def _time_routes(device, case, n, T, repeat):
    from torch.func import functional_call, grad, vmap

    from mat_cuda import MNTKProbe

    label, model, mm, loss, sample_loss, batch = case

    def step():
        loss().backward()

    probe = MNTKProbe(model, mm)

    def probed_step():
        probe.begin()
        step()
        return probe.gram()

    params = {k: p.detach() for k, p in model.named_parameters()}

    def one_sample(p, x_i, *rest):
        return sample_loss(functional_call(model, p, (x_i.unsqueeze(0),))[0], *rest)

    per_sample = vmap(grad(one_sample), in_dims=(None,) + (0,) * len(batch))

    def torch_func_route():
        return _grams_fp32(model, mm, per_sample(params, *batch), n, device)

    # the two routes agree before anything is timed
    K_probe, K_func = probed_step(), torch_func_route()
    err = ((K_probe - K_func).norm() / K_func.norm()).item()
    if not err < 1e-3:
        raise RuntimeError(f"bench_probe: probe and torch.func disagree (relative error {err:.2e})")
    t_step = time_fn(step, device, warmup=2, repeat=repeat)["median_ms"]
    t_probe = time_fn(probed_step, device, warmup=2, repeat=repeat)["median_ms"]
    t_func = time_fn(torch_func_route, device, warmup=1, repeat=max(3, repeat // 2))["median_ms"]
    probe.close()
    return {"device": device, "model": label, "n": n, "T": T,
            "modules": mm.num_modules, "step_ms": t_step, "probe_ms": t_probe,
            "probe_extra_ms": t_probe - t_step, "torch_func_ms": t_func,
            "speedup_extra": t_func / max(t_probe - t_step, 1e-3),
            "speedup_total": t_func / t_probe, "rel_err": err}


def run_probe_benchmark(devices: list[str], quick: bool) -> dict:
    """Time the probe's mode "loss" against the torch.func route (see the module docstring)."""
    rows = []
    for dev in devices:
        vocab = 500 if dev == "cuda" else 200
        if quick:
            encoders, mlps = [(16, 32, 64, 4, 2)], [(32, 256, 3)]
        elif dev == "cuda":
            encoders = [(32, 128, 256, 4, 4), (64, 128, 256, 8, 4), (16, 32, 512, 8, 4)]
            mlps = [(64, 1024, 4)]
        else:
            encoders = [(16, 32, 64, 4, 2), (32, 64, 128, 4, 4), (8, 16, 256, 4, 2)]
            mlps = [(64, 512, 4)]
        torch.manual_seed(0)
        for n, T, d, heads, layers in encoders:
            rows.append(_time_routes(dev, _encoder_case(dev, n, T, d, heads, layers, vocab), n, T,
                                     repeat=5 if quick else 10))
        for n, d, layers in mlps:
            rows.append(_time_routes(dev, _mlp_case(dev, n, d, layers), n, 1,
                                     repeat=5 if quick else 10))
    return {
        "title": "mNTK probe, mode loss, whole model vs torch.func",
        "columns": COLUMNS,
        "rows": rows,
        "notes": [
            "probe_ms: begin + training forward/backward + gram; probe_extra_ms = probe_ms - "
            "step_ms, what mode loss adds to a training step that runs anyway",
            "torch_func_ms: vmap(grad) per-sample gradients + fp32 module Grams (a pass of its "
            "own); speedup_extra = torch_func_ms / probe_extra_ms (target >= 3), speedup_total "
            "= torch_func_ms / probe_ms (the step counted against the probe)",
            "loss: token-mean masked-LM cross-entropy; routes checked to agree before timing",
        ],
    }


run = run_probe_benchmark
