"""The module split of the reference BertEncoderMLM, as module discovery would produce it.

A small stand-in used by the tests and benchmarks/bench_skip.py so that compute skipping can be
exercised on its own; module discovery (mat_cuda/discovery.py) is the general tool and yields the
same fields. Modules: one per head (kind "head": its Q/K/V rows and bias entries, its W_O
columns), one per FFN block (kind "ffn": fc1 and fc2 weights and biases), the token and position
embeddings (kind "embedding"). LayerNorms, W_O biases and the MLM head are unmanaged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..modules import ModuleMap


@dataclass
class AttentionFields:
    """The AttentionSpec fields compute skipping reads."""
    path: str
    block: nn.Module
    num_heads: int
    head_dim: int
    q: Optional[nn.Module]
    k: Optional[nn.Module]
    v: Optional[nn.Module]
    qkv: Optional[nn.Module]
    o: nn.Module
    head_modules: list[int]
    style: str = "mat_bert"


@dataclass
class FFNFields:
    """The FFNSpec fields compute skipping reads."""
    path: str
    block: nn.Module
    linears: list[nn.Module] = field(default_factory=list)
    module: int = -1


def bert_module_split(model: nn.Module) -> tuple[ModuleMap, list[AttentionFields], list[FFNFields]]:
    """model: mat_cuda.models.BertEncoderMLM -> (module_map, attentions, ffns)."""
    mm = ModuleMap()
    attentions, ffns = [], []
    emb = model.embeddings
    for name in ("tokens", "positions"):
        mm.assign_whole(getattr(emb, name).weight, mm.add_module(f"embeddings.{name}", "embedding"),
                        name=f"embeddings.{name}.weight")
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        heads = [mm.add_module(f"layers.{i}.attn.head{h}", "head") for h in range(attn.heads)]
        d = attn.head_dim
        if attn.qkv_layout == "packed":
            for p, pn in ((attn.qkv.weight, "qkv.weight"), (attn.qkv.bias, "qkv.bias")):
                mm.assign_row_groups(p, d, heads * 3, name=f"layers.{i}.attn.{pn}")
            q = k = v = None
            qkv = attn.qkv
        else:
            for proj in ("q", "k", "v"):
                lin = getattr(attn, proj)
                mm.assign_row_groups(lin.weight, d, heads, name=f"layers.{i}.attn.{proj}.weight")
                mm.assign_row_groups(lin.bias, d, heads, name=f"layers.{i}.attn.{proj}.bias")
            q, k, v, qkv = attn.q, attn.k, attn.v, None
        mm.assign_col_groups(attn.o.weight, d, heads, name=f"layers.{i}.attn.o.weight")
        attentions.append(AttentionFields(f"layers.{i}.attn", attn, attn.heads, d, q, k, v, qkv,
                                          attn.o, heads))
        ffn = layer.ffn
        mid = mm.add_module(f"layers.{i}.ffn", "ffn")
        for lin in (ffn.fc1, ffn.fc2):
            mm.assign_whole(lin.weight, mid)
            mm.assign_whole(lin.bias, mid)
        ffns.append(FFNFields(f"layers.{i}.ffn", ffn, [ffn.fc1, ffn.fc2], mid))
    mm.validate()
    return mm, attentions, ffns
