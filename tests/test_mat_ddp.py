"""MAT under DistributedDataParallel (gloo, 2 CPU processes) against one process.

What is asserted, precisely. Each rank probes its own n samples, so its K is the Gram of its own
samples; MAT all-reduces λ (mean over ranks). The global batch's K would also have cross-rank
blocks, which no rank can form without exchanging factors, so DDP's λ is by definition
mean_r λ_max(K[block_r, block_r]) of the global K. The single-process reference is MAT on the
global batch whose λ is computed that way (a subclass overriding ``_lambda``); with that:
- every rank holds the same λ history, masks and parameters (bit for bit), frozen ones included;
- λ equals the reference's to Lanczos/rounding tolerance (the ranks' Ritz warm starts differ),
  the masks are equal, and the parameters equal to float tolerance (DDP sums gradients in
  another order; atol 1e-5 at lr 1e-2). The loss is a mean over samples, so the DDP-averaged gradient is the global
  batch's gradient.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mat_cuda
from mat_cuda import MAT, MATPolicy, ModularPolicy
from mat_cuda.models import BertEncoderMLM, mlm_loss

WORLD, N_LOCAL, T, V, STEPS = 2, 3, 5, 23, 5


def _model():
    torch.manual_seed(0)
    return BertEncoderMLM(V, hidden=16, layers=2, heads=2, ffn=24, max_len=8)


def _data():
    g = torch.Generator().manual_seed(7)
    n = WORLD * N_LOCAL
    out = []
    for _ in range(STEPS):
        x = torch.randint(0, V, (n, T), generator=g)
        y = torch.where(torch.rand(n, T, generator=g) < 0.5, x, torch.full_like(x, -100))
        y[:, 0] = x[:, 0]
        out.append((x, y))
    return out


def _loss(logits, y):
    # A mean over samples of per-sample sums: the global mean is the mean of equal-size shards.
    return mlm_loss(logits, y, reduction="none").sum(dim=1).mean()


def _policy(kinds):
    return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.5), warmup=0,
                     probe_every=2)


def _run(model, mat, data, shard):
    for x, y in data:
        _loss(model(x[shard]), y[shard]).backward()
        mat.step()
        mat.zero_grad()
    r = mat.report()
    params = [p.detach().clone() for p in mat.inner.parameters()]
    mat.close()
    return {"lam": r["lam"], "mask": r["mask"], "params": params}


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        kinds = mat_cuda.discover(model, ("head", "ffn")).module_map.kinds
        mat = MAT(ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-2), policy=_policy(kinds))
        out = _run(ddp, mat, _data(), slice(rank * N_LOCAL, (rank + 1) * N_LOCAL))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks finish every collective before either tears gloo down: a rank that exits
        # while its peer is still connected can abort the peer ("terminate called without an
        # active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _ShardedLambdaMAT(MAT):
    """Single-process MAT whose λ is the mean over the ranks' diagonal blocks of K."""

    def _lambda(self, K):
        blocks = [K[:, r * N_LOCAL:(r + 1) * N_LOCAL, r * N_LOCAL:(r + 1) * N_LOCAL].contiguous()
                  for r in range(WORLD)]
        lam = torch.stack([mat_cuda.lambda_max(b, check_symmetric=False) for b in blocks]).mean(0)
        return lam, None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for other in ranks[1:]:
        assert torch.equal(other["lam"], ranks[0]["lam"])
        assert torch.equal(other["mask"], ranks[0]["mask"])
        for p, q in zip(other["params"], ranks[0]["params"]):
            assert torch.equal(p, q)
    assert not ranks[0]["mask"][-1].all(), "nothing was frozen: the test checked little"

    model = _model()
    kinds = mat_cuda.discover(model, ("head", "ffn")).module_map.kinds
    mat = _ShardedLambdaMAT(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                            policy=_policy(kinds))
    ref = _run(model, mat, _data(), slice(None))
    # Each rank's Lanczos warm-starts from its own Ritz vectors: λ agrees to the stopping tol
    # (1e-6 relative) plus float32 Grams; 1e-4 also covers DDP's gradient sum order.
    torch.testing.assert_close(ranks[0]["lam"], ref["lam"], rtol=1e-4, atol=1e-12)
    assert torch.equal(ranks[0]["mask"], ref["mask"])
    # Adam divides by sqrt(v): gradients that differ in the last bits (summation order) move
    # near-zero-gradient entries by up to ~1e-6 at lr=1e-2; 1e-5 is 0.1% of one step's size.
    for p, q in zip(ranks[0]["params"], ref["params"]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
