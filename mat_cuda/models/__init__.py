"""Small reference models in plain PyTorch (no mat_cuda imports), for benchmarks and tests.

- :class:`BertEncoderMLM` — BERT-style encoder with an MLM head; :func:`mlm_loss`.
- :class:`SwitchMoELM` — the same encoder with Switch (top-1) MoE FFNs and a load-balancing loss.
- :class:`VGGNet` — VGG-style CNN, BatchNorm off by default.
"""
from .bert import BertEncoderMLM
from .encoder import mlm_loss
from .moe import SwitchFFN, SwitchMoELM
from .vgg import VGGNet

__all__ = ["BertEncoderMLM", "SwitchMoELM", "SwitchFFN", "VGGNet", "mlm_loss"]
