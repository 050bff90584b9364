"""The one place mat_cuda reads a private name of torch._dynamo (tests/test_compile.py checks it).

torch.compile keeps at most ``torch._dynamo.config.recompile_limit`` graphs per compiled
function (named ``cache_size_limit`` before torch 2.6); past it, Dynamo stops compiling that
function for new guards and runs it eagerly. MAT's compiled training needs one graph per
distinct mask, so :class:`mat_cuda.compile.CompiledModel` reads the limit to warn before it is hit.
"""
from __future__ import annotations

import torch


def recompile_limit() -> int:
    """Dynamo's per-function graph limit (an int; 8 by default in torch 2.14)."""
    import torch._dynamo  # noqa: F401  (loads torch._dynamo.config)
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise RuntimeError("mat_cuda: torch._dynamo.config has neither recompile_limit nor "
                       "cache_size_limit; mat_cuda/_dynamo.py needs updating for this torch "
                       f"({torch.__version__})")
