"""Structural recognisers for module discovery: attention blocks, FFN blocks, expert lists.

Pure inspection of an ``nn.Module`` tree (child names, layer types, weight shapes, head-count
attributes); nothing here builds a ModuleMap. Each recogniser returns a small match object or
None, and checks shapes so that a name that happens to fit (``fc1``/``fc2`` of a classifier)
does not produce a wrong split.

Projection layers are ``nn.Linear`` (weight (out, in)) or the Hugging Face GPT-2 ``Conv1D``
(weight (in, out), recognised by duck typing so that transformers need not be importable).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

# Separate Q/K/V projections and the output projection, as dotted paths inside the block.
# (q, k, v, o, style). Order matters: the first pattern that fits wins.
SEPARATE_QKV_PATTERNS = (
    ("q", "k", "v", "o", "mat_bert"),                                   # mat_cuda.models
    ("self.query", "self.key", "self.value", "output.dense", "hf_bert"),  # HF BERT / RoBERTa / ViT (4.x)
    ("attention.query", "attention.key", "attention.value", "output.dense", "hf_vit"),  # HF ViT 4.x
    ("q_proj", "k_proj", "v_proj", "o_proj", "hf_vit"),                 # HF ViT 5.x (and same-shape q/k/v)
    ("q_proj", "k_proj", "v_proj", "out_proj", "separate_linear"),      # HF BART / CLIP style
    ("q_lin", "k_lin", "v_lin", "out_lin", "separate_linear"),          # HF DistilBERT
    ("query", "key", "value", "out", "separate_linear"),
)
# Packed projections whose output features are [Q; K; V] blocks of H·d_h each, and the output
# projection: (qkv, o, style).
PACKED_QKV_PATTERNS = (
    ("qkv", "o", "mat_bert"),         # mat_cuda.models, qkv="packed"
    ("c_attn", "c_proj", "hf_gpt2"),  # HF GPT-2 (Conv1D)
    ("qkv", "proj", "packed_linear"),  # timm ViT
)
# FFN blocks: (input projections, output projection, layer_level). layer_level: the pattern
# matches on the whole transformer layer (which also holds attention and norms), so the FFN
# module is named "<layer>.ffn" rather than after the block.
FFN_PATTERNS = (
    (("fc1",), "fc2", False),                          # mat_cuda.models, HF ViT 5.x ViTMLP
    (("linear1",), "linear2", True),                   # torch TransformerEncoder/DecoderLayer
    (("intermediate.dense",), "output.dense", True),   # HF BERT / RoBERTa / ViT 4.x layer
    (("c_fc",), "c_proj", False),                      # HF GPT-2 MLP (Conv1D)
    (("lin1",), "lin2", False),                        # HF DistilBERT
    (("fc_in",), "fc_out", False),                     # HF GPT-J
    (("wi",), "wo", False),                            # HF T5 DenseReluDense
    (("w1",), "w2", False),
    (("dense_h_to_4h",), "dense_4h_to_h", False),
    (("gate_proj", "up_proj"), "down_proj", False),    # gated (LLaMA-style) MLP
)
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads", "nhead")
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "d_head")


def is_conv1d_transposed(m: nn.Module) -> bool:
    """HF GPT-2 style Conv1D: a linear layer with weight (in, out) = (nx, nf)."""
    w = getattr(m, "weight", None)
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int)
            and isinstance(getattr(m, "nx", None), int) and w is not None
            and tuple(w.shape) == (m.nx, m.nf))


def linear_dims(m: Optional[nn.Module]) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D, else None."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if m is not None and is_conv1d_transposed(m):
        return m.nx, m.nf
    return None


def get_path(root: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at dotted ``path``, or None."""
    m = root
    for part in path.split("."):
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if m is None:
            return None
    return m


def is_norm(m: nn.Module) -> bool:
    """Normalisation layers stay shared (always trained): small, and per-feature across heads."""
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types += (nn.RMSNorm,)
    return isinstance(m, norm_types) or type(m).__name__.lower().endswith("norm")


def looks_like_attention(m: nn.Module) -> bool:
    """A module that is probably an attention block (used only to warn when it is not split)."""
    name = type(m).__name__.lower()
    if "attention" in name or name.endswith("attn"):
        return True
    return any(isinstance(getattr(m, a, None), int) and not isinstance(getattr(m, a), bool)
               for a in ("num_heads", "num_attention_heads", "n_head"))


@dataclass
class AttentionMatch:
    """A recognised attention block. Projection modules are given with their dotted paths
    relative to the block. For style "torch_mha" q/k/v/qkv are None (the projections are raw
    parameters of the nn.MultiheadAttention)."""

    num_heads: int
    head_dim: int
    q: Optional[nn.Module]
    k: Optional[nn.Module]
    v: Optional[nn.Module]
    qkv: Optional[nn.Module]
    o: nn.Module
    style: str
    parts: dict  # relative path -> projection module (what the block's match claims)


def _int_attr(mods, names) -> Optional[int]:
    for m in mods:
        for a in names:
            val = getattr(m, a, None)
            if isinstance(val, int) and not isinstance(val, bool) and val > 0:
                return val
        cfg = getattr(m, "config", None)
        if cfg is not None and not isinstance(cfg, dict):
            for a in names:
                val = getattr(cfg, a, None)
                if isinstance(val, int) and not isinstance(val, bool) and val > 0:
                    return val
    return None


def _heads_and_dim(block: nn.Module, proj_path: str, width: int) -> Optional[tuple[int, int]]:
    """(H, d_h) from head-count attributes of the block or the modules between it and the
    projection (HF BERT keeps them on block.self), checked against the projection width."""
    mods, m = [block], block
    for part in proj_path.split(".")[:-1]:
        m = m._modules[part]
        mods.append(m)
    heads = _int_attr(reversed(mods), HEAD_COUNT_ATTRS)
    if heads is None or width % heads:
        return None
    head_dim = _int_attr(reversed(mods), HEAD_DIM_ATTRS) or width // heads
    return (heads, head_dim) if heads * head_dim == width else None


def match_attention(block: nn.Module, claimed: set[int]) -> Optional[AttentionMatch]:
    """Recognise ``block`` as an attention block with per-head structure, or None.

    Requires: Q, K, V projections of equal width H·d_h (no grouped K/V), an output projection
    taking H·d_h inputs, a head count found on the block, none of the projections claimed yet.
    """
    if isinstance(block, nn.MultiheadAttention):
        return _match_mha(block)
    for q_path, k_path, v_path, o_path, style in SEPARATE_QKV_PATTERNS:
        mods = [get_path(block, p) for p in (q_path, k_path, v_path, o_path)]
        dims = [linear_dims(m) for m in mods]
        if any(d is None for d in dims) or any(id(m) in claimed for m in mods):
            continue
        width = dims[0][1]
        if dims[1][1] != width or dims[2][1] != width or dims[3][0] != width:
            continue
        hd = _heads_and_dim(block, q_path, width)
        if hd is None:
            continue
        q, k, v, o = mods
        if style == "hf_vit" and "vit" not in type(block).__name__.lower():
            style = "separate_linear"  # same names as ViT 5.x, another model: say nothing more
        return AttentionMatch(hd[0], hd[1], q, k, v, None, o, style,
                              dict(zip((q_path, k_path, v_path, o_path), mods)))
    for qkv_path, o_path, style in PACKED_QKV_PATTERNS:
        qkv, o = get_path(block, qkv_path), get_path(block, o_path)
        dq, do = linear_dims(qkv), linear_dims(o)
        if dq is None or do is None or id(qkv) in claimed or id(o) in claimed:
            continue
        width = do[0]
        if dq[1] != 3 * width:
            continue
        hd = _heads_and_dim(block, qkv_path, width)
        if hd is None:
            continue
        return AttentionMatch(hd[0], hd[1], None, None, None, qkv, o, style, {qkv_path: qkv, o_path: o})
    return None


def _match_mha(mha: nn.MultiheadAttention) -> Optional[AttentionMatch]:
    if mha.embed_dim % mha.num_heads:
        return None
    return AttentionMatch(mha.num_heads, mha.head_dim, None, None, None, None, mha.out_proj,
                          "torch_mha", {"out_proj": mha.out_proj})


@dataclass
class FFNMatch:
    linears: list  # input projection(s) then the output projection
    paths: list    # their dotted paths relative to the block
    layer_level: bool


def match_ffn(block: nn.Module, claimed: set[int]) -> Optional[FFNMatch]:
    """Recognise ``block`` as (or as holding) a feed-forward block d -> f -> d, or None.

    Shapes must chain: every input projection maps d -> f and the output projection f -> d.
    """
    for in_paths, out_path, layer_level in FFN_PATTERNS:
        ins = [get_path(block, p) for p in in_paths]
        out = get_path(block, out_path)
        mods = ins + [out]
        dims = [linear_dims(m) for m in mods]
        if any(d is None for d in dims) or any(id(m) in claimed for m in mods):
            continue
        d_model, d_ff = dims[0]
        if all(d == (d_model, d_ff) for d in dims[:-1]) and dims[-1] == (d_ff, d_model):
            return FFNMatch(mods, list(in_paths) + [out_path], layer_level)
    return None


def match_experts(name: str, module: nn.Module, claimed: set[int]) -> Optional[list]:
    """A ModuleList named ``*experts`` whose items are all FFN blocks -> their FFNMatches."""
    if not isinstance(module, nn.ModuleList) or not name.lower().endswith("experts") or len(module) == 0:
        return None
    matches = [match_ffn(e, claimed) for e in module]
    if any(m is None or m.layer_level for m in matches):
        return None
    return matches
