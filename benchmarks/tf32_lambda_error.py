"""How much TF32 Gram GEMMs move λ_max: an emulation on the CPU.

On an Ampere-or-newer GPU, when the user allows it (``torch.backends.cuda.matmul.allow_tf32 =
True`` or ``torch.set_float32_matmul_precision("high")``), cuBLAS rounds the float32 inputs of
the Gram GEMMs to TF32 (10 explicit mantissa bits instead of 23) and accumulates in float32.
This script emulates that on the CPU for the Grams MAT actually computes: the layer factors of
a BERT-style encoder (mat_cuda.models.BertEncoderMLM, hidden 128, 4 layers, 4 heads, FFN 512)
after a few AdamW steps, a probe batch of n samples of T tokens, per-head Grams (Q/K/V row
groups and W_O column groups, the modules MAT measures) and per-FFN Grams. Each GEMM of the
explicit form (per-sample gradients g_i = B_iᵀ A_i, then G Gᵀ) runs in float64 on inputs
rounded to TF32 (round-to-nearest, as cvt.rna.tf32.f32, and truncation as a worst case), and
λ_max of every module's Gram is compared with the float64 λ of the unrounded factors.

    python -m benchmarks.tf32_lambda_error [--seeds 0,1,2] [--n 16] [--T 64]

Prints one row per seed (median and max relative λ error over the modules, for float32 inputs
rounded once, as a plain float32 GEMM sees them, and for TF32) and the pooled figures.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from mat_cuda.models import BertEncoderMLM, mlm_loss


def round_tf32(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x (float32) with its mantissa cut to TF32's 10 bits: "rn" nearest, "rz" truncation."""
    bits = x.float().contiguous().view(torch.int32)
    if mode == "rn":
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


def collect_factors(model, x, y):
    """Inputs and output gradients of every nn.Linear of the encoder layers: {name: (A, B)}."""
    store, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".attn." in name or ".ffn." in name):

            def fwd(m, args, out, name=name):
                store[name] = [args[0].detach(), None]
                out.register_hook(lambda g: store[name].__setitem__(1, g.detach()))
            handles.append(mod.register_forward_hook(fwd))
    mlm_loss(model(x), y, reduction="sum").backward()
    for h in handles:
        h.remove()
    return store


def per_sample_grads(A, B, prep):
    """g_i = B_iᵀ A_i (n, d_out, d_in) in float64 from `prep`-rounded float32 factors."""
    return torch.einsum("nto,nti->noi", prep(B).double(), prep(A).double())


def module_grams(factors, heads, prep):
    """{module: K (n, n)} per head (Q/K/V rows and W_O columns of its layer) and per FFN."""
    grams = {}
    for name, (A, B) in factors.items():
        g = per_sample_grads(A, B, prep)  # (n, d_out, d_in), exact products of rounded inputs
        g = prep(g.float()).double() if prep is not _exact else g  # the Gram GEMM's own inputs
        layer = name.split(".attn.")[0] if ".attn." in name else name.split(".ffn.")[0]
        if ".attn." in name:
            dh = (g.shape[2] if name.endswith(".o") else g.shape[1]) // heads
            for h in range(heads):
                sl = g[:, :, h * dh:(h + 1) * dh] if name.endswith(".o") else g[:, h * dh:(h + 1) * dh]
                flat = sl.reshape(g.shape[0], -1)
                key = f"{layer}.head{h}"
                grams[key] = grams.get(key, 0) + flat @ flat.T
        else:
            flat = g.reshape(g.shape[0], -1)
            key = f"{layer}.ffn"
            grams[key] = grams.get(key, 0) + flat @ flat.T
    return grams


def _exact(t):
    return t


def run(seed: int, n: int, T: int, vocab: int = 1000, train_steps: int = 5):
    torch.manual_seed(seed)
    model = BertEncoderMLM(vocab, hidden=128, layers=4, heads=4, ffn=512, max_len=T)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1000 + seed)

    def batch():
        x = torch.randint(0, vocab, (n, T), generator=g)
        y = torch.where(torch.rand(n, T, generator=g) < 0.15, x, torch.full_like(x, -100))
        y[:, 0] = x[:, 0]
        return x, y

    for _ in range(train_steps):
        x, y = batch()
        mlm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    x, y = batch()
    factors = collect_factors(model, x, y)
    ref = {k: torch.linalg.eigvalsh(v)[-1].item()
           for k, v in module_grams({k: (a.double(), b.double()) for k, (a, b) in factors.items()},
                                    4, _exact).items()}
    out = {}
    for label, prep in (("fp32", lambda t: t.float()), ("tf32_rn", lambda t: round_tf32(t, "rn")),
                        ("tf32_rz", lambda t: round_tf32(t, "rz"))):
        lam = {k: torch.linalg.eigvalsh(v)[-1].item() for k, v in module_grams(factors, 4, prep).items()}
        out[label] = [abs(lam[k] - ref[k]) / ref[k] for k in ref]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--T", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pooled = {}
    print(f"n={args.n} T={args.T}; relative |λ - λ_float64| / λ_float64 over modules")
    print("| seed | fp32 median | fp32 max | TF32-RN median | TF32-RN max | TF32-RZ median | TF32-RZ max |")
    print("|---|---|---|---|---|---|---|")
    for s in (int(v) for v in args.seeds.split(",")):
        r = run(s, args.n, args.T)
        for k, v in r.items():
            pooled.setdefault(k, []).extend(v)
        print(f"| {s} | " + " | ".join(f"{statistics.median(r[k]):.2e} | {max(r[k]):.2e}"
                                       for k in ("fp32", "tf32_rn", "tf32_rz")) + " |")
    print(f"| pooled ({len(pooled['fp32'])} module-λ) | " + " | ".join(
        f"{statistics.median(pooled[k]):.2e} | {max(pooled[k]):.2e}"
        for k in ("fp32", "tf32_rn", "tf32_rz")) + " |")


if __name__ == "__main__":
    main()
