"""The only places where the integrations touch private details of accelerate and torch.

Each function names what it relies on; tests/test_integrations_private.py checks every one of
them against the installed libraries and fails with a message naming the detail that moved.
"""
from __future__ import annotations

import functools

import torch


def swap_accelerated_optimizer(accelerated, new: torch.optim.Optimizer) -> None:
    """Make accelerate's ``AcceleratedOptimizer`` step ``new`` instead of the optimizer it wraps.

    Relies on: the public attribute ``accelerated.optimizer``, and on the pickle protocol of
    ``AcceleratedOptimizer`` (``__getstate__`` / ``__setstate__``), which re-derives the cached
    bound ``step`` methods (``_optimizer_original_step_method`` / ``_optimizer_patched_step_method``,
    used with a GradScaler) from ``.optimizer``. Setting ``.optimizer`` alone would leave them
    bound to the old optimizer, which a fp16 run would then step instead.
    """
    state = accelerated.__getstate__()
    state["optimizer"] = new
    accelerated.__setstate__(state)


def retarget_lr_scheduler(scheduler, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Point a ``torch.optim.lr_scheduler.LRScheduler`` built on ``old`` at ``new``.

    The schedule itself needs nothing (MAT's optimizer shares ``old``'s param-group dicts, which
    the scheduler writes the learning rate into); what this keeps working is torch's check that
    ``optimizer.step()`` ran before the scheduler's first ``step()``. Relies on: the scheduler's
    public ``optimizer`` attribute, and torch's wrapping of ``optimizer.step`` by the scheduler
    (a ``_wrapped_by_lr_sched`` attribute on the wrapper, an ``_opt_called`` flag on the
    optimizer), replicated here on ``new.step``.
    """
    if getattr(scheduler, "optimizer", None) is not old:
        return
    scheduler.optimizer = new
    if not hasattr(old.step, "_wrapped_by_lr_sched") or hasattr(new.step, "_wrapped_by_lr_sched"):
        return
    step = new.step

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        new._opt_called = True
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    new.step = wrapper
    new._opt_called = getattr(old, "_opt_called", False)
