"""Masked-backward layers and in-place model conversion: where MAT's compute is really saved.

- :class:`Skipper`: module mask -> skipped backward compute (heads and whole-tensor modules).
- :func:`convert_attention` / :class:`ConvertedAttention`: head-aware attention blocks.
- :class:`WholeModuleSkipper`: requires_grad toggling (and detach) for whole-tensor modules.
- :func:`row_grouped_linear`, :func:`col_grouped_linear`: linear layers whose backward computes
  dW only for active row / column groups; :func:`active_rows_linear`, :func:`active_cols_linear`:
  their detach-mode variants (only the active part carries grad).
"""
from .attention import ConvertedAttention, HeadGroups, convert_attention
from .grouped_linear import active_cols_linear, active_rows_linear, col_grouped_linear, row_grouped_linear
from .skipper import Skipper
from .whole import WholeModuleSkipper

__all__ = ["Skipper", "ConvertedAttention", "HeadGroups", "convert_attention", "WholeModuleSkipper",
           "row_grouped_linear", "col_grouped_linear", "active_rows_linear", "active_cols_linear"]
