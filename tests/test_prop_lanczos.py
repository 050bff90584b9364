"""Property tests: mat_cuda.linalg.lambda_max (λ_max and top-k) against the float64
eigendecomposition of mat_cuda/reference.py on random symmetric PSD batches.

Random M (0 included), n (1, primes, past the default 32-step budget, rarely past a 256-thread
CUDA block), float32 / float64, spectra (random Gram, low rank, zero, repeated eigenvalues,
magnitudes 1e-6 … 1e6), top-k, budgets (full: exact to rounding; short: bounds only), tol,
warm starts (zero rows fall back), strided (batch-last) K and NaN matrices (only their own
results become NaN).

Error bound (derived): with a full Krylov basis (budget ≥ n) Lanczos with full
reorthogonalisation is backward stable: the Ritz values are eigenvalues of K + E with
‖E‖₂ ≲ c·n·u·‖K‖₂ (each matrix-vector product is n-term dot products, each reorthogonalisation
another n), so by Weyl |λ̂_i − λ_i| ≤ ‖E‖₂. We allow (4n + 32)·u·λ_max. An early stop at
tol adds tol·λ_max (the stopping rule's documented guarantee for λ_max). With a short budget
only the Rayleigh-Ritz facts hold: λ̂_max ≤ λ_max (+ rounding) and some eigenvalue lies within
the Ritz pair's residual of λ̂_max.
"""
from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from mat_cuda import linalg
from mat_cuda.reference import lambda_max_reference
from prop_strategies import dim, generator, seeds, tally

U = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def _spectrum(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    spec = torch.rand(n, generator=g, dtype=torch.float64)
    if kind == "low_rank":
        spec[max(1, n // 3):] = 0.0
    elif kind == "zero":
        spec.zero_()
    elif kind == "repeated":  # the top eigenvalue (and another) with multiplicity
        spec = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.25] * n, dtype=torch.float64)[:n]
    elif kind == "separated":
        spec[0] = 2.0
    return spec


def _matrices(pb, g) -> torch.Tensor:
    n, M = pb["n"], pb["M"]
    out = torch.empty(M, n, n, dtype=torch.float64)
    for b in range(M):
        if pb["kind"] == "gram":
            X = torch.randn(n, max(1, n // 2), generator=g, dtype=torch.float64)
            K = X @ X.T
        else:
            Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            K = Q @ torch.diag(_spectrum(pb["kind"], n, g)) @ Q.T
        out[b] = (K + K.T) / 2 * 10.0 ** pb["log_scale"]
    return out


@st.composite
def lanczos_problems(draw):
    n = draw(st.one_of(dim(1, 40), st.sampled_from([1, 2, 3, 33, 37, 64, 257, 300])))
    if n > 64 and draw(st.integers(0, 9)):  # keep large n rare: eigvalsh and Lanczos cost n³
        n = draw(dim(1, 40))
    k = draw(st.one_of(st.none(), st.integers(1, min(8, n))))
    budget = draw(st.sampled_from(["default", "full", "short"]))
    iters = None if budget == "default" else n if budget == "full" else \
        draw(st.integers(k or 1, max(k or 1, n - 1)))
    M = draw(st.integers(0, 4))
    return dict(n=n, M=M, topk=k, iters=iters,
                tol=draw(st.sampled_from([0.0, 1e-6, 1e-3])),
                dtype=draw(st.sampled_from(["float32", "float64"])),
                kind=draw(st.sampled_from(["gram", "low_rank", "zero", "repeated", "separated"])),
                log_scale=draw(st.integers(-6, 6)),
                v0=draw(st.sampled_from(["none", "random", "zero_rows"])),
                contiguous=draw(st.booleans()),
                nan_rows=tuple(draw(st.lists(st.integers(0, max(M - 1, 0)), max_size=2,
                                             unique=True))) if M > 1 else (),
                seed=draw(seeds()))


@given(pb=lanczos_problems())
@example(pb=dict(n=300, M=2, topk=3, iters=None, tol=1e-6, dtype="float32", kind="separated",
                 log_scale=2, v0="none", nan_rows=(1,), seed=7))  # past a CUDA block, short budget
@example(pb=dict(n=37, M=3, topk=8, iters=37, tol=0.0, dtype="float64", kind="repeated",
                 log_scale=-3, v0="zero_rows", nan_rows=(), seed=8))
def test_lambda_max_property(device, pb):
    tally("test_lambda_max_property")
    g = generator(pb["seed"])
    dtype = getattr(torch, pb["dtype"])
    n, M, k = pb["n"], pb["M"], pb["topk"]
    K = _matrices(pb, g).to(dtype)
    if not pb.get("contiguous", True):  # the same values in a strided (batch-last) layout
        K = K.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for b in pb["nan_rows"]:
        K[b, 0, n - 1] = K[b, n - 1, 0] = float("nan")
    v0 = None
    if pb["v0"] != "none":
        v0 = torch.randn(M, n, generator=g, dtype=torch.float64).to(dtype)
        if pb["v0"] == "zero_rows" and M:
            v0[::2] = 0.0
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    res = linalg.lambda_max(on(K), iters=pb["iters"], tol=pb["tol"], v0=on(v0),
                            return_vectors=True, topk=k)
    res = type(res)(*(t.cpu() for t in res))
    lam = res.lambdas if k is not None else res.lambdas[:, None]
    assert lam.shape == (M, k or 1) and lam.dtype == dtype
    assert res.vectors.shape == (M, n) and res.iterations.shape == (M,)

    clean = [b for b in range(M) if b not in pb["nan_rows"]]
    for b in pb["nan_rows"]:
        assert torch.isnan(lam[b]).all() and torch.isnan(res.vectors[b]).all(), \
            f"matrix {b} holds NaN but its results are not NaN"
    if not clean:
        return
    if pb["nan_rows"]:  # the other matrices' results do not depend on the NaN ones
        alone = linalg.lambda_max(on(K[clean]), iters=pb["iters"], tol=pb["tol"],
                                  v0=None if v0 is None else on(v0[clean]), return_vectors=True,
                                  topk=k)
        alone = type(alone)(*(t.cpu() for t in alone))
        assert torch.equal(alone.lambdas, res.lambdas[clean])
        assert torch.equal(alone.vectors, res.vectors[clean])

    Kc = K[clean].double()
    ref = lambda_max_reference(Kc, topk=n)  # (m, n) all eigenvalues, descending
    lam = lam[clean].double()
    lmax = ref[:, :1].abs()
    rounding = (4 * n + 32) * U[dtype] * lmax
    budget = min(n, linalg.DEFAULT_ITERS) if pb["iters"] is None else pb["iters"]
    assert (lam[:, 1:] <= lam[:, :-1]).all(), "top-k not in descending order"
    assert (lam <= ref[:, :1] + rounding).all(), "a Ritz value above λ_max"
    y = res.vectors[clean].double()
    assert torch.allclose(y.norm(dim=1), torch.ones(len(clean), dtype=torch.float64),
                          atol=(4 * n + 32) * U[dtype]), "Ritz vector not unit norm"
    if budget >= n:
        if pb["tol"] == 0.0:  # a full basis: every requested eigenvalue exact to rounding
            want = ref[:, :lam.shape[1]]
            assert ((lam - want).abs() <= rounding).all(), \
                f"max error {(lam - want).abs().max():.3e} > bound {rounding.max():.3e}"
        else:  # early stop: λ_max within tol·λ_max
            assert ((lam[:, 0] - ref[:, 0]).abs() <= (pb["tol"] * lmax + rounding)[:, 0]).all()
    else:  # short budget: some eigenvalue within the Ritz pair's residual of λ̂_max
        resid = res.residuals[clean].double()
        gap = (ref - lam[:, :1]).abs().amin(dim=1)
        assert (gap <= resid + rounding[:, 0]).all(), "no eigenvalue within the residual"
