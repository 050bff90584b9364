"""mat_cuda: Modular Adaptive Training (MAT) for PyTorch, with C++/CUDA kernels.

See README.md for the quick start and ../shared/DESIGN.md for the math and the data flow.
"""
from ._ops import build_info
from .discovery import AttentionSpec, Discovery, FFNSpec, discover, resolve_modules
from .nn import Skipper
from .policy import MATPolicy, ModularPolicy, Policy, TemporalPolicy

__version__ = "0.1.0"

__all__ = ["build_info", "__version__", "MATPolicy", "ModularPolicy", "Policy", "TemporalPolicy",
           "AttentionSpec", "Discovery", "FFNSpec", "discover", "resolve_modules", "Skipper"]
