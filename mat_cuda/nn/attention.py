"""Head-aware attention: an attention block converted in place so frozen heads cost less in backward.

:func:`convert_attention` replaces the block's ``forward`` (an instance attribute; the block's
parameters, submodules and state_dict are untouched, so an optimizer holding them is unaffected)
with one that, while some heads are frozen (styles ``mat_bert`` and ``torch_mha``; the HF styles
keep HF's forward, replace the projections' ``forward`` and split HF's attention call, see the
end):

- ``mode="exact"`` computes the Q/K/V (or packed QKV) projection with the full weight in one
  GEMM (forward unchanged) through :func:`row_grouped_linear`, whose backward computes dW and db
  only for the rows of active heads, and the output projection through
  :func:`col_grouped_linear`, whose backward computes dW only for the columns of active heads
  (W_O's bias is shared: full gradient); ``mode="detach"`` keeps the active and frozen heads
  apart from the projections on (:func:`active_rows_linear`: one GEMM on the active heads' rows
  with grad, one on the frozen heads' rows without; :func:`active_cols_linear` for W_O), so
  no activation is gathered or scattered by head;
- ``mode="detach"`` (the paper's partial back-propagation): the attention of frozen heads is
  computed under ``no_grad`` from their detached Q/K/V, so no gradient flows through frozen heads:
  their attention backward, their share of dX of the projections and their share of W_O's dX are
  never computed. The active heads' gradients are those of the same model with the frozen heads'
  Q/K/V detached.
- ``mode="exact"``: every head's attention backward runs, so dX is exactly the unconverted
  model's; only the frozen heads' weight gradients are skipped.

The forward equals the unconverted block's to rounding (the same ops on the same numbers; each
head's attention is computed in a smaller batch, and in detach mode the projections in two
GEMMs and W_O's product as two partial sums: within 1e-6 relative in float32). With dropout > 0 in
training the dropout draws differ in order from the unconverted block (same distribution).

When every head is active, or while probing (:meth:`ConvertedAttention.set_active` with
``probing=True``), the block runs its original forward: all factors and gradients are produced,
and hooks on its projection submodules fire, exactly as before conversion.

Styles (the AttentionSpec ``style`` of module discovery):

- ``"mat_bert"``: :class:`mat_cuda.models.encoder.SelfAttention` (separate q/k/v or packed qkv
  ``nn.Linear``, output ``nn.Linear`` o).
- ``"torch_mha"``: ``torch.nn.MultiheadAttention`` with packed in-projection (``q``, ``k``, ``v``,
  ``qkv`` are ignored: the weight is the block's ``in_proj_weight``; ``o`` is ``out_proj``).
  While heads are frozen only self-attention (query is key is value) with ``need_weights=False``
  is supported (what ``nn.TransformerEncoderLayer`` calls); anything else raises a clear error.

- ``"hf_bert"`` (HF BERT/RoBERTa: ``BertAttention`` with self.query/key/value ``nn.Linear``,
  output.dense as W_O), ``"hf_vit"`` (HF ViT: q_proj/k_proj/v_proj/o_proj ``nn.Linear``),
  ``"hf_gpt2"`` (``GPT2Attention``: c_attn Conv1D with weight (d, 3·H·d_h), a head's Q/K/V are
  COLUMN groups; c_proj Conv1D with weight (H·d_h, d), a head's W_O slice is ROWS). HF's own
  forward runs; the projection submodules' ``forward`` is replaced by the grouped linears above
  (a Conv1D y = x W + b is the linear with weight Wᵀ). While heads are frozen:

  * both modes: dW (and the Q/K/V bias gradient) of frozen heads is not computed;
  * ``detach``: HF's attention call (``attention_interface(module, q, k, v, mask, ...)``, q/k/v
    (n, H, T, d_h)) is split by heads like the styles above: the function HF would call (eager,
    sdpa, flash, ...: resolved from the config as HF does; GPT-2's reorder_and_upcast_attn
    variant included) runs on the active heads with grad and on the frozen heads under
    ``no_grad``; a mask with a head dimension > 1 is split with the heads. The output (n, T, H,
    d_h) and the weights (n, H, T, S), if the function returns them, are assembled in head
    order. So the frozen heads' attention backward, their share of the Q/K/V dX and of W_O's dX
    are not computed; the gradients are those of the model with the frozen heads' Q/K/V
    detached. How the call is routed: the block's ``forward`` is wrapped; for that forward
    only, the config of the module making the call (shared by every layer and maybe other
    models, so never changed) is replaced on that one module by a stand-in whose
    ``_attn_implementation`` is :data:`ROUTE_NAME`, a name registered in transformers'
    ``AttentionInterface`` while a converted block routes (from conversion to ``restore()``;
    the forward itself touches no global, so torch.compile traces it whole); the routed
    function puts the real config back before anything else. Blocks whose code does not
    make that call (transformers 4.x) warn at conversion and still run the frozen heads'
    attention backward (on zero gradients). The dropout draws differ in order from the
    unconverted block;
  * ``exact``: HF's attention call runs unchanged on every head; dX is the unconverted model's.

Other styles (``separate_linear``, ``packed_linear``: attention blocks of unknown code) are not
converted: a clear error (or left as they are with ``Skipper(strict=False)``).
"""
from __future__ import annotations

import functools
import math
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .._structure import is_conv1d_transposed
from .grouped_linear import (active_cols_linear, active_rows_linear, col_grouped_linear,
                             row_grouped_linear)

MODES = ("detach", "exact")
HF_STYLES = ("hf_bert", "hf_vit", "hf_gpt2")
STYLES = ("mat_bert", "torch_mha") + HF_STYLES


@dataclass
class HeadGroups:
    """Index tensors of one block's active heads on one device (built at a mask update).

    active, frozen (int64, head ids, ascending),
    rows (int64 (n_active·d_h,): rows of a (H·d_h)-row weight owned by the active heads; also the
    W_O columns), rows3 (int64 (3·n_active·d_h,): the same rows in each block of a packed [Q;K;V]),
    frozen_rows, frozen_rows3: the same for the frozen heads.
    """

    active_list: tuple[int, ...]
    active: torch.Tensor
    frozen: torch.Tensor
    rows: torch.Tensor
    rows3: torch.Tensor
    frozen_rows: torch.Tensor
    frozen_rows3: torch.Tensor

    @classmethod
    def build(cls, active: Sequence[bool], head_dim: int, device: torch.device) -> "HeadGroups":
        num_heads = len(active)
        width = num_heads * head_dim
        act = [h for h in range(num_heads) if active[h]]
        frz = [h for h in range(num_heads) if not active[h]]

        def rows_of(heads):
            return [h * head_dim + i for h in heads for i in range(head_dim)]

        def packed(rows):
            return [b * width + r for b in range(3) for r in rows]

        def t(v):
            return torch.tensor(v, dtype=torch.int64, device=device)

        rows, frozen_rows = rows_of(act), rows_of(frz)
        return cls(tuple(act), t(act), t(frz), t(rows), t(packed(rows)), t(frozen_rows),
                   t(packed(frozen_rows)))

    @property
    def device(self) -> torch.device:
        return self.rows.device


def _linear_weight(m: nn.Module, what: str, rows: int) -> None:
    if not isinstance(m, nn.Linear):
        raise TypeError(f"convert_attention: {what} must be an nn.Linear, got {type(m).__name__} "
                        "(for HF Conv1D projections use style 'hf_gpt2')")
    if m.weight.shape[0] != rows:
        raise ValueError(f"convert_attention: {what}.weight has {m.weight.shape[0]} rows, "
                         f"expected {rows} (num_heads · head_dim)")


class ConvertedAttention:
    """One attention block converted in place; see the module docstring.

    Attributes: block, style, num_heads, head_dim, mode, head_modules (ModuleMap id of head h).
    """

    def __init__(self, block: nn.Module, style: str, num_heads: int, head_dim: int, o: nn.Module,
                 head_modules: Sequence[int], mode: str):
        if mode not in MODES:
            raise ValueError(f"convert_attention: mode must be one of {MODES}, got {mode!r}")
        if len(head_modules) != num_heads:
            raise ValueError(f"convert_attention: {len(head_modules)} head_modules for {num_heads} heads")
        if "forward" in vars(block):
            raise ValueError(f"convert_attention: {type(block).__name__} is already converted "
                             "(its forward is replaced); restore() it first")
        self._check_out_projection(o, num_heads * head_dim)
        self.block, self.style, self.o = block, style, o
        self.num_heads, self.head_dim, self.mode = num_heads, head_dim, mode
        self.head_modules = [int(m) for m in head_modules]
        self.groups: Optional[HeadGroups] = None  # None: every head active
        self.probing = False
        block.forward = self.forward

    @staticmethod
    def _check_out_projection(o: nn.Module, width: int) -> None:
        _linear_weight(o, "o", o.weight.shape[0])
        if o.weight.shape[1] != width:
            raise ValueError(f"convert_attention: o.weight has {o.weight.shape[1]} columns, "
                             f"expected {width} (num_heads · head_dim)")

    def set_active(self, active_heads: Sequence[bool], probing: bool = False) -> None:
        """Host-side update at a mask change: active_heads[h] says whether head h trains.
        ``probing``: run the original forward (all heads active) until the next call."""
        if len(active_heads) != self.num_heads:
            raise ValueError(f"set_active: {len(active_heads)} flags for {self.num_heads} heads")
        self.probing = bool(probing)
        if all(active_heads):
            self.groups = None
        else:
            self.groups = HeadGroups.build([bool(a) for a in active_heads], self.head_dim,
                                           self.o.weight.device)

    def restore(self) -> None:
        """Undo the conversion: the block's class forward is used again."""
        vars(self.block).pop("forward", None)

    def original_forward(self, *args, **kwargs):
        return type(self.block).forward(self.block, *args, **kwargs)

    def current_groups(self) -> Optional[HeadGroups]:
        """The active heads' index tensors for this forward, or None: run as unconverted."""
        if self.groups is None or self.probing:
            return None
        if self.groups.device != self.o.weight.device:  # the model moved since the mask update
            active = [h in self.groups.active_list for h in range(self.num_heads)]
            self.groups = HeadGroups.build(active, self.head_dim, self.o.weight.device)
        return self.groups

    def forward(self, *args, **kwargs):
        if self.current_groups() is None:
            return self.original_forward(*args, **kwargs)
        return self.partial_forward(*args, **kwargs)

    def partial_forward(self, *args, **kwargs):
        raise NotImplementedError

    # ---- shared pieces (styles mat_bert, torch_mha) ----
    # _project_in -> _heads_attend -> _project_out pass a pair along: (None, the projections of
    # every head) in exact mode; (the active heads' part with grad | None, the frozen heads'
    # part without grad) in detach mode, heads ascending within each part.
    def _heads_attend(self, proj, n, t, attend):
        """The attention context of every head from ``_project_in``'s pair of (q, k, v) triples
        (each (n, T, h·d_h) for the h heads of its part). ``attend(q, k, v, heads)`` (each
        (n, h, T, d_h)) -> (n, h, T, d_h), on the head ids ``heads`` (None: all). Returns the
        pair of contexts ((n, T, h·d_h) each) that ``_project_out`` takes."""
        d, g = self.head_dim, self.groups
        proj_active, proj_rest = proj

        def heads_first(y):  # (n, T, h·d) -> (n, h, T, d)
            return y.view(n, t, -1, d).transpose(1, 2)

        def tokens_first(c):  # (n, h, T, d) -> (n, T, h·d)
            return c.transpose(1, 2).reshape(n, t, -1)

        if self.mode == "exact":  # every head's backward runs
            return None, tokens_first(attend(*(heads_first(y) for y in proj_rest), None))
        ctx_a = None
        if proj_active is not None:
            ctx_a = tokens_first(attend(*(heads_first(y) for y in proj_active), g.active))
        with torch.no_grad():  # frozen heads: no attention backward, no gradient through them
            ctx_f = tokens_first(attend(*(heads_first(y) for y in proj_rest), g.frozen))
        return ctx_a, ctx_f

    def _project_in(self, x, weight, bias, packed):
        """-> the pair of (q, k, v) triples _heads_attend takes (see above)."""
        g = self.groups
        width = self.num_heads * self.head_dim
        rows = g.rows3 if packed else g.rows
        if self.mode == "exact":
            y = row_grouped_linear(x, weight, bias, rows, None)
            return None, y.split(width, dim=-1)
        if g.active.numel() == 0:  # every head frozen: no grad through the projection
            with torch.no_grad():
                return None, F.linear(x, weight, bias).split(width, dim=-1)
        frozen_rows = g.frozen_rows3 if packed else g.frozen_rows
        y_a, y_f = active_rows_linear(x, weight, bias, rows, frozen_rows)
        return (y_a.split(g.active.numel() * self.head_dim, dim=-1),
                y_f.split(g.frozen.numel() * self.head_dim, dim=-1))

    def _project_out(self, ctx_active, ctx_rest):
        g = self.groups
        if self.mode == "exact":
            return col_grouped_linear(ctx_rest, self.o.weight, self.o.bias, g.rows, None)
        if ctx_active is None:  # every head frozen: only the shared bias trains
            return F.linear(ctx_rest, self.o.weight.detach(), self.o.bias)
        return active_cols_linear(ctx_active, ctx_rest, self.o.weight, self.o.bias, g.rows,
                                  g.frozen_rows)


class _MatBertAttention(ConvertedAttention):
    """mat_cuda.models.encoder.SelfAttention: forward(x (n, T, hidden), attention_mask (n, T))."""

    def __init__(self, block, num_heads, head_dim, o, head_modules, mode, q, k, v, qkv):
        width = num_heads * head_dim
        if qkv is not None:
            if any(m is not None for m in (q, k, v)):
                raise ValueError("convert_attention: give either q, k, v or qkv, not both")
            _linear_weight(qkv, "qkv", 3 * width)
        else:
            if any(m is None for m in (q, k, v)):
                raise ValueError("convert_attention: separate projections need q, k and v")
            for name, m in (("q", q), ("k", k), ("v", v)):
                _linear_weight(m, name, width)
        self.q, self.k, self.v, self.qkv = q, k, v, qkv
        super().__init__(block, "mat_bert", num_heads, head_dim, o, head_modules, mode)

    def partial_forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        n, t, _ = x.shape
        d = self.head_dim
        if self.qkv is not None:
            proj = self._project_in(x, self.qkv.weight, self.qkv.bias, packed=True)
        else:  # one (active, rest) pair of 1-tuples per projection -> one pair of (q, k, v)
            per = [self._project_in(x, m.weight, m.bias, packed=False) for m in (self.q, self.k, self.v)]
            proj = (None if per[0][0] is None else tuple(p[0][0] for p in per),
                    tuple(p[1][0] for p in per))
        dropout = self.block.dropout

        def attend(q, k, v, heads):  # the same ops as SelfAttention.forward, on a subset of heads
            scores = q @ k.transpose(-1, -2) / math.sqrt(d)
            if attention_mask is not None:
                keep = attention_mask.to(torch.bool)[:, None, None, :]
                scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            return dropout(scores.softmax(dim=-1)) @ v

        return self._project_out(*self._heads_attend(proj, n, t, attend))


class _TorchMHA(ConvertedAttention):
    """torch.nn.MultiheadAttention (packed in-projection, self-attention while heads are frozen)."""

    def __init__(self, block, num_heads, head_dim, o, head_modules, mode):
        if not isinstance(block, nn.MultiheadAttention):
            raise TypeError(f"convert_attention: style 'torch_mha' needs nn.MultiheadAttention, "
                            f"got {type(block).__name__}")
        if not block._qkv_same_embed_dim or block.in_proj_weight is None:
            raise ValueError("convert_attention: nn.MultiheadAttention with kdim/vdim != embed_dim "
                             "(separate q/k/v weights) is not supported")
        if block.bias_k is not None or block.add_zero_attn:
            raise ValueError("convert_attention: nn.MultiheadAttention with add_bias_kv or "
                             "add_zero_attn is not supported")
        if o is not block.out_proj:
            raise ValueError("convert_attention: for 'torch_mha', o must be the block's out_proj")
        if num_heads != block.num_heads or head_dim != block.head_dim:
            raise ValueError(f"convert_attention: num_heads/head_dim {num_heads}/{head_dim} disagree "
                             f"with the block's {block.num_heads}/{block.head_dim}")
        super().__init__(block, "torch_mha", num_heads, head_dim, o, head_modules, mode)

    def partial_forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False):
        blk = self.block
        if not (query is key and key is value):
            raise NotImplementedError("converted nn.MultiheadAttention with frozen heads supports "
                                      "self-attention only (query is key is value)")
        if need_weights:
            raise NotImplementedError("converted nn.MultiheadAttention with frozen heads does not "
                                      "return attention weights: call it with need_weights=False")
        x = query if blk.batch_first else query.transpose(0, 1)  # (n, T, E)
        n, t, _ = x.shape
        h = self.num_heads
        proj = self._project_in(x, blk.in_proj_weight, blk.in_proj_bias, packed=True)
        mask = _mha_mask(key_padding_mask, attn_mask, n, h, t, proj[1][0].dtype)  # (n, 1|H, T, T) or None
        causal = is_causal and mask is None
        p = blk.dropout if blk.training else 0.0

        def attend(q, k, v, heads):
            m = mask
            if m is not None and m.shape[1] != 1 and heads is not None:
                m = m.index_select(1, heads)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p, is_causal=causal)

        out = self._project_out(*self._heads_attend(proj, n, t, attend))
        return (out if blk.batch_first else out.transpose(0, 1)), None


def _weight_rows(m: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight as (d_out, d_in), bias) of an nn.Linear, or of a GPT-2 Conv1D (its weight is
    (d_in, d_out): the transposed view; autograd transposes its gradient back)."""
    return (m.weight.t() if is_conv1d_transposed(m) else m.weight), m.bias


def _projection(m: Optional[nn.Module], what: str, rows: int) -> nn.Module:
    """Check an HF projection: nn.Linear or Conv1D with ``rows`` outputs."""
    if m is None or not (isinstance(m, nn.Linear) or is_conv1d_transposed(m)):
        raise TypeError(f"convert_attention: {what} must be an nn.Linear or HF Conv1D, "
                        f"got {type(m).__name__}")
    d_out = _weight_rows(m)[0].shape[0]
    if d_out != rows:
        raise ValueError(f"convert_attention: {what} has {d_out} outputs, expected {rows} "
                         "(num_heads · head_dim, times 3 if packed)")
    if "forward" in vars(m):
        raise ValueError(f"convert_attention: {what} ({type(m).__name__}) is already converted")
    return m


class _HFProjections(ConvertedAttention):
    """HF BERT/RoBERTa, ViT, GPT-2 blocks: HF's forward runs, the projections are grouped and
    (``detach`` mode) the attention call is split by heads.

    q, k, v (or the packed qkv) and o get a ``forward`` instance attribute that calls
    :func:`row_grouped_linear` / :func:`col_grouped_linear` while heads are frozen and the
    module's class forward otherwise (all heads active, or probing). The block's ``forward`` is
    replaced by one that (``detach`` mode, heads frozen, not probing) routes the attention call
    of the module that owns the projections (the "core": BERT's ``block.self``, ViT's and
    GPT-2's block itself) to :meth:`_split_heads` for this forward only; otherwise it runs the
    block's class forward."""

    def __init__(self, block, style, num_heads, head_dim, o, head_modules, mode, q, k, v, qkv):
        width = num_heads * head_dim
        if style == "hf_gpt2":
            if qkv is None or any(m is not None for m in (q, k, v)):
                raise ValueError("convert_attention: style 'hf_gpt2' needs the packed qkv (c_attn) "
                                 "and no q, k, v")
            self.inputs = [(_projection(qkv, "qkv", 3 * width), True)]
        else:
            if qkv is not None or any(m is None for m in (q, k, v)):
                raise ValueError(f"convert_attention: style {style!r} needs q, k and v and no qkv")
            self.inputs = [(_projection(m, n, width), False) for n, m in (("q", q), ("k", k), ("v", v))]
        if "forward" in vars(o):
            raise ValueError(f"convert_attention: o ({type(o).__name__}) is already converted")
        core = _attention_core(block, self.inputs[0][0]) if mode == "detach" else None
        super().__init__(block, style, num_heads, head_dim, o, head_modules, mode)
        for m, packed in self.inputs:
            m.forward = functools.partial(self._in_forward, m, packed)
        o.forward = self._out_forward
        self.core = core  # None: the attention call is not split (exact mode, or no HF interface)
        # Released by restore(), or when the converted model is garbage-collected unrestored.
        self._route = None
        if core is not None:
            _route_acquire()
            self._route = weakref.finalize(self, _route_release)
            self._route.atexit = False  # nothing to undo in an interpreter that is exiting

    @staticmethod
    def _check_out_projection(o: nn.Module, width: int) -> None:
        if not (isinstance(o, nn.Linear) or is_conv1d_transposed(o)):
            raise TypeError(f"convert_attention: o must be an nn.Linear or HF Conv1D, got {type(o).__name__}")
        d_in = _weight_rows(o)[0].shape[1]
        if d_in != width:
            raise ValueError(f"convert_attention: o has {d_in} inputs, expected {width} "
                             "(num_heads · head_dim)")

    def forward(self, *args, **kwargs):
        if self.core is None or self.current_groups() is None:
            return self.original_forward(*args, **kwargs)
        # The core's config is shared by every layer (and maybe other models): it is replaced on
        # this one module, for this one forward, by a stand-in that names the route.
        config = self.core.config
        route = _HeadSplitRoute(config, self, _attention_function(self.core, config))
        self.core.config = route
        try:
            return self.original_forward(*args, **kwargs)
        finally:
            self.core.config = config

    def restore(self) -> None:
        for m, _ in self.inputs:
            vars(m).pop("forward", None)
        vars(self.o).pop("forward", None)
        if self._route is not None:
            self._route()  # a finalize object: releases once
        self.core = None
        super().restore()

    def _in_forward(self, m: nn.Module, packed: bool, x: torch.Tensor) -> torch.Tensor:
        # x (..., d) -> (..., H·d_h) or packed (..., 3·H·d_h); the same numbers as m(x).
        g = self.current_groups()
        if g is None:
            return type(m).forward(m, x)
        w, b = _weight_rows(m)
        rows = g.rows3 if packed else g.rows
        return row_grouped_linear(x, w, b, rows, rows if self.mode == "detach" else None)

    def _out_forward(self, ctx: torch.Tensor) -> torch.Tensor:
        # ctx (..., H·d_h): the heads' attention context -> (..., d).
        g = self.current_groups()
        if g is None:
            return type(self.o).forward(self.o, ctx)
        w, b = _weight_rows(self.o)
        return col_grouped_linear(ctx, w, b, g.rows, g.rows if self.mode == "detach" else None)

    def _split_heads(self, attend, module, query, key, value, attention_mask, **kwargs):
        """HF's attention call, split by heads: ``attend`` (the function HF would have called)
        on the active heads with grad, then on the frozen heads under ``no_grad``.

        query, key, value: (n, H, T | S, d_h) of every head; attention_mask: None, or a tensor
        broadcast over (n, H, T, S) (a head dimension > 1 is split with the heads).
        Returns (output (n, T, H, d_h), weights (n, H, T, S) | None) as ``attend`` does, heads in
        order; only the active heads' part carries grad."""
        g, h = self.groups, self.num_heads
        if any(t.dim() != 4 or t.shape[1] != h for t in (query, key, value)):
            raise NotImplementedError(f"converted {self.style} attention with frozen heads: query, key "
                                      f"and value must be (n, {h}, T, d_h) (one key/value head per "
                                      f"query head), got {tuple(query.shape)}, {tuple(key.shape)}, "
                                      f"{tuple(value.shape)}")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise NotImplementedError(f"converted {self.style} attention with frozen heads: attention "
                                      f"mask of type {type(attention_mask).__name__} is not supported "
                                      "(a tensor or None)")

        def heads(t, ids):
            return t.index_select(1, ids)

        def mask_of(ids):
            m = attention_mask
            return heads(m, ids) if m is not None and m.dim() == 4 and m.shape[1] != 1 else m

        out_a = w_a = None
        if g.active.numel() > 0:
            out_a, w_a = attend(module, *(heads(t, g.active) for t in (query, key, value)),
                                mask_of(g.active), **kwargs)
            _check_output(out_a, g.active.numel(), query.shape[2])
        with torch.no_grad():  # frozen heads: no attention backward, no gradient through them
            out_f, w_f = attend(module, *(heads(t, g.frozen) for t in (query, key, value)),
                                mask_of(g.frozen), **kwargs)
        if out_a is None:  # every head frozen: all in order already
            return out_f, w_f
        return _heads_in_order(out_a, out_f, 2, g, h), _heads_in_order(w_a, w_f, 1, g, h)


# ---- routing HF's attention call of one converted block to _HFProjections._split_heads ----
ROUTE_NAME = "mat_cuda_head_split"  # in transformers' AttentionInterface while a routing block exists
_route_lock = threading.Lock()
_routing_blocks = 0  # converted blocks whose attention call is routed (detach mode, HF styles)


def _route_acquire() -> None:
    """Register ROUTE_NAME (HF checks the name a config gives) for one more routing block.

    Registered from a block's conversion to its restore(), not per forward: the forward then
    holds no lock and touches no global, so torch.compile traces it without a graph break.
    Selected by a config other than a routed forward's stand-in, the route raises."""
    global _routing_blocks
    from transformers import AttentionInterface  # only HF blocks get here
    with _route_lock:
        if _routing_blocks == 0:
            AttentionInterface.register(ROUTE_NAME, _head_split_attention)
        _routing_blocks += 1


def _route_release() -> None:
    """One routing block fewer; the last one removes ROUTE_NAME from transformers."""
    global _routing_blocks
    from transformers import AttentionInterface
    with _route_lock:
        _routing_blocks -= 1
        if _routing_blocks == 0:  # no public unregister: the class-wide mapping it wrote to
            AttentionInterface._global_mapping.pop(ROUTE_NAME, None)


def _attention_core(block: nn.Module, proj: nn.Module) -> Optional[nn.Module]:
    """The module that owns the (first) input projection and makes HF's attention call through
    ``ALL_ATTENTION_FUNCTIONS`` with its ``config``; None (with a warning) if there is none."""
    core = next((m for m in block.modules() if any(c is proj for c in m.children())), None)
    code = sys.modules.get(type(core).__module__)
    if (core is None or "config" not in vars(core) or not hasattr(code, "ALL_ATTENTION_FUNCTIONS")
            or not hasattr(code, "eager_attention_forward")):
        warnings.warn(f"convert_attention: {type(block).__name__} does not make HF's attention-interface "
                      "call through the module owning its projections (transformers < 5?): its frozen "
                      "heads' attention backward still runs", stacklevel=4)
        return None
    return core


def _attention_function(core: nn.Module, config):
    """The attention function ``core`` calls under ``config`` (resolved as HF resolves it)."""
    code = sys.modules[type(core).__module__]
    impl = config._attn_implementation
    if impl == "eager" and getattr(core, "reorder_and_upcast_attn", False):  # GPT-2's own eager variant
        return lambda module, q, k, v, mask, **_: module._upcast_and_reordered_attn(q, k, v, mask)
    return code.ALL_ATTENTION_FUNCTIONS.get_interface(impl, code.eager_attention_forward)


class _HeadSplitRoute:
    """Stands in for a core module's config during its converted block's forward: its
    ``_attn_implementation`` names the route, every other attribute is the config's."""

    def __init__(self, config, handle: _HFProjections, attend):
        self._mat_config, self._mat_handle, self._mat_attend = config, handle, attend
        self._attn_implementation = ROUTE_NAME

    def __getattr__(self, name):
        return getattr(self._mat_config, name)


def _head_split_attention(module, query, key, value, attention_mask, **kwargs):
    """The function registered as ``ROUTE_NAME``: HF's attention call of a converted block."""
    route = module.config
    if not isinstance(route, _HeadSplitRoute):
        raise RuntimeError(f"attention implementation {ROUTE_NAME!r} is mat_cuda's route for converted "
                           "attention blocks; it cannot be selected in a config")
    module.config = route._mat_config  # the real config for whatever the attention function reads
    return route._mat_handle._split_heads(route._mat_attend, module, query, key, value, attention_mask,
                                          **kwargs)


def _check_output(out: torch.Tensor, num_heads: int, t: int) -> None:
    if out.dim() != 4 or out.shape[1] != t or out.shape[2] != num_heads:
        raise NotImplementedError(f"converted HF attention: the attention function returned "
                                  f"{tuple(out.shape)}, expected (n, {t}, {num_heads}, d_h)")


def _heads_in_order(active, frozen, dim: int, g: HeadGroups, num_heads: int):
    """The active and frozen heads' parts (heads along ``dim``) -> every head, in order, in one
    new tensor; only the active part carries grad. None if the parts are (weights not returned)."""
    if active is None:
        return None
    shape = list(active.shape)
    shape[dim] = num_heads
    out = active.new_empty(shape)
    with torch.no_grad():
        out.index_copy_(dim, g.frozen, frozen)
    return out.index_copy_(dim, g.active, active)  # autograd: the active part's gradient, selected


def _mha_mask(key_padding_mask, attn_mask, n, h, t, dtype):
    """MHA's key_padding_mask (n, S) and attn_mask (T, S) | (n·H, T, S), bool (True = masked) or
    additive float, merged into one additive float mask (n, 1|H, T, S), or None."""
    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        return m.to(dtype)

    out = None
    if attn_mask is not None:
        am = additive(attn_mask)
        out = am.view(1, 1, t, t) if am.dim() == 2 else am.view(n, h, t, t)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(n, 1, 1, t)
        out = kp if out is None else out + kp
    return out


def convert_attention(block: nn.Module, *, num_heads: int, head_dim: int, o: nn.Module,
                      head_modules: Sequence[int], style: str = "mat_bert", mode: str = "detach",
                      q: Optional[nn.Module] = None, k: Optional[nn.Module] = None,
                      v: Optional[nn.Module] = None, qkv: Optional[nn.Module] = None) -> ConvertedAttention:
    """Convert one attention block in place (the fields of module discovery's AttentionSpec).

    block: the attention module; num_heads, head_dim: its head layout; q, k, v (separate
    ``nn.Linear`` (H·d_h → …) each) or qkv (packed ``nn.Linear``, rows [Q; K; V]); o: output
    ``nn.Linear`` (columns of head h = h·d_h … (h+1)·d_h); head_modules: ModuleMap id of head h;
    style: one of :data:`STYLES` (for ``"hf_gpt2"`` qkv and o are Conv1D); mode: ``"detach"``
    or ``"exact"``.
    Returns the :class:`ConvertedAttention` handle (all heads active until ``set_active``).
    """
    if style == "mat_bert":
        return _MatBertAttention(block, num_heads, head_dim, o, head_modules, mode, q, k, v, qkv)
    if style == "torch_mha":
        return _TorchMHA(block, num_heads, head_dim, o, head_modules, mode)
    if style in HF_STYLES:
        return _HFProjections(block, style, num_heads, head_dim, o, head_modules, mode, q, k, v, qkv)
    raise NotImplementedError(f"convert_attention: style {style!r} is not converted (supported: "
                              f"{STYLES}); its heads are skipped by the optimizer only")
