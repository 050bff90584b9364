"""BertEncoderMLM: a small BERT-style encoder with a masked-LM head, in plain PyTorch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .encoder import (Embeddings, EncoderLayer, FeedForward, MLMHead, init_bert_weights,
                      predicted_positions)


class BertEncoderMLM(nn.Module):
    """BERT-style encoder for masked language modelling.

    Module tree (what MAT's module discovery sees):
        embeddings.tokens, embeddings.positions, embeddings.norm
        layers[i].attn.{q,k,v} (qkv="separate") or layers[i].attn.qkv (qkv="packed"), layers[i].attn.o
        layers[i].attn_norm, layers[i].ffn.fc1, layers[i].ffn.fc2, layers[i].ffn_norm
        mlm_head.transform, mlm_head.norm, mlm_head.decoder (untied from the embedding)

    Post-LN layers (as BERT), GELU FFN, BERT initialisation (N(0, 0.02²)). dropout defaults to
    0 so that a sample's output depends only on the sample and the weights (MAT's per-sample
    Grams) and runs are deterministic.

    forward(input_ids (n, T) int64, attention_mask (n, T) bool/int or None, 1 = real token,
            predict (n, T) bool or None)
        -> logits (n, T, vocab_size) float; with ``predict``, logits (P, vocab_size) of the P
           positions where ``predict`` is True, in row-major order (those of ``labels[predict]``):
           the MLM head runs on the predicted positions only (as NVIDIA's BERT pre-training does),
           which on an 8k vocabulary removes most of the head's cost.
    """

    def __init__(self, vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                 ffn: int = 512, max_len: int = 128, dropout: float = 0.0, qkv: str = "separate"):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, ffn=ffn,
                           max_len=max_len, dropout=dropout, qkv=qkv)
        self.embeddings = Embeddings(vocab_size, hidden, max_len, dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(hidden, heads, dropout, qkv, FeedForward(hidden, ffn), "ffn") for _ in range(layers)
        )
        self.mlm_head = MLMHead(hidden, vocab_size)
        init_bert_weights(self)

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (n, T) int64 -> hidden states (n, T, hidden)."""
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                predict: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.mlm_head(predicted_positions(self.encode(input_ids, attention_mask), predict))

