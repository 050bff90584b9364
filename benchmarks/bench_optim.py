"""MaskedAdamW against torch.optim.AdamW (foreach and fused) on 10M / 100M fp32 parameters.

The parameters are (1000, 1000) tensors, each split into 20 row-group modules of 50 rows (the
layout of attention heads), and masks keep 100%, 50% or 10% of the modules active. Reported per
step: the median (and minimum) time, the effective bandwidth at 28 bytes per *active* parameter (read param,
grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq), that bandwidth as a fraction of
the device's measured copy bandwidth (a large tensor copy, read + write), and the time relative
to torch's fused AdamW measured in the same run.
"""
from __future__ import annotations

import torch

from mat_cuda import MaskedAdamW, ModuleMap

from .timing import time_fn

BYTES_PER_ACTIVE_PARAM = 28
ROWS, COLS, ROWS_PER_MODULE = 1000, 1000, 50


def _params(total: int, device: str) -> list[torch.Tensor]:
    count = max(1, total // (ROWS * COLS))
    params = []
    for _ in range(count):
        p = torch.randn(ROWS, COLS, device=device, requires_grad=True)
        p.grad = torch.randn_like(p) * 1e-3
        params.append(p)
    return params


def _row_group_map(params: list[torch.Tensor]) -> ModuleMap:
    mm = ModuleMap()
    groups = ROWS // ROWS_PER_MODULE
    for i, p in enumerate(params):
        ids = [mm.add_module(f"t{i}.g{g}", "group") for g in range(groups)]
        mm.assign_row_groups(p, ROWS_PER_MODULE, ids, name=f"t{i}")
    return mm


def _mask(num_modules: int, fraction: float, device: str) -> torch.Tensor:
    active = max(1, round(num_modules * fraction))
    mask = torch.zeros(num_modules, dtype=torch.bool)
    mask[torch.randperm(num_modules)[:active]] = True
    return mask.to(device)


def copy_bandwidth_gbs(device: str, quick: bool) -> float:
    """Read + write GB/s of a large tensor copy on `device`."""
    n = (64 if quick else 256) * 2**20  # float32 elements
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, repeat=5 if quick else 20)
    return 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9


def run(devices: list[str], quick: bool) -> dict:
    sizes = [10_000_000] if quick else [10_000_000, 100_000_000]
    warmup, repeat = (2, 10) if quick else (3, 20)
    rows, notes = [], []
    for device in devices:
        copy_gbs = copy_bandwidth_gbs(device, quick)
        notes.append(f"{device}: measured copy bandwidth {copy_gbs:.1f} GB/s (read + write)")
        for size in sizes:
            params = _params(size, device)
            n = sum(p.numel() for p in params)

            def record(name, active_fraction, opt, active_params):
                timing = time_fn(opt.step, device=device, warmup=warmup, repeat=repeat)
                t = timing["median_ms"]
                gbs = BYTES_PER_ACTIVE_PARAM * active_params / (t * 1e-3) / 1e9
                rows.append({"device": device, "params": f"{n / 1e6:.0f}M", "optimizer": name,
                             "active": f"{active_fraction:.0%}", "ms/step": t,
                             "min ms": timing["min_ms"], "GB/s": gbs,
                             "of copy BW": gbs / copy_gbs})
                return t

            fused_ms = None
            for name, kwargs in [("torch AdamW foreach", dict(foreach=True)),
                                 ("torch AdamW fused", dict(fused=True))]:
                opt = torch.optim.AdamW(params, **kwargs)
                ms = record(name, 1.0, opt, n)
                if "fused" in name:
                    fused_ms = ms
                del opt
            mm = _row_group_map(params)
            opt = MaskedAdamW(params, module_map=mm)
            times = {}
            for fraction in (1.0, 0.5, 0.1):
                mask = _mask(mm.num_modules, fraction, device)
                opt.set_module_mask(mask)
                active = int(mask.sum().item()) * ROWS_PER_MODULE * COLS
                times[fraction] = record("MaskedAdamW", fraction, opt, active)
            for r in rows[-5:]:
                r["vs torch fused"] = r["ms/step"] / fused_ms
            notes.append(f"{device} {n / 1e6:.0f}M: MaskedAdamW all-active / torch fused = "
                         f"{times[1.0] / fused_ms:.2f}x; 50% active / all-active = "
                         f"{times[0.5] / times[1.0]:.2f}x; 10% / all-active = "
                         f"{times[0.1] / times[1.0]:.2f}x")
            del opt, params
    return {"title": "MaskedAdamW vs torch.optim.AdamW (fp32, 1000x1000 tensors, 50-row modules)",
            "columns": ["device", "params", "optimizer", "active", "ms/step", "min ms", "GB/s",
                        "of copy BW",
                        "vs torch fused"],
            "rows": rows, "notes": notes}
