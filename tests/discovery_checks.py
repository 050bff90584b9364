"""Checks shared by the module-discovery tests (plain and Hugging Face models)."""
from __future__ import annotations

import re

import torch


def owner(mm, p: torch.Tensor) -> torch.Tensor:
    """int64 tensor shaped like ``p``: the module owning each element, -1 where unmanaged."""
    lay = mm.layout(p)
    if lay is None:
        return torch.full(p.shape, -1, dtype=torch.int64)
    if lay.kind == "whole":
        return torch.full(p.shape, lay.module, dtype=torch.int64)
    per_index = torch.tensor(lay.group_module, dtype=torch.int64).repeat_interleave(lay.group_size)
    if lay.kind == "rows":
        return per_index.reshape((-1,) + (1,) * (p.dim() - 1)).expand(p.shape).clone()
    return per_index.expand(p.shape).clone()


def check_coverage(model, disc) -> None:
    """Every trainable parameter is mapped or listed in ``shared`` (not both), the map validates,
    and the per-module element counts add up to what the ModuleMap says."""
    mm = disc.module_map
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mm.validate([p for _, p in trainable])
    unmapped = {n for n, p in trainable if mm.layout(p) is None}
    assert set(disc.shared) == unmapped
    counts = torch.zeros(mm.num_modules + 1, dtype=torch.int64)
    for _, p in trainable:
        counts += torch.bincount(owner(mm, p).flatten() + 1, minlength=mm.num_modules + 1)
    assert counts[1:].tolist() == disc.module_numel
    assert disc.shared_numel == int(counts[0])
    assert all(c > 0 for c in disc.module_numel)


def check_head_slices(mm, spec) -> None:
    """Head h owns exactly rows (or Conv1D columns) h·d_h … (h+1)·d_h of each Q/K/V block and
    the matching input slice of the output projection; o's bias is unmanaged."""
    H, dh = spec.num_heads, spec.head_dim
    width = H * dh
    heads = torch.tensor(spec.head_modules).repeat_interleave(dh)  # (H·d_h,) owner by feature
    assert len(set(spec.head_modules)) == H and min(spec.head_modules) >= 0
    assert all(mm.kinds[m] == "head" for m in spec.head_modules)
    qkv_tensors = [(n, t) for n, t in spec.params.items() if n != "o.weight" and n != "o.bias"]
    assert qkv_tensors
    for name, t in qkv_tensors:
        own = owner(mm, t)
        if spec.qkv_axis == "cols" and t.dim() == 2:
            own = own.t()  # Conv1D (d, 3·H·d_h): features along columns
        blocks = own.shape[0] // width
        assert blocks * width == own.shape[0], name
        expected = heads.repeat(blocks).reshape((-1,) + (1,) * (own.dim() - 1)).expand(own.shape)
        assert torch.equal(own, expected), name
    o_own = owner(mm, spec.o.weight)
    o_own = o_own if spec.o_axis == "cols" else o_own.t()  # features of o's input along last dim
    assert torch.equal(o_own, heads.expand(o_own.shape))
    if spec.o.bias is not None:
        assert mm.layout(spec.o.bias) is None


def check_heads_drive_forward(model, mm, spec, loss_fn) -> None:
    """The split matches what the forward actually does: with every other head's slice of the
    output projection zeroed, gradients reach only head h's Q/K/V elements (and reach them)."""
    o_owner = owner(mm, spec.o.weight)
    original = spec.o.weight.detach().clone()
    tensors = [t for n, t in spec.params.items() if n not in ("o.weight", "o.bias")]
    try:
        for h, m in enumerate(spec.head_modules):
            with torch.no_grad():
                spec.o.weight.copy_(torch.where(o_owner == m, original, torch.zeros_like(original)))
            model.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            for t in tensors:
                own, g = owner(mm, t), t.grad
                assert g is not None
                assert g[own != m].abs().max() == 0, f"head {h}: gradient leaks to other heads"
                assert g[own == m].abs().max() > 0, f"head {h}: no gradient in its own slice"
    finally:
        with torch.no_grad():
            spec.o.weight.copy_(original)
        model.zero_grad(set_to_none=True)


def check_summary(disc) -> None:
    """The summary states every kind's module count and parameters, coverage and shared count."""
    text = disc.summary()
    mm = disc.module_map
    for kind in set(mm.kinds):
        ids = mm.modules_of_kind(kind)
        numel = sum(disc.module_numel[i] for i in ids)
        assert re.search(rf"^\s+{kind}\s+{len(ids)}\s+{numel:,}$", text, re.MULTILINE), (kind, text)
    covered = sum(disc.module_numel)
    assert f"{mm.num_modules} modules cover {covered:,} of {covered + disc.shared_numel:,}" in text
    assert f"shared (always trained): {disc.shared_numel:,} parameters in {len(disc.shared)} tensors" in text
