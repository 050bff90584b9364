"""Property tests: the Gram (mNTK) ops against mat_cuda/reference.py on random problems.

Random n, T (2-D inputs too), widths with 0, 1 and primes, row and column groupings (packed
QKV patterns and skipped groups among them), bias, weight on/off, scale, every algorithm
(ghost, explicit, auto), float32 / bfloat16 / float16 inputs, contiguous or strided (transposed
storage) inputs, and small workspaces (so small
problems already run many sample-block tiles and feature chunks). K starts random: the ops add.

Error bound, per entry (derived, not tuned): each form is sums of products of the inputs, so
its float32 error is ≤ L · u32 · Kabs, where Kabs is the reference Gram of the inputs' absolute
values (|A|, |B|, |G|: it bounds every partial sum) and L counts the longest chain of additions
(Higham's γ_L): explicit form T per-sample-gradient terms then d_in·d_out Gram terms; ghost form
d_in + d_out feature terms then T² position pairs; plus the bias (T + group width), the groups
summed into one module (G) and the add into K (a few). Half inputs are exact in float32, so the
same bound holds. A wrong group, module, sample, scale or dropped term is off by ~Kabs itself.
"""
from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import U32
from mat_cuda import gram
from mat_cuda import reference as ref
from prop_strategies import (DTYPES, dim, divisors, generator, group_modules, randn_strided,
                             seeds, tally)

ALGORITHMS = ["ghost", "explicit", "auto"]
# Small workspaces force tiling over sample blocks / chunking over features (default 256 MiB).
WORKSPACES = [4, 64, 1024, 16384, gram.DEFAULT_WORKSPACE_BYTES]
SCALES = [1.0, 0.5, 3.0, -1.0]


def _assert_within(K, K_ref, K_abs, K0, chain: int, what: str):
    bound = chain * U32 * K_abs + 4 * U32 * (K0.abs() + K_ref.abs())
    err = (K.double() - K_ref).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())}/{K.numel()} entries beyond the derived "
                             f"bound (L={chain}); first at {i}: got {K[tuple(i)].item()!r}, "
                             f"reference {K_ref[tuple(i)].item()!r}, bound {bound[tuple(i)].item():.3e}")


@st.composite
def linear_problems(draw):
    n = draw(dim(0, 12))
    T = draw(st.one_of(st.none(), dim(0, 20)))
    d_in, d_out = draw(dim(0, 14)), draw(dim(0, 14))
    group_dim = draw(st.sampled_from([0, 1]))
    grouped = d_out if group_dim == 0 else d_in
    group_size = draw(st.one_of(st.none(), st.sampled_from(divisors(grouped))))
    num_groups = 1 if group_size is None or grouped == 0 else grouped // group_size
    if group_size is not None and grouped == 0:
        num_groups = 0
    M = draw(st.integers(1, 5))
    return dict(n=n, T=T, d_in=d_in, d_out=d_out, group_dim=group_dim, group_size=group_size,
                group_module=draw(group_modules(num_groups, M)), M=M,
                weight=draw(st.booleans()), bias=group_dim == 0 and draw(st.booleans()),
                scale=draw(st.sampled_from(SCALES)), algorithm=draw(st.sampled_from(ALGORITHMS)),
                dtype=draw(st.sampled_from(sorted(DTYPES))),
                workspace_bytes=draw(st.sampled_from(WORKSPACES)),
                contiguous=draw(st.booleans()), seed=draw(seeds()))


@given(pb=linear_problems())
@example(pb=dict(n=37, T=19, d_in=6, d_out=9, group_dim=0, group_size=3, group_module=(0, 1, 0),
                 M=2, weight=True, bias=True, scale=0.5, algorithm="ghost", dtype="float32",
                 workspace_bytes=1024, seed=3))  # many tiles, T past the CUDA block-per-pair size
@example(pb=dict(n=37, T=19, d_in=6, d_out=9, group_dim=1, group_size=2, group_module=(2, -1, 2),
                 M=3, weight=True, bias=False, scale=1.0, algorithm="explicit",
                 dtype="bfloat16", workspace_bytes=64, seed=4))  # explicit form chunked
def test_linear_gram_property(device, pb):
    tally("test_linear_gram_property")
    g = generator(pb["seed"])
    lead = (pb["n"],) if pb["T"] is None else (pb["n"], pb["T"])
    dtype = DTYPES[pb["dtype"]]
    A = randn_strided((*lead, pb["d_in"]), g, pb.get("contiguous", True)).to(dtype)
    B = randn_strided((*lead, pb["d_out"]), g, pb.get("contiguous", True)).to(dtype)
    K0 = torch.randn(pb["M"], pb["n"], pb["n"], generator=g)
    K0 = K0 + K0.transpose(1, 2)
    gm = list(pb["group_module"])
    kw = dict(group_dim=pb["group_dim"], group_size=pb["group_size"], weight=pb["weight"],
              bias=pb["bias"], scale=pb["scale"])
    K = K0.to(device, copy=True)
    out = gram.linear_gram_(K, A.to(device), B.to(device),
                            torch.tensor(gm, dtype=torch.long, device=device),
                            algorithm=pb["algorithm"], workspace_bytes=pb["workspace_bytes"], **kw)
    assert out is K
    K = K.cpu()
    K_ref = ref.linear_gram_(K0.double(), A, B, gm, **kw)
    K_abs = ref.linear_gram_(torch.zeros_like(K0, dtype=torch.float64), A.abs(), B.abs(), gm,
                             **dict(kw, scale=abs(pb["scale"])))
    T = 1 if pb["T"] is None else pb["T"]
    G = max(len(gm), 1)
    chain = T * T + 2 * T + pb["d_in"] * pb["d_out"] + pb["d_in"] + pb["d_out"] + G + 8
    _assert_within(K, K_ref, K_abs, K0, chain, "linear_gram_")


@st.composite
def embedding_problems(draw):
    vocab = draw(st.integers(1, 20))
    return dict(n=draw(dim(0, 10)), T=draw(dim(0, 12)), d=draw(dim(0, 14)), vocab=vocab,
                padding_idx=draw(st.one_of(st.none(), st.integers(0, vocab - 1))),
                M=(M := draw(st.integers(1, 3))), module=draw(st.integers(-1, M - 1)),
                scale=draw(st.sampled_from(SCALES)), algorithm=draw(st.sampled_from(ALGORITHMS)),
                dtype=draw(st.sampled_from(sorted(DTYPES))),
                workspace_bytes=draw(st.sampled_from(WORKSPACES)),
                contiguous=draw(st.booleans()), seed=draw(seeds()))


@given(pb=embedding_problems())
@example(pb=dict(n=33, T=17, d=13, vocab=7, padding_idx=2, M=2, module=1, scale=0.5,
                 algorithm="ghost", dtype="float32", workspace_bytes=1024, seed=5))
@example(pb=dict(n=33, T=17, d=13, vocab=19, padding_idx=None, M=2, module=0, scale=1.0,
                 algorithm="explicit", dtype="float16", workspace_bytes=64, seed=6))
def test_embedding_gram_property(device, pb):
    tally("test_embedding_gram_property")
    g = generator(pb["seed"])
    n, T, d = pb["n"], pb["T"], pb["d"]
    idx = torch.randint(0, pb["vocab"], (n, T), generator=g)
    B = randn_strided((n, T, d), g, pb.get("contiguous", True)).to(DTYPES[pb["dtype"]])
    K0 = torch.randn(pb["M"], n, n, generator=g)
    K = K0.to(device, copy=True)
    gram.embedding_gram_(K, idx.to(device), B.to(device), pb["module"],
                         padding_idx=pb["padding_idx"], scale=pb["scale"],
                         algorithm=pb["algorithm"], workspace_bytes=pb["workspace_bytes"])
    K = K.cpu()
    K_ref = ref.embedding_gram_(K0.double(), idx, B, pb["module"], padding_idx=pb["padding_idx"],
                                scale=pb["scale"])
    K_abs = ref.embedding_gram_(torch.zeros_like(K0, dtype=torch.float64), idx, B.abs(),
                                pb["module"], padding_idx=pb["padding_idx"], scale=abs(pb["scale"]))
    U = min(n * T, pb["vocab"])
    chain = T * T + 2 * T + d + U * d + 8
    _assert_within(K, K_ref, K_abs, K0, chain, "embedding_gram_")


@st.composite
def sample_problems(draw):
    p = draw(dim(0, 40))
    group_size = draw(st.one_of(st.none(), st.sampled_from(divisors(p))))
    num_groups = 1 if group_size is None or p == 0 else p // group_size
    if group_size is not None and p == 0:
        num_groups = 0
    M = draw(st.integers(1, 5))
    return dict(n=draw(dim(0, 16)), p=p, group_size=group_size, M=M,
                group_module=draw(group_modules(num_groups, M)),
                scale=draw(st.sampled_from(SCALES)), dtype=draw(st.sampled_from(sorted(DTYPES))),
                contiguous=draw(st.booleans()), seed=draw(seeds()))


@given(pb=sample_problems())
def test_sample_gram_property(device, pb):
    tally("test_sample_gram_property")
    g = generator(pb["seed"])
    G = randn_strided((pb["n"], pb["p"]), g, pb.get("contiguous", True)).to(DTYPES[pb["dtype"]])
    K0 = torch.randn(pb["M"], pb["n"], pb["n"], generator=g)
    gm = list(pb["group_module"])
    K = K0.to(device, copy=True)
    gram.sample_gram_(K, G.to(device), torch.tensor(gm, dtype=torch.long, device=device),
                      group_size=pb["group_size"], scale=pb["scale"])
    K = K.cpu()
    K_ref = ref.sample_gram_(K0.double(), G, gm, group_size=pb["group_size"], scale=pb["scale"])
    K_abs = ref.sample_gram_(torch.zeros_like(K0, dtype=torch.float64), G.abs(), gm,
                             group_size=pb["group_size"], scale=abs(pb["scale"]))
    chain = pb["p"] + len(gm) + 8
    _assert_within(K, K_ref, K_abs, K0, chain, "sample_gram_")


def test_the_bound_detects_a_misassigned_group_or_a_lost_sample():
    # The derived bound is tight enough to fail real mistakes: a Gram accumulated with two
    # groups' modules swapped, or with one sample's factor rows zeroed, lies outside it.
    g = generator(0)
    A, B = torch.randn(5, 4, 6, generator=g), torch.randn(5, 4, 8, generator=g)
    gm = [0, 1]
    K0 = torch.zeros(2, 5, 5)
    K_ref = ref.linear_gram_(K0.double(), A, B, gm, group_size=4)
    K_abs = ref.linear_gram_(K0.double(), A.abs(), B.abs(), gm, group_size=4)
    chain = 4 * 4 + 2 * 4 + 6 * 8 + 6 + 8 + 2 + 8
    good = gram.linear_gram_(K0.clone(), A, B, torch.tensor(gm), group_size=4)
    _assert_within(good, K_ref, K_abs, K0, chain, "correct")
    swapped = gram.linear_gram_(K0.clone(), A, B, torch.tensor([1, 0]), group_size=4)
    lost = B.clone()
    lost[3] = 0
    dropped = gram.linear_gram_(K0.clone(), A, lost, torch.tensor(gm), group_size=4)
    for wrong in (swapped, dropped):
        try:
            _assert_within(wrong, K_ref, K_abs, K0, chain, "wrong")
        except AssertionError:
            continue
        raise AssertionError("the bound accepted a wrong Gram")
