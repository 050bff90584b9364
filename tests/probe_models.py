"""Tiny real models and their module maps for the probe tests (odd sizes on purpose).

Each ``make_*`` returns (model, module_map, inputs, targets): the model in float32 with fresh
random weights, a ModuleMap mixing whole-tensor and row/column-group layouts, a probe batch and
per-sample integer targets for a cross-entropy loss (None where the test builds its own).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mat_cuda.modules import ModuleMap


# ---- MLP (no sequence axis) ---------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, d_in=7, hidden=11, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, 9)
        self.fc3 = nn.Linear(9, d_out)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.fc1(x), inplace=True))))


def make_mlp(n=6):
    model = MLP()
    mm = ModuleMap()
    m1 = mm.add_module("fc1", "layer")
    mm.assign_whole(model.fc1.weight, m1, "fc1.weight")
    mm.assign_whole(model.fc1.bias, m1, "fc1.bias")
    # fc2: output rows in groups of 3 -> units a, b, unmanaged; the bias in its own module.
    ua, ub = mm.add_module("fc2.units_a", "unit"), mm.add_module("fc2.units_b", "unit")
    mm.assign_row_groups(model.fc2.weight, 3, [ua, ub, -1], "fc2.weight")
    mm.assign_whole(model.fc2.bias, mm.add_module("fc2.bias", "bias"), "fc2.bias")
    # fc3: input columns in groups of 3; no bias managed.
    c0, c1 = mm.add_module("fc3.in_0", "unit"), mm.add_module("fc3.in_1", "unit")
    mm.assign_col_groups(model.fc3.weight, 3, [c0, c1, c0], "fc3.weight")
    x = torch.randn(n, 7)
    y = torch.randint(0, 5, (n,))
    return model, mm, x, y


# ---- transformer encoder (MLM), packed or separate QKV ------------------------------------------

class Attention(nn.Module):
    def __init__(self, d, heads, packed):
        super().__init__()
        self.h, self.dh, self.packed = heads, d // heads, packed
        if packed:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):                                   # x (n, T, d)
        n, T, d = x.shape
        if self.packed:
            q, k, v = self.qkv(x).split(d, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.reshape(n, T, self.h, self.dh).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / self.dh ** 0.5, dim=-1) @ v
        return self.out(a.transpose(1, 2).reshape(n, T, d))


class Block(nn.Module):
    def __init__(self, d, heads, ffn, packed, rms):
        super().__init__()
        self.ln1 = nn.RMSNorm(d) if rms else nn.LayerNorm(d)
        self.attn = Attention(d, heads, packed)
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    def __init__(self, vocab=13, d=12, heads=3, ffn=10, layers=2, max_len=7, packed=True,
                 rms=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn, packed, rms) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):                                 # ids (n, T) -> logits (n, T, vocab)
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.tok(ids) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def encoder_module_map(model: Encoder) -> ModuleMap:
    """Heads (Q/K/V rows + biases, W_O columns), FFN blocks, norms, embeddings and the LM head."""
    mm = ModuleMap()
    mm.assign_whole(model.tok.weight, mm.add_module("tok", "embedding"), "tok.weight")
    for li, b in enumerate(model.blocks):
        a = b.attn
        heads = [mm.add_module(f"l{li}.head{h}", "head") for h in range(a.h)]
        if a.packed:
            mm.assign_row_groups(a.qkv.weight, a.dh, heads * 3, f"l{li}.qkv.weight")
            mm.assign_row_groups(a.qkv.bias, a.dh, heads * 3, f"l{li}.qkv.bias")
        else:
            for nm in ("q", "k", "v"):
                lin = getattr(a, nm)
                mm.assign_row_groups(lin.weight, a.dh, heads, f"l{li}.{nm}.weight")
                # one head's bias unmanaged, so weight and bias take separate Gram calls
                mm.assign_row_groups(lin.bias, a.dh, heads[:-1] + [-1], f"l{li}.{nm}.bias")
        mm.assign_col_groups(a.out.weight, a.dh, heads, f"l{li}.out.weight")
        ffn = mm.add_module(f"l{li}.ffn", "ffn")
        for p, nm in ((b.fc1.weight, "fc1.weight"), (b.fc1.bias, "fc1.bias"),
                      (b.fc2.weight, "fc2.weight"), (b.fc2.bias, "fc2.bias"),
                      (a.out.bias, "out.bias")):
            mm.assign_whole(p, ffn, f"l{li}.{nm}")
        for nm in ("ln1", "ln2"):
            ln = getattr(b, nm)
            norm = mm.add_module(f"l{li}.{nm}", "norm")
            for pn, p in ln.named_parameters():
                mm.assign_whole(p, norm, f"l{li}.{nm}.{pn}")
    # final LayerNorm: weight and bias in different modules; pos embedding unmanaged
    mm.assign_whole(model.ln.weight, mm.add_module("ln.weight", "norm"), "ln.weight")
    mm.assign_whole(model.ln.bias, mm.add_module("ln.bias", "norm"), "ln.bias")
    head = mm.add_module("head", "head_out")
    mm.assign_whole(model.head.weight, head, "head.weight")
    mm.assign_whole(model.head.bias, head, "head.bias")
    return mm


def make_encoder(n=5, T=7, packed=True, rms=False):
    model = Encoder(packed=packed, rms=rms)
    mm = encoder_module_map(model)
    ids = torch.randint(1, 13, (n, T))
    ids[0, -2:] = 0                                          # padding tokens
    ids[-1, 0] = ids[1, 3]                                   # a shared token across samples
    y = torch.randint(0, 13, (n, T))
    return model, mm, ids, y


# ---- small CNN ----------------------------------------------------------------------------------

class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.c2 = nn.Conv2d(6, 5, (3, 2), dilation=(2, 1), padding="same", padding_mode="reflect")
        self.bn = nn.BatchNorm2d(5)
        self.c3 = nn.Conv2d(5, 4, 2, stride=(1, 2), bias=False)
        self.fc = nn.Linear(4 * 4 * 2, 3)

    def forward(self, x):                                   # x (n, 3, 9, 7)
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.bn(self.c2(x)))
        x = torch.tanh(self.c3(x))
        return self.fc(x.flatten(1))


def make_cnn(n=5):
    model = CNN()
    with torch.no_grad():                                   # non-trivial eval statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.bn.eval()
    mm = ModuleMap()
    f = [mm.add_module(f"c1.filters{i}", "filters") for i in range(3)]
    mm.assign_row_groups(model.c1.weight, 2, f, "c1.weight")
    mm.assign_row_groups(model.c1.bias, 2, f, "c1.bias")
    norm = mm.add_module("norms", "norm")
    mm.assign_whole(model.gn.weight, norm, "gn.weight")
    mm.assign_whole(model.bn.bias, norm, "bn.bias")
    mm.assign_whole(model.bn.weight, mm.add_module("bn.weight", "norm"), "bn.weight")
    c2 = mm.add_module("c2", "conv")
    mm.assign_whole(model.c2.weight, c2, "c2.weight")
    mm.assign_whole(model.c2.bias, c2, "c2.bias")
    mm.assign_row_groups(model.c3.weight, 1, [c2, -1, c2, mm.add_module("c3.f3", "filters")],
                         "c3.weight")
    mm.assign_whole(model.fc.weight, mm.add_module("fc", "layer"), "fc.weight")
    x = torch.randn(n, 3, 9, 7)
    y = torch.randint(0, 3, (n,))
    return model, mm, x, y


# ---- embedding + norms, no sequence axis in the embedding ---------------------------------------

class EmbedNorm(nn.Module):
    def __init__(self, vocab=11, d=9):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=2)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm((3, d // 3), eps=1e-5)
        self.fc = nn.Linear(d, 4)

    def forward(self, ids):                                 # ids (n,) -> (n, 4)
        h = self.ln(self.emb(ids))
        h = self.rms(h.reshape(-1, 3, h.shape[-1] // 3)).reshape(h.shape)
        return self.fc(h)


def make_embed_norm(n=7):
    model = EmbedNorm()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.rms.weight.uniform_(0.5, 1.5)
    mm = ModuleMap()
    mm.assign_whole(model.emb.weight, mm.add_module("emb", "embedding"), "emb.weight")
    ln = mm.add_module("ln", "norm")
    mm.assign_whole(model.ln.weight, ln, "ln.weight")
    mm.assign_whole(model.ln.bias, ln, "ln.bias")
    r0, r1 = mm.add_module("rms.g0", "norm"), mm.add_module("rms.g1", "norm")
    mm.assign_row_groups(model.rms.weight, 1, [r0, r1, r0], "rms.weight")
    mm.assign_whole(model.fc.weight, mm.add_module("fc", "layer"), "fc.weight")
    ids = torch.tensor([3, 2, 5, 3, 10, 2, 7, 1, 0, 4][:n])
    y = torch.randint(0, 4, (n,))
    return model, mm, ids, y


# ---- GPT-2 style block with Hugging Face Conv1D -------------------------------------------------

class Conv1D(nn.Module):
    """The Hugging Face GPT-2 Conv1D (transformers.pytorch_utils.Conv1D): y = x W + b, W (nx, nf)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2Block(nn.Module):
    def __init__(self, d=9, heads=3, vocab=10):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.wte = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.lm = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.wte(ids)
        n, T, d = x.shape
        q, k, v = self.c_attn(self.ln(x)).split(d, dim=-1)
        q, k, v = (t.reshape(n, T, self.h, self.dh).transpose(1, 2) for t in (q, k, v))
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        s = (q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        a = torch.softmax(s / self.dh ** 0.5, dim=-1) @ v
        x = x + self.c_proj(a.transpose(1, 2).reshape(n, T, d))
        return self.lm(x)


def make_gpt2(n=4, T=6):
    model = GPT2Block()
    mm = ModuleMap()
    heads = [mm.add_module(f"head{h}", "head") for h in range(model.h)]
    # c_attn weight (d, 3d): output features are columns; c_proj weight (d, d): inputs are rows.
    mm.assign_col_groups(model.c_attn.weight, model.dh, heads * 3, "c_attn.weight")
    mm.assign_row_groups(model.c_attn.bias, model.dh, heads * 3, "c_attn.bias")
    mm.assign_row_groups(model.c_proj.weight, model.dh, heads, "c_proj.weight")
    mm.assign_whole(model.c_proj.bias, mm.add_module("c_proj.bias", "bias"), "c_proj.bias")
    mm.assign_whole(model.lm.weight, mm.add_module("lm", "head_out"), "lm.weight")
    ids = torch.randint(0, 10, (n, T))
    y = torch.randint(0, 10, (n, T))
    return model, mm, ids, y


MODELS = {
    "mlp": make_mlp,
    "encoder_packed": lambda: make_encoder(packed=True),
    "encoder_separate_rms": lambda: make_encoder(packed=False, rms=True),
    "cnn": make_cnn,
    "embed_norm": make_embed_norm,
    "gpt2_conv1d": make_gpt2,
}
