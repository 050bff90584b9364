"""mat_cuda: Modular Adaptive Training (MAT) for PyTorch, with C++/CUDA kernels.

See README.md for the quick start and ../shared/DESIGN.md for the math and the data flow.
"""
from ._ops import build_info
from .gram import embedding_gram_, gram_workspace, linear_gram_, sample_gram_

__version__ = "0.1.0"

__all__ = ["build_info", "__version__",
           "linear_gram_", "embedding_gram_", "sample_gram_", "gram_workspace"]
