"""Fused masked optimizers: torch's AdamW and SGD, applied only to the active MAT modules.

:class:`MaskedAdamW` and :class:`MaskedSGD` are ``torch.optim.Optimizer`` subclasses with torch's
constructor arguments plus ``module_map`` (a :class:`~mat_cuda.modules.ModuleMap`; default: one
module per parameter tensor). :meth:`~_MaskedOptimizer.set_module_mask` takes a bool tensor of
length ``num_modules`` on the parameters' device; each ``step()``:

- gives the elements of active modules exactly torch's AdamW / SGD update, with Adam's bias
  correction at the module's *own* step count (how many steps it has been active);
- leaves masked modules' parameters, ``exp_avg`` / ``exp_avg_sq`` / ``momentum_buffer`` and step
  counts untouched, bit for bit;
- always updates unmanaged parameters (those the map does not cover); they share one step count
  that advances every step (torch keeps one per tensor; the two agree whenever every unmanaged
  parameter has a gradient at every step);
- never synchronises with the host: the mask, the step counts, ``grad_scale`` and ``found_inf``
  are device tensors read inside the kernels (one fused multi-tensor launch per parameter group
  and dtype on CUDA; on CPU one ``at::parallel_for`` with AVX vectors where the CPU has them,
  else ``at::vec``).

Parameters may be float32, bfloat16 or float16; optimizer state is float32 and the math runs in
float32. Parameters whose ``.grad`` is None are skipped, as in torch; a module's step count
advances at every step where it is active (MAT freezes a module by masking it, not by dropping
its gradient). ``torch.amp.GradScaler`` works (``_step_supports_amp_scaling``): gradients are
unscaled inside the kernel, and a step with inf/nan gradients changes nothing.

Example::

    mm = ModuleMap()
    heads = [mm.add_module(f"head{h}", "head") for h in range(n_heads)]
    mm.assign_row_groups(attn.in_proj_weight, head_dim, heads * 3)   # Q, K, V blocks
    mm.assign_col_groups(attn.out_proj.weight, head_dim, heads)
    opt = MaskedAdamW(model.parameters(), lr=1e-3, module_map=mm)    # the rest: unmanaged
    ...
    opt.set_module_mask(mask)   # (len(heads),) bool on the parameters' device
    opt.step()
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ._ops import check_device_supported, ops
from .modules import ModuleMap

__all__ = ["MaskedAdamW", "MaskedSGD"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _MaskedOptimizer(torch.optim.Optimizer):
    """What both masked optimizers share: the module map, the device mask and step counts,
    the input checks and the state-dict round trip. Subclasses define the per-group kernel call.

    State: per parameter, the float32 tensors named by ``_state_keys``; per optimizer,
    ``module_steps`` (num_modules + 1,) int64 (slot ``num_modules``: unmanaged parameters) and
    ``module_mask`` (num_modules,) bool, both on the parameters' device.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands us grad_scale / found_inf
    _state_keys: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, module_map: ModuleMap | None):
        super().__init__(params, defaults)
        all_params = [p for g in self.param_groups for p in g["params"]]
        if not all_params:
            raise ValueError(f"{type(self).__name__}: got no parameters")
        devices = {p.device for p in all_params}
        if len(devices) != 1:
            raise ValueError(f"{type(self).__name__}: all parameters must be on one device, got "
                             f"{sorted(str(d) for d in devices)}")
        self._device = all_params[0].device
        check_device_supported(all_params[0], "the parameters")
        bad = sorted({str(p.dtype) for p in all_params if p.dtype not in _SUPPORTED_DTYPES})
        if bad:
            raise ValueError(f"{type(self).__name__}: parameter dtype(s) {bad} are not supported "
                             "(float32, bfloat16 or float16)")
        for group in self.param_groups:
            self._check_hyperparameters(group)
        if module_map is None:
            module_map = ModuleMap.per_parameter(self.param_groups)
        if not isinstance(module_map, ModuleMap):
            raise TypeError(f"{type(self).__name__}: module_map must be a ModuleMap, got "
                            f"{type(module_map).__name__}")
        module_map.validate(all_params)
        self.module_map = module_map
        m = module_map.num_modules
        self._module_steps = torch.zeros(m + 1, dtype=torch.int64, device=self._device)
        self._module_mask = torch.ones(m, dtype=torch.bool, device=self._device)

    # ---- public API ----
    @property
    def num_modules(self) -> int:
        return self.module_map.num_modules

    @property
    def module_mask(self) -> torch.Tensor:
        """The current mask, (num_modules,) bool on the parameters' device (read only view)."""
        return self._module_mask

    @property
    def module_steps(self) -> torch.Tensor:
        """Steps each module has been updated, (num_modules + 1,) int64; the last entry counts
        the steps of the unmanaged parameters."""
        return self._module_steps

    def set_module_mask(self, mask: torch.Tensor) -> None:
        """Train only the modules whose entry of ``mask`` is True from the next step on.

        mask: (num_modules,) bool tensor on the parameters' device. Copied into the optimizer's
        own buffer on the device (no host synchronisation; the buffer keeps its address, so a
        captured CUDA graph sees the new mask).
        """
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"set_module_mask: mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(f"set_module_mask: mask must have dtype torch.bool, got {mask.dtype}")
        if mask.shape != (self.num_modules,):
            raise ValueError(f"set_module_mask: mask must have shape ({self.num_modules},) "
                             f"(one entry per module), got {tuple(mask.shape)}")
        if mask.device != self._device:
            raise ValueError(f"set_module_mask: mask must be on the parameters' device "
                             f"{self._device}, got {mask.device}")
        self._module_mask.copy_(mask)

    @torch.no_grad()
    def step(self, closure=None):
        """One masked step over every parameter group; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = self._amp_tensor(getattr(self, "grad_scale", None))
        found_inf = self._amp_tensor(getattr(self, "found_inf", None))
        # Every check (the module map's fit included) runs before anything is written, so a
        # rejected step changes nothing.
        work = []
        for group in self.param_groups:
            params, grads = self._prepare_group(group)
            if params:
                work.append((group, params, grads,
                             *self.module_map.kernel_tables(params, self._device)))
        for group, params, grads, layout_table, group_table in work:
            self._init_state(group, params)
            self._group_step(group, params, grads, layout_table, group_table, grad_scale, found_inf)
        ops.masked_module_steps_(self._module_steps, self._module_mask, found_inf)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``module_steps`` and ``module_mask``."""
        sd = super().state_dict()
        sd["module_steps"] = self._module_steps
        sd["module_mask"] = self._module_mask
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state dict from :meth:`state_dict`, per-module step counts included.

        The per-parameter state stays float32 (torch's loader would cast it to the parameter's
        dtype; the saved float32 values are copied back unrounded).
        """
        state_dict = dict(state_dict)
        if "module_steps" not in state_dict:
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state dict has no "
                             "'module_steps' (not saved by a masked optimizer)")
        steps = state_dict.pop("module_steps")
        mask = state_dict.pop("module_mask", None)
        if tuple(steps.shape) != tuple(self._module_steps.shape):
            raise ValueError(f"{type(self).__name__}.load_state_dict: module_steps has shape "
                             f"{tuple(steps.shape)}, this optimizer has {self.num_modules} modules "
                             f"(expected ({self.num_modules + 1},))")
        if mask is not None and tuple(mask.shape) != tuple(self._module_mask.shape):
            raise ValueError(f"{type(self).__name__}.load_state_dict: module_mask has shape "
                             f"{tuple(mask.shape)}, expected ({self.num_modules},)")
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved_group["params"], group["params"]):
                for key, value in saved_state.get(index, {}).items():
                    if isinstance(value, torch.Tensor) and key in self._state_keys:
                        self.state[p][key] = value.to(device=p.device, dtype=torch.float32,
                                                      memory_format=torch.contiguous_format,
                                                      copy=True)
        self._module_steps.copy_(steps.to(torch.int64))
        if mask is not None:
            self._module_mask.copy_(mask.to(torch.bool))

    # ---- for subclasses ----
    def _check_hyperparameters(self, group: dict) -> None:
        raise NotImplementedError

    def _group_step(self, group, params, grads, layout_table, group_table, grad_scale, found_inf):
        raise NotImplementedError

    def _state_needed(self, group: dict) -> bool:
        return True

    # ---- internals ----
    def _init_state(self, group: dict, params: list[torch.Tensor]) -> None:
        if not self._state_needed(group):
            return
        for p in params:
            state = self.state[p]
            for key in self._state_keys:
                if key not in state:
                    state[key] = torch.zeros_like(p, dtype=torch.float32,
                                                  memory_format=torch.contiguous_format)

    def _prepare_group(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The group's parameters that have a gradient, and their (contiguous) gradients.
        Raises on anything the kernels do not support, before any tensor is written."""
        self._check_hyperparameters(group)
        params, grads = [], []
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            # One combined test on the hot path; the detailed checks only name what failed.
            if not (p.dtype in _SUPPORTED_DTYPES and g.dtype == p.dtype and g.layout == torch.strided
                    and p.device == self._device and g.device == p.device and g.shape == p.shape
                    and p.is_contiguous()):
                self._explain_bad_parameter(i, p, g)
            params.append(p)
            grads.append(g.contiguous())
        return params, grads

    def _explain_bad_parameter(self, i: int, p: torch.Tensor, g: torch.Tensor) -> None:
        where = f"{type(self).__name__}: parameter {i} of its group (shape {tuple(p.shape)})"
        if p.device != self._device:
            raise ValueError(f"{where} is on {p.device}, but the optimizer's parameters are on "
                             f"{self._device}; all parameters must be on one device")
        if p.is_complex() or g.is_complex():
            raise ValueError(f"{where}: complex parameters and gradients are not supported")
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(f"{where}: sparse gradients ({g.layout}) are not supported")
        if p.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{where}: dtype {p.dtype} is not supported "
                             "(float32, bfloat16 or float16)")
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise ValueError(f"{where}: gradient has dtype {g.dtype}, shape {tuple(g.shape)} on "
                             f"{g.device}; expected the parameter's {p.dtype}, "
                             f"{tuple(p.shape)} on {p.device}")
        raise ValueError(f"{where}: the parameter must be contiguous")

    def _amp_tensor(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(device=self._device, dtype=torch.float32, non_blocking=True).reshape(1)


def _scalar(name: str, group: dict, key: str) -> float:
    value = group[key]
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: {key} must be a Python number (a tensor {key} would need a host "
                        "read), got a tensor")
    return float(value)


class MaskedAdamW(_MaskedOptimizer):
    """AdamW (``torch.optim.AdamW``) that updates only the active modules.

    Args: as ``torch.optim.AdamW`` (``params``, ``lr=1e-3``, ``betas=(0.9, 0.999)``,
    ``eps=1e-8``, ``weight_decay=1e-2``, ``maximize``), plus ``module_map``. Unsupported torch
    options raise: ``amsgrad=True``, ``differentiable=True``, tensor ``lr``. ``foreach``,
    ``fused`` and ``capturable`` are accepted for compatibility and ignored: the step is always
    fused and never reads device values on the host.

    State per parameter: ``exp_avg``, ``exp_avg_sq`` (float32, the parameter's shape).
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 module_map: ModuleMap | None = None):
        if amsgrad:
            raise ValueError("MaskedAdamW: amsgrad=True is not supported")
        if differentiable:
            raise ValueError("MaskedAdamW: differentiable=True is not supported")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=False, fused=fused)
        super().__init__(params, defaults, module_map)

    def _check_hyperparameters(self, group: dict) -> None:
        name = "MaskedAdamW"
        lr, eps = _scalar(name, group, "lr"), _scalar(name, group, "eps")
        wd = _scalar(name, group, "weight_decay")
        if not 0.0 <= lr < math.inf:
            raise ValueError(f"{name}: invalid learning rate {lr} (must be finite and >= 0)")
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"{name}: invalid eps {eps} (must be finite and >= 0)")
        if not 0.0 <= wd < math.inf:
            raise ValueError(f"{name}: invalid weight_decay {wd} (must be finite and >= 0)")
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair, got {betas!r}")
        for i, b in enumerate(betas):
            if isinstance(b, torch.Tensor) or not 0.0 <= float(b) < 1.0:
                raise ValueError(f"{name}: invalid beta{i + 1} {b!r} (must be a number in [0, 1))")
        if group.get("amsgrad", False):
            raise ValueError(f"{name}: amsgrad=True is not supported")

    def _group_step(self, group, params, grads, layout_table, group_table, grad_scale, found_inf):
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        beta1, beta2 = group["betas"]
        ops.masked_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, self._module_steps,
                               self._module_mask, layout_table, group_table, float(group["lr"]),
                               float(beta1), float(beta2), float(group["weight_decay"]),
                               float(group["eps"]), bool(group["maximize"]), grad_scale, found_inf)


class MaskedSGD(_MaskedOptimizer):
    """SGD (``torch.optim.SGD``: momentum, dampening, nesterov, weight decay) that updates only
    the active modules.

    Args: as ``torch.optim.SGD`` (``params``, ``lr=1e-3``, ``momentum=0``, ``dampening=0``,
    ``weight_decay=0``, ``nesterov=False``, ``maximize``), plus ``module_map``. A module's
    momentum buffer starts as its gradient at its first active step, as torch's does at a
    parameter's first step. ``differentiable=True`` and tensor ``lr`` raise; ``foreach`` and
    ``fused`` are accepted and ignored.

    State per parameter (with momentum): ``momentum_buffer`` (float32, the parameter's shape;
    zeros until the module's first active step).
    """

    _state_keys = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, module_map: ModuleMap | None = None):
        if differentiable:
            raise ValueError("MaskedSGD: differentiable=True is not supported")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=False, fused=fused)
        super().__init__(params, defaults, module_map)

    def _check_hyperparameters(self, group: dict) -> None:
        name = "MaskedSGD"
        lr, momentum = _scalar(name, group, "lr"), _scalar(name, group, "momentum")
        dampening, wd = _scalar(name, group, "dampening"), _scalar(name, group, "weight_decay")
        for key, value in (("learning rate", lr), ("momentum", momentum),
                           ("dampening", dampening), ("weight_decay", wd)):
            if not 0.0 <= value < math.inf:
                raise ValueError(f"{name}: invalid {key} {value} (must be finite and >= 0)")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{name}: nesterov momentum requires momentum > 0 and zero dampening")

    def _state_needed(self, group: dict) -> bool:
        return float(group["momentum"]) != 0.0

    def _group_step(self, group, params, grads, layout_table, group_table, grad_scale, found_inf):
        momentum = float(group["momentum"])
        bufs = [self.state[p]["momentum_buffer"] for p in params] if momentum != 0.0 else []
        ops.masked_sgd_step_(params, grads, bufs, self._module_steps, self._module_mask,
                             layout_table, group_table, float(group["lr"]), momentum,
                             float(group["dampening"]), float(group["weight_decay"]),
                             bool(group["nesterov"]), bool(group["maximize"]), grad_scale,
                             found_inf)


# ---- fake (meta) kernels, so torch.compile can trace the ops ----

@torch.library.register_fake("mat_cuda::masked_module_steps_")
def _masked_module_steps_fake(module_steps, module_mask, found_inf):
    return None


@torch.library.register_fake("mat_cuda::masked_adamw_step_")
def _masked_adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, module_steps, module_mask,
                            layout_table, group_table, lr, beta1, beta2, weight_decay, eps,
                            maximize, grad_scale, found_inf):
    return None


@torch.library.register_fake("mat_cuda::masked_sgd_step_")
def _masked_sgd_step_fake(params, grads, momentum_buffers, module_steps, module_mask,
                          layout_table, group_table, lr, momentum, dampening, weight_decay,
                          nesterov, maximize, grad_scale, found_inf):
    return None
