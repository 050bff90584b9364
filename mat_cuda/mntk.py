"""MNTKProbe: hooks that feed layer factors to the Gram kernels and return per-module mNTKs.

A probe watches the layers whose parameters a :class:`~mat_cuda.modules.ModuleMap` covers. For
a probe batch of n samples it returns K, float32 (M, n, n) on the model's device, where K[m] is
the Gram of the per-sample gradients of module m (DESIGN.md, "The math, precisely"):

    K[m]_ij = ⟨g_i, g_j⟩,  g_i = the gradient w.r.t. θ_m of sample i's scalar (see ``mode``)

computed from layer factors (inputs A, output gradients B) by :mod:`mat_cuda.gram`, never by
per-sample autograd. Usage::

    probe = MNTKProbe(model, module_map)                    # mode "loss"
    probe.begin()                                           # before a training step's forward
    loss = criterion(model(x), y); loss.backward()          # the step's own backward
    K = probe.gram()                                        # (M, n, n), factors freed

    with MNTKProbe(model, module_map, mode="output", projections=4) as probe:
        K = probe.measure(x)                                # own backward passes, .grad untouched

Modes:

- ``"loss"``: row i is ∇θ_m ℓ_i, sample i's own loss term, read from the training backward (no
  extra pass). The batch loss must be L = Σ_i w_i ℓ_i; the probe rescales the factors by 1/w_i.
  ``loss_reduction="mean"``: w_i = 1/n; ``"sum"``: w_i = 1; or pass ``loss_weights`` to
  :meth:`begin` (a float, or a (n,) tensor). Token-level means, e.g. a masked-LM loss
  L = Σ_{i,t} l_it / N over the N masked tokens of the batch: with ``"mean"`` sample i's term is
  ℓ_i = (n / N) Σ_t l_it (its share of L times n, so that L is the mean of the ℓ_i); to use the
  sample's own token mean ℓ_i = Σ_t l_it / N_i instead, pass ``loss_weights = N_i / N`` ((n,)
  tensor). A loss scaled by a GradScaler factor S needs ``loss_weights = S / n`` likewise.
- ``"output"``: k = ``projections`` random vectors v_r (Rademacher, shared by the samples, so
  E[v vᵀ] = I over the output of one sample); row i of projection r is ∇θ_m ⟨v_r, f(x_i)⟩ and
  K = (1/k) Σ_r G⁽ʳ⁾ G⁽ʳ⁾ᵀ, an unbiased estimate of Σ_o J_o J_oᵀ. f(x_i) is all of sample i's
  outputs (e.g. every position's logits for an (n, T, V) output). k backward passes.
- ``"logit_sum"``: row i is ∇θ_m Σ_o f_o(x_i). One backward pass.

The output modes run :meth:`measure`: a forward on the probe batch and backward passes by
``torch.autograd.grad`` to the layer outputs only, so no parameter's ``.grad`` is touched (the
managed parameters are made to require grad for the pass and restored after, so frozen modules
are measured too). The model's train/eval mode is left as it is.

Supported layers (a managed parameter anywhere else is reported by name when the probe is built):
``nn.Linear`` (and subclasses computing y = x Wᵀ + b; any leading dims, dim 0 the sample axis;
weight layouts whole, row groups and column groups, so packed QKV, separate Q/K/V and W_O head
slices all map to head modules), ``nn.Conv2d`` (groups=1; any stride, padding, padding mode,
dilation; unfolded to the linear case with T = output positions; weight whole or output-channel
row groups), Hugging Face GPT-2 ``Conv1D`` (weight (d_in, d_out): rows group input features,
columns output features), ``nn.Embedding`` (whole weight; padding_idx respected;
scale_grad_by_freq rejected since it mixes samples) and the elementwise affine parameters of
``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and eval-mode ``nn.BatchNorm*d`` (through
their explicit per-sample gradients).

``probe_size=p`` keeps only the first p samples of each batch: the hooks slice every layer's
input and output gradient to its first p rows, so K is (M, p, p) and the Gram cost falls with p²
(the backward itself is unchanged). The loss weights keep referring to the whole batch (w_i = 1/n
for ``"mean"`` with n the full batch). A batch with fewer than p samples raises in the forward.

Per-sample independence is assumed. A BatchNorm that normalises with batch statistics (training
mode, or track_running_stats=False) anywhere in the model mixes samples: :meth:`begin` and
:meth:`measure` raise. A hooked layer called twice in one forward (weight sharing, activation
checkpointing) raises, as does an input modified in place between forward and backward. One
probe is one forward and one backward: to add several batches pass the running K as ``out``.
Routed layers (mixture-of-experts): a Switch expert gets a flat gather (N_routed, d) of the
tokens routed to it, with no sample axis. When a hooked ``nn.Linear`` or ``Conv1D`` (or any
module above it) carries ``routed_tokens = (idx, (n, T))`` at its forward (the protocol of
:class:`mat_cuda.models.SwitchFFN`: idx (N_routed,) int64, the flat position i·T + s of each
row's token), the probe reads it at the forward hook, keeps idx with the layer's input, and at
the backward scatters A (N_routed, d_in) and B (N_routed, d_out) by ``index_copy_`` into
zero-filled (n·T, d) tensors viewed as (n, T, d). Zero rows add nothing to g_i = Σ_s b_is a_isᵀ,
so the per-sample Grams are exact (dropped tokens and other samples' tokens are zero rows). An
expert that gets no token in a forward is not called and adds zero. Cost: an expert's factors
are padded to n·T rows (E experts: E times the rows of a dense FFN) for its Gram.
In mode ``"loss"`` a module the training backward does not reach (e.g. frozen and below every
trainable layer) gets zeros; measure it in an output mode, which makes the managed parameters
require grad for its own pass.

Memory: between the forward and the backward the probe holds each hooked layer's input (a
detached reference, no copy; Conv2d inputs are unfolded only when their gradient arrives). In
``"loss"`` mode each layer's Gram is accumulated as soon as its output gradient arrives and its
factors are dropped; :meth:`gram` and :meth:`measure` release everything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import gram as _gram
from .modules import ModuleMap, ParamLayout

__all__ = ["MNTKProbe"]

MODES = ("loss", "output", "logit_sum")
LOSS_REDUCTIONS = ("mean", "sum")

# Containers whose projections bypass their submodules' __call__ (fused kernels), so hooks on
# their Linear children would never fire (or only sometimes: the encoder fast path).
_OPAQUE_CONTAINERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                      nn.TransformerDecoderLayer)


# ---- the Gram calls one layer needs -------------------------------------------------------------

@dataclass(frozen=True)
class _Grouping:
    """One Gram-op call's grouping: which axis is grouped, group size (None = one group), modules."""
    group_dim: int
    group_size: int | None
    group_module: tuple[int, ...]


@dataclass
class _Call:
    grouping: _Grouping
    weight: bool
    bias: bool
    group_module_on: dict = field(default_factory=dict)   # device -> int64 tensor (cached)

    def modules(self, device: torch.device) -> torch.Tensor:
        t = self.group_module_on.get(device)
        if t is None:
            t = torch.tensor(self.grouping.group_module, dtype=torch.int64, device=device)
            self.group_module_on[device] = t
        return t


def _unsupported(path: str, what: str) -> ValueError:
    return ValueError(f"MNTKProbe: layer '{path}': {what}")


def _linear_grouping(lay: ParamLayout, path: str, pname: str, transposed: bool,
                     rows_only: bool) -> _Grouping:
    """Grouping of a weight in linear_gram_ terms (group_dim 0 = output features, 1 = input)."""
    if lay.kind == "whole":
        return _Grouping(0, None, (lay.module,))
    if rows_only and lay.kind == "cols":
        raise _unsupported(path, f"{pname} has column groups ({lay.name}); only whole or "
                                 "output-channel row groups are supported for this layer")
    out_axis = "cols" if transposed else "rows"
    return _Grouping(0 if lay.kind == out_axis else 1, lay.group_size, lay.group_module)


def _bias_grouping(lay: ParamLayout) -> _Grouping:
    # A 1-D bias: row and column groups are the same thing.
    if lay.kind == "whole":
        return _Grouping(0, None, (lay.module,))
    return _Grouping(0, lay.group_size, lay.group_module)


def _linear_calls(w_lay, b_lay, path, transposed=False, rows_only=False) -> list[_Call]:
    wg = None if w_lay is None else _linear_grouping(w_lay, path, "weight", transposed, rows_only)
    bg = None if b_lay is None else _bias_grouping(b_lay)
    if wg is not None and wg == bg:
        calls = [_Call(wg, weight=True, bias=True)]
    else:
        calls = ([] if wg is None else [_Call(wg, weight=True, bias=False)]) + \
                ([] if bg is None else [_Call(bg, weight=False, bias=True)])
    return [c for c in calls if any(m >= 0 for m in c.grouping.group_module)]


def _flat_grouping(lay: ParamLayout, shape: torch.Size, path: str, pname: str) -> _Grouping:
    """Grouping of a flattened elementwise parameter's explicit per-sample gradient."""
    if lay.kind == "whole":
        return _Grouping(1, None, (lay.module,))
    if lay.kind == "cols" and len(shape) > 1:
        raise _unsupported(path, f"{pname} has column groups ({lay.name}) on a "
                                 f"{len(shape)}-d parameter; only whole or row groups are supported")
    return _Grouping(1, lay.group_size * math.prod(shape[1:]), lay.group_module)


def _norm_calls(layer, w_lay, b_lay, path) -> list[tuple[str, _Call]]:
    """(which, call) pairs: which is "weight", "bias" or "both" (weight then bias columns)."""
    wg = None if w_lay is None else _flat_grouping(w_lay, layer.weight.shape, path, "weight")
    bg = None if b_lay is None else _flat_grouping(b_lay, layer.bias.shape, path, "bias")
    if wg is not None and bg is not None and wg.group_size is None and wg == bg:
        out = [("both", _Call(wg, True, True))]
    else:
        out = ([] if wg is None else [("weight", _Call(wg, True, False))]) + \
              ([] if bg is None else [("bias", _Call(bg, False, True))])
    return [(w, c) for w, c in out if any(m >= 0 for m in c.grouping.group_module)]


# ---- layer kinds --------------------------------------------------------------------------------

def _is_hf_conv1d(layer: nn.Module) -> bool:
    # Hugging Face's GPT-2 Conv1D: y = x @ W + b, W of shape (nx, nf). Matched by name and shape
    # so transformers need not be imported.
    w = getattr(layer, "weight", None)
    return (type(layer).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(layer, "nf", None) == w.shape[1])


def _is_batchnorm(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.batchnorm._BatchNorm)


def _layer_kind(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Linear):
        return "linear"
    if _is_hf_conv1d(layer):
        return "conv1d"
    if isinstance(layer, nn.Conv2d):
        return "conv2d"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    if isinstance(layer, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or _is_batchnorm(layer):
        return "norm"
    return None


_KNOWN_PARAMS = ("weight", "bias")


class _ProbedLayer:
    """One hooked layer: where it is, what it is, the Gram calls its layouts need, and the
    factors of the probe in flight (input A, its version, the output's gradient edge)."""

    def __init__(self, path: str, layer: nn.Module, kind: str, module_map: ModuleMap):
        self.path, self.layer, self.kind = path, layer, kind
        lay = {n: module_map.layout(p) for n, p in layer.named_parameters(recurse=False)}
        extra = [n for n, l in lay.items() if l is not None and n not in _KNOWN_PARAMS]
        if extra:
            raise _unsupported(path, f"managed parameter(s) {extra} of {type(layer).__name__} "
                                     "are not supported (only weight and bias)")
        w_lay, b_lay = lay.get("weight"), lay.get("bias")
        self.calls: list = []
        if kind == "linear":
            self.calls = _linear_calls(w_lay, b_lay, path)
        elif kind == "conv1d":
            self.calls = _linear_calls(w_lay, b_lay, path, transposed=True)
        elif kind == "conv2d":
            if layer.groups != 1:
                raise _unsupported(path, f"Conv2d with groups={layer.groups}; only groups=1 "
                                         "is supported")
            self.calls = _linear_calls(w_lay, b_lay, path, rows_only=True)
        elif kind == "embedding":
            if w_lay is not None and w_lay.kind != "whole":
                raise _unsupported(path, f"Embedding weight has {w_lay.kind} groups "
                                         f"({w_lay.name}); only a whole-weight module is supported")
            if layer.scale_grad_by_freq:
                raise _unsupported(path, "Embedding(scale_grad_by_freq=True) scales gradients by "
                                         "batch-wide counts, which mixes samples")
            self.calls = [] if w_lay is None else [w_lay.module]
        else:
            self.calls = _norm_calls(layer, w_lay, b_lay, path)
        self.reset()

    def reset(self) -> None:
        self.input = None          # detached layer input (indices for Embedding)
        self.routed = None         # (idx (N_routed,) int64, n, T) of a routed (MoE expert) call
        self.samples = 0           # sample rows of K this call's factors cover (after probe_size)
        self.input_version = None
        self.batch_size = 0        # samples of the layer input before probe_size slicing
        self.edge = None           # output-mode: gradient edge of the layer output
        self.calls_seen = 0        # forward calls during the current probe

    # ---- factors ----
    def _check_input_unchanged(self) -> torch.Tensor:
        x = self.input
        if x._version != self.input_version:
            raise RuntimeError(f"MNTKProbe: the input of layer '{self.path}' was modified in "
                               "place between its forward and backward; its factors are lost")
        return x

    def accumulate(self, K: torch.Tensor, grad_out: torch.Tensor, scale: float,
                   row_scale: torch.Tensor | None, algorithm: str) -> None:
        """K += scale · this layer's module Grams from its stored input and ``grad_out``.

        row_scale: optional (n,) or 0-d factor applied to sample i's gradient (loss weights)."""
        x = self._check_input_unchanged()
        n = K.shape[1]
        if self.routed is not None:
            x, grad_out = self._scatter_routed(x, grad_out)
            x = x[:n]   # probe_size: the first samples only
        if grad_out.dim() and grad_out.shape[0] == self.batch_size and x.shape[0] < self.batch_size:
            grad_out = grad_out[: x.shape[0]]   # probe_size: the first samples only
        if x.dim() == 0 or x.shape[0] != n or grad_out.shape[0] != n:
            raise RuntimeError(f"MNTKProbe: layer '{self.path}' saw input {tuple(x.shape)} and "
                               f"output gradient {tuple(grad_out.shape)}, expected the sample "
                               f"axis (dim 0) of size n={n}")
        if row_scale is not None:
            if row_scale.dim() == 1:
                row_scale = row_scale.view((n,) + (1,) * (grad_out.dim() - 1))
            grad_out = grad_out * row_scale.to(grad_out.dtype)
        if self.kind in ("linear", "conv1d", "conv2d"):
            A, B = self._linear_factors(x, grad_out)
            dev = K.device
            for c in self.calls:
                _gram.linear_gram_(K, A, B, c.modules(dev), group_dim=c.grouping.group_dim,
                                   group_size=c.grouping.group_size, weight=c.weight,
                                   bias=c.bias, scale=scale, algorithm=algorithm, validate=False)
        elif self.kind == "embedding":
            idx = x if x.dim() > 1 else x.unsqueeze(1)
            B = grad_out.reshape(n, -1, grad_out.shape[-1])
            if idx.dim() > 2:
                idx = idx.reshape(n, -1)
            # "auto" counts the batch's distinct ids (a host synchronisation on CUDA); on CUDA
            # the probe takes the sync-free form instead (docs/gpu.md).
            if algorithm == "auto" and K.device.type == "cuda":
                algorithm = "sync_free"
            _gram.embedding_gram_(K, idx.contiguous(), B.contiguous(), self.calls[0],
                                  padding_idx=self.layer.padding_idx, scale=scale,
                                  algorithm=algorithm, num_embeddings=self.layer.num_embeddings)
        else:
            gw, gb = self._norm_grads(x, grad_out)
            dev = K.device
            for which, c in self.calls:
                G = {"weight": gw, "bias": gb}.get(which)
                if G is None:
                    G = torch.cat([gw, gb], dim=1)
                _gram.sample_gram_(K, G.contiguous(), c.modules(dev),
                                   group_size=c.grouping.group_size, scale=scale, validate=False)

    def _scatter_routed(self, x: torch.Tensor, gy: torch.Tensor):
        """Routed rows x (N_routed, d_in), gy (N_routed, d_out) -> (n, T, d_in), (n, T, d_out),
        zero where a token was not routed to this layer."""
        idx, n, t = self.routed

        def scatter(rows: torch.Tensor) -> torch.Tensor:
            full = rows.new_zeros(n * t, rows.shape[-1])
            return full.index_copy_(0, idx, rows).view(n, t, -1)

        return scatter(x), scatter(gy)

    def _linear_factors(self, x: torch.Tensor, gy: torch.Tensor):
        """(A, B): (n, T, d_in) and (n, T, d_out), or 2-D without a sequence axis."""
        n = x.shape[0]
        if self.kind == "conv2d":
            A = self._unfold(x)                                       # (n, L, C_in·kh·kw)
            B = gy.reshape(n, gy.shape[1], -1).transpose(1, 2)        # (n, L, C_out)
        elif x.dim() <= 2:
            A, B = x, gy
        else:
            A, B = x.reshape(n, -1, x.shape[-1]), gy.reshape(n, -1, gy.shape[-1])
        if A.dtype != B.dtype:
            # Under autocast the layer multiplied in B's (lower) precision: use what it used.
            A = A.to(B.dtype)
        return A.contiguous(), B.contiguous()

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.layer
        if x.dim() != 4:
            raise RuntimeError(f"MNTKProbe: Conv2d '{self.path}' got input {tuple(x.shape)}; "
                               "the probe needs a batched (n, C, H, W) input")
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        else:
            padding = conv.padding
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding,
                        stride=conv.stride)                           # (n, C_in·kh·kw, L)
        return cols.transpose(1, 2)

    def _norm_grads(self, x: torch.Tensor, gy: torch.Tensor):
        """Explicit per-sample gradients (n, numel(weight)) and (n, numel(bias)) (None if absent)."""
        layer, n = self.layer, x.shape[0]
        x = x.to(gy.dtype) if x.dtype != gy.dtype else x
        if isinstance(layer, nn.LayerNorm):
            xhat = F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)
            feat = len(layer.normalized_shape)
            reduce = tuple(range(1, x.dim() - feat))
        elif isinstance(layer, nn.RMSNorm):
            xhat = F.rms_norm(x, layer.normalized_shape, None, layer.eps)
            feat = len(layer.normalized_shape)
            reduce = tuple(range(1, x.dim() - feat))
        elif isinstance(layer, nn.GroupNorm):
            xhat = F.group_norm(x, layer.num_groups, None, None, layer.eps)
            reduce = tuple(range(2, x.dim()))
        else:  # eval-mode BatchNorm: running statistics, per channel (dim 1)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            xhat = (x - layer.running_mean.view(shape).to(x.dtype)) * torch.rsqrt(
                layer.running_var.view(shape).to(x.dtype) + layer.eps)
            reduce = tuple(range(2, x.dim()))

        def per_sample(t):
            t = t.sum(dim=reduce) if reduce else t
            return t.reshape(n, -1)

        gw = per_sample(gy * xhat) if layer.weight is not None else None
        gb = per_sample(gy) if getattr(layer, "bias", None) is not None else None
        return gw, gb


# ---- the probe ----------------------------------------------------------------------------------

class MNTKProbe:
    """Per-module mNTK of a probe batch from layer hooks (see the module docstring).

    Args:
        model: the ``nn.Module``; dim 0 of every hooked layer's input is the sample axis.
        module_map: the :class:`~mat_cuda.modules.ModuleMap` partitioning the model's parameters;
            every mapped parameter must belong to a supported layer of ``model`` (else ValueError
            naming the layer).
        mode: ``"loss"`` (default), ``"output"`` or ``"logit_sum"``.
        projections: k, the number of random output projections of mode ``"output"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the batch loss sums the per-sample terms
            (mode ``"loss"``; :meth:`begin` can override it per batch with ``loss_weights``).
        algorithm: ``"auto"``, ``"ghost"`` or ``"explicit"``, passed to
            :func:`mat_cuda.gram.linear_gram_` and :func:`mat_cuda.gram.embedding_gram_`.
            ``"auto"`` on CUDA takes ``"sync_free"`` for embeddings (their ``"auto"`` counts the
            batch's distinct ids: one host synchronisation per embedding layer per probe).
        generator: optional ``torch.Generator`` for the projections of mode ``"output"``.
        probe_size: None (every sample) or p ≥ 1: K covers the first p samples of each batch.
        defer_errors: mode "loss" only. False (default): an exception while a layer's Gram is
            accumulated (an out-of-memory, a kernel error, a probe check) is raised from the
            backward that triggered it. True: it is kept, the rest of that backward runs without
            the probe (the parameters' gradients are complete), and :meth:`gram` raises it. MAT
            sets this so that a failed probe never aborts a training step.

    The hooks are installed at construction and removed by :meth:`close` (or leaving a
    ``with`` block). They record only while a probe is in flight (between :meth:`begin` and
    :meth:`gram`, or inside :meth:`measure`); otherwise they return at once. Build the probe
    after the module map is complete: the Gram calls of each layer are planned here.
    """

    def __init__(self, model: nn.Module, module_map: ModuleMap, mode: str = "loss", *,
                 projections: int = 1, loss_reduction: str = "mean", algorithm: str = "auto",
                 generator: torch.Generator | None = None, probe_size: int | None = None,
                 defer_errors: bool = False):
        if mode not in MODES:
            raise ValueError(f"MNTKProbe: mode must be one of {MODES}, got {mode!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"MNTKProbe: loss_reduction must be one of {LOSS_REDUCTIONS}, "
                             f"got {loss_reduction!r}")
        if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
            raise ValueError(f"MNTKProbe: projections must be an int >= 1, got {projections!r}")
        if algorithm not in ("auto", "ghost", "explicit"):
            raise ValueError(f"MNTKProbe: algorithm must be 'auto', 'ghost' or 'explicit', "
                             f"got {algorithm!r}")
        if probe_size is not None and (isinstance(probe_size, bool) or not isinstance(probe_size, int)
                                       or probe_size < 1):
            raise ValueError(f"MNTKProbe: probe_size must be None or an int >= 1, got {probe_size!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"MNTKProbe: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(module_map, ModuleMap):
            raise TypeError(f"MNTKProbe: module_map must be a ModuleMap, got "
                            f"{type(module_map).__name__}")
        self.model, self.module_map, self.mode = model, module_map, mode
        self.projections, self.loss_reduction = projections, loss_reduction
        self.algorithm, self.generator = algorithm, generator
        self.probe_size = probe_size
        module_map.validate(params=list(model.parameters()))
        self._layers = self._find_layers()
        self._batchnorms = [(p, m) for p, m in model.named_modules() if _is_batchnorm(m)]
        self._handles = []
        for pl in self._layers:
            self._handles.append(pl.layer.register_forward_hook(self._make_forward_hook(pl),
                                                                with_kwargs=True))
        self._active = None        # None, "loss" or "measure"
        self._generation = 0       # bumps at every begin()/measure(): stale tensor hooks ignore
        self._K = None
        self._loss_scale = None    # K scale from a float loss_weights (None: from reduction)
        self._row_scale = None     # (n,) 1/w_i from a tensor loss_weights
        self._divisor = None       # 0-d 1/loss_scale (K is multiplied by its square in gram())
        self._user_out = None      # begin(out=...) when a loss_scale defers the accumulation
        self.defer_errors = bool(defer_errors)
        self._error = None         # the exception a deferred hook kept (gram() raises it)

    # ---- construction ----
    def _find_layers(self) -> list[_ProbedLayer]:
        owner: dict[int, str] = {}
        layers = []
        parent = {id(child): m for m in self.model.modules() for child in m.children()}
        opaque = [(p, type(m).__name__) for p, m in self.model.named_modules()
                  if isinstance(m, _OPAQUE_CONTAINERS)]
        for path, layer in self.model.named_modules():
            managed = [n for n, p in layer.named_parameters(recurse=False)
                       if self.module_map.layout(p) is not None]
            for n, p in layer.named_parameters(recurse=False):
                if id(p) in owner and self.module_map.layout(p) is not None:
                    raise _unsupported(path, f"parameter '{n}' is shared with layer "
                                             f"'{owner[id(p)]}' (tied weights are not supported)")
                owner[id(p)] = path
            if not managed:
                continue
            for opath, otype in opaque:
                if path == opath or path.startswith(opath + "."):
                    raise _unsupported(path, f"it is inside '{opath}' ({otype}), whose fused "
                                             "forward bypasses submodule hooks; build attention "
                                             "and FFN from nn.Linear layers instead")
            kind = _layer_kind(layer)
            if kind is None:
                raise _unsupported(path or "<model>",
                                   f"{type(layer).__name__} owns managed parameter(s) {managed}, "
                                   "but the probe supports Linear, Conv2d (groups=1), GPT-2 "
                                   "Conv1D, Embedding, LayerNorm, RMSNorm, GroupNorm and eval "
                                   "BatchNorm")
            pl = _ProbedLayer(path or "<model>", layer, kind, self.module_map)
            chain, m = [], layer
            while m is not None:   # the layer and its ancestors: where routed_tokens may sit
                chain.append(m)
                m = parent.get(id(m))
            pl.ancestors = tuple(chain)
            layers.append(pl)
        return layers

    # ---- hooks ----
    def _make_forward_hook(self, pl: _ProbedLayer):
        def hook(layer, args, kwargs, output):
            if self._active is None or not pl.calls:
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None   # no gradient will reach this call: it adds nothing
            pl.calls_seen += 1
            if pl.calls_seen > 1:
                raise RuntimeError(f"MNTKProbe: layer '{pl.path}' was called more than once in "
                                   "one probe forward (weight sharing or activation "
                                   "checkpointing); per-sample Grams need one call per forward")
            x = (args[0] if args else kwargs["input"]).detach()
            pl.routed = self._routed_tokens(pl, x)
            if pl.routed is not None:
                pl.batch_size = pl.routed[1]
            else:
                pl.batch_size = x.shape[0] if x.dim() else 0
            p = self.probe_size
            if p is not None:
                if pl.batch_size < p:
                    raise ValueError(f"MNTKProbe: probe_size={p}, but layer '{pl.path}' got a "
                                     f"batch of {pl.batch_size} samples (input "
                                     f"{tuple(x.shape)}); probe_size must not exceed the batch")
                if pl.routed is None:
                    x = x[:p]   # a view: shares the version counter checked at the backward
            pl.samples = pl.batch_size if p is None else p
            pl.input, pl.input_version = x, x._version
            if self._active == "loss":
                output.register_hook(self._make_grad_hook(pl, self._generation))
            else:
                pl.edge = torch.autograd.graph.get_gradient_edge(output)
            return None
        return hook

    def _routed_tokens(self, pl: _ProbedLayer, x: torch.Tensor):
        """(idx, n, T) when the layer or a module above it carries ``routed_tokens`` (a routed
        MoE expert call: see the module docstring), else None. Read now: the next forward of
        the routing block overwrites it."""
        routed = next((m.routed_tokens for m in pl.ancestors
                       if getattr(m, "routed_tokens", None) is not None), None)
        if routed is None:
            return None
        idx, (n, t) = routed
        if pl.kind not in ("linear", "conv1d"):
            raise RuntimeError(f"MNTKProbe: layer '{pl.path}' ({type(pl.layer).__name__}) gets "
                               "routed tokens; only Linear and Conv1D layers are supported there")
        if x.dim() != 2 or idx.dim() != 1 or idx.shape[0] != x.shape[0] \
                or idx.dtype != torch.int64:
            raise RuntimeError(f"MNTKProbe: layer '{pl.path}' got input {tuple(x.shape)} with "
                               f"routed_tokens idx {idx.dtype} {tuple(idx.shape)}; expected a "
                               "2-D input (N_routed, d) and an int64 idx (N_routed,)")
        return idx, int(n), int(t)

    def _make_grad_hook(self, pl: _ProbedLayer, generation: int):
        def hook(grad):
            if self._active != "loss" or generation != self._generation or self._error is not None:
                return None
            try:
                if pl.input is None:
                    raise RuntimeError(f"MNTKProbe: a second backward reached layer '{pl.path}' "
                                       "in one probe; call gram() after each backward")
                scale, row_scale = self._loss_scales(pl.batch_size)
                pl.accumulate(self._ensure_K(pl.samples, grad.device), grad, scale, row_scale,
                              self.algorithm)
            except Exception as e:
                if not self.defer_errors:
                    raise
                # Keep the failure for gram(); free what the probe holds so the rest of the
                # backward (and a retry after an out-of-memory) has the memory back.
                self._error = e
                self._K = None
                for other in self._layers:
                    other.input = None
                return None
            pl.input = None
            return None
        return hook

    def _loss_scales(self, n: int) -> tuple[float, torch.Tensor | None]:
        """(scale of K, per-sample factor of the output gradients) undoing the weights w_i;
        n: the whole batch (before probe_size slicing)."""
        if self._row_scale is not None:
            if self._row_scale.dim() == 1 and self._row_scale.shape[0] != n:
                raise RuntimeError(f"MNTKProbe: loss_weights has {self._row_scale.shape[0]} "
                                   f"entries but the batch has n={n} samples")
            row = self._row_scale
            if row.dim() == 1 and self.probe_size is not None:
                row = row[: self.probe_size]
            return 1.0, row
        if self._loss_scale is not None:
            return self._loss_scale, None
        # The backward of a mean delivered (1/n)·∇ℓ_i: row i times n, so K times n².
        return (float(n) ** 2 if self.loss_reduction == "mean" else 1.0), None

    def _ensure_K(self, n: int, device: torch.device) -> torch.Tensor:
        M = self.module_map.num_modules
        if self._K is None:
            self._K = torch.zeros(M, n, n, dtype=torch.float32, device=device)
        elif self._K.shape != (M, n, n):
            raise RuntimeError(f"MNTKProbe: K has shape {tuple(self._K.shape)}, but this batch "
                               f"needs ({M}, {n}, {n}) (n = the sample axis of the layer inputs)")
        return self._K

    # ---- sample independence ----
    def _check_sample_independence(self) -> None:
        for path, bn in self._batchnorms:
            if bn.training or not bn.track_running_stats:
                raise RuntimeError(
                    f"MNTKProbe: BatchNorm '{path}' normalises with batch statistics (training "
                    "mode or track_running_stats=False), which mixes the samples of a batch, so "
                    "per-sample gradients are not defined. Probe with the BatchNorm layers in "
                    "eval mode, or use GroupNorm/LayerNorm.")

    # ---- loss mode ----
    def begin(self, out: torch.Tensor | None = None,
              loss_weights: float | torch.Tensor | None = None,
              loss_scale: float | torch.Tensor | None = None) -> None:
        """Arm the probe for the next forward and backward (mode ``"loss"``).

        out: optional float32 (M, n, n) tensor that :meth:`gram` adds this batch's Grams into
            (accumulating several batches); default: a fresh zero tensor.
        loss_weights: w_i in L = Σ_i w_i ℓ_i: a float or 0-d tensor (every sample) or a (n,)
            tensor, tensors on the model's device (read there, no host synchronisation);
            default from ``loss_reduction`` (1/n for "mean", 1 for "sum").
        loss_scale: a factor S the loss was multiplied by on top of the weights (a GradScaler's
            scale: pass its device tensor, no host read), a positive float or 0-d float tensor.
            The gradients are divided by it: K is multiplied by 1/S² in :meth:`gram`, in float32
            (dividing float16 gradients by S first could underflow).
        """
        if self.mode != "loss":
            raise RuntimeError(f"MNTKProbe: begin()/gram() are for mode 'loss'; this probe is "
                               f"mode {self.mode!r}: use measure()")
        self._check_open()
        self._check_sample_independence()
        if out is not None:
            _check_out(out, self.module_map.num_modules)
        row_scale, weight_scale = None, None
        if isinstance(loss_weights, torch.Tensor):
            if loss_weights.dim() > 1 or not loss_weights.is_floating_point():
                raise ValueError(f"MNTKProbe: loss_weights must be a float or a floating 0-d or "
                                 f"(n,) tensor, got {loss_weights.dtype} "
                                 f"{tuple(loss_weights.shape)}")
            row_scale = 1.0 / loss_weights.detach().to(torch.float32)
        elif loss_weights is not None:
            if not float(loss_weights) > 0:
                raise ValueError(f"MNTKProbe: loss_weights must be positive, got {loss_weights}")
            weight_scale = 1.0 / float(loss_weights) ** 2
        divisor = None
        if isinstance(loss_scale, torch.Tensor):
            if loss_scale.numel() != 1 or not loss_scale.is_floating_point():
                raise ValueError(f"MNTKProbe: loss_scale must be a float or a floating one-element "
                                 f"tensor, got {loss_scale.dtype} {tuple(loss_scale.shape)}")
            divisor = 1.0 / loss_scale.detach().reshape(()).to(torch.float32)
        elif loss_scale is not None:
            if not float(loss_scale) > 0:
                raise ValueError(f"MNTKProbe: loss_scale must be positive, got {loss_scale}")
            divisor = torch.tensor(1.0 / float(loss_scale), dtype=torch.float32)
        # With a loss_scale the Grams go to a fresh K that gram() rescales and adds into `out`.
        self._start("loss", out if divisor is None else None)
        self._row_scale, self._loss_scale = row_scale, weight_scale
        self._divisor, self._user_out = divisor, (out if divisor is not None else None)

    def cancel(self) -> None:
        """Drop a probe in flight (e.g. a training step that failed between begin() and gram())."""
        self._finish()

    def gram(self) -> torch.Tensor:
        """The batch's K, float32 (M, n, n), after the backward that followed :meth:`begin`.

        Frees every stored factor and disarms the hooks. Raises when no backward reached a
        hooked layer since :meth:`begin`.
        """
        if self._active != "loss":
            raise RuntimeError("MNTKProbe: gram() without a matching begin()")
        K, divisor, out, error = self._K, self._divisor, self._user_out, self._error
        self._finish()
        if error is not None:
            raise error
        if K is None:
            raise RuntimeError("MNTKProbe: no gradient reached a probed layer since begin(); "
                               "run the forward and backward between begin() and gram()")
        if divisor is not None:
            K.mul_(divisor.to(K.device).square())
            if out is not None:
                K = out.add_(K)
        return K

    # ---- output modes ----
    def measure(self, inputs, forward_fn=None, *, out: torch.Tensor | None = None,
                vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Run the probe's own forward and backward passes on a probe batch (modes ``"output"``
        and ``"logit_sum"``) and return K, float32 (M, n, n).

        inputs: the batch, passed as ``model(inputs)`` (a tuple/list: ``model(*inputs)``, a dict:
            ``model(**inputs)``) or ``forward_fn(inputs)``, which must return a tensor of shape
            (n, ...) (e.g. ``lambda b: model(**b).logits``).
        out: optional float32 (M, n, n) tensor to add into (several batches or calls).
        vectors: optional projections (k, *output.shape[1:]) for mode ``"output"``, shared by
            all samples, with E[v vᵀ] = I; default: k Rademacher vectors from ``generator``.
        The model's parameters' ``.grad`` are not touched.
        """
        if self.mode == "loss":
            raise RuntimeError("MNTKProbe: measure() is for modes 'output' and 'logit_sum'; "
                               "mode 'loss' reads the training backward: use begin()/gram()")
        self._check_open()
        self._check_sample_independence()
        if out is not None:
            _check_out(out, self.module_map.num_modules)
        if vectors is not None and self.mode != "output":
            raise ValueError("MNTKProbe: vectors are only used by mode 'output'")
        managed = [p for p in self.module_map.params() if not p.requires_grad]
        self._start("measure", out)
        try:
            for p in managed:
                p.requires_grad_(True)
            with torch.enable_grad():
                output = forward_fn(inputs) if forward_fn is not None else _call(self.model, inputs)
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"MNTKProbe: the forward returned {type(output).__name__}; "
                                    "pass forward_fn returning the output tensor (n, ...)")
                if not output.requires_grad:
                    raise RuntimeError("MNTKProbe: the model output does not depend on any "
                                       "managed parameter")
                self._backward_projections(output, vectors)
            K = self._K
        finally:
            for p in managed:
                p.requires_grad_(False)
            self._finish()
        if K is None:
            raise RuntimeError("MNTKProbe: no probed layer lies on the path to the output")
        return K

    def _backward_projections(self, output: torch.Tensor, vectors) -> None:
        if self.mode == "logit_sum":
            vs, scale = [torch.ones((), dtype=output.dtype, device=output.device)], 1.0
        else:
            vs = self._projections(output, vectors)
            scale = 1.0 / len(vs)
        live = [pl for pl in self._layers if pl.edge is not None]
        if not live:
            return
        for r, v in enumerate(vs):
            grads = torch.autograd.grad(output, [pl.edge for pl in live],
                                        grad_outputs=v.to(output.dtype).expand_as(output),
                                        retain_graph=r < len(vs) - 1, allow_unused=True)
            for pl, g in zip(live, grads):
                if g is not None:
                    pl.accumulate(self._ensure_K(pl.samples, g.device), g, scale, None,
                                  self.algorithm)

    def _projections(self, output: torch.Tensor, vectors) -> list[torch.Tensor]:
        shape = tuple(output.shape[1:])
        if vectors is not None:
            if tuple(vectors.shape[1:]) != shape or vectors.dim() != len(shape) + 1:
                raise ValueError(f"MNTKProbe: vectors must have shape (k, *{shape}), got "
                                 f"{tuple(vectors.shape)}")
            return [v.to(output.device) for v in vectors]
        gen_dev = self.generator.device if self.generator is not None else output.device
        bits = torch.randint(0, 2, (self.projections,) + shape, generator=self.generator,
                             device=gen_dev)
        return [(2 * b - 1).to(output.device) for b in bits]

    # ---- state ----
    def _start(self, active: str, out) -> None:
        if self._active is not None:
            raise RuntimeError(f"MNTKProbe: a probe is already in flight ({self._active}); "
                               "finish it with gram() first")
        for pl in self._layers:
            pl.reset()
        self._generation += 1
        self._K = out
        self._active = active

    def _finish(self) -> None:
        for pl in self._layers:
            pl.reset()
        self._generation += 1
        self._K, self._row_scale, self._active = None, None, None
        self._divisor, self._user_out = None, None
        self._error = None

    def _check_open(self) -> None:
        if self._handles is None:
            raise RuntimeError("MNTKProbe: this probe is closed")

    # ---- lifetime ----
    @property
    def layers(self) -> list[str]:
        """Paths of the hooked layers, in model order."""
        return [pl.path for pl in self._layers]

    def close(self) -> None:
        """Remove every hook and drop stored factors. Idempotent."""
        if self._handles is not None:
            for h in self._handles:
                h.remove()
            self._handles = None
        self._finish()

    def __enter__(self) -> "MNTKProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _check_out(out: torch.Tensor, M: int) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 3 \
            or out.shape[0] != M or out.shape[1] != out.shape[2]:
        got = (f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"MNTKProbe: out must be a float32 (M={M}, n, n) tensor, got {got}")
