"""SwitchMoELM: the BERT-style encoder with Switch (top-1) mixture-of-experts FFNs."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .encoder import (Embeddings, EncoderLayer, FeedForward, MLMHead, init_bert_weights,
                      predicted_positions)


class SwitchFFN(nn.Module):
    """Switch Transformer feed-forward: a router picks one expert FFN per token.

    router: Linear(hidden -> num_experts, no bias); experts[e]: FeedForward (fc1, GELU, fc2).
    Token x goes to e = argmax softmax(router(x)) and returns p_e(x) · experts[e](x) (the gate
    p_e keeps the router trained by the main loss).

    Per-sample independence: routing is per token and capacity (if any) is counted per sample
    (sequence), never across the batch, so a sample's output does not depend on the other
    samples. capacity_factor=None (default): no token is dropped. Otherwise each sample sends
    at most ceil(capacity_factor · T / num_experts) tokens to each expert, in position order;
    overflow tokens get 0 from this block (the residual connection carries them).

    Load balancing (Switch Transformer, eq. 4): after each forward, `aux_loss` holds
    num_experts · Σ_e f_e · P_e, with f_e the fraction of (non-padding) tokens routed to e and
    P_e the mean router probability of e. It is a batch-level term: it couples the samples of a
    batch, so it belongs in the training loss but not in per-sample losses.

    Dispatch gathers each expert's tokens with nonzero(), a host sync per expert on CUDA: this
    is a readable reference model, not a tuned MoE kernel.

    Routed-token protocol: expert e sees a flat gather (N_routed, hidden) of its tokens, with
    no sample axis. Just before calling it, the block sets ``experts[e].routed_tokens =
    (idx, (n, T))``: idx (N_routed,) int64 holds the flat position of each routed row among
    the n·T tokens (token (i, s) is i·T + s), so per-sample tools (MAT's MNTKProbe) recover
    the sample of every row inside the expert (row r belongs to sample idx[r] // T). It is
    overwritten at the next call; an expert given no token this forward is not called.

    x (n, T, hidden), attention_mask (n, T) or None -> (n, T, hidden).
    """

    def __init__(self, hidden: int, expert_ffn: int, num_experts: int, capacity_factor: Optional[float] = None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be ≥ 1, got {num_experts}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(hidden, expert_ffn) for _ in range(num_experts))
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_routing: Optional[torch.Tensor] = None  # (n, T) int64, expert per token (-1: dropped)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, t, d = x.shape
        probs = self.router(x).float().softmax(dim=-1)  # (n, T, E)
        gate, expert = probs.max(dim=-1)  # (n, T) each
        one_hot = nn.functional.one_hot(expert, self.num_experts)  # (n, T, E)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * t / self.num_experts)
            # Position of each token in its expert's queue within its own sample (0-based).
            queue_pos = (one_hot.cumsum(dim=1) - 1).gather(-1, expert[..., None]).squeeze(-1)
            expert = torch.where(queue_pos < capacity, expert, -1)
        self.last_routing = expert
        out = torch.zeros_like(x)
        flat_x, flat_out, flat_e, flat_g = x.reshape(-1, d), out.view(-1, d), expert.reshape(-1), gate.reshape(-1)
        for e, ffn in enumerate(self.experts):
            idx = (flat_e == e).nonzero().squeeze(-1)
            if idx.numel():
                ffn.routed_tokens = (idx, (n, t))
                flat_out.index_add_(0, idx, ffn(flat_x[idx]) * flat_g[idx, None].to(x.dtype))
        self.aux_loss = self._load_balancing_loss(probs, one_hot, attention_mask)
        return out

    def _load_balancing_loss(self, probs: torch.Tensor, one_hot: torch.Tensor,
                             attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # probs, one_hot (n, T, E); weights (n, T, 1) select the real tokens.
        w = torch.ones_like(probs[..., :1]) if attention_mask is None else attention_mask.to(probs.dtype)[..., None]
        tokens = w.sum().clamp_min(1)
        f = (one_hot.to(probs.dtype) * w).sum(dim=(0, 1)) / tokens  # (E,)
        p = (probs * w).sum(dim=(0, 1)) / tokens  # (E,)
        return self.num_experts * (f * p).sum()


class SwitchMoELM(nn.Module):
    """BERT-style MLM encoder whose FFNs are Switch (top-1) mixtures of experts.

    Module tree: as :class:`BertEncoderMLM`, with layers[i].moe.router and
    layers[i].moe.experts[e].fc1 / .fc2 in place of layers[i].ffn.

    forward(input_ids (n, T) int64, attention_mask (n, T) or None, predict (n, T) bool or None)
    -> logits (n, T, vocab_size), or (P, vocab_size) at the predicted positions (as
    :class:`BertEncoderMLM`);
    afterwards `aux_loss` is the load-balancing loss summed over layers (add
    `aux_weight · model.aux_loss` to the training loss; Switch uses 0.01).
    """

    def __init__(self, vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                 num_experts: int = 4, expert_ffn: int = 512, capacity_factor: Optional[float] = None,
                 max_len: int = 128, dropout: float = 0.0, qkv: str = "separate"):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                           num_experts=num_experts, expert_ffn=expert_ffn, capacity_factor=capacity_factor,
                           max_len=max_len, dropout=dropout, qkv=qkv)
        self.embeddings = Embeddings(vocab_size, hidden, max_len, dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(hidden, heads, dropout, qkv, SwitchFFN(hidden, expert_ffn, num_experts, capacity_factor), "moe")
            for _ in range(layers)
        )
        self.mlm_head = MLMHead(hidden, vocab_size)
        init_bert_weights(self)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Load-balancing loss of the last forward, summed over layers (scalar float32)."""
        losses = [layer.moe.aux_loss for layer in self.layers]
        if any(a is None for a in losses):
            raise RuntimeError("aux_loss is available after a forward pass")
        return torch.stack(losses).sum()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                predict: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return self.mlm_head(predicted_positions(x, predict))
