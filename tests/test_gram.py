"""Gram kernels (mat_cuda.gram) against the float64 references of mat_cuda.reference, which
build per-sample gradients explicitly (einsum) and take per-module Grams."""
import pytest
import torch

from mat_cuda import gram, reference as ref
from helpers import rel_err

# fp32 accumulation vs the float64 reference, on the same (possibly rounded) inputs: norm-wise
# ≲ sqrt(L)·u32 … L·u32 for reductions of L ≲ 200 terms here (1e-6 … 1e-5); the per-entry
# derived bound is in tests/test_prop_gram.py.
TOL = 1e-5
ALGORITHMS = ["ghost", "explicit", "auto"]


def _rand(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, device=device).to(dtype)


def _check_linear(device, A, B, gm, M, *, dtype=torch.float32, **kw):
    n = A.shape[0]
    K = _rand(M, n, n, device=device)
    K64 = K.double().cpu()
    gmt = torch.tensor(gm, dtype=torch.long, device=device)
    out = gram.linear_gram_(K, A, B, gmt, **kw)
    assert out is K
    kw.pop("algorithm", None)
    kw.pop("workspace_bytes", None)
    kw.pop("workspace", None)
    ref.linear_gram_(K64, A.cpu(), B.cpu(), gm, **kw)
    err = rel_err(K, K64)
    assert err <= TOL, f"relative error {err:.3e} > {TOL:.0e}"


# (n, T (None = 2-D inputs), d_in, d_out, group_dim, group_size, group_module, bias)
LINEAR_CASES = [
    (4, 6, 5, 7, 0, None, [0], False),
    (4, 6, 5, 7, 0, None, [1], True),
    (3, None, 9, 6, 0, 2, [0, 2, 1], True),
    (5, 3, 8, 6, 0, 3, [1, -1], True),
    (6, 5, 12, 7, 1, 4, [0, 1, 0], False),
    (2, 11, 6, 10, 1, 1, [0, 1, -1, 1, 0, 0], False),
    (1, 4, 3, 5, 0, 5, [0], True),  # n = 1
    (7, 1, 13, 3, 0, 1, [2, 1, 0], True),
    (5, None, 1, 1, 1, None, [0], False),
    (3, 37, 5, 6, 0, 3, [0, 1], True),  # T >= 16: the CUDA kernel's block-per-pair path
    (2, 16, 4, 4, 1, 2, [1, 1], False),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"n{c[0]}T{c[1]}g{c[4]}-{c[5]}b{int(c[7])}")
def test_linear_gram_matches_reference(device, algorithm, case):
    n, T, d_in, d_out, group_dim, group_size, gm, bias = case
    lead = (n,) if T is None else (n, T)
    A, B = _rand(*lead, d_in, device=device), _rand(*lead, d_out, device=device)
    _check_linear(device, A, B, gm, 3, group_dim=group_dim, group_size=group_size, bias=bias,
                  scale=0.7, algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ["ghost", "explicit"])
@pytest.mark.parametrize("group_dim", [0, 1])
def test_linear_gram_tiled_by_small_workspace(device, algorithm, group_dim):
    # A workspace of a few KB forces sample tiles (ghost: off-diagonal tiles mirrored, group
    # chunks) and column chunks (explicit).
    n, T, d_in, d_out = 9, 5, 12, 8
    A, B = _rand(n, T, d_in, device=device), _rand(n, T, d_out, device=device)
    grouped = d_out if group_dim == 0 else d_in
    gm = [g % 3 for g in range(grouped // 2)]
    for ws in (64, 1500, 6000):
        _check_linear(device, A, B, gm, 3, group_dim=group_dim, group_size=2,
                      bias=group_dim == 0, algorithm=algorithm, workspace_bytes=ws)
    # A caller's reusable workspace: too small for one chunk (a fresh buffer is used), a few
    # chunks, everything at once; its contents never matter.
    for numel in (1, 200, 10_000):
        workspace = torch.full((numel,), float("nan"), device=device)
        _check_linear(device, A, B, gm, 3, group_dim=group_dim, group_size=2,
                      bias=group_dim == 0, algorithm=algorithm, workspace=workspace)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_packed_qkv_head_gram_is_sum_of_its_qkv_slices(device, algorithm):
    # A packed QKV weight (3·H·dh, d): head h owns rows h·dh..(h+1)·dh of each of the Q, K, V
    # blocks plus its bias entries; its Gram is the sum of those three slices' Grams.
    n, T, d, H, dh = 4, 6, 10, 3, 4
    A, B = _rand(n, T, d, device=device), _rand(n, T, 3 * H * dh, device=device)
    gm = list(range(H)) * 3
    K = torch.zeros(H, n, n, device=device)
    gram.linear_gram_(K, A, B, torch.tensor(gm, device=device), group_size=dh, bias=True,
                      algorithm=algorithm)
    g = torch.einsum("nto,nti->noi", B.double().cpu(), A.double().cpu())
    gb = B.double().cpu().sum(1)
    for h in range(H):
        want = torch.zeros(n, n, dtype=torch.float64)
        for blk in range(3):
            rows = slice(blk * H * dh + h * dh, blk * H * dh + (h + 1) * dh)
            flat = torch.cat([g[:, rows].reshape(n, -1), gb[:, rows]], 1)
            want += flat @ flat.T
        assert rel_err(K[h], want) <= TOL


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_linear_gram_bias_only_and_zero_T(device, algorithm):
    n, d_in, d_out = 5, 4, 6
    A, B = _rand(n, 3, d_in, device=device), _rand(n, 3, d_out, device=device)
    _check_linear(device, A, B, [0, 1], 2, group_size=3, weight=False, bias=True,
                  algorithm=algorithm)
    # n = 0: nothing to do, no error.
    gram.linear_gram_(torch.zeros(2, 0, 0, device=device), _rand(0, 3, d_in, device=device),
                      _rand(0, 3, d_out, device=device), torch.tensor([0, 1], device=device),
                      group_size=3, bias=True, algorithm=algorithm)
    # T = 0 contributes nothing: K unchanged.
    K = _rand(2, n, n, device=device)
    before = K.clone()
    gram.linear_gram_(K, _rand(n, 0, d_in, device=device), _rand(n, 0, d_out, device=device),
                      torch.tensor([0, 1], device=device), group_size=3, bias=True,
                      algorithm=algorithm)
    assert torch.equal(K, before)


@pytest.mark.parametrize("algorithm", ["ghost", "explicit"])
def test_linear_gram_non_contiguous_inputs(device, algorithm):
    # Hooks may hand over transposed or sliced views.
    n, T, d_in, d_out = 4, 5, 6, 8
    A = _rand(n, d_in, T, device=device).transpose(1, 2)
    B = _rand(d_out * 2, n, T, device=device).permute(1, 2, 0)[:, :, ::2]
    _check_linear(device, A, B, [1, 0], 2, group_size=4, bias=True, algorithm=algorithm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["ghost", "explicit"])
def test_linear_gram_half_inputs_accumulate_in_fp32(device, dtype, algorithm):
    # Inputs are upcast before any product, so against the reference on the same rounded inputs
    # only fp32 accumulation error remains; the tolerance is still loosened a little for the
    # half-precision inputs' larger dynamic range of partial sums.
    n, T, d_in, d_out = 6, 7, 16, 12
    A, B = _rand(n, T, d_in, device=device, dtype=dtype), _rand(n, T, d_out, device=device, dtype=dtype)
    _check_linear(device, A, B, [0, 1, 1], 2, group_size=4, bias=True, algorithm=algorithm)


def _form_that_ran(run, K0):
    """Which form "auto" ran, told by its bits: the ghost and explicit forms sum in different
    orders (so their float32 results differ in the last bits, asserted here), and each form is
    deterministic (no atomics; same shapes, same GEMMs), so "auto" equals exactly one of them."""
    out = {}
    for algorithm in ("ghost", "explicit", "auto"):
        K = K0.clone()
        run(K, algorithm)
        out[algorithm] = K
    assert not torch.equal(out["ghost"], out["explicit"]), "the forms are indistinguishable here"
    matches = [a for a in ("ghost", "explicit") if torch.equal(out["auto"], out[a])]
    assert len(matches) == 1, f"auto matches {matches}"
    return matches[0]


@pytest.mark.parametrize("n, T, expected", [(8, 1, "ghost"), (3, 40, "explicit")])
def test_linear_gram_auto_picks_the_cheaper_form(device, n, T, expected):
    # Cost model (csrc/mntk/gram_driver.h, d_in = 6, d_out = 5, one group): ghost ~(nT)²·12,
    # explicit ~n(T + n)·30. n=8, T=1: 768 vs 2160 → ghost; n=3, T=40: 172800 vs 3870 → explicit.
    A, B = _rand(n, T, 6, device=device), _rand(n, T, 5, device=device)
    _check_linear(device, A, B, [0], 1, algorithm="auto")
    gm = torch.tensor([0], device=device)
    ran = _form_that_ran(lambda K, a: gram.linear_gram_(K, A, B, gm, algorithm=a),
                         _rand(1, n, n, device=device))
    assert ran == expected


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("T", [9, 20])
def test_embedding_gram_matches_reference(device, padding_idx, T):
    n, d = 5, 6
    idx = torch.randint(0, 4, (n, T), device=device)  # few ids: many repeats within and across samples
    B = _rand(n, T, d, device=device)
    K = _rand(3, n, n, device=device)
    K64 = K.double().cpu()
    out = gram.embedding_gram_(K, idx, B, 1, padding_idx=padding_idx, scale=1.3)
    assert out is K
    ref.embedding_gram_(K64, idx.cpu(), B.cpu(), 1, padding_idx=padding_idx, scale=1.3)
    assert rel_err(K, K64) <= TOL


@pytest.mark.parametrize("algorithm, num_embeddings", [
    ("ghost", None), ("explicit", None), ("auto", None), ("sync_free", None), ("sync_free", 5),
    ("sync_free", 1000)])
@pytest.mark.parametrize("n,T,d,padding_idx", [(5, 9, 7, None), (5, 9, 7, 1), (1, 6, 3, 0),
                                               (4, 1, 5, None), (1, 1, 1, None)])
def test_embedding_gram_algorithms_match_reference(device, algorithm, num_embeddings, n, T, d,
                                                   padding_idx):
    # Few ids over many positions: repeats within and across samples.
    idx = torch.randint(0, 5, (n, T), device=device)
    B = _rand(n, T, d, device=device)
    K = _rand(2, n, n, device=device)
    K64 = K.double().cpu()
    gram.embedding_gram_(K, idx, B, 0, padding_idx=padding_idx, scale=0.7, algorithm=algorithm,
                         num_embeddings=num_embeddings)
    ref.embedding_gram_(K64, idx.cpu(), B.cpu(), 0, padding_idx=padding_idx, scale=0.7)
    assert rel_err(K, K64) <= TOL


@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embedding_gram_auto_short_sequences(device, padding_idx):
    # All ids distinct at T = 2: U = n·T makes the explicit Gram (n²·U·d) dearer than the
    # ghost one ((nT)²·d), so "auto" takes the ghost branch after counting U.
    n, T, d = 8, 2, 4
    idx = torch.randperm(n * T, device=device).view(n, T)
    B = _rand(n, T, d, device=device)
    K = _rand(1, n, n, device=device)
    K64 = K.double().cpu()
    gram.embedding_gram_(K, idx, B, 0, padding_idx=padding_idx, algorithm="auto")
    ref.embedding_gram_(K64, idx.cpu(), B.cpu(), 0, padding_idx=padding_idx)
    assert rel_err(K, K64) <= TOL
    run = lambda K, a: gram.embedding_gram_(K, idx, B, 0, padding_idx=padding_idx, algorithm=a)  # noqa: E731
    assert _form_that_ran(run, _rand(1, n, n, device=device)) == "ghost"


def test_embedding_gram_auto_takes_explicit_for_few_ids(device):
    # Two ids over long sequences: U = 2, so explicit ~n·d·(T + n·U) = 6·4·(40 + 12) = 1248
    # multiply-adds against ghost's ~(nT)²·(d + 3) = 240²·7 ≈ 4·10^5: "auto" runs explicit.
    n, T, d = 6, 40, 4
    idx = torch.randint(0, 2, (n, T), device=device)
    B = _rand(n, T, d, device=device)
    run = lambda K, a: gram.embedding_gram_(K, idx, B, 0, algorithm=a)  # noqa: E731
    assert _form_that_ran(run, _rand(1, n, n, device=device)) == "explicit"


@pytest.mark.parametrize("workspace_bytes", [4, 200, 1 << 20])
def test_embedding_gram_explicit_chunked(device, workspace_bytes):
    # A workspace smaller than the per-sample gradients chunks the explicit form over d
    # (4 bytes: one column per chunk); bfloat16 B exercises the float32 conversion.
    n, T, d = 6, 8, 9
    idx = torch.randint(0, 40, (n, T), device=device)
    B = _rand(n, T, d, device=device).to(torch.bfloat16)
    K = torch.zeros(1, n, n, device=device)
    gram.embedding_gram_(K, idx, B, 0, algorithm="explicit", workspace_bytes=workspace_bytes)
    K64 = torch.zeros(1, n, n, dtype=torch.float64)
    ref.embedding_gram_(K64, idx.cpu(), B.float().cpu(), 0)
    assert rel_err(K, K64) <= TOL


def test_embedding_gram_tiled_and_skipped(device):
    n, T, d = 7, 4, 5
    idx = torch.randint(0, 6, (n, T), device=device)
    B = _rand(n, T, d, device=device)
    K = torch.zeros(2, n, n, device=device)
    gram.embedding_gram_(K, idx, B, 0, workspace_bytes=300)
    K64 = torch.zeros(2, n, n, dtype=torch.float64)
    ref.embedding_gram_(K64, idx.cpu(), B.cpu(), 0)
    assert rel_err(K, K64) <= TOL
    before = K.clone()
    gram.embedding_gram_(K, idx, B, -1)
    assert torch.equal(K, before)


@pytest.mark.parametrize("group_size,gm", [(None, [1]), (3, [0, -1, 1, 0]), (1, [1] * 12)])
def test_sample_gram_matches_reference(device, group_size, gm):
    n, p = 6, 12
    G = _rand(n, p, device=device)
    K = _rand(2, n, n, device=device)
    K64 = K.double().cpu()
    gram.sample_gram_(K, G, torch.tensor(gm, device=device), group_size=group_size, scale=0.5)
    ref.sample_gram_(K64, G.cpu(), gm, group_size=group_size, scale=0.5)
    assert rel_err(K, K64) <= TOL


def test_opcheck(device):
    n = 3
    K = torch.zeros(2, n, n, device=device)
    A, B = _rand(n, 4, 5, device=device), _rand(n, 4, 6, device=device)
    gm = torch.tensor([0, 1, -1], device=device)
    for algorithm in (1, 2):
        torch.library.opcheck(torch.ops.mat_cuda.linear_gram_,
                              (K, A, B, gm, 0, 2, True, True, 0.5, algorithm, 1 << 20))
        torch.library.opcheck(torch.ops.mat_cuda.linear_gram_,
                              (K, A, B, gm, 0, 2, True, True, 0.5, algorithm, 1 << 20,
                               torch.empty(1000, device=device)))
    idx = torch.randint(0, 3, (n, 4), device=device)
    for algorithm in (0, 1, 2):
        torch.library.opcheck(torch.ops.mat_cuda.embedding_gram_,
                              (K, idx, B, 1, 0, 1.0, algorithm, 1 << 20))
    torch.library.opcheck(torch.ops.mat_cuda.sample_gram_,
                          (K, _rand(n, 6, device=device), gm, 2, 1.0))


def _linear_args(device, n=3, T=4, d_in=5, d_out=6):
    return dict(K=torch.zeros(2, n, n, device=device), A=_rand(n, T, d_in, device=device),
                B=_rand(n, T, d_out, device=device),
                group_module=torch.tensor([0, 1, 0], device=device))


BAD_LINEAR = [
    ("K dtype", lambda a: a.update(K=a["K"].double()), {}, "K must have dtype"),
    ("K shape", lambda a: a.update(K=torch.zeros(2, 4, 4, device=a["K"].device)), {}, "n = 3"),
    ("K contiguous", lambda a: a.update(K=torch.zeros(2, 3, 6, device=a["K"].device)[:, :, :3]), {}, "contiguous"),
    ("n mismatch", lambda a: a.update(B=a["B"][:2]), {}, "same sample count"),
    ("T mismatch", lambda a: a.update(B=a["B"][:, :3]), {}, "sequence length"),
    ("dtype mismatch", lambda a: a.update(B=a["B"].half()), {}, "B must have A's dtype"),
    ("int dtype", lambda a: a.update(A=a["A"].long(), B=a["B"].long()), {}, "A must be float32"),
    ("group_size divides", lambda a: None, {"group_size": 4}, "must divide"),
    ("group count", lambda a: a.update(group_module=a["group_module"][:2]), {}, "one entry per group"),
    ("module id", lambda a: a.update(group_module=a["group_module"] + 1), {}, "group_module ids"),
    ("module id -2", lambda a: a.update(group_module=a["group_module"] - 2), {}, "group_module ids"),
    ("gm dtype", lambda a: a.update(group_module=a["group_module"].int()), {}, "group_module must have dtype"),
    ("bias cols", lambda a: None, {"group_dim": 1, "bias": True, "group_size": 5}, "bias=True needs group_dim=0"),
    ("group_dim", lambda a: None, {"group_dim": 2}, "group_dim must be"),
    ("algorithm", lambda a: None, {"algorithm": "fast"}, "algorithm must be"),
    ("workspace dtype", lambda a: None, {"workspace": torch.empty(100, dtype=torch.float64)}, "workspace must"),
]


@pytest.mark.parametrize("name,mutate,kw,msg", BAD_LINEAR, ids=[c[0] for c in BAD_LINEAR])
def test_linear_gram_bad_inputs_raise_and_leave_K(device, name, mutate, kw, msg):
    args = _linear_args(device)
    mutate(args)
    kw = {"group_size": 2, **kw}
    K = args["K"]
    before = K.clone()
    with pytest.raises((RuntimeError, ValueError), match=msg):
        gram.linear_gram_(K, args["A"], args["B"], args["group_module"], **kw)
    assert torch.equal(K, before)


def test_embedding_and_sample_gram_bad_inputs(device):
    n = 3
    K = torch.zeros(2, n, n, device=device)
    before = K.clone()
    B = _rand(n, 4, 5, device=device)
    idx = torch.randint(0, 3, (n, 4), device=device)
    with pytest.raises(RuntimeError, match="module must be in"):
        gram.embedding_gram_(K, idx, B, 2)
    with pytest.raises(RuntimeError, match="indices must have dtype"):
        gram.embedding_gram_(K, idx.int(), B, 0)
    with pytest.raises(RuntimeError, match="matching indices"):
        gram.embedding_gram_(K, idx[:, :3], B, 0)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        gram.embedding_gram_(K, idx, B, 0, algorithm="dense")
    with pytest.raises(RuntimeError, match="algorithm must be 0"):
        torch.ops.mat_cuda.embedding_gram_(K, idx, B, 0, None, 1.0, 4, 1 << 20)
    with pytest.raises(RuntimeError, match="must divide"):
        gram.sample_gram_(K, _rand(n, 7, device=device), torch.tensor([0, 1], device=device),
                          group_size=2)
    with pytest.raises(RuntimeError, match="K must have shape"):
        gram.sample_gram_(torch.zeros(2, n, device=device), _rand(n, 4, device=device),
                          torch.tensor([0], device=device))
    assert torch.equal(K, before)


def test_wrong_device_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    K = torch.zeros(1, 2, 2, device="cuda")
    with pytest.raises(RuntimeError, match="A must be on K's device"):
        gram.linear_gram_(K, torch.randn(2, 3, 4), torch.randn(2, 3, 5, device="cuda"),
                          torch.tensor([0], device="cuda"))


def test_torch_compile_fullgraph(device):
    # The wrappers and fake kernels trace without graph breaks (validate=False: the CUDA id
    # check would read values on the host).
    def probe(K, A, B, gm, idx, G):
        gram.linear_gram_(K, A, B, gm, group_size=2, bias=True, validate=False)
        gram.embedding_gram_(K, idx, B, 0, padding_idx=1)
        gram.sample_gram_(K, G, gm, group_size=2, validate=False)
        return K

    n = 3
    args = (_rand(n, 4, 5, device=device), _rand(n, 4, 6, device=device),
            torch.tensor([0, 1, -1], device=device), torch.randint(0, 3, (n, 4), device=device),
            _rand(n, 6, device=device))
    K, K_eager = torch.zeros(2, n, n, device=device), torch.zeros(2, n, n, device=device)
    torch.compile(probe, fullgraph=True, backend="aot_eager")(K, *args)
    probe(K_eager, *args)
    assert rel_err(K, K_eager) <= TOL


@pytest.mark.parametrize("n, T", [(2, 40), (40, 2), (6, 6)])
@pytest.mark.parametrize("num_embeddings", [None, 7, 50, 100000])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_gram_sync_free_matches_other_forms(device, n, T, num_embeddings, padding_idx):
    # The sync-free form against the counting forms on the same inputs: the same Gram up to
    # float32 rounding. (2, 40): n < T, so its explicit form over the static id bound is the
    # cheaper (and is taken); (40, 2): the ghost form is; num_embeddings 7 <= nT: the ids are the
    # explicit form's slots; None / 100000: dense ranks of the ids (sorted, sync-free).
    d = 5
    V = 7 if num_embeddings is None else min(num_embeddings, 50)
    idx = torch.randint(0, V, (n, T), device=device)
    B = _rand(n, T, d, device=device)
    outs = {}
    for algorithm in ("ghost", "explicit", "sync_free"):
        K = torch.zeros(1, n, n, device=device)
        gram.embedding_gram_(K, idx, B, 0, padding_idx=padding_idx, algorithm=algorithm,
                             num_embeddings=num_embeddings)
        outs[algorithm] = K
    K64 = torch.zeros(1, n, n, dtype=torch.float64)
    ref.embedding_gram_(K64, idx.cpu(), B.cpu(), 0, padding_idx=padding_idx)
    for algorithm, K in outs.items():
        assert rel_err(K, K64) <= TOL, algorithm
    assert rel_err(outs["sync_free"], outs["explicit"]) <= TOL
    assert rel_err(outs["sync_free"], outs["ghost"]) <= TOL


def test_embedding_gram_rejects_bad_num_embeddings():
    K = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="num_embeddings must be None or a positive int"):
        gram.embedding_gram_(K, torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 4), 0,
                             algorithm="sync_free", num_embeddings=0)
