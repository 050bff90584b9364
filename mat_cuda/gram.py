"""Per-module Gram (mNTK) accumulation from layer factors: the kernels of the mNTK probe.

Every function adds, in place, into ``K``: a float32 tensor (M, n, n) holding one n×n Gram per
module for a probe batch of n samples, on the inputs' device. A module's Gram is the sum of the
Grams of its parameter slices (DESIGN.md, "The math, precisely"), so several calls (one per
layer or per parameter) accumulate into the same K. Inputs may be float32, bfloat16 or float16;
accumulation is always float32.

Groups: a weight's output rows (or input columns) are split into equal groups; ``group_module``
(int64, (num_groups,), on K's device) gives each group's module id, -1 meaning "skip". A packed
QKV weight of 3·H·d_h rows with ``group_size=d_h`` and ``group_module=[0..H-1]*3`` gives head h
the sum of its Q, K and V slices' Grams.

Module-id range checks need the ids' values: on CPU the kernel checks them; on CUDA the wrapper
checks them when ``validate=True`` (one host synchronisation), and the kernel otherwise skips
out-of-range ids without writing.
"""
from __future__ import annotations

import math

import torch

from . import _ops

__all__ = ["linear_gram_", "embedding_gram_", "sample_gram_", "gram_workspace"]

_ALGORITHMS = {"auto": 0, "ghost": 1, "explicit": 2}
_EMBEDDING_ALGORITHMS = {**_ALGORITHMS, "sync_free": 3}
DEFAULT_WORKSPACE_BYTES = 256 * 2**20


def _check_args(name: str, scale, tensors) -> None:
    """Tensor arguments are tensors on a supported device; scale is a finite number."""
    for t, arg in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mat_cuda: {name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        _ops.check_device_supported(t, f"{name} {arg}")
    if isinstance(scale, torch.Tensor) or not math.isfinite(float(scale)):
        raise ValueError(f"mat_cuda: {name}: scale must be a finite Python number, got {scale!r}")


def _resolve_group_size(group_size, dim: int, name: str) -> int:
    if group_size is None:
        return dim
    group_size = int(group_size)
    if group_size <= 0:
        raise ValueError(f"mat_cuda: {name}: group_size must be positive, got {group_size}")
    return group_size


def _validate_module_ids(K: torch.Tensor, group_module: torch.Tensor, name: str) -> None:
    # CPU kernels check the values themselves; on CUDA this costs one host synchronisation.
    if group_module.device.type != "cuda" or group_module.numel() == 0:
        return
    M = K.shape[0] if K.dim() == 3 else 0
    lo, hi = int(group_module.min()), int(group_module.max())
    if lo < -1 or hi >= M:
        raise ValueError(f"mat_cuda: {name}: group_module ids must be in [-1, {M - 1}] "
                         f"(K has M={M} modules), got values in [{lo}, {hi}]")


def gram_workspace(device: torch.device | str, nbytes: int = DEFAULT_WORKSPACE_BYTES) -> torch.Tensor:
    """A reusable scratch buffer for ``linear_gram_(..., workspace=...)``: float32, 1-D,
    ``nbytes // 4`` elements on ``device``. Keep one per device and pass it to every call."""
    return torch.empty(max(int(nbytes) // 4, 1), dtype=torch.float32, device=device)


def linear_gram_(K: torch.Tensor, A: torch.Tensor, B: torch.Tensor, group_module: torch.Tensor, *,
                 group_dim: int = 0, group_size: int | None = None, weight: bool = True,
                 bias: bool = False, scale: float = 1.0, algorithm: str = "auto",
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                 workspace: torch.Tensor | None = None,
                 validate: bool = True) -> torch.Tensor:
    """Accumulate the per-module Grams of a linear layer's per-sample gradients into K.

    For y = x Wᵀ (+ b): A (n, T, d_in) or (n, d_in) are the layer inputs, B (n, T, d_out) or
    (n, d_out) the gradients w.r.t. its outputs (2-D means T = 1; T = 0 adds nothing). Sample i's
    weight gradient is g_i = B_iᵀ A_i (d_out × d_in) and its bias gradient Σ_t B_it.

    The weight's output rows (``group_dim=0``: groups of ``group_size`` features of B) or input
    columns (``group_dim=1``: groups of A's features) form ``len(group_module)`` groups
    (``group_size=None``: one group, the whole layer). For each group g with module
    m = group_module[g] ≥ 0: K[m] += scale · Gram of the group's slice of g_i (if ``weight``)
    concatenated with the group's rows of the bias gradient (if ``bias``; only with group_dim=0).

    algorithm: "ghost" (Σ_{t,s}(A_i A_jᵀ)_{ts}(B_i B_jᵀ)_{ts}, cost ~n²T²(d_in+d_out), the A/B
    Gram shared by all groups, tiled over sample blocks), "explicit" (per-sample g_i by batched
    GEMM, reduced to the Gram at once, cost ~nT·d_in·d_out + n²·d_in·d_out) or "auto" (the
    cheaper by that cost model). workspace_bytes bounds the temporary memory of either form.
    workspace: optional scratch from ``gram_workspace`` (float32, 1-D, on K's device) reused
    for the explicit form's per-sample gradients across calls; its size then bounds that form's
    memory. On CPU this saves the page faults of a fresh large allocation at every call.

    K: float32 (M, n, n), contiguous, on A's device. group_module: int64 (num_groups,) on K's
    device. Returns K.
    """
    name = "linear_gram_"
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"mat_cuda: {name}: algorithm must be one of {sorted(_ALGORITHMS)}, "
                         f"got {algorithm!r}")
    if group_dim not in (0, 1):
        raise ValueError(f"mat_cuda: {name}: group_dim must be 0 (output rows) or 1 (input "
                         f"columns), got {group_dim}")
    if bias and group_dim == 1:
        raise ValueError(f"mat_cuda: {name}: bias=True needs group_dim=0 (a bias has no input "
                         "columns to group)")
    _check_args(name, scale, ((K, "K"), (A, "A"), (B, "B"), (group_module, "group_module")))
    grouped = B if group_dim == 0 else A
    group_size = _resolve_group_size(group_size, grouped.shape[-1] if grouped.dim() else 0, name)
    if validate:
        _validate_module_ids(K, group_module, name)
    _ops.ops.linear_gram_(K, A, B, group_module, group_dim, group_size, weight, bias, float(scale),
                          _ALGORITHMS[algorithm], int(workspace_bytes), workspace)
    return K


def embedding_gram_(K: torch.Tensor, indices: torch.Tensor, B: torch.Tensor, module: int, *,
                    padding_idx: int | None = None, scale: float = 1.0, algorithm: str = "auto",
                    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                    num_embeddings: int | None = None) -> torch.Tensor:
    """Accumulate the Gram of an embedding's per-sample weight gradients into K[module].

    indices: int64 (n, T); B: (n, T, d) gradients w.r.t. the embedding's outputs.
    ⟨g_i, g_j⟩ = Σ_{t,s} [idx_it == idx_js] ⟨B_it, B_js⟩, positions with idx == padding_idx
    excluded. K[module] += scale · that (module = -1: nothing). Returns K.

    algorithm: "ghost" (the index-equality (nT × nT) matrix ∘ the B Gram, cost ~(nT)²·d,
    sync-free, tiled over sample blocks), "explicit" (each sample's gradient scattered into
    (U, d) rows over the batch's U distinct ids, then one GEMM for the Gram, cost
    ~nT·d + n²·U·d; finding U is one host synchronisation on CUDA), "auto" (the cheaper by
    that cost model; counting U is the same synchronisation) or "sync_free" (no host
    synchronisation: the explicit form over the static bound U ≤ min(nT, num_embeddings), its
    unused id slots adding zero columns, or the ghost form when that is cheaper by the same
    cost model with U at its bound; the default of :class:`~mat_cuda.mntk.MNTKProbe` on CUDA).
    All forms give the same Gram up to float rounding. workspace_bytes bounds the temporaries of
    every form (the explicit one is chunked over d).

    num_embeddings: the embedding's vocabulary size V (None: unknown, U ≤ nT). With
    "sync_free" and V ≤ nT the ids themselves index the explicit form's slots, so every index
    must lie in [0, V) (nn.Embedding's own requirement).
    """
    name = "embedding_gram_"
    if algorithm not in _EMBEDDING_ALGORITHMS:
        raise ValueError(f"mat_cuda: {name}: algorithm must be one of "
                         f"{sorted(_EMBEDDING_ALGORITHMS)}, got {algorithm!r}")
    if num_embeddings is not None and (isinstance(num_embeddings, bool)
                                       or int(num_embeddings) < 1):
        raise ValueError(f"mat_cuda: {name}: num_embeddings must be None or a positive int, "
                         f"got {num_embeddings!r}")
    _check_args(name, scale, ((K, "K"), (indices, "indices"), (B, "B")))
    _ops.ops.embedding_gram_(K, indices, B, int(module),
                             None if padding_idx is None else int(padding_idx), float(scale),
                             _EMBEDDING_ALGORITHMS[algorithm], int(workspace_bytes),
                             0 if num_embeddings is None else int(num_embeddings))
    return K


def sample_gram_(K: torch.Tensor, G: torch.Tensor, group_module: torch.Tensor, *,
                 group_size: int | None = None, scale: float = 1.0,
                 validate: bool = True) -> torch.Tensor:
    """Accumulate Grams of explicit per-sample gradients (e.g. LayerNorm weight/bias) into K.

    G: (n, p) per-sample gradients, columns split into groups of ``group_size`` (None: one
    group); K[group_module[g]] += scale · G_g G_gᵀ for each group with module id ≥ 0. Returns K.
    """
    name = "sample_gram_"
    _check_args(name, scale, ((K, "K"), (G, "G"), (group_module, "group_module")))
    group_size = _resolve_group_size(group_size, G.shape[-1] if G.dim() else 0, name)
    if validate:
        _validate_module_ids(K, group_module, name)
    _ops.ops.sample_gram_(K, G, group_module, group_size, float(scale))
    return K


@torch.library.register_fake("mat_cuda::linear_gram_")
def _linear_gram_fake(K, A, B, group_module, group_dim, group_size, weight, bias, scale,
                      algorithm, workspace_bytes, workspace=None):
    return None


@torch.library.register_fake("mat_cuda::embedding_gram_")
def _embedding_gram_fake(K, indices, B, module, padding_idx, scale, algorithm, workspace_bytes,
                         num_embeddings=0):
    return None


@torch.library.register_fake("mat_cuda::sample_gram_")
def _sample_gram_fake(K, G, group_module, group_size, scale):
    return None
