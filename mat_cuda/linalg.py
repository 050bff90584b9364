"""Batched Lanczos: the largest eigenvalue(s) of many small symmetric PSD matrices, on the device.

``lambda_max(K)`` runs Lanczos with full reorthogonalisation on each of the M matrices of
``K`` (M, n, n) independently and in parallel (CPU: one thread per matrix; CUDA: one thread
block per matrix, all in one launch), stops each matrix as soon as its residual estimate meets
``tol``, and never synchronises with the host (unless ``check_symmetric=True``, see below).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _ops

DEFAULT_ITERS = 32
DEFAULT_TOL = 1e-6
DEFAULT_SYMMETRY_TOL = 1e-4
MAX_TOPK = 8


class LambdaMaxResult(NamedTuple):
    """What ``lambda_max(..., return_vectors=True)`` returns.

    lambdas:    (M,) the largest eigenvalue of each matrix, or (M, k) the k largest in
                descending order when ``topk=k``; dtype of K.
    vectors:    (M, n) the unit Ritz vector of the largest eigenvalue (pass it back as ``v0``
                to warm-start the next probe); dtype of K.
    iterations: (M,) int32, the Lanczos steps (matrix-vector products) each matrix took.
    residuals:  (M,) the explicit residual ‖K y − λ_max y‖ of that Ritz pair; dtype of K.
    """

    lambdas: torch.Tensor
    vectors: torch.Tensor
    iterations: torch.Tensor
    residuals: torch.Tensor


def lambda_max(K: torch.Tensor, iters: Optional[int] = None, tol: float = DEFAULT_TOL,
               v0: Optional[torch.Tensor] = None, return_vectors: bool = False,
               topk: Optional[int] = None, seed: int = 0, check_symmetric: bool = True,
               symmetry_tol: float = DEFAULT_SYMMETRY_TOL):
    """Largest eigenvalue(s) of each symmetric (PSD) matrix of a batch, by Lanczos.

    Args:
        K: (M, n, n) float32 or float64 tensor on CPU or CUDA, each K[b] symmetric. M may be 0;
            n must be ≥ 1. Made contiguous if it is not.
        iters: Lanczos step budget per matrix (default ``min(n, 32)``; capped at n). With
            ``iters >= n`` the result is exact to rounding (Q becomes a full basis).
        tol: a matrix stops early once the residual estimate |β_j s_j| of every requested Ritz
            pair is ≤ ``tol · |λ_max|``. The eigenvalue error is then ≤ tol·|λ_max| always and
            ≈ (tol·|λ_max|)² / gap when the gap to the next eigenvalue allows. ``tol=0`` runs
            the whole budget.
        v0: optional (M, n) start vectors (e.g. the previous probe's ``vectors``), same dtype
            and device as K. A row that is zero or not finite falls back to the default start.
            Default: a fixed hash-based pseudo-random vector depending only on ``seed`` and n
            (identical on CPU and CUDA, independent of torch's RNG), so results are reproducible.
        return_vectors: also return the Ritz vectors, iteration counts and residuals
            (a :class:`LambdaMaxResult`).
        topk: None for λ_max only (lambdas of shape (M,)), or k in [1, 8] for the k largest
            eigenvalues, descending (lambdas of shape (M, k)). Needs k ≤ n and k ≤ iters. A
            repeated eigenvalue is found once per Krylov block: the k largest *distinct* Ritz
            values are returned unless the budget reaches n (then multiplicities are exact).
        seed: seed of the default start vector.
        check_symmetric: check max|K − Kᵀ| ≤ symmetry_tol · max|K| per matrix and raise a
            ValueError otherwise. This is one reduction plus a host synchronisation (``.item()``):
            pass False on the training hot path (MAT's probe does), where K is symmetric by
            construction, and under ``torch.compile(fullgraph=True)`` (the check breaks graphs).
        symmetry_tol: relative tolerance of that check.

    Returns:
        ``lambdas`` ((M,) or (M, k), dtype of K) when ``return_vectors`` is False, else a
        :class:`LambdaMaxResult`.

    NaN or Inf in K[b]: lambdas[b], vectors[b] and residuals[b] are NaN for that matrix alone;
    the other matrices are unaffected (no error is raised, so no synchronisation is needed).

    Clustered top eigenvalues (gap below the accuracy Lanczos reaches in the budget): λ_max is
    still accurate to about the cluster's width or tol·|λ_max|, whichever is larger, but the
    Ritz vector is some unit vector in the cluster's eigenspace and the residual reflects that.
    """
    if not isinstance(K, torch.Tensor):
        raise TypeError(f"mat_cuda: K must be a torch.Tensor, got {type(K).__name__}")
    _ops.check_device_supported(K, "K")
    if K.dim() != 3 or K.shape[1] != K.shape[2]:
        raise ValueError(f"mat_cuda: K must have shape (M, n, n), got {tuple(K.shape)}")
    if K.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"mat_cuda: K must have dtype float32 or float64, got {K.dtype}")
    n = K.shape[-1]
    if n < 1:
        raise ValueError(f"mat_cuda: K must hold matrices of size n >= 1, got shape {tuple(K.shape)}")
    k = 1 if topk is None else int(topk)
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"mat_cuda: topk must be in [1, {MAX_TOPK}], got {topk}")
    if k > n:
        raise ValueError(f"mat_cuda: topk must be <= n = {n}, got {topk}")
    budget = min(n, DEFAULT_ITERS) if iters is None else int(iters)
    if budget < k:
        raise ValueError(f"mat_cuda: iters must be >= topk = {k}, got {iters}")
    K = K.contiguous()
    if v0 is not None:
        if not isinstance(v0, torch.Tensor):
            raise TypeError(f"mat_cuda: v0 must be a torch.Tensor or None, got {type(v0).__name__}")
        v0 = v0.contiguous()
    if check_symmetric and K.numel() > 0:
        _check_symmetric(K, symmetry_tol)
    lambdas, vectors, iterations, residuals = _ops.ops.lanczos_lambda_max(
        K, budget, float(tol), v0, k, int(seed))
    if topk is None:
        lambdas = lambdas[:, 0]
    if not return_vectors:
        return lambdas
    return LambdaMaxResult(lambdas, vectors, iterations, residuals)


def _check_symmetric(K: torch.Tensor, symmetry_tol: float) -> None:
    # NaN compares False, so a matrix holding NaN passes here and gets NaN λ from the kernel.
    asym = (K - K.transpose(1, 2)).abs().amax(dim=(1, 2))
    scale = K.abs().amax(dim=(1, 2))
    bad = asym > symmetry_tol * scale
    if bool(bad.any()):  # host synchronisation, documented above
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"mat_cuda: K must be symmetric: matrix {first} has max|K - K^T| = "
            f"{float(asym[first]):.3e} > symmetry_tol * max|K| = "
            f"{symmetry_tol * float(scale[first]):.3e} (pass check_symmetric=False to skip)")


@torch.library.register_fake("mat_cuda::lanczos_lambda_max")
def _lanczos_lambda_max_fake(K, iters, tol, v0, topk, seed):
    M, n = K.shape[0], K.shape[1]
    return (K.new_empty((M, topk)), K.new_empty((M, n)), K.new_empty((M,), dtype=torch.int32),
            K.new_empty((M,)))


def _lanczos_lambda_max_backward(ctx, *grads):
    # Without an autograd kernel a K that requires grad would get a silent zero gradient
    # (torch's autograd-not-implemented fallback only warns); fail loudly instead.
    raise RuntimeError("mat_cuda: lanczos_lambda_max (lambda_max) is not differentiable; pass "
                       "K.detach() (MAT's probe never differentiates λ)")


torch.library.register_autograd("mat_cuda::lanczos_lambda_max", _lanczos_lambda_max_backward)
