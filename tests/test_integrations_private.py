"""The private details of accelerate and torch that mat_cuda/integrations/_private.py relies on.

If one of these fails after a library upgrade, the named detail moved: update _private.py.
"""
import warnings

import pytest
import torch

from mat_cuda import MaskedSGD
from mat_cuda.integrations import _private


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=g))]


def test_swap_accelerated_optimizer_steps_the_new_optimizer_through_the_scaler():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    accelerate.Accelerator(cpu=True)          # AcceleratedOptimizer reads the accelerator state
    params = _params()
    old = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    acc = AcceleratedOptimizer(old, device_placement=False, scaler=scaler)
    assert hasattr(acc, "_optimizer_original_step_method"), \
        "accelerate's AcceleratedOptimizer no longer caches the wrapped optimizer's step method"
    new = MaskedSGD(old.param_groups, lr=0.1)
    stepped = []
    new.register_step_post_hook(lambda opt, a, k: stepped.append("new"))
    old.register_step_post_hook(lambda opt, a, k: stepped.append("old"))
    _private.swap_accelerated_optimizer(acc, new)
    assert acc.optimizer is new and acc.param_groups is new.param_groups
    before = params[0].detach().clone()
    (scaler.scale(params[0].sum())).backward()
    acc.step()
    assert stepped == ["new"], f"the AcceleratedOptimizer stepped {stepped} after the swap"
    assert not acc.step_was_skipped
    # The scaler unscaled the gradient (4.0) inside the masked step: SGD moved by lr * 1.
    torch.testing.assert_close(params[0].detach(), before - 0.1)


def test_retarget_lr_scheduler_follows_torch_protocol():
    params = _params()
    old = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(old, lambda s: 0.5 ** s)
    assert hasattr(old.step, "_wrapped_by_lr_sched"), \
        "torch's LRScheduler no longer marks the optimizer's step with _wrapped_by_lr_sched"
    new = MaskedSGD(old.param_groups, lr=1.0)
    _private.retarget_lr_scheduler(sched, old, new)
    assert sched.optimizer is new
    params[0].grad = torch.ones_like(params[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # torch warns when it cannot see optimizer.step()
        new.step()
        sched.step()
    assert getattr(new, "_opt_called", False), "torch's LRScheduler no longer uses _opt_called"
    assert new.param_groups[0]["lr"] == 0.5 and sched.get_last_lr() == [0.5]


def test_retarget_lr_scheduler_leaves_other_schedulers_alone():
    params = _params()
    a, b = torch.optim.SGD(params, lr=1.0), torch.optim.SGD(_params(1), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(b, lambda s: 1.0)
    _private.retarget_lr_scheduler(sched, a, MaskedSGD(a.param_groups, lr=1.0))
    assert sched.optimizer is b
