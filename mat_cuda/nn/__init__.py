"""Masked-backward layers and in-place model conversion: where MAT's compute is really saved.

- :class:`Skipper`: module mask -> skipped backward compute (heads and whole-tensor modules).
- :func:`convert_attention` / :class:`ConvertedAttention`: head-aware attention blocks.
- :class:`WholeModuleSkipper`: requires_grad toggling (and detach) for whole-tensor modules.
- :func:`row_grouped_linear`, :func:`col_grouped_linear`: linear layers whose backward computes
  dW only for active row / column groups.
"""
from .attention import ConvertedAttention, HeadGroups, convert_attention
from .grouped_linear import col_grouped_linear, row_grouped_linear
from .skipper import Skipper
from .whole import WholeModuleSkipper

__all__ = ["Skipper", "ConvertedAttention", "HeadGroups", "convert_attention", "WholeModuleSkipper",
           "row_grouped_linear", "col_grouped_linear"]
