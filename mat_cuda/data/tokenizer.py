"""Tokenizers for the text benchmarks, trained locally and cached: never downloaded.

Two kinds share one interface (``encode``, ``decode``, ``vocab_size`` and the special ids):
  - ``bpe``: a byte-level BPE trained on the corpus' train split with Hugging Face
    ``tokenizers`` (optional: ``pip install tokenizers``), saved in the cache folder under a key
    that hashes the corpus text and the settings, so a second run loads it instead of training;
  - ``byte``: UTF-8 bytes (ids 0-255) followed by the special tokens; needs nothing and no
    training, and is what ``auto`` picks when ``tokenizers`` is not installed.
Special tokens: [PAD] [UNK] [CLS] [SEP] [MASK]; read their ids from the tokenizer's attributes
(the byte tokenizer puts them at 256-260, the BPE at 0-4).
"""
from __future__ import annotations

import os
import re

import torch

from .cache import cache_dir as _cache_dir
from .cache import stable_hash
from .errors import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_BPE_VOCAB_SIZE = 8192


class Tokenizer:
    """Common interface. Attributes: ``kind`` (str), ``vocab_size`` (int, regular + special),
    ``pad_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id`` (int) and ``special_ids``
    (tuple of those five ids)."""

    kind = ""

    def __init__(self, vocab_size: int, special_id_of: dict):
        self.vocab_size = vocab_size
        self.pad_id = special_id_of["[PAD]"]
        self.unk_id = special_id_of["[UNK]"]
        self.cls_id = special_id_of["[CLS]"]
        self.sep_id = special_id_of["[SEP]"]
        self.mask_id = special_id_of["[MASK]"]
        self.special_ids = tuple(special_id_of[t] for t in SPECIAL_TOKENS)

    def encode(self, text: str) -> list:
        """``text`` -> list of int token ids (no special tokens added)."""
        raise NotImplementedError

    def decode(self, ids, skip_special: bool = True) -> str:
        """Token ids (list or 1-D tensor) -> text; special tokens are dropped when
        ``skip_special``, else written as their names."""
        raise NotImplementedError

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """A whole corpus split -> 1-D int64 tensor of ids, for ``MLMBatcher``. The text is
        encoded paragraph by paragraph (each with the blank line that ends it), which is what
        makes large corpora fast; the ids are the concatenation of those encodings."""
        return torch.tensor(self.encode(text), dtype=torch.long)

    def __repr__(self):
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, special tokens at 256-260; vocab_size 261. Lossless on any
    text; decode replaces byte sequences that are not valid UTF-8 (a cut multi-byte character)."""

    kind = "byte"

    def __init__(self):
        super().__init__(256 + len(SPECIAL_TOKENS),
                         {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)})

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        if not data:
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids, skip_special: bool = True) -> str:
        out, run = [], bytearray()
        for i in (int(i) for i in ids):
            if i < 256:
                run.append(i)
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            if not skip_special:
                out += [run.decode("utf-8", errors="replace"), SPECIAL_TOKENS[i - 256]]
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class BPETokenizer(Tokenizer):
    """A trained Hugging Face ``tokenizers`` byte-level BPE (see ``get_tokenizer``)."""

    kind = "bpe"

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer
        super().__init__(hf_tokenizer.get_vocab_size(),
                         {t: hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS})

    def encode(self, text: str) -> list:
        return self._tok.encode(text).ids

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        # Paragraphs keep their separator, so decoding the ids gives the text back.
        pieces = [p for p in re.split(r"(?<=\n\n)", text) if p]
        ids = [i for enc in self._tok.encode_batch(pieces) for i in enc.ids]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def bpe_available() -> bool:
    """Whether the optional Hugging Face ``tokenizers`` package is importable."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def get_tokenizer(kind: str = "auto", vocab_size: int = DEFAULT_BPE_VOCAB_SIZE,
                  corpus_train_text: str | None = None, cache_dir: str | None = None) -> Tokenizer:
    """A tokenizer of ``kind`` ``"auto"`` (``bpe`` when ``tokenizers`` is installed, else
    ``byte``), ``"bpe"`` or ``"byte"``.

    ``bpe`` is trained on ``corpus_train_text`` (required) to ``vocab_size`` entries (special
    tokens included) and cached as ``<cache_dir>/tokenizer-bpe-<key>.json``, the key hashing the
    text and the settings; ``cache_dir`` defaults to ``$MAT_CUDA_CACHE`` or ``~/.cache/mat_cuda``.
    ``byte`` ignores ``vocab_size`` and the text (its vocabulary is fixed: 261).
    Raises DataError when ``bpe`` is asked for and ``tokenizers`` is missing, ValueError on a
    bad ``kind`` or a missing text.
    """
    if kind not in ("auto", "bpe", "byte"):
        raise ValueError(f"tokenizer kind must be 'auto', 'bpe' or 'byte', got {kind!r}")
    if kind == "auto":
        kind = "bpe" if bpe_available() else "byte"
    if kind == "byte":
        return ByteTokenizer()
    if not bpe_available():
        raise DataError("the BPE tokenizer needs the Hugging Face `tokenizers` package: "
                        "pip install tokenizers (or use the byte tokenizer)")
    if corpus_train_text is None:
        raise ValueError("the BPE tokenizer is trained locally: pass corpus_train_text")
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"BPE vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (the byte "
                         f"alphabet plus specials), got {vocab_size}")
    from tokenizers import Tokenizer as HFTokenizer

    key = stable_hash("bpe-v1", str(vocab_size), ",".join(SPECIAL_TOKENS), corpus_train_text)[:24]
    path = os.path.join(_cache_dir(cache_dir), f"tokenizer-bpe-{key}.json")
    if os.path.isfile(path):
        return BPETokenizer(HFTokenizer.from_file(path))
    tok = _train_bpe(corpus_train_text, vocab_size)
    tmp = f"{path}.{os.getpid()}.tmp"
    tok.save(tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never reads a half-written file
    return BPETokenizer(tok)


def _train_bpe(text: str, vocab_size: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Train on paragraphs: the trainer's parallel pre-tokenisation works per input string.
    tok.train_from_iterator((p for p in text.split("\n\n") if p), trainer=trainer)
    return tok
