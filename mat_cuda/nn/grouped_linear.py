"""Linear layers whose backward computes the weight gradient only for active row / column groups.

The forward is the plain ``F.linear`` with the full weight (outputs unchanged). The backward
gathers the active groups (``index_select``) and runs one GEMM of the reduced size, then writes
the result into a full-size gradient whose frozen groups are zero: the frozen groups' dW is never
computed, not computed and then masked. A fused masked optimizer skips the frozen groups anyway,
so zero rows are what it needs; a plain optimizer sees zero gradients there.

Two layouts, matching the ModuleMap's ``rows`` and ``cols`` layouts of attention heads:

- :func:`row_grouped_linear` (Q, K, V or packed QKV projections): head h owns output rows
  h·d_h … (h+1)·d_h. ``grad_rows`` lists the rows whose dW (and bias gradient) is computed.
  ``dx_rows`` (or None): the rows whose output gradient reaches the input. None means exact
  dX = dY·W; a row list means dX = dY[:, rows]·W[rows] (in ``detach`` mode the other rows'
  output gradient is zero by construction, so the result is the same at a fraction of the cost).
- :func:`col_grouped_linear` (output projection W_O): head h owns input columns
  h·d_h … (h+1)·d_h. ``grad_cols`` lists the columns whose dW is computed; the bias is shared
  by all heads and always gets its full gradient. ``dx_cols`` (or None): the input columns
  whose gradient is computed (the others get zero).

For ``detach`` mode two variants keep the active and the frozen groups apart from the start, so
no zero-filled gradient is scattered and gathered again, and no activation is gathered: only
weight rows / columns are (a weight is d_in / d_out times smaller than the activations of a
batch of tokens).

- :func:`active_rows_linear` returns (y_active, y_frozen): y_active = x W[rows]ᵀ + b[rows] (with
  grad), y_frozen = x W[frozen_rows]ᵀ + b[frozen_rows] (no grad): two GEMMs of the two sizes.
  Backward: dX = dY_a·W[rows] and dW[rows] = dY_aᵀ·x only.
- :func:`active_cols_linear` takes (x_active, x_frozen), the inputs of columns ``cols`` and
  ``frozen_cols``: y = x_active W[:, cols]ᵀ + x_frozen W[:, frozen_cols]ᵀ + b; the gradient
  reaches only x_active: dX_a = dY·W[:, cols], dW[:, cols] = dYᵀ·X_a.

Their outputs equal the full layer's to rounding (each output element is the same dot product,
but the GEMM blocking, and for the columns the order of the two partial sums, may differ: within
1e-6 relative in float32).

Index tensors are int64 on the weight's device, built once per mask update, so the step itself
never reads anything back to the host. A weight with no active group gets no gradient at all
(``None``: its ``.grad`` is not written).

The backward is not itself differentiable (double backward raises). Under autocast the forward casts x, W, b to the autocast dtype as ``nn.Linear`` would, and the
backward returns gradients in the original dtypes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def _autocast_inputs(x, weight, bias):
    """The (x, W, b) an autocast-enabled F.linear would use."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return x.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
    return x, weight, bias


class _GroupedLinear(torch.autograd.Function):
    """y = x Wᵀ + b, exactly F.linear's forward; subclasses give the grouped backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, grad_idx, dx_idx, dx_is_grad_idx=False):
        # x (..., d_in), weight (d_out, d_in), bias (d_out,) | None; grad_idx int64: the weight
        # rows (row groups) or columns (column groups) whose gradient is computed; dx_idx int64
        # (the rows/columns dX flows through) or None for exact dX; dx_is_grad_idx: dX flows
        # through grad_idx (passed once: torch.compile cannot trace a Function given the same
        # tensor twice).
        xc, wc, bc = _autocast_inputs(x, weight, bias)
        ctx.save_for_backward(xc, wc, grad_idx, dx_idx)
        ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x.dtype, weight.dtype, bias is not None
        ctx.dx_is_grad_idx = dx_is_grad_idx
        ctx.dx_exact = dx_idx is None and not dx_is_grad_idx
        return F.linear(xc, wc, bc)

    @staticmethod
    def saved(ctx):
        """(x, w, grad_idx, dx_idx) as saved by forward."""
        x, w, grad_idx, dx_idx = ctx.saved_tensors
        return x, w, grad_idx, (grad_idx if ctx.dx_is_grad_idx else dx_idx)


class _RowGroupedLinear(_GroupedLinear):
    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, grad_rows, dx_rows = _GroupedLinear.saved(ctx)
        d_out, d_in = w.shape
        x2 = x.reshape(-1, d_in)       # (N, d_in)
        dy2 = dy.reshape(-1, d_out)    # (N, d_out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.dx_exact or dx_rows.numel() == d_out:
                dx = dy2 @ w
            elif dx_rows.numel() == 0:
                dx = dy2.new_zeros(x2.shape)
            else:
                dx = dy2.index_select(1, dx_rows) @ w.index_select(0, dx_rows)
            dx = dx.reshape(x.shape).to(ctx.x_dtype)
        r = grad_rows.numel()
        if r > 0 and (ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])):
            full = r == d_out
            dy_a = dy2 if full else dy2.index_select(1, grad_rows)  # (N, r)
            if ctx.needs_input_grad[1]:
                dw_a = (dy_a.t() @ x2).to(ctx.w_dtype)               # (r, d_in): the only dW GEMM
                dw = dw_a if full else dw_a.new_zeros((d_out, d_in)).index_copy_(0, grad_rows, dw_a)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                db_a = dy_a.sum(0).to(ctx.w_dtype)
                db = db_a if full else db_a.new_zeros(d_out).index_copy_(0, grad_rows, db_a)
        return dx, dw, db, None, None, None


class _ColGroupedLinear(_GroupedLinear):
    # The bias is shared by all column groups: its gradient is always full.
    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w, grad_cols, dx_cols = _GroupedLinear.saved(ctx)
        d_out, d_in = w.shape
        x2 = x.reshape(-1, d_in)       # (N, d_in)
        dy2 = dy.reshape(-1, d_out)    # (N, d_out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            if ctx.dx_exact or dx_cols.numel() == d_in:
                dx = dy2 @ w
            else:
                dx = dy2.new_zeros(x2.shape)
                if dx_cols.numel() > 0:
                    dx.index_copy_(1, dx_cols, dy2 @ w.index_select(1, dx_cols))
            dx = dx.reshape(x.shape).to(ctx.x_dtype)
        c = grad_cols.numel()
        if ctx.needs_input_grad[1] and c > 0:
            if c == d_in:
                dw = (dy2.t() @ x2).to(ctx.w_dtype)
            else:
                dw_a = (dy2.t() @ x2.index_select(1, grad_cols)).to(ctx.w_dtype)  # (d_out, c)
                dw = dw_a.new_zeros((d_out, d_in)).index_copy_(1, grad_cols, dw_a)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(ctx.w_dtype)
        return dx, dw, db, None, None, None


class _ActiveRowsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows, frozen_rows):
        # x (..., d_in), weight (d_out, d_in), bias (d_out,) | None, rows int64 (r,), r > 0,
        # frozen_rows int64 (f,): the other rows (any order; f may be 0).
        xc, wc, bc = _autocast_inputs(x, weight, bias)
        w_a = wc.index_select(0, rows)                  # (r, d_in): gathered once, reused below
        y_a = F.linear(xc, w_a, None if bc is None else bc.index_select(0, rows))
        y_f = F.linear(xc, wc.index_select(0, frozen_rows),
                       None if bc is None else bc.index_select(0, frozen_rows))
        ctx.save_for_backward(xc, w_a, rows)
        ctx.d_out = wc.shape[0]
        ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x.dtype, weight.dtype, bias is not None
        ctx.mark_non_differentiable(y_f)
        return y_a, y_f

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_a, _dy_f):
        x, w_a, rows = ctx.saved_tensors
        d_in = w_a.shape[1]
        dy2 = dy_a.reshape(-1, rows.numel())           # (N, r)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ w_a).reshape(x.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw_a = (dy2.t() @ x.reshape(-1, d_in)).to(ctx.w_dtype)   # (r, d_in)
            dw = dw_a.new_zeros((ctx.d_out, d_in)).index_copy_(0, rows, dw_a)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db_a = dy2.sum(0).to(ctx.w_dtype)
            db = db_a.new_zeros(ctx.d_out).index_copy_(0, rows, db_a)
        return dx, dw, db, None, None


class _ActiveColsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_active, x_frozen, weight, bias, cols, frozen_cols):
        # x_active (..., c): the inputs of columns `cols` (with grad); x_frozen (..., f): those of
        # `frozen_cols` (no grad); weight (d_out, d_in), bias (d_out,) | None (shared: full
        # gradient), cols int64 (c,), frozen_cols int64 (f,).
        xc, wc, bc = _autocast_inputs(x_active, weight, bias)
        xf = x_frozen.to(xc.dtype)
        w_a = wc.index_select(1, cols)                  # (d_out, c)
        y_f = F.linear(xf, wc.index_select(1, frozen_cols), bc)
        # Out of place: FLOP counters (torch.utils.flop_counter, FlopMeter) know addmm, not addmm_.
        y = torch.addmm(y_f.reshape(-1, y_f.shape[-1]), xc.reshape(-1, cols.numel()),
                        w_a.t()).view(y_f.shape)
        ctx.save_for_backward(xc, w_a, cols)
        ctx.d_in = wc.shape[1]
        ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x_active.dtype, weight.dtype, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xa, w_a, cols = ctx.saved_tensors
        d_out = w_a.shape[0]
        dy2 = dy.reshape(-1, d_out)                     # (N, d_out)
        dxa = dw = db = None
        if ctx.needs_input_grad[0]:
            dxa = (dy2 @ w_a).reshape(xa.shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            dw_a = (dy2.t() @ xa.reshape(-1, cols.numel())).to(ctx.w_dtype)  # (d_out, c)
            dw = dw_a.new_zeros((d_out, ctx.d_in)).index_copy_(1, cols, dw_a)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(0).to(ctx.w_dtype)
        return dxa, None, dw, db, None, None


def active_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       rows: torch.Tensor, frozen_rows: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_active, y_frozen): y_active = x W[rows]ᵀ + b[rows] (..., r) with grad, y_frozen =
    x W[frozen_rows]ᵀ + b[frozen_rows] (..., f) without; backward computes dX and dW/db of
    ``rows`` only (detach mode).

    x (..., d_in) float, weight (d_out, d_in), bias (d_out,) or None, rows int64 (r,), r ≥ 1,
    frozen_rows int64 (f,), f ≥ 0 (the rows that are not in ``rows``, in the order wanted).
    """
    return _ActiveRowsLinear.apply(x, weight, bias, rows, frozen_rows)


def active_cols_linear(x_active: torch.Tensor, x_frozen: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor], cols: torch.Tensor,
                       frozen_cols: torch.Tensor) -> torch.Tensor:
    """y = x_active W[:, cols]ᵀ + x_frozen W[:, frozen_cols]ᵀ + b (..., d_out): the layer on an
    input whose columns ``cols`` are x_active (..., c) and ``frozen_cols`` are x_frozen (..., f).
    The gradient reaches x_active and dW of ``cols`` only; the bias gets its full gradient
    (detach mode); x_frozen is not differentiated.
    """
    return _ActiveColsLinear.apply(x_active, x_frozen, weight, bias, cols, frozen_cols)


def row_grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       grad_rows: torch.Tensor, dx_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x Wᵀ + b with dW, db computed only for ``grad_rows`` (see the module docstring).

    x (..., d_in) float, weight (d_out, d_in), bias (d_out,) or None, grad_rows int64 (r,)
    distinct row indices, dx_rows int64 (r',) or None (exact dX). Returns (..., d_out).
    """
    if dx_rows is grad_rows:
        return _RowGroupedLinear.apply(x, weight, bias, grad_rows, None, True)
    return _RowGroupedLinear.apply(x, weight, bias, grad_rows, dx_rows)


def col_grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       grad_cols: torch.Tensor, dx_cols: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x Wᵀ + b with dW computed only for input columns ``grad_cols`` (bias: full gradient).

    x (..., d_in) float, weight (d_out, d_in), bias (d_out,) or None, grad_cols int64 (c,)
    distinct column indices, dx_cols int64 (c',) or None (exact dX). Returns (..., d_out).
    """
    if dx_cols is grad_cols:
        return _ColGroupedLinear.apply(x, weight, bias, grad_cols, None, True)
    return _ColGroupedLinear.apply(x, weight, bias, grad_cols, dx_cols)
