"""mat_cuda: Modular Adaptive Training (MAT) for PyTorch, with C++/CUDA kernels.

See README.md for the quick start and ../shared/DESIGN.md for the math and the data flow.
"""
from ._ops import build_info
from . import linalg
from .discovery import AttentionSpec, Discovery, FFNSpec, discover, resolve_modules
from .gram import embedding_gram_, linear_gram_, sample_gram_
from .compile import CompiledModel, compile_model
from .linalg import lambda_max
from .mat import MAT
from .mntk import MNTKProbe
from .modules import ModuleMap
from .nn import Skipper
from .optim import MaskedAdamW, MaskedSGD
from .policy import MATPolicy, ModularPolicy, Policy, PolicyScheduleWarning, TemporalPolicy

__version__ = "0.1.0"

__all__ = [
    "build_info", "__version__",
    # kernels and their wrappers
    "MaskedAdamW", "MaskedSGD", "ModuleMap", "linalg", "lambda_max",
    "linear_gram_", "embedding_gram_", "sample_gram_", "MNTKProbe",
    # MAT and its building blocks
    "MAT", "CompiledModel", "compile_model",
    "MATPolicy", "ModularPolicy", "Policy", "PolicyScheduleWarning", "TemporalPolicy",
    "AttentionSpec", "Discovery", "FFNSpec", "discover", "resolve_modules", "Skipper",
]
