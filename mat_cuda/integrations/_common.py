"""What the Trainer and Lightning callbacks share: MAT's options, building MAT on a framework's
optimizer, and the metrics they log. Framework-free (imports only mat_cuda)."""
from __future__ import annotations

import numbers
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..mat import MAT, MAT_DEFAULT_KINDS
from ..policy import MATPolicy


class MATOptions:
    """The arguments of :class:`mat_cuda.MAT` a callback passes on (see MAT's docstring), except
    ``warmup``, which may also be a fraction of the run's optimizer steps.

    warmup: None (MAT's default, 1000 steps), an int number of optimizer steps, or a float in
    [0, 1): that fraction of the run's total optimizer steps (rounded to the nearest step),
    resolved when training starts.
    """

    def __init__(self, modules="auto", policy: Union[MATPolicy, Callable[..., MATPolicy], None] = None,
                 probe_every: Optional[int] = None, warmup: Union[int, float, None] = None,
                 probe_size: Optional[int] = None, kernel: str = "loss", probe_inputs=None,
                 probe_forward: Optional[Callable] = None, projections: int = 4,
                 backward: str = "detach", loss_reduction: str = "mean",
                 kinds: Iterable[str] = MAT_DEFAULT_KINDS, lanczos_iters: Optional[int] = None):
        if warmup is not None:
            if isinstance(warmup, bool) or not isinstance(warmup, numbers.Real):
                raise TypeError(f"MATCallback: warmup must be an int (steps) or a float in [0, 1) "
                                f"(a fraction of the run's steps), got {type(warmup).__name__}")
            if isinstance(warmup, numbers.Integral):
                if warmup < 0:
                    raise ValueError(f"MATCallback: warmup must be >= 0 steps, got {warmup}")
            elif not 0.0 <= float(warmup) < 1.0:
                raise ValueError(f"MATCallback: a float warmup is a fraction of the run's steps "
                                 f"and must be in [0, 1), got {warmup}; pass an int for a "
                                 "number of steps")
        if policy is not None and (warmup is not None or probe_every is not None):
            raise ValueError("MATCallback: probe_every and warmup configure the default policy; "
                             "with policy= set them on the MATPolicy")
        self.warmup = warmup
        self.kwargs = dict(modules=modules, policy=policy, probe_every=probe_every,
                           probe_size=probe_size, kernel=kernel, probe_inputs=probe_inputs,
                           probe_forward=probe_forward, projections=projections,
                           backward=backward, loss_reduction=loss_reduction, kinds=tuple(kinds),
                           lanczos_iters=lanczos_iters)

    def warmup_steps(self, total_steps: Optional[int]) -> Optional[int]:
        """The warm-up in optimizer steps for a run of ``total_steps`` (None: MAT's default)."""
        w = self.warmup
        if w is None or isinstance(w, numbers.Integral):
            return None if w is None else int(w)
        if not total_steps or total_steps <= 0:
            raise ValueError(f"MATCallback: warmup={w} is a fraction of the run's optimizer steps, "
                             "but the trainer does not know how many there are (an iterable "
                             "dataset without max_steps?); pass warmup as an int number of steps")
        return int(round(float(w) * total_steps))

    def build(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: Optional[int],
              scaler=None, accumulation_steps: int = 1) -> MAT:
        """MAT on ``model`` and the framework's (not yet stepped) ``optimizer``."""
        warmup = self.warmup_steps(total_steps)
        mat = MAT(model, optimizer, warmup=warmup, scaler=scaler,
                  accumulation_steps=accumulation_steps, **self.kwargs)
        if total_steps and mat.policy.warmup >= total_steps:
            warnings.warn(f"MATCallback: warm-up ({mat.policy.warmup} steps) covers the whole run "
                          f"({total_steps} optimizer steps): every module trains at every step, "
                          "MAT only measures; pass a smaller warmup (e.g. warmup=0.2)", stacklevel=3)
        return mat


class MATMetrics:
    """MAT's scalars for a training logger (:meth:`__call__`), from host copies: the parts that
    change only at a probe (mask, λ, retired modules) are read once per probe and cached.

    Keys (``prefix`` + ...): ``compute_saved`` (fraction of the analytic training FLOPs saved so
    far), ``probes``, ``skipped_probes``, ``converged_kinds`` (kinds the temporal policy reports
    converged), and per module kind k: ``active_fraction/k`` (the mask in force),
    ``lambda_mean/k``, ``lambda_min/k``, ``lambda_max/k`` (the last probe's λ) and
    ``retired_fraction/k`` (with a temporal policy).
    """

    def __init__(self, mat: MAT, prefix: str = "mat/"):
        self.mat, self.prefix = mat, prefix
        self._key = None
        self._per_probe: dict[str, float] = {}

    def __call__(self) -> dict[str, float]:
        mat, pre = self.mat, self.prefix
        key = (len(mat.probe_steps), mat.skipped_probes)
        if key != self._key:
            self._per_probe, self._key = self._read_probe_state(), key
        saved = mat.compute_saved   # None where the analytic estimate does not hold (conv, experts)
        out = {} if saved is None else {f"{pre}compute_saved": float(saved)}
        out.update(self._per_probe)
        return out

    def _read_probe_state(self) -> dict[str, float]:
        mat, pre, policy = self.mat, self.prefix, self.mat.policy
        out = {f"{pre}probes": float(len(mat.probe_steps)),
               f"{pre}skipped_probes": float(mat.skipped_probes)}
        active = list(mat.skipper.active)       # host copy of the mask, made at each probe
        lam = policy.history["lam"][-1] if policy.history["lam"] else None
        temporal = policy.temporal
        retired = None if temporal is None or temporal.retired is None \
            else temporal.retired.cpu().tolist()
        converged = 0
        for kind, idx in policy.groups.items():
            out[f"{pre}active_fraction/{kind}"] = sum(bool(active[i]) for i in idx) / len(idx)
            if lam is not None:
                v = lam[idx]
                out[f"{pre}lambda_mean/{kind}"] = float(v.mean())
                out[f"{pre}lambda_min/{kind}"] = float(v.min())
                out[f"{pre}lambda_max/{kind}"] = float(v.max())
            if retired is not None:
                r = sum(bool(retired[i]) for i in idx)
                out[f"{pre}retired_fraction/{kind}"] = r / len(idx)
                converged += r == len(idx)
        out[f"{pre}converged_kinds"] = float(converged)
        return out


def converged_at_new_probe(mat: MAT, probes_seen: int, step: int, logger) -> tuple:
    """``(stop, probes_seen)``: whether every module kind of ``mat`` has converged, checked only
    when a probe ran since the last check (``probes_seen`` probes then; the count to keep is
    returned); logs the stop on ``logger`` at ``step``."""
    if len(mat.probe_steps) == probes_seen:
        return False, probes_seen
    stop = bool(mat.should_stop)
    if stop:
        logger.info("MATCallback: every module kind converged at step %d; stopping", step)
    return stop, len(mat.probe_steps)
