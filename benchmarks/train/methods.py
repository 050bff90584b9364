"""Module-selection methods compared by `mat-bench train`.

Every method trains with the same machinery: module discovery (``mat_cuda.discover``), the
fused masked optimizer (``MaskedAdamW``) and compute skipping (``Skipper``, ``detach`` mode), so
frozen modules cost the same in every method and only the *selection rule* differs:

- ``baseline``: every module trains at every step (mask all True).
- ``mat``: the MAT controller (``mat_cuda.MAT``): λ_max of each module's NTK at probe steps,
  modular + temporal policy.
- ``random``: after warm-up, at every probe step, a fresh uniformly random set of modules per
  kind, of MAT's measured active fraction for that kind (does λ matter?).
- ``gradnorm``: after warm-up, at every probe step, every module's gradient is computed
  (all modules active for that step) and the modules with the largest gradient norm per kind
  are kept, at MAT's measured active fraction (the usual cheap proxy).
- ``freeze_all:<kind>``: every module of ``kind`` is frozen after warm-up (how much does that
  kind's learning matter at all?); one run per kind.

A method object is driven by the runner (see runner.py):
    key = method.compute_state(step)     # hashable: FLOPs are measured once per compute state
    with method.backward_context(step): loss = loss_fn(model, batch); loss.backward()
    method.step(step)                    # optimizer step (+ mask update at probe steps)
    method.zero_grad()
"""
from __future__ import annotations

import contextlib
import math

import torch

import mat_cuda
from mat_cuda.flops import FlopMeter

METHODS = ("baseline", "mat", "random", "gradnorm", "freeze_all")
# Module kinds of every method: MAT's default (embeddings stay shared: the loss-mode probe
# cannot split a position table's gradient per sample).
MODULE_KINDS = ("head", "ffn", "expert", "conv")
SELECTION_METHODS = ("random", "gradnorm")  # need an active fraction per kind


class MethodError(Exception):
    """A method that cannot run as asked (e.g. MAT not built into this version)."""


def _fractions_count(fraction: float, n: int) -> int:
    return min(n, max(0, round(fraction * n)))


class MaskedMethod:
    """Shared harness: discovery, MaskedAdamW, Skipper; subclasses choose the mask."""

    name = "baseline"

    def __init__(self, model: torch.nn.Module, lr: float, warmup: int, probe_every: int,
                 seed: int, weight_decay: float = 0.01):
        self.model = model
        self.discovery = mat_cuda.discover(model, MODULE_KINDS)
        self.module_map = self.discovery.module_map
        self.kinds = self.module_map.kinds
        self.names = self.module_map.names
        self.optimizer = mat_cuda.MaskedAdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr,
            weight_decay=weight_decay, module_map=self.module_map)
        self.skipper = mat_cuda.Skipper.from_discovery(self.discovery, mode="detach", strict=False)
        self.device = next(model.parameters()).device
        self.warmup, self.probe_every = warmup, probe_every
        self.generator = torch.Generator().manual_seed(10_007 + seed)
        self.mask = torch.ones(self.module_map.num_modules, dtype=torch.bool)
        self.history = {"step": [], "mask": [], "score": []}  # per mask decision (CPU)

    # ---- the runner's interface ----
    def is_probe(self, step: int) -> bool:
        return False

    def compute_state(self, step: int):
        """What decides a step's FLOPs: the mask in force, or "probe" (every module computed)."""
        return "probe" if self.is_probe(step) else tuple(self.mask.tolist())

    def backward_context(self, step: int):
        return self.skipper.probe_mode() if self.is_probe(step) else contextlib.nullcontext()

    def meter_context(self, step: int):
        """Context of a FLOP-metering pass in the compute state of ``step``."""
        return self.backward_context(step)

    def step(self, step: int) -> None:
        if self.is_probe(step):
            scores = self.scores()
            self._set_mask(self.choose(scores), step, scores)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def should_stop(self) -> bool:
        return False

    def active_fraction(self) -> dict:
        """{kind: fraction of that kind's modules active now}."""
        return _kind_fractions(self.mask, self.kinds)

    def extra_report(self) -> dict:
        return {}

    def extra_flops(self) -> int:
        """FLOPs the last :meth:`step` executed beyond the metered training pass (0 here)."""
        return 0

    # ---- selection ----
    def scores(self):
        return None

    def choose(self, scores) -> torch.Tensor:
        return self.mask

    def _set_mask(self, mask: torch.Tensor, step: int, scores=None) -> None:
        self.mask = mask.to(torch.bool).cpu()
        self.optimizer.set_module_mask(self.mask.to(self.device))
        self.skipper.set_mask(self.mask)
        self.history["step"].append(step)
        self.history["mask"].append(self.mask.tolist())
        self.history["score"].append(None if scores is None else [float(s) for s in scores])

    def _kind_indices(self) -> dict:
        groups: dict = {}
        for i, k in enumerate(self.kinds):
            groups.setdefault(k, []).append(i)
        return groups


def _kind_fractions(mask, kinds) -> dict:
    out: dict = {}
    for k in dict.fromkeys(kinds):
        idx = [i for i, kk in enumerate(kinds) if kk == k]
        out[k] = sum(bool(mask[i]) for i in idx) / len(idx)
    return out


class Baseline(MaskedMethod):
    name = "baseline"


class FreezeAll(MaskedMethod):
    """Every module of ``kind`` frozen from the end of warm-up on."""

    def __init__(self, *args, kind: str, **kwargs):
        super().__init__(*args, **kwargs)
        if kind not in self.kinds:
            raise MethodError(f"freeze_all: the model has no modules of kind {kind!r} "
                              f"(it has {sorted(set(self.kinds))})")
        self.kind = kind
        self.name = f"freeze_all:{kind}"

    def step(self, step: int) -> None:
        if step == self.warmup:
            self._set_mask(torch.tensor([k != self.kind for k in self.kinds]), step)
        self.optimizer.step()


class _AtFraction(MaskedMethod):
    """Keeps, per kind, round(fraction[kind] · M_kind) modules after warm-up, chosen at probes."""

    def __init__(self, *args, fractions: dict, **kwargs):
        super().__init__(*args, **kwargs)
        missing = [k for k in set(self.kinds) if k not in fractions]
        if missing:
            raise MethodError(f"{self.name}: no active fraction for kind(s) {missing} "
                              "(run method mat first in the same invocation, or give "
                              "--active-fraction)")
        self.fractions = {k: float(fractions[k]) for k in set(self.kinds)}

    def is_probe(self, step: int) -> bool:
        return step >= self.warmup and step % self.probe_every == 0  # MAT's probe steps

    def choose(self, scores) -> torch.Tensor:
        mask = torch.zeros(len(self.kinds), dtype=torch.bool)
        for kind, idx in self._kind_indices().items():
            keep = _fractions_count(self.fractions[kind], len(idx))
            ranked = torch.argsort(torch.as_tensor(scores, dtype=torch.float64)[idx],
                                   descending=True, stable=True)
            mask[torch.tensor(idx)[ranked[:keep]]] = True
        return mask

    def extra_report(self) -> dict:
        return {"target_fractions": self.fractions}


class RandomSelect(_AtFraction):
    name = "random"

    def backward_context(self, step: int):
        return contextlib.nullcontext()  # a random draw needs no measurement

    def meter_context(self, step: int):
        return contextlib.nullcontext()

    def compute_state(self, step: int):
        return tuple(self.mask.tolist())

    def scores(self):
        return torch.rand(len(self.kinds), generator=self.generator, dtype=torch.float64)


class GradNorm(_AtFraction):
    """Score = the module's gradient norm on the probe step's batch (every module computed)."""

    name = "gradnorm"

    def scores(self):
        sq = torch.zeros(len(self.kinds), dtype=torch.float64)
        for p in self.module_map.params():
            lay, g = self.module_map.layout(p), p.grad
            if lay is None or g is None:
                continue
            g = g.detach().double()
            if lay.kind == "whole":
                sq[lay.module] += float(g.pow(2).sum())
                continue
            dim = 0 if lay.kind == "rows" else g.dim() - 1
            per_group = g.pow(2).movedim(dim, 0).reshape(len(lay.group_module), -1).sum(1)
            for gi, m in enumerate(lay.group_module):
                if m >= 0:
                    sq[m] += float(per_group[gi])
        return sq.sqrt()


# `--mat-policy key=value,...`: which policy class each key configures.
MODULAR_OPTIONS = ("mode", "alpha", "centre", "budget", "hysteresis", "min_dwell",
                   "relative_to_history", "ema_decay", "min_active", "min_active_fraction",
                   "relative_to_layer", "min_active_per_layer", "max_frozen_probes")
TEMPORAL_OPTIONS = ("eps", "patience", "scale_probes")
POLICY_OPTIONS = MODULAR_OPTIONS + TEMPORAL_OPTIONS + ("temporal",)


def mat_policy_factory(options: dict, warmup: int, probe_every: int):
    """A ``MAT(policy=...)`` factory: MAT's default policy with ``options`` changed.

    ``options`` maps ModularPolicy / TemporalPolicy argument names (POLICY_OPTIONS) to values;
    ``temporal=False`` drops the temporal policy. Raises MethodError for an unknown key or a
    value the policy rejects (checked here, before any training)."""
    unknown = sorted(set(options) - set(POLICY_OPTIONS))
    if unknown:
        raise MethodError(f"--mat-policy: unknown option(s) {unknown}; choose from "
                          f"{', '.join(POLICY_OPTIONS)}")
    modular = {k: v for k, v in options.items() if k in MODULAR_OPTIONS}
    temporal = {k: v for k, v in options.items() if k in TEMPORAL_OPTIONS}
    use_temporal = options.get("temporal", True)
    if not isinstance(use_temporal, bool):
        raise MethodError(f"--mat-policy: temporal must be on or off, got {use_temporal!r}")
    if temporal and not use_temporal:
        raise MethodError("--mat-policy: eps/patience configure the temporal policy, which "
                          "temporal=off removes")

    def factory(kinds, names):
        return mat_cuda.MATPolicy(
            kinds, modular=mat_cuda.ModularPolicy(kinds, names=names, **modular),
            temporal=mat_cuda.TemporalPolicy(kinds, names=names, **temporal) if use_temporal
            else None, warmup=warmup, probe_every=probe_every, names=names)

    try:
        factory(["head"], ["head[0]"])  # validate the values now
    except (TypeError, ValueError) as exc:
        raise MethodError(f"--mat-policy: {exc}") from None
    return factory


MAT_KERNELS = ("loss", "logit_sum", "output")  # `--mat-kernel`: MAT's mNTK kernel


class MATMethod:
    """The MAT controller (``mat_cuda.MAT``; its default policy, or the default with
    ``policy_options`` changed), driven like the other methods. ``kernel="loss"`` (default):
    the loss-mode probe on the probe step's training batch; ``"logit_sum"`` / ``"output"``:
    measured on the task's fixed probe batch at each probe (their passes' FLOPs are charged
    through :meth:`extra_flops`). Its AdamW is rebuilt by MAT as a MaskedAdamW on MAT's module
    map (the same discovery kinds as the other methods)."""

    name = "mat"

    def __init__(self, model, lr, warmup, probe_every, seed, weight_decay=0.01, probe_size=None,
                 policy_options: dict | None = None, kernel: str = "loss", probe_batch=None,
                 total_steps: int | None = None):
        if not hasattr(mat_cuda, "MAT"):
            raise MethodError("method 'mat' needs mat_cuda.MAT, which is not part of this build "
                              "of mat_cuda")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=weight_decay)
        if policy_options:
            schedule = dict(policy=mat_policy_factory(policy_options, warmup, probe_every))
        else:
            schedule = dict(probe_every=probe_every, warmup=warmup)
        if kernel not in MAT_KERNELS:
            raise MethodError(f"unknown MAT kernel {kernel!r}; choose from {', '.join(MAT_KERNELS)}")
        self.model = model
        if kernel == "loss":
            probe = dict(probe_size=probe_size)
        else:  # output kernels: the task's fixed probe batch, measured at every probe
            if probe_batch is None:
                raise MethodError(f"kernel {kernel!r} needs the task's fixed probe batch")
            inputs, forward = probe_batch
            probe = dict(kernel=kernel, probe_inputs=inputs,
                         probe_forward=lambda batch: forward(model, batch))
        self.mat = mat_cuda.MAT(model, optimizer, kinds=MODULE_KINDS, total_steps=total_steps,
                                **probe, **schedule)
        self.optimizer = self.mat.optimizer
        self.kinds = self.mat.module_map.kinds
        self.names = self.mat.module_map.names
        self.history = {}
        self._measure_flops = None  # output kernels: FLOPs of one probe's measure passes
        self._last_extra = 0

    def is_probe(self, step: int) -> bool:
        return self.mat.is_probe_step

    def compute_state(self, step: int):
        return "probe" if self.mat.is_probe_step else tuple(self.mat.skipper.active)

    def backward_context(self, step: int):
        return contextlib.nullcontext()  # MAT arms probe mode itself

    @contextlib.contextmanager
    def meter_context(self, step: int):
        """A metering pass must not feed the armed probe: drop it, run, re-arm."""
        armed = self.mat._armed
        if armed:
            self.mat.probe.cancel()
        try:
            yield
        finally:
            if armed:
                self.mat.probe.begin(loss_scale=self.mat._loss_scale())

    def step(self, step: int) -> None:
        self._last_extra = 0
        if self.mat.kernel == "loss" or not self.mat.probes_on_step:
            self.mat.step()
            return
        # An output-kernel probe runs its own forward and backward passes on the probe batch
        # inside MAT.step: metered once (the first probe; the same work every probe), charged
        # at every probe. (The metered call's wall time includes the meter's overhead.)
        if self._measure_flops is None:
            with FlopMeter(self.model) as meter:
                self.mat.step()
            self._measure_flops = meter.summary()["total"]
        else:
            self.mat.step()
        self._last_extra = self._measure_flops

    def extra_flops(self) -> int:
        """FLOPs of the output kernels' probe passes run by the last :meth:`step` (0 when it
        did not probe, and always 0 for the loss kernel, whose probe is the training pass)."""
        return self._last_extra

    def zero_grad(self) -> None:
        self.mat.zero_grad()

    @property
    def should_stop(self) -> bool:
        return self.mat.should_stop

    def active_fraction(self) -> dict:
        return _kind_fractions(self.mat.skipper.active, self.kinds)

    def extra_report(self) -> dict:
        rep = self.mat.report()
        self.history = {"step": rep["step"].tolist(), "mask": rep["mask"].tolist(), "score": None}
        return {"lambda_history": {"step": rep["step"].tolist(), "lam": rep["lam"].tolist()},
                "mask_history": self.history,
                "reentries": None if rep["reentries"] is None else rep["reentries"].tolist(),
                "converged_kinds": rep["converged_kinds"],
                "retired": None if rep["retired"] is None else rep["retired"].tolist(),
                "mat_compute_saved_analytic": rep["compute_saved"],
                "probe_steps": list(self.mat.probe_steps)}


def build_method(name: str, model, *, lr: float, warmup: int, probe_every: int, seed: int,
                 fractions: dict | None = None, kind: str | None = None, probe_size=None,
                 policy_options: dict | None = None, mat_kernel: str = "loss",
                 probe_batch=None, total_steps: int | None = None):
    """The method ``name`` ("freeze_all" needs ``kind``; random/gradnorm need ``fractions``;
    ``policy_options`` changes MAT's default policy, see :func:`mat_policy_factory`;
    ``total_steps`` lets MAT check its schedule (a warning when too few probes);
    ``mat_kernel`` is MAT's mNTK kernel, the output kernels measure on ``probe_batch``,
    ``(inputs, forward(model, inputs) -> output (n, ...))``)."""
    common = dict(lr=lr, warmup=warmup, probe_every=probe_every, seed=seed)
    if name == "baseline":
        return Baseline(model, **common)
    if name == "freeze_all":
        return FreezeAll(model, kind=kind, **common)
    if name == "random":
        return RandomSelect(model, fractions=fractions or {}, **common)
    if name == "gradnorm":
        return GradNorm(model, fractions=fractions or {}, **common)
    if name == "mat":
        return MATMethod(model, probe_size=probe_size, policy_options=policy_options,
                         kernel=mat_kernel, probe_batch=probe_batch, total_steps=total_steps,
                         **common)
    raise MethodError(f"unknown method {name!r}; choose from {METHODS}")
