"""MAT controller: the probe's cost as a fraction of training time, and MAT's step time vs AdamW.

Model: the reference BertEncoderMLM. Each configuration is its own copy of the model (same
initial weights) trained by one closure ``fwd + bwd + step``:

- ``AdamW``: plain ``torch.optim.AdamW`` (the baseline);
- ``MAT, no probe``: MAT (loss-mode probe, ``detach`` backward) on a step without a probe, at a
  fixed mask: all active, or the mask MAT's default ratio policy picked after a short warm-up
  run (the "measured active fraction");
- ``MAT, probe step``: the same with a probe on every step (probe mode: every module measured,
  frozen ones included; Gram, Lanczos, policy, mask update).

A fixed-mask policy keeps the mask constant across the timed steps. Derived numbers (notes):
the probe's share of training time at ``probe_every`` P, (t_probe − t_step) / ((P−1)·t_step +
t_probe), and the average MAT step at P relative to AdamW.
"""
from __future__ import annotations

import time

import torch

from mat_cuda import MAT, MATPolicy, ModularPolicy, Policy
from mat_cuda.mat import DEFAULT_PROBE_EVERY
from mat_cuda.models import BertEncoderMLM, mlm_loss

NEVER = 10 ** 9


class _FixedMask(Policy):
    """A modular policy that always answers the same mask."""

    def __init__(self, kinds, mask: torch.Tensor):
        super().__init__(kinds)
        self.mask = mask

    def update(self, lam, exclude=None):
        return self.mask.to(lam.device).clone()


def _config(quick: bool) -> dict:
    if quick:
        return dict(vocab=1000, hidden=128, layers=2, heads=4, ffn=512, t=32, n=8, rounds=9,
                    warm_steps=9)
    return dict(vocab=1000, hidden=256, layers=4, heads=4, ffn=1024, t=128, n=16, rounds=7,
                warm_steps=9)


def _model(cfg, device):
    torch.manual_seed(0)
    return BertEncoderMLM(cfg["vocab"], hidden=cfg["hidden"], layers=cfg["layers"],
                          heads=cfg["heads"], ffn=cfg["ffn"], max_len=cfg["t"]).to(device)


def _batch(cfg, device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg["vocab"], (cfg["n"], cfg["t"]), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    return ids.to(device), labels.to(device)


def _mat_step(model, mat, batch):
    def step():
        mlm_loss(model(batch[0], predict=batch[1] != -100), batch[1]).backward()
        mat.step()
        mat.zero_grad()
    return step


def _measured_mask(cfg, device) -> torch.Tensor:
    """The mask MAT's default ratio policy picks after a short run (warm-up 3, probe every 3)."""
    model = _model(cfg, device)
    mat = MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-3), warmup=3, probe_every=3)
    for s in range(cfg["warm_steps"]):
        _mat_step(model, mat, _batch(cfg, device, s))()
    mask = mat.optimizer.module_mask.clone()
    mat.close()
    return mask


def _fixed_mat(cfg, device, mask, probe_every):
    model = _model(cfg, device)
    from mat_cuda import discover
    kinds = discover(model, ("head", "ffn", "expert", "conv")).module_map.kinds
    policy = MATPolicy(kinds, modular=_FixedMask(kinds, mask), temporal=None, warmup=0,
                       probe_every=probe_every)
    mat = MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-4), policy=policy)
    step = _mat_step(model, mat, _batch(cfg, device, 0))
    step()  # step 0 is always a probe: it installs the fixed mask
    return step, mat


def _adamw(cfg, device):
    model = _model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, labels = _batch(cfg, device, 0)

    def step():
        mlm_loss(model(ids, predict=labels != -100), labels).backward()  # head at masked positions
        opt.step()
        opt.zero_grad()
    return step


def _time_round_robin(steps: dict, rounds: int, device: str) -> dict:
    """Min wall and process-CPU ms per configuration, one step each per round."""
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            wall[k].append((time.perf_counter() - w0) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    return {k: (min(wall[k]), sorted(wall[k])[len(wall[k]) // 2], min(cpu[k])) for k in steps}


def _run_device(cfg: dict, device: str) -> tuple[list[dict], list[str]]:
    mask_f = _measured_mask(cfg, device)
    ones = torch.ones_like(mask_f)
    frac = float(mask_f.float().mean())
    mats = []
    steps = {"AdamW": _adamw(cfg, device)}
    for label, mask in (("all", ones), ("measured", mask_f)):
        for probe, every in (("no probe", NEVER), ("probe step", 1)):
            fn, mat = _fixed_mat(cfg, device, mask, every)
            mats.append(mat)
            steps[f"MAT {probe}, {label}"] = fn
    times = _time_round_robin(steps, cfg["rounds"], device)
    for mat in mats:
        mat.close()
    use_cpu = device == "cpu"
    base = times["AdamW"][2 if use_cpu else 0]
    rows = []
    for k, (wmin, wmed, cmin) in times.items():
        t = cmin if use_cpu else wmin
        active = 1.0 if k == "AdamW" or k.endswith("all") else frac
        rows.append({"device": device, "config": k, "active": active, "ms_min": wmin,
                     "ms_median": wmed, "cpu_ms": cmin if use_cpu else float("nan"),
                     "vs_adamw": t / base})

    def t(k):
        return times[k][2 if use_cpu else 0]
    P = DEFAULT_PROBE_EVERY
    notes = []
    for label in ("all", "measured"):
        tp, tn = t(f"MAT probe step, {label}"), t(f"MAT no probe, {label}")
        share = (tp - tn) / ((P - 1) * tn + tp)
        avg = ((P - 1) * tn + tp) / P
        notes.append(f"{device}, mask {label} (active {1.0 if label == 'all' else frac:.2f}): probe "
                     f"step {tp:.1f} ms vs {tn:.1f} ms without; probe share of training time at "
                     f"probe_every={P}: {100 * share:.2f}%; average MAT step / AdamW: "
                     f"{avg / base:.3f}")
    return rows, notes


def run(devices: list[str], quick: bool) -> dict:
    cfg = _config(quick)
    rows, notes = [], []
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # CPU: process CPU time of one thread is the step's compute
        for device in devices:
            r, n = _run_device(cfg, device)
            rows += r
            notes += n
    finally:
        torch.set_num_threads(threads)
    notes = [
        "BertEncoderMLM (post-LN, untied MLM head, vocab {vocab}): hidden {hidden}, {layers} layers, "
        "{heads} heads, FFN {ffn}, T={t}, n={n}; MAT modules: heads and FFN blocks; loss-mode "
        "probe on the whole batch; detach backward".format(**cfg),
        f"{cfg['rounds']} round-robin rounds of one step per configuration; CPU single-threaded, "
        "vs_adamw compares min process-CPU time (steadier than wall time on a shared machine); "
        "CUDA compares min wall time",
        "'measured' mask: what the default ratio policy chose after warm-up 3, probe every 3, "
        f"{cfg['warm_steps']} steps on random tokens",
    ] + notes
    return {"title": "MAT controller: probe overhead and step time vs AdamW",
            "columns": ["device", "config", "active", "ms_min", "ms_median", "cpu_ms", "vs_adamw"],
            "rows": rows, "notes": notes}
