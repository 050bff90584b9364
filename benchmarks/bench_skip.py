"""Compute skipping: training-step time and FLOPs of a BERT-small-shaped encoder with modules frozen.

The encoder has BERT-Small's shape (Turc et al. 2019: 4 layers, hidden 512, 8 heads, FFN 2048)
with the benchmark suite's 8192-token vocabulary; the MLM head runs at the masked positions.
A step is forward + backward + ``MaskedAdamW`` with the mask in force (MAT's step: frozen
modules' parameters are not updated; frozen FFNs have no gradients at all). Frozen: the same
fraction of heads and of FFN blocks, chosen at random once (fixed seed); embeddings, norms and
the MLM head always train.
``detach``: gradients stop at frozen modules (partial back-propagation); ``exact``: dX exact,
only frozen weights' gradients skipped. FLOPs (forward + backward) from
``torch.utils.flop_counter.FlopCounterMode``. The 100% row is the ceiling: what remains of the
step with every head and FFN frozen (forward, embeddings, norms, MLM head, residual path).
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mat_cuda.discovery import discover
from mat_cuda.optim import MaskedAdamW
from mat_cuda.models import BertEncoderMLM, mlm_loss
from mat_cuda.nn import Skipper

from .timing import time_fn

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _config(quick: bool) -> dict:
    if quick:
        return dict(vocab=1000, hidden=128, layers=2, heads=4, ffn=512, t=32, n=8, repeat=3)
    return dict(vocab=8192, hidden=512, layers=4, heads=8, ffn=2048, t=128, n=16, repeat=5)


def _frozen_mask(mm, frac: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(mm.num_modules, dtype=torch.bool)
    for kind in ("head", "ffn"):
        ids = torch.tensor(mm.modules_of_kind(kind))
        k = int(round(frac * len(ids)))
        mask[ids[torch.randperm(len(ids), generator=g)[:k]]] = False
    return mask


def _setup(cfg: dict, device: str, mode: str | None):
    torch.manual_seed(0)
    model = BertEncoderMLM(cfg["vocab"], hidden=cfg["hidden"], layers=cfg["layers"], heads=cfg["heads"],
                           ffn=cfg["ffn"], max_len=cfg["t"]).to(device)
    found = discover(model)
    mm = found.module_map
    skipper = Skipper.from_discovery(found, mode=mode) if mode is not None else None
    opt = MaskedAdamW(model.parameters(), lr=1e-4, module_map=mm)
    ids = torch.randint(0, cfg["vocab"], (cfg["n"], cfg["t"]), device=device)
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]

    def fwd_bwd():
        mlm_loss(model(ids, predict=labels != -100), labels).backward()  # head at masked positions

    def step():
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return mm, skipper, fwd_bwd, step, opt


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def run(devices: list[str], quick: bool) -> dict:
    cfg = _config(quick)
    rows = []
    threads = torch.get_num_threads()
    try:
        # One thread on CPU: its process CPU time is the step's compute, undisturbed by other
        # jobs on shared cores (with several threads, OpenMP spin-waits would count too).
        torch.set_num_threads(1)
        for device in devices:
            rows += _run_device(cfg, device)
    finally:
        torch.set_num_threads(threads)
    notes = [
        "BERT-style encoder (post-LN, MLM head untied, vocab {vocab}): hidden {hidden}, {layers} "
        "layers, {heads} heads, FFN {ffn}, T={t}, n={n}; step = fwd+bwd+MaskedAdamW (mask in "
        "force); frozen = that "
        "fraction of heads and of FFN blocks (random, fixed seed); 100% = the ceiling (every head "
        "and FFN frozen)".format(**cfg),
        f"{cfg['repeat']} round-robin rounds of one step per configuration (load from other "
        "processes hits all alike); ms_min/ms_median: wall time; time_vs_0 compares minima; "
        "FLOPs are fwd+bwd (FlopCounterMode)",
        "CPU timed single-threaded (torch.set_num_threads(1)); cpu_ms: process CPU time of the "
        "step, min over rounds (on a shared machine steadier than wall time; on CUDA it is only "
        "the host's launch work)",
        "probe step: a step in probe_mode (every module measured, as unconverted) with the 75% "
        "mask in force",
    ]
    return {"title": "Compute skipping: training step with frozen heads and FFNs",
            "columns": ["device", "mode", "frozen", "ms_min", "ms_median", "time_vs_0", "cpu_ms",
                        "cpu_vs_0", "gflop", "flop_vs_0"],
            "rows": rows, "notes": notes}


def _run_device(cfg: dict, device: str) -> list[dict]:
    # Configurations: (label, mode, frozen fraction, probe step).
    setups = {mode: _setup(cfg, device, mode) for mode in (None, "detach", "exact")}
    configs = [("unconverted", None, 0.0, False)]
    configs += [(mode, mode, frac, False) for mode in ("detach", "exact") for frac in FRACTIONS]
    configs += [(f"{mode} probe step", mode, 0.75, True) for mode in ("detach", "exact")]

    def prepare(c):
        """Set c's mask; -> (step, fwd_bwd) callables."""
        _, mode, frac, probe = c
        mm, skipper, fwd_bwd, step, opt = setups[mode]
        if skipper is None:
            return step, fwd_bwd
        mask = _frozen_mask(mm, frac)
        skipper.set_mask(mask)
        opt.set_module_mask(mask)  # a probe step updates with the mask in force, too
        if not probe:
            return step, fwd_bwd

        def in_probe_mode(fn):
            def wrapped():
                with skipper.probe_mode():
                    fn()
            return wrapped
        return in_probe_mode(step), in_probe_mode(fwd_bwd)

    flops = {}
    for c in configs:  # warm-up and FLOPs
        step, fwd_bwd = prepare(c)
        step()
        flops[c] = _flops(fwd_bwd)
        setups[c[1]][4].zero_grad(set_to_none=True)
    wall = {c: [] for c in configs}
    cpu = {c: [] for c in configs}
    for _ in range(cfg["repeat"]):
        for c in configs:
            step, _ = prepare(c)
            t_cpu = time.process_time()
            wall[c].append(time_fn(step, device, warmup=0, repeat=1)["median_ms"])
            cpu[c].append((time.process_time() - t_cpu) * 1e3)
    base = {mode: next(c for c in configs if c[1] == mode and c[2] == 0.0 and not c[3])
            for mode in (None, "detach", "exact")}
    rows = []
    for c in configs:
        label, mode, frac, _ = c
        b = base[mode]
        rows.append(dict(device=device, mode=label, frozen=f"{frac:.0%}", ms_min=min(wall[c]),
                         ms_median=statistics.median(wall[c]), time_vs_0=min(wall[c]) / min(wall[b]),
                         cpu_ms=min(cpu[c]), cpu_vs_0=min(cpu[c]) / min(cpu[b]),
                         gflop=flops[c] / 1e9, flop_vs_0=flops[c] / flops[b]))
    return rows
