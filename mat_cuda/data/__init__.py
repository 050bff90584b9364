"""Data for the benchmark suite, built from what is installed: nothing is ever downloaded.

- ``load_corpus``: text (embedded stdlib docs by default, or WikiText-style files);
- ``get_tokenizer``: a BPE trained locally and cached (with ``tokenizers``) or a byte tokenizer;
- ``MLMBatcher`` / ``mlm_eval_batches``: masked-language-model batches, BERT's 80/10/10 rule;
- ``load_images``: CIFAR-10 from disk or scikit-learn's digits upsampled to 32x32.
Every problem with the user's data raises ``DataError``.
"""
from .corpus import embedded_corpus, load_corpus
from .errors import DataError
from .images import ImageData, load_cifar10, load_images
from .mlm import IGNORE_INDEX, MLMBatcher, mask_tokens, mlm_eval_batches
from .tokenizer import (SPECIAL_TOKENS, BPETokenizer, ByteTokenizer, Tokenizer, bpe_available,
                        get_tokenizer)

__all__ = ["DataError", "load_corpus", "embedded_corpus", "Tokenizer", "ByteTokenizer",
           "BPETokenizer", "SPECIAL_TOKENS", "get_tokenizer", "bpe_available", "MLMBatcher",
           "mlm_eval_batches", "mask_tokens", "IGNORE_INDEX", "ImageData", "load_images",
           "load_cifar10"]
