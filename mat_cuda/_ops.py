"""Loads the compiled extension and holds what every op wrapper shares.

The ops themselves are registered by the extension under ``torch.ops.mat_cuda``; each family's
Python module (optim, linalg, mntk) adds its fake (meta) kernels and documented wrappers. This
module owns the loading, the build information and the device check that turns a missing CUDA
build into a clear error instead of a dispatcher message.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.mat_cuda.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "mat_cuda's compiled extension (mat_cuda._C) could not be loaded: "
        f"{exc}. Build it with `pip install --no-build-isolation -e .` "
        "(MAT_CUDA_BUILD=cpu for CPU kernels only)."
    ) from exc

ops = torch.ops.mat_cuda

# A C++ extension is bound to the exact torch it was compiled against; a different torch may
# load it and then crash or misbehave, so refuse it here with the fix.
_BUILT_TORCH = _C.build_info()["torch_version"]
if _BUILT_TORCH != torch.__version__:
    raise ImportError(
        f"mat_cuda was compiled against torch {_BUILT_TORCH} but torch {torch.__version__} is "
        "installed: rebuild it against this torch with `pip install --no-build-isolation .` "
        "(`-e .` for an editable install), or reinstall the torch it was built with."
    )


def build_info() -> dict:
    """What the installed extension was compiled with.

    Returns a dict with keys ``cuda`` (bool: CUDA kernels compiled), ``cuda_arch_list`` (str),
    ``cuda_version`` (str, CUDA of the torch it was built against), ``torch_version`` (str, the
    torch it was built against), ``torch_runtime_version`` (str, the torch running now),
    ``openmp`` (bool: CPU kernels parallelised with OpenMP), ``cxx_compiler`` (str, the host
    compiler, e.g. ``"gcc 12.2.0"``), ``cuda_toolkit`` (str, nvcc's release, e.g.
    ``"13.0, V13.0.88"``; empty in a CPU build) and ``cuda_home`` (str, the toolkit's folder;
    empty in a CPU build).
    """
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    return info


_HAS_CUDA_KERNELS = bool(_C.build_info()["cuda"])


def check_device_supported(t: torch.Tensor, name: str) -> None:
    """Raise a clear error when ``t`` lives on a device this build has no kernels for."""
    if t.device.type == "cpu":
        return
    if t.device.type == "cuda":
        if not _HAS_CUDA_KERNELS:
            raise RuntimeError(
                f"mat_cuda: {name} is on {t.device}, but this build of mat_cuda has CPU kernels "
                "only. Rebuild with a CUDA build of torch and nvcc on PATH: "
                "`MAT_CUDA_BUILD=cuda pip install --no-build-isolation -e .`"
            )
        return
    if t.device.type == "meta":
        return
    raise RuntimeError(f"mat_cuda: {name} is on {t.device}; only CPU and CUDA are supported")
