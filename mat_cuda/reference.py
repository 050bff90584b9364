"""Plain-PyTorch versions of every mat_cuda op: the tests' oracles, readable as documentation."""
from __future__ import annotations

from typing import Optional

import torch


# ---- linalg ----

def lambda_max_reference(K: torch.Tensor, topk: Optional[int] = None) -> torch.Tensor:
    """What ``mat_cuda.linalg.lambda_max`` computes, by a full eigendecomposition in float64.

    K: (M, n, n) symmetric. Returns (M,) float64 λ_max, or (M, k) the k largest eigenvalues in
    descending order when ``topk=k``.
    """
    evals = torch.linalg.eigvalsh(K.double())  # (M, n) ascending
    if topk is None:
        return evals[:, -1]
    return evals.flip(-1)[:, :topk]
