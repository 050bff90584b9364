"""The environment report for bug reports (`python -m mat_cuda`).

``environment()`` collects what a maintainer needs to reproduce a problem: mat_cuda's and
torch's versions, what the extension was built with (``build_info()``: CUDA or not, the arch
list, the host compiler, the CUDA toolkit), the devices this process sees and the CPU threads.
``format_report()`` renders it as plain text.
"""
from __future__ import annotations

import os
import platform
import sys

import torch

from ._ops import build_info


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name,
                        "capability": f"{props.major}.{props.minor}",
                        "memory_gib": round(props.total_memory / 2**30, 1)})
    return devices


def environment() -> dict:
    """What this process runs: a dict of plain values (str, int, bool, list, dict)."""
    import mat_cuda

    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:  # numpy is a dependency, but report rather than fail
        numpy_version = None
    return {
        "mat_cuda": {"version": mat_cuda.__version__,
                     "installed_distribution": _distribution_version("mat_cuda") or "none (a source tree)",
                     "location": os.path.dirname(os.path.abspath(mat_cuda.__file__))},
        "python": f"{platform.python_version()} ({platform.python_implementation()}, "
                  f"{sys.executable})",
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  "debug": torch.version.debug},
        "numpy": numpy_version,
        "build_info": build_info(),
        "devices": {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
                    "cuda_available": torch.cuda.is_available(),
                    "cuda": _cuda_devices(),
                    "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "unset")},
        "threads": {"torch_num_threads": torch.get_num_threads(),
                    "torch_num_interop_threads": torch.get_num_interop_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
                    "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "unset"),
                    "openmp_in_torch": torch.backends.openmp.is_available()},
    }


def format_report(env: dict | None = None) -> str:
    """``environment()`` as text, one ``key: value`` per line under a heading per section."""
    env = environment() if env is None else env
    lines = ["mat_cuda environment report (paste it whole into a bug report)"]
    for section, value in env.items():
        if isinstance(value, dict):
            lines.append(f"{section}:")
            for key, item in value.items():
                if isinstance(item, list):
                    lines.append(f"  {key}: {'none' if not item else ''}")
                    lines += [f"    - {entry}" for entry in item]
                else:
                    lines.append(f"  {key}: {item}")
        else:
            lines.append(f"{section}: {value}")
    return "\n".join(lines)
