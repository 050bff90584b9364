"""Building blocks of the BERT-style encoders: embeddings, multi-head self-attention, FFN, layers.

Plain PyTorch, written so that the per-head structure and the module boundaries MAT works with
are visible in the module tree:

    attn.q / attn.k / attn.v (qkv="separate") or attn.qkv (qkv="packed"), attn.o
    ffn.fc1 / ffn.fc2

Head h owns output rows h·d_h … (h+1)·d_h of q, k and v (of each of the Q, K, V blocks of the
packed qkv weight, rows [Q; K; V]) and input columns h·d_h … (h+1)·d_h of o, as DESIGN.md states.

Post-LN (as in BERT): x ← LN(x + Attn(x)); x ← LN(x + FFN(x)). Chosen to match the BERT models
of the MAT paper's experiments; at these small sizes it trains without learning-rate warm-up.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: Linear/Embedding weights N(0, std²), biases 0, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Embeddings(nn.Module):
    """Token + learned position embeddings, LayerNorm, dropout.

    input_ids (n, T) int64 -> (n, T, hidden) float. T ≤ max_len.
    """

    def __init__(self, vocab_size: int, hidden: int, max_len: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, hidden)
        self.positions = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.positions.num_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_len {self.positions.num_embeddings}")
        pos = torch.arange(t, device=input_ids.device)
        return self.dropout(self.norm(self.tokens(input_ids) + self.positions(pos)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with plain matmuls and softmax.

    qkv="separate": Linear q, k, v (hidden -> hidden each); qkv="packed": one Linear qkv
    (hidden -> 3·hidden, weight rows [Q; K; V]). Output projection o (hidden -> hidden).
    x (n, T, hidden), attention_mask (n, T) bool/int (1 = attend, 0 = padding) or None
    -> (n, T, hidden).
    """

    def __init__(self, hidden: int, heads: int, dropout: float, qkv: str = "separate"):
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if qkv not in ("separate", "packed"):
            raise ValueError(f"qkv must be 'separate' or 'packed', got {qkv!r}")
        self.hidden, self.heads, self.head_dim, self.qkv_layout = hidden, heads, hidden // heads, qkv
        if qkv == "separate":
            self.q = nn.Linear(hidden, hidden)
            self.k = nn.Linear(hidden, hidden)
            self.v = nn.Linear(hidden, hidden)
        else:
            self.qkv = nn.Linear(hidden, 3 * hidden)
        self.o = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (n, T, hidden) -> q, k, v each (n, heads, T, head_dim)."""
        if self.qkv_layout == "separate":
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q, k, v = self.qkv(x).split(self.hidden, dim=-1)
        n, t, _ = x.shape
        return tuple(y.view(n, t, self.heads, self.head_dim).transpose(1, 2) for y in (q, k, v))

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.project(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (n, heads, T, T)
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)[:, None, None, :]  # (n, 1, 1, T) over keys
            # finfo.min rather than -inf: a fully padded row gives a uniform softmax, not NaN.
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = self.dropout(scores.softmax(dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(n, t, self.hidden)  # heads concatenated
        return self.o(ctx)


class FeedForward(nn.Module):
    """fc1 (hidden -> ffn), GELU, fc2 (ffn -> hidden). x (..., hidden) -> (..., hidden).

    attention_mask is accepted for the layer's uniform call and unused (per-token block)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Post-LN encoder layer: attn, attn_norm, a feed-forward block, ffn_norm.

    The feed-forward block (called as block(x, attention_mask)) is registered under `ffn_name`
    ("ffn" for BERT, "moe" for Switch) so module discovery sees what it is.
    x (n, T, hidden) -> (n, T, hidden).
    """

    def __init__(self, hidden: int, heads: int, dropout: float, qkv: str, feed_forward: nn.Module,
                 ffn_name: str = "ffn"):
        super().__init__()
        self.attn = SelfAttention(hidden, heads, dropout, qkv)
        self.attn_norm = nn.LayerNorm(hidden)
        self.ffn_name = ffn_name
        self.add_module(ffn_name, feed_forward)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, attention_mask)))
        block = getattr(self, self.ffn_name)
        return self.ffn_norm(x + self.dropout(block(x, attention_mask)))


class MLMHead(nn.Module):
    """BERT MLM head: transform (Linear, GELU, LayerNorm) then decoder Linear (hidden -> V).

    Untied from the token embedding: tying would make the embedding and the decoder one
    parameter shared by two modules, which MAT's disjoint module split cannot express.
    x (n, T, hidden) -> logits (n, T, V).
    """

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.decoder = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.transform(x))))


def predicted_positions(hidden: torch.Tensor, predict: Optional[torch.Tensor]) -> torch.Tensor:
    """hidden (n, T, d) -> hidden[predict] (P, d) (row-major), or ``hidden`` when predict is None.
    predict: (n, T) bool. (Boolean indexing reads P to the host: one sync per call on CUDA.)"""
    if predict is None:
        return hidden
    if predict.dtype != torch.bool or predict.shape != hidden.shape[:2]:
        raise ValueError(f"predict must be a bool tensor of shape {tuple(hidden.shape[:2])} (n, T), "
                         f"got {predict.dtype} {tuple(predict.shape)}")
    return hidden[predict]


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
             reduction: str = "mean") -> torch.Tensor:
    """Masked-LM cross-entropy.

    logits (n, T, V) float, or (P, V) at the predicted positions only (the models' ``forward(...,
    predict=labels != ignore_index)``); labels (n, T) int64 with `ignore_index` at unmasked
    positions. reduction "mean" (over predicted tokens; NaN when there are none), "sum", or
    "none" -> (n, T) with 0 at ignored positions.
    """
    if logits.dim() == 2:  # predicted positions only
        predict = labels != ignore_index
        target = labels[predict]
        if logits.shape[0] != target.numel():
            raise ValueError(f"logits {tuple(logits.shape)} has {logits.shape[0]} rows but labels "
                             f"{tuple(labels.shape)} has {target.numel()} predicted positions")
        loss = F.cross_entropy(logits.float(), target, reduction=reduction)
        if reduction != "none":
            return loss
        return loss.new_zeros(labels.shape).masked_scatter(predict, loss)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (n, T)")
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore_index,
                           reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss
