"""Masked-language-model batches from a token stream (BERT's masking rule), deterministic by seed."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of positions the loss ignores (torch.nn.CrossEntropyLoss default)


def mask_tokens(seqs: torch.Tensor, generator: torch.Generator, mask_prob: float, mask_id: int,
                vocab_size: int, special_ids) -> tuple:
    """BERT masking of ``seqs`` (n, T) int64.

    Each non-special position is chosen with probability ``mask_prob``; a chosen position is
    replaced by ``mask_id`` with probability 0.8, by a uniformly random non-special id with
    probability 0.1, and kept with probability 0.1. Returns ``(input_ids, labels)``, both (n, T)
    int64: labels hold the original id where chosen and IGNORE_INDEX elsewhere.
    """
    special = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long)
    is_special = torch.isin(seqs, special)
    chosen = (torch.rand(seqs.shape, generator=generator) < mask_prob) & ~is_special
    action = torch.rand(seqs.shape, generator=generator)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    # Random replacements are drawn from the regular vocabulary only (never a special token).
    regular = torch.ones(vocab_size, dtype=torch.bool)
    regular[special[special < vocab_size]] = False
    regular_ids = regular.nonzero().squeeze(1)
    random_ids = regular_ids[torch.randint(len(regular_ids), seqs.shape, generator=generator)]
    input_ids = torch.where(to_mask, torch.full_like(seqs, mask_id), seqs)
    input_ids = torch.where(to_random, random_ids, input_ids)
    labels = torch.where(chosen, seqs, torch.full_like(seqs, IGNORE_INDEX))
    return input_ids, labels


def _as_sequences(token_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    if token_ids.dim() != 1 or token_ids.dtype != torch.long:
        raise ValueError(f"token_ids must be a 1-D int64 tensor, got {token_ids.dim()}-D "
                         f"{token_ids.dtype}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = token_ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"{token_ids.numel()} tokens do not fill one sequence of {seq_len}")
    return token_ids[: n * seq_len].reshape(n, seq_len)  # the tail shorter than seq_len is dropped


class MLMBatcher:
    """Batches for masked-language-model training from a token stream.

    The stream ``token_ids`` (1-D int64) is cut into ``len(self.sequences)`` consecutive windows of
    ``seq_len`` tokens (the tail is dropped). Iterating yields one epoch: the windows in a
    shuffled order, ``batch_size`` at a time (the last batch may be smaller), each masked by
    ``mask_tokens``, as ``(input_ids, labels)``, both (n, seq_len) int64 on the CPU. Epoch e's
    order and masks depend only on ``(seed, e)``; epochs advance on each iteration, or are set by
    ``set_epoch``.
    """

    def __init__(self, token_ids: torch.Tensor, seq_len: int, batch_size: int, *,
                 mask_id: int, vocab_size: int, special_ids, mask_prob: float = 0.15,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.sequences = _as_sequences(token_ids, seq_len)  # (num_sequences, seq_len)
        self.batch_size = batch_size
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.special_ids = tuple(special_ids)
        self.mask_prob = mask_prob
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.sequences) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.sequences), generator=g)
        for start in range(0, len(order), self.batch_size):
            seqs = self.sequences[order[start:start + self.batch_size]]
            yield mask_tokens(seqs, g, self.mask_prob, self.mask_id, self.vocab_size,
                              self.special_ids)


def mlm_eval_batches(token_ids: torch.Tensor, seq_len: int, batch_size: int, *, mask_id: int,
                     vocab_size: int, special_ids, mask_prob: float = 0.15,
                     seed: int = 0) -> list:
    """A fixed evaluation set: the windows of ``token_ids`` in stream order, masked once with a
    generator seeded by ``seed``, as a list of ``(input_ids, labels)`` (n, seq_len) int64 batches.
    The same arguments give the same list in every run, so evaluations are comparable."""
    seqs = _as_sequences(token_ids, seq_len)
    g = torch.Generator().manual_seed(seed)
    input_ids, labels = mask_tokens(seqs, g, mask_prob, mask_id, vocab_size, special_ids)
    return [(input_ids[i:i + batch_size], labels[i:i + batch_size])
            for i in range(0, len(seqs), batch_size)]
