"""Plain regression tests: the shrunk counterexamples the property tests (tests/test_prop_*.py)
found, kept as fixed cases so they run on every CI run whatever hypothesis draws.
docs/testing.md lists what each one was and how it was fixed."""
import torch

from mat_cuda import gram, linalg
from mat_cuda import reference as ref


def test_gram_references_accept_zero_samples():
    # Found by test_linear_gram_property / test_embedding_gram_property: the references reshaped
    # per-sample gradients with reshape(n, -1), which raises for n = 0 (ambiguous -1). The ops
    # accept n = 0 (K is (M, 0, 0)); the references now do too.
    K = torch.zeros(2, 0, 0)
    A, B = torch.randn(0, 1, 1), torch.randn(0, 1, 1)
    gram.linear_gram_(K, A, B, torch.tensor([0]), algorithm="ghost")
    assert ref.linear_gram_(torch.zeros(2, 0, 0, dtype=torch.float64), A, B, [0]).shape == (2, 0, 0)
    idx, E = torch.zeros(0, 1, dtype=torch.long), torch.randn(0, 1, 1)
    gram.embedding_gram_(K, idx, E, 0)
    assert ref.embedding_gram_(torch.zeros(1, 0, 0, dtype=torch.float64), idx, E, 0).shape == (1, 0, 0)


def test_topk_descending_with_eigenvalues_equal_to_rounding():
    # Found by test_lambda_max_property (n=3, rank-1 Gram, topk=3, float64, full budget): the
    # two zero eigenvalues came back as [-7.6e-16, 1.1e-16], not descending (bisection stops
    # within 2·eps·‖T‖). Fixed in csrc/linalg/lanczos.h: each value is clamped to the one before.
    g = torch.Generator().manual_seed(0)
    for seed in range(20):
        X = torch.randn(3, 1, generator=g, dtype=torch.float64)
        K = (X @ X.T)[None]
        lam = linalg.lambda_max(K, topk=3, tol=0.0, seed=seed)
        assert (lam[:, 1:] <= lam[:, :-1]).all(), f"seed {seed}: {lam.tolist()}"
        assert torch.allclose(lam, ref.lambda_max_reference(K, topk=3), rtol=0, atol=1e-14)
