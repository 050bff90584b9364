"""One training run (task, method, seed) and the per-task savings ceiling.

What is measured, per run:
  - FLOPs executed: ``mat_cuda.flops.FlopMeter`` counts one real forward + backward of each
    distinct *compute state* (the mask in force, or a probe step where every module computes),
    on the first batch that runs in that state; every later step in the same state is charged
    the same count. The metered pass runs on a copy of the step (its gradients are discarded)
    and its time is not counted in wall time. Exact for mlm and cnn (a step's FLOPs depend on
    the mask, not on the data); for moe the split of tokens between experts varies per batch,
    so frozen experts' savings are an estimate from that first batch. MAT's output kernels
    run their own passes on a fixed probe batch inside the probe step's ``method.step``: metered
    once and charged at every probe (``method.extra_flops()``). Not counted: element-wise
    work, the optimizer, and MAT's Gram/Lanczos kernels (custom ops; their cost is in the wall time).
  - wall time: the training steps (forward, backward, optimizer, probes and mask updates),
    without evaluation and without metering, synchronised on CUDA at each evaluation.
  - validation loss (and perplexity / accuracy) every ``eval_every`` steps and at the end; with
    ``cfg["eval_test"]`` the test split's too (``test_loss``, ``test_<metric>``), recorded for
    reporting only: nothing in a run reads it.

Run length: ``cfg["steps"]`` steps, or with ``cfg["patience"] = P`` until the validation loss has
not improved for P evaluations in a row (``steps`` is then a cap). The run's best-valid
checkpoint is the evaluation with the lowest validation loss (``best_valid``: its step, FLOPs,
wall time and losses): the held-out protocol compares methods at it, on test.
"""
from __future__ import annotations

import sys
import time

import torch

from mat_cuda.flops import FlopMeter

from .methods import build_method
from .tasks import build_task


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; None when disabled or when stderr (where tqdm writes) is a file
    or a pipe: a log then gets the one line per finished run that cli.py prints, not every
    refresh of a bar."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        if not _progress.warned:
            print("mat-bench train: tqdm is not installed, so no progress bars "
                  "(pip install tqdm)")
            _progress.warned = True
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


_progress.warned = False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(task_name: str, method_name: str, seed: int, cfg: dict, device: str = "cpu",
            data_path: str | None = None, fractions: dict | None = None,
            kind: str | None = None, progress: bool = True,
            policy_options: dict | None = None, mat_kernel: str = "loss") -> dict:
    """Train ``task_name`` with ``method_name`` for ``cfg["steps"]`` steps; return the record
    written to results.json (see report.py for its schema)."""
    task = build_task(task_name, cfg, seed, device, data_path)
    model = task.model
    method = build_method(method_name, model, lr=cfg["lr"], warmup=cfg["warmup"],
                          probe_every=cfg["probe_every"], seed=seed, fractions=fractions,
                          kind=kind, probe_size=cfg.get("probe_size"),
                          policy_options=policy_options, mat_kernel=mat_kernel,
                          probe_batch=task.probe_batch, total_steps=cfg["steps"])
    model.train()
    batches = task.train_batches()
    flops_of_state: dict = {}
    state_flops_list: list = []  # [{"state", "flops", "per_kind"}] as measured
    total_flops, wall = 0, 0.0
    evals, fraction_history = [], []
    bar = _progress(cfg["steps"], f"{task_name}/{method.name}/seed{seed}", progress)

    patience = cfg.get("patience")
    eval_test = bool(cfg.get("eval_test", patience is not None))
    if eval_test and task.evaluate_test is None:
        raise ValueError(f"task {task_name!r} has no test split, so eval_test cannot be set")
    best = {"index": 0, "since": 0}

    def evaluate(step):
        _sync(device)
        ev = task.evaluate(model)
        point = {"step": step, "flops": total_flops, "wall_s": wall, **ev}
        if eval_test:
            point.update({f"test_{k}": v for k, v in task.evaluate_test(model).items()})
        evals.append(point)
        if ev["loss"] < evals[best["index"]]["loss"]:
            best.update(index=len(evals) - 1, since=0)
        elif len(evals) > 1:
            best["since"] += 1
        if bar is not None:
            bar.set_postfix(loss=f"{ev['loss']:.3f}")

    evaluate(0)
    stop_reason = "steps"
    for step in range(cfg["steps"]):
        batch = next(batches)
        state = method.compute_state(step)
        if state not in flops_of_state:
            flops_of_state[state] = _meter_step(method, task, batch, step)
            state_flops_list.append({"step": step, "state": "probe" if state == "probe" else
                                     [bool(s) for s in state], **flops_of_state[state]})
        t0 = time.perf_counter()
        with method.backward_context(step):
            loss = task.loss_fn(model, batch)
            loss.backward()
        method.step(step)
        method.zero_grad()
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            _sync(device)
        wall += time.perf_counter() - t0
        total_flops += flops_of_state[state]["total"] + method.extra_flops()
        fraction_history.append({"step": step, **method.active_fraction()})
        if bar is not None:
            bar.update(1)
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            evaluate(step + 1)
            if patience is not None and best["since"] >= patience:
                stop_reason = "patience"
                break
        if method.should_stop:
            if evals[-1]["step"] != step + 1:
                evaluate(step + 1)
            stop_reason = "method"
            break
    if bar is not None:
        bar.close()
    losses = [e["loss"] for e in evals]
    return {
        "task": task_name, "method": method.name, "seed": seed,
        "steps_run": step + 1, "evals": evals, "stop_reason": stop_reason, "patience": patience,
        "best_valid": evals[best["index"]],
        "final_loss": losses[-1], "best_loss": min(losses),
        "total_flops": total_flops, "wall_s": wall,
        "flops_measured": state_flops_list,
        "active_fraction": fraction_history,
        "mean_active_fraction_after_warmup": _mean_fraction(fraction_history, cfg["warmup"]),
        "modules": {"names": method.names, "kinds": method.kinds},
        "task_config": task.config,
        **{"mask_history": method.history, **method.extra_report()},
    }


def _mean_fraction(history: list, warmup: int) -> dict:
    after = [h for h in history if h["step"] >= warmup] or history
    kinds = [k for k in after[0] if k != "step"]
    return {k: sum(h[k] for h in after) / len(after) for k in kinds}


def _meter_step(method, task, batch, step) -> dict:
    """FLOPs of one forward + backward in the compute state of ``step`` (gradients discarded)."""
    with method.meter_context(step):
        with FlopMeter(task.model) as meter:
            task.loss_fn(task.model, batch).backward()
    method.zero_grad()
    task.model.zero_grad(set_to_none=True)
    s = meter.summary()
    return {"total": s["total"], "forward": s["forward"], "backward": s["backward"]}


def savings_ceiling(task_name: str, cfg: dict, device: str = "cpu",
                    data_path: str | None = None) -> dict:
    """Per module kind: the share of a step's FLOPs that freezing every module of that kind
    removes (measured with FlopMeter on one batch, with compute skipping as in the runs), and
    the same with every module of every kind frozen."""
    task = build_task(task_name, cfg, 0, device, data_path)
    method = build_method("baseline", task.model, lr=cfg["lr"], warmup=cfg["warmup"],
                          probe_every=cfg["probe_every"], seed=0)
    batch = next(task.train_batches())
    full = _meter_step(method, task, batch, 0)["total"]
    out = {"step_flops_all_active": full, "per_kind": {}}
    kinds = method.kinds
    for kind in list(dict.fromkeys(kinds)) + ["(all kinds)"]:
        method._set_mask(torch.tensor([kind != "(all kinds)" and k != kind for k in kinds]), 0)
        frozen = _meter_step(method, task, batch, 0)["total"]
        out["per_kind"][kind] = {"step_flops_frozen": frozen, "ceiling": 1.0 - frozen / full}
    method.skipper.restore()
    return out
