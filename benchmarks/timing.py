"""The one timing helper every benchmark uses, and the environment record printed beside numbers.

Machines here are shared and noisy: time many repetitions, report the median, and compare
against the PyTorch baseline measured in the same run (ratios, not absolute targets).
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def time_fn(fn: Callable[[], object], device: str | torch.device = "cpu", warmup: int = 3,
            repeat: int = 20, min_time_s: float = 0.0) -> dict:
    """Median wall time of ``fn()`` in milliseconds.

    Warm-up calls run first (module loads, allocator, caches). On CUDA each call is bracketed
    by CUDA events (no host clock); on CPU by ``time.perf_counter``. With ``min_time_s`` the
    repetitions continue until that much time has been spent, for very short functions.
    Returns {"median_ms", "min_ms", "max_ms", "n"}.
    """
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        while len(times) < repeat or time.perf_counter() - start_all < min_time_s:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        while len(times) < repeat or time.perf_counter() - start_all < min_time_s:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "n": len(times)}


def environment() -> dict:
    """Device, versions and commit, recorded beside every table of numbers."""
    import mat_cuda
    from mat_cuda.environment import cpu_name

    env = {
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mat_cuda_build": mat_cuda.build_info(),
        "commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def devices() -> list[str]:
    """The devices a benchmark sweeps: CPU always, CUDA when present and built."""
    import mat_cuda

    out = ["cpu"]
    if torch.cuda.is_available() and mat_cuda.build_info()["cuda"]:
        out.append("cuda")
    return out


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns``; floats to 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
