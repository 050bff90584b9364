"""Shared by tests/test_compile.py: a tiny MAT run whose
masks follow a script, so that mask changes (and repeats) fall on known probe steps."""
from __future__ import annotations

import torch

import mat_cuda
from mat_cuda import MAT, MATPolicy
from mat_cuda.models import BertEncoderMLM, mlm_loss
from mat_cuda.policy import Policy

V, N, T = 30, 4, 6


class ScriptedPolicy(Policy):
    """Returns the given masks in turn at each probe (λ is ignored)."""

    def __init__(self, kinds, masks):
        super().__init__(kinds)
        self.masks, self.calls = [list(m) for m in masks], 0

    def update(self, lam, exclude=None):
        mask = torch.tensor(self.masks[self.calls % len(self.masks)], device=lam.device)
        self.calls += 1
        return mask


def tiny_model(seed=0, heads=2):
    torch.manual_seed(seed)
    return BertEncoderMLM(V, hidden=16, layers=2, heads=heads, ffn=32, max_len=8)


def batches(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randint(0, V, (N, T), generator=g)
        y = torch.where(torch.rand(N, T, generator=g) < 0.4, x, torch.full_like(x, -100))
        y[:, 0] = x[:, 0]  # every sample predicts at least one token
        out.append((x, y))
    return out


# Masks over the tiny model's 6 modules [L0 head0, L0 head1, L0 ffn, L1 head0, L1 head1, L1 ffn]:
# partial heads with a frozen FFN, a layer with every head frozen, back to all active, a repeat.
MASKS = [
    [True, False, True, True, False, False],
    [False, False, True, True, True, True],
    [True, True, False, False, True, True],
    [True] * 6,
    [True, False, True, True, False, False],
]


def build_mat(model, masks=MASKS, probe_every=4, backward="detach", kernel="loss", **kw):
    kinds = mat_cuda.discover(model, ("head", "ffn")).module_map.kinds
    policy = MATPolicy(kinds, modular=ScriptedPolicy(kinds, masks), warmup=0,
                       probe_every=probe_every, temporal=None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return MAT(model, opt, modules=mat_cuda.discover(model, ("head", "ffn")), policy=policy,
               backward=backward, kernel=kernel, **kw)


def train(mat, forward, data):
    """Runs ``forward`` (the model or a CompiledModel) over ``data``; returns the losses."""
    losses = []
    for x, y in data:
        loss = mlm_loss(forward(x), y)
        loss.backward()
        mat.step()
        mat.zero_grad()
        losses.append(loss.item())
    return losses
