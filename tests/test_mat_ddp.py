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

Every scenario runs in one spawn of 2 gloo processes (a module-scoped fixture), and each checks
that the ranks are bit-identical (λ history, masks, parameters): the plain run; gradient
accumulation with DDP's ``no_sync`` (2 micro-batches, the first without all-reduce); a
``torch.amp.GradScaler("cpu")``; ``probe_size``; a probe that raises on rank 0 only (both
ranks drop it and take the same step); and a resume from a checkpoint the 2-rank run
saved half way (model and optimizer from rank 0, MAT state per rank), which must equal the
uninterrupted run bit for bit.

Teardown: the ranks rendezvous through a file in the test's tmp dir (no TCP port: a port the
parent found free could be taken by another process before the ranks bind it), every collective
has a 120 s timeout (a rank left waiting by a dead peer fails instead of hanging), and both
ranks pass a barrier before destroying the process group.
"""
import contextlib
import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mat_cuda
from mat_cuda import MAT, MATPolicy, ModularPolicy
from mat_cuda.models import BertEncoderMLM, mlm_loss

WORLD, N_LOCAL, T, V, STEPS = 2, 4, 5, 23, 6


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


def _run(model, mat, data, shard, accumulation=1, scaler=None, ddp=None):
    """Train on data; with accumulation A each batch is split into A micro-batches along the
    sample axis, the first A-1 under DDP's no_sync (no gradient all-reduce)."""
    for x, y in data:
        xs, ys = x[shard], y[shard]
        micro = xs.shape[0] // accumulation
        for a in range(accumulation):
            sl = slice(a * micro, (a + 1) * micro)
            ctx = ddp.no_sync() if ddp is not None and not mat.is_last_micro_batch \
                else contextlib.nullcontext()
            with ctx:
                loss = _loss(model(xs[sl]), ys[sl]) / accumulation
                (scaler.scale(loss) if scaler is not None else loss).backward()
            mat.step()
            mat.zero_grad()
    return _result(mat)


def _result(mat, close=True):
    r = mat.report()
    params = [p.detach().clone() for p in mat.inner.parameters()]
    if close:
        mat.close()
    return {"lam": r["lam"], "mask": r["mask"], "params": params,
            "probe_size": None if mat._vectors is None else mat._vectors.shape[1],
            "probe_steps": list(mat.probe_steps), "skipped_probes": mat.skipped_probes}


def _ddp_mat(policy_steps=2, **kw):
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    kinds = mat_cuda.discover(model, ("head", "ffn")).module_map.kinds
    mat = MAT(ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-2), policy=_policy(kinds), **kw)
    return ddp, mat


def _scenario_plain(rank, shard, out_dir):
    ddp, mat = _ddp_mat()
    return _run(ddp, mat, _data(), shard)


def _scenario_no_sync(rank, shard, out_dir):
    # 2 micro-batches per step (N_LOCAL = 4 samples per rank, 2 per micro-batch).
    ddp, mat = _ddp_mat(accumulation_steps=2)
    return _run(ddp, mat, _data(), shard, accumulation=2, ddp=ddp)


def _scenario_scaler(rank, shard, out_dir):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ddp, mat = _ddp_mat(scaler=scaler)
    return _run(ddp, mat, _data(), shard, scaler=scaler)


def _scenario_probe_size(rank, shard, out_dir):
    ddp, mat = _ddp_mat(probe_size=2)
    return _run(ddp, mat, _data(), shard)


def _scenario_resume(rank, shard, out_dir):
    """Train STEPS // 2 steps, checkpoint (model and optimizer from rank 0, MAT state per rank:
    its Ritz vectors are of the rank's own K), rebuild everything, load, finish."""
    data, half = _data(), STEPS // 2
    ddp, mat = _ddp_mat()
    _run(ddp, mat, data[:half], shard)   # closes mat
    ckpt = os.path.join(out_dir, "ckpt")
    if rank == 0:
        torch.save({"model": ddp.module.state_dict(), "opt": mat.optimizer.state_dict()},
                   ckpt + ".pt")
    torch.save(mat.state_dict(), ckpt + f"_mat{rank}.pt")
    dist.barrier()
    ddp2, mat2 = _ddp_mat()
    shared = torch.load(ckpt + ".pt")
    ddp2.module.load_state_dict(shared["model"])
    mat2.optimizer.load_state_dict(shared["opt"])
    mat2.load_state_dict(torch.load(ckpt + f"_mat{rank}.pt"))
    return _run(ddp2, mat2, data[half:], shard)


def _scenario_one_rank_fails(rank, shard, out_dir):
    """Rank 0's probe at step 2 runs out of memory (simulated in its Gram kernel); rank 1's
    succeeds. Both must drop that probe and take the same step (no hang, no divergence)."""
    ddp, mat = _ddp_mat()
    real = mat_cuda.gram.linear_gram_

    def failing(*args, **kw):
        if rank == 0 and mat.step_count == 2:
            raise torch.OutOfMemoryError("simulated on rank 0")
        return real(*args, **kw)

    mat_cuda.gram.linear_gram_ = failing
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = _run(ddp, mat, _data(), shard)
    finally:
        mat_cuda.gram.linear_gram_ = real
    out["warnings"] = [str(w.message) for w in rec if "dropped" in str(w.message)]
    return out


SCENARIOS = {"plain": _scenario_plain, "one_rank_fails": _scenario_one_rank_fails, "no_sync": _scenario_no_sync, "scaler": _scenario_scaler,
             "probe_size": _scenario_probe_size, "resume": _scenario_resume}


def _worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    # A file rendezvous, not a TCP port: a port picked free by the parent can be taken by
    # another process (tests running in parallel) before the ranks bind it. The timeout turns
    # a rank stuck in a collective (its peer died) into an error instead of a hang.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        shard = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        out = {name: fn(rank, shard, out_dir) for name, fn in SCENARIOS.items()}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks finish every collective before either tears gloo down: a rank that exits
        # while its peer is still connected can abort the peer ("terminate called without an
        # active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


class _ShardedLambdaMAT(MAT):
    """Single-process MAT whose λ is the mean over the ranks' diagonal blocks of K."""

    block = N_LOCAL   # samples of one rank in the probed (micro-)batch

    def _lambda(self, K):
        b = self.block
        blocks = [K[:, r * b:(r + 1) * b, r * b:(r + 1) * b].contiguous() for r in range(WORLD)]
        lam = torch.stack([mat_cuda.lambda_max(b, check_symmetric=False) for b in blocks]).mean(0)
        return lam, None


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ranks_are_bit_identical(ranks, scenario):
    first = ranks[0][scenario]
    for other in ranks[1:]:
        assert torch.equal(other[scenario]["lam"], first["lam"])
        assert torch.equal(other[scenario]["mask"], first["mask"])
        for p, q in zip(other[scenario]["params"], first["params"]):
            assert torch.equal(p, q)
    assert not first["mask"][-1].all(), "nothing was frozen: the test checked little"


def test_ddp_matches_single_process(ranks):
    model = _model()
    kinds = mat_cuda.discover(model, ("head", "ffn")).module_map.kinds
    mat = _ShardedLambdaMAT(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                            policy=_policy(kinds))
    ref = _run(model, mat, _data(), slice(None))
    got = ranks[0]["plain"]
    torch.testing.assert_close(got["lam"], ref["lam"], rtol=1e-4, atol=1e-12)
    assert torch.equal(got["mask"], ref["mask"])
    # Adam divides by sqrt(v): gradients that differ in the last bits (summation order) move
    # near-zero-gradient entries by up to ~1e-6 at lr=1e-2; 1e-5 is 0.1% of one step's size.
    for p, q in zip(got["params"], ref["params"]):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(ranks):
    for r in ranks:
        assert torch.equal(r["resume"]["mask"][-1], r["plain"]["mask"][-1])
        for p, q in zip(r["resume"]["params"], r["plain"]["params"]):
            assert torch.equal(p, q)
    # The resumed MAT continued the saved history: the whole λ history is the plain run's.
    assert torch.equal(ranks[0]["resume"]["lam"], ranks[0]["plain"]["lam"])


def test_no_sync_accumulation_matches_single_process_accumulation(ranks):
    """The reference accumulates the same global micro-batches (micro-batch a = every rank's
    a-th half) in one process; K is the last micro-batch's, so its λ is the mean over the
    ranks' 2×2 diagonal blocks of that micro-batch's K."""
    model = _model()
    kinds = mat_cuda.discover(model, ("head", "ffn")).module_map.kinds
    mat = _ShardedLambdaMAT(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                            policy=_policy(kinds), accumulation_steps=2)
    mat.block = N_LOCAL // 2
    for x, y in _data():
        for a in range(2):
            idx = torch.cat([torch.arange(r * N_LOCAL + a * mat.block,
                                          r * N_LOCAL + (a + 1) * mat.block) for r in range(WORLD)])
            (_loss(model(x[idx]), y[idx]) / 2).backward()
            mat.step()
            mat.zero_grad()
    ref, got = _result(mat), ranks[0]["no_sync"]
    torch.testing.assert_close(got["lam"], ref["lam"], rtol=1e-4, atol=1e-12)
    assert torch.equal(got["mask"], ref["mask"])
    for p, q in zip(got["params"], ref["params"]):   # tolerance: as test_ddp_matches_single_process
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_grad_scaler_matches_the_unscaled_run(ranks):
    sc, plain = ranks[0]["scaler"], ranks[0]["plain"]
    torch.testing.assert_close(sc["lam"], plain["lam"], rtol=1e-5, atol=0)
    assert torch.equal(sc["mask"], plain["mask"])
    for p, q in zip(sc["params"], plain["params"]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_probe_size_uses_the_first_samples_of_each_rank(ranks):
    assert ranks[0]["probe_size"]["probe_size"] == 2 and ranks[0]["plain"]["probe_size"] == N_LOCAL


def test_a_probe_failing_on_one_rank_is_dropped_on_every_rank(ranks):
    for r in ranks:
        got = r["one_rank_fails"]
        assert got["skipped_probes"] == 1 and 2 not in got["probe_steps"]
        assert got["probe_steps"] == [p for p in r["plain"]["probe_steps"] if p != 2]
        assert len(got["warnings"]) == 1
    assert "OutOfMemoryError" in ranks[0]["one_rank_fails"]["warnings"][0]
    assert "on another rank" in ranks[1]["one_rank_fails"]["warnings"][0]
