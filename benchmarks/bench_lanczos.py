"""lambda_max (batched Lanczos) against torch.linalg.eigvalsh (batched) and torch.lobpcg.

Matrices: M symmetric PSD n×n float32 matrices with an NTK-like decaying spectrum
λ_i = c / i (c random per matrix), built in float64 from random orthogonal bases. Accuracy is
the largest relative error on λ_max against float64 eigvalsh. lambda_max runs at its defaults
(iters = min(n, 32), tol = 1e-6) with check_symmetric=False (the hot-path call: no host
synchronisation). torch.lobpcg has no batched mode: it is looped over the first
`LOBPCG_SAMPLE[device]` matrices and the time scaled to M.
"""
from __future__ import annotations

import torch

from mat_cuda import linalg
from .timing import time_fn

LOBPCG_SAMPLE = {"cpu": 16, "cuda": 2}
BUDGET_MS = 300.0  # time spent per measurement, after one probe call


def _time(fn, device: str) -> float:
    """Median ms of fn, with as many repetitions (1 to 20) as fit in BUDGET_MS (after a warm-up)."""
    probe = time_fn(fn, device, warmup=1, repeat=1)["median_ms"]
    if probe >= BUDGET_MS:  # slow baselines (eigvalsh at large n): one warm call is enough
        return probe
    repeat = max(1, min(20, int(BUDGET_MS / max(probe, 1e-3))))
    return time_fn(fn, device, warmup=1 if repeat > 2 else 0, repeat=repeat)["median_ms"]


def _matrices(M: int, n: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + 7 * n + M)
    Q, _ = torch.linalg.qr(torch.randn(M, n, n, dtype=torch.float64, generator=g))
    spec = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    spec = spec * (0.1 + 10 * torch.rand(M, 1, dtype=torch.float64, generator=g))
    K = Q @ torch.diag_embed(spec) @ Q.transpose(1, 2)
    K = (K + K.transpose(1, 2)) / 2
    return K.to(device, torch.float32)


def _lobpcg_loop(K: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.lobpcg(K[b], k=1, largest=True)[0][0] for b in range(K.shape[0])])


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).abs() / ref.abs()).max().item()


def run(devices: list[str], quick: bool) -> dict:
    sizes = [(144, n) for n in (16, 64, 128)] if quick else [
        (M, n) for M in (144, 1152) for n in (16, 32, 64, 128, 256)]
    rows = []
    for device in devices:
        for M, n in sizes:
            K = _matrices(M, n, device)
            ref = torch.linalg.eigvalsh(K.double().cpu())[:, -1]
            res = linalg.lambda_max(K, check_symmetric=False, return_vectors=True)
            t_lz = _time(lambda: linalg.lambda_max(K, check_symmetric=False), device)
            t_eig = _time(lambda: torch.linalg.eigvalsh(K), device)
            eig_err = _rel_err(torch.linalg.eigvalsh(K)[:, -1], ref)
            sample = K[:LOBPCG_SAMPLE[device]]
            t_lob = time_fn(lambda: _lobpcg_loop(sample), device, warmup=0,
                            repeat=1)["median_ms"] * M / sample.shape[0]
            lob_err = _rel_err(_lobpcg_loop(sample), ref[:sample.shape[0]])
            rows.append({
                "device": device, "M": M, "n": n,
                "lambda_max_ms": t_lz, "eigvalsh_ms": t_eig, "lobpcg_ms": t_lob,
                "x_vs_eigvalsh": t_eig / t_lz, "x_vs_lobpcg": t_lob / t_lz,
                "mean_iters": res.iterations.float().mean().item(),
                "err_lambda_max": _rel_err(res.lambdas, ref), "err_eigvalsh": eig_err,
                "err_lobpcg": lob_err,
            })
    return {
        "title": "Batched λ_max: lambda_max (Lanczos) vs torch.linalg.eigvalsh and torch.lobpcg",
        "columns": ["device", "M", "n", "lambda_max_ms", "eigvalsh_ms", "lobpcg_ms",
                    "x_vs_eigvalsh", "x_vs_lobpcg", "mean_iters", "err_lambda_max",
                    "err_eigvalsh", "err_lobpcg"],
        "rows": rows,
        "notes": [
            "float32 inputs, NTK-like spectrum λ_i = c/i; errors are max relative errors on λ_max "
            "against float64 eigvalsh",
            f"lobpcg is not batched: looped over {LOBPCG_SAMPLE} matrices (per device), time "
            "scaled to M; one repetition",
            "lambda_max at its defaults (iters=min(n,32), tol=1e-6), check_symmetric=False",
        ],
    }
