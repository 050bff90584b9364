"""Hypothesis strategies shared by the property tests (tests/test_prop_*.py).

Sizes favour the edge cases: 0 (empty), 1, small primes, powers of two ± 1, and, rarely, sizes
larger than one kernel chunk or block (CPU optimizer chunk 32768 elements, run inline below
4·32768; CUDA optimizer block 65536; Gram tiles set by the workspace, drawn small here so that
small problems already span many tiles). Tests draw a plain spec (ints, tuples, a seed) and
build tensors from it, so a shrunk counterexample prints as a spec a regression test can copy.
"""
from __future__ import annotations

import os

import torch
from hypothesis import strategies as st

EDGE_SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Element counts just past the kernels' chunk and block boundaries (primes where possible):
# CPU optimizer chunk 32768 and its inline threshold 131072, CUDA block 65536.
LARGE_NUMELS = [32771, 65537, 131101]


@st.composite
def dim(draw, lo: int = 0, hi: int = 40) -> int:
    """One tensor dimension: mostly an edge size, sometimes any size in [lo, hi]."""
    edge = [s for s in EDGE_SIZES if lo <= s <= hi]
    return draw(st.one_of(st.sampled_from(edge), st.integers(lo, hi)))


def divisors(n: int) -> list[int]:
    """Positive divisors of n (every size for n = 0: any group size splits nothing)."""
    if n == 0:
        return [1, 2, 3, 5]
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def group_modules(draw, num_groups: int, num_modules: int, allow_skip: bool = True) -> tuple:
    """A module id per group: -1 (unmanaged / skipped) or a module in [0, num_modules);
    sometimes a packed pattern (the same ids repeated, as Q, K and V blocks of one head); a
    short tiled pattern beyond 64 groups (hypothesis cannot draw lists of ~10^5)."""
    lo = -1 if allow_skip else 0
    if num_modules == 0:
        return (-1,) * num_groups if allow_skip else ()
    if num_groups > 64:  # many groups (a large tensor cut finely): a short pattern, tiled
        pattern = draw(st.lists(st.integers(lo, num_modules - 1), min_size=1, max_size=8))
        return tuple((pattern * (num_groups // len(pattern) + 1))[:num_groups])
    if num_groups and num_groups % 3 == 0 and draw(st.booleans()):
        third = draw(st.lists(st.integers(lo, num_modules - 1), min_size=num_groups // 3,
                              max_size=num_groups // 3))
        return tuple(third * 3)
    return tuple(draw(st.lists(st.integers(lo, num_modules - 1), min_size=num_groups,
                               max_size=num_groups)))


def seeds():
    return st.integers(0, 2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tally(test_name: str) -> None:
    """Count one example of a property test in the file named by MAT_HYPOTHESIS_TALLY, if set
    (one line per example): the long profile's true counts survive a run stopped at a deadline."""
    path = os.environ.get("MAT_HYPOTHESIS_TALLY")
    if path:
        with open(path, "a") as f:
            f.write(test_name + "\n")


def randn_strided(shape, g: torch.Generator, contiguous: bool) -> torch.Tensor:
    """randn of ``shape``; when not ``contiguous``, a non-contiguous view with the same values
    layout-wise (the dims stored in reverse order), so an op must honour strides or copy."""
    if contiguous or len(shape) < 2:
        return torch.randn(*shape, generator=g)
    return torch.randn(*reversed(shape), generator=g).permute(*reversed(range(len(shape))))
