"""MAT: the controller a training loop calls (probe on schedule, update masks, masked step).

    mat = mat_cuda.MAT(model, optimizer)            # modules="auto", loss-mode probe
    for batch in loader:
        loss = compute_loss(model, batch)
        loss.backward()
        mat.step()                                  # probe on schedule, masks, optimizer step
        mat.zero_grad()

Data flow of a probe step (DESIGN.md): the training backward → the probe's hooks hand layer
factors to the Gram kernels → K (M, p, p) → batched Lanczos → λ (M,) → policy → module mask
(M,) bool on the device → the fused masked optimizer step and the masked backward (Skipper) of
the following steps. Host reads happen at probe steps only: λ's validity (one ``bool``), the
policy's history copy, and the skipper's host copy of the new mask.

Probe arming. The user calls :meth:`MAT.step` *after* the backward, so MAT decides at the end of
step k whether step k+1 is a probe step and, if so, arms it then: the Skipper's probe mode (every
module active in forward and backward, frozen ones included, so their factors are produced and a
frozen module can re-enter) and ``MNTKProbe.begin()``, before the user's next forward. Step 0 is
armed by the constructor. :attr:`MAT.is_probe_step` says whether the step in progress is one.
At the probe step's :meth:`MAT.step`: K → λ → ``policy.step`` → the new mask is set on the
optimizer and the Skipper *before* that step's optimizer update, so it already applies to it.

Output kernels (``kernel="output"`` / ``"logit_sum"``, DESIGN.md's table). Nothing is armed: the
training steps run with the mask in force, and at a probe step's :meth:`MAT.step` (before the
optimizer update) MAT runs ``MNTKProbe.measure`` on the user's fixed ``probe_inputs`` in the
Skipper's probe mode (every module measured, frozen ones included; ``.grad`` untouched). Cost:
one forward and 1 (logit_sum) or k (output) backward passes on the probe batch per probe.

Gradient accumulation. Pass ``accumulation_steps=A`` and call :meth:`MAT.step` and
:meth:`MAT.zero_grad` after every micro-batch's backward: the first A−1 calls only count (and
zero_grad does nothing), the A-th steps the optimizer. A probe step keeps probe mode on for all
of its micro-batches (so a re-entering module gets its whole accumulated gradient), but the
probe's hooks are armed only for the last one: K is that micro-batch's. The micro-batch loss is
assumed to be the batch loss divided by A (the usual convention). :attr:`MAT.is_last_micro_batch`
says whether the next :meth:`MAT.step` steps the optimizer (e.g. to clip, or to leave DDP's
``no_sync``).

Mixed precision. Pass the ``torch.amp.GradScaler`` as ``scaler=``; the loop is
``scaler.scale(loss).backward(); mat.step(); mat.zero_grad()`` and :meth:`MAT.step` calls
``scaler.step(optimizer)`` and ``scaler.update()``. The probe divides the gradients by the
scaler's scale tensor (read on the device, no host sync). A probe whose λ is not finite (an
overflowing step) is dropped when a scaler is in use, the mask stays, and the next step probes
again (counted in ``report()["skipped_probes"]``); if the retry's λ is again not finite, the
failure-isolation rule below applies.

Failure isolation (docs/failure.md). A module whose λ is NaN/Inf (NaN/Inf in its gradient or its
Gram) keeps its mask and policy state, sits out that step's update, and is reported in one
warning; its neighbours are decided as usual. A probe that raises a RuntimeError (an
out-of-memory while building K or in Lanczos) is dropped with one warning, the masks stay and the
step's update runs on them. A call of :meth:`step` that raises (in the optimizer step, say)
moves no counter: calling it again retries the step; after a forward or backward that raised,
:meth:`zero_grad` drops what the probe had gathered, so the batch can be run again.

Gradient clipping: :meth:`MAT.clip_grad_norm_` (unscales through the scaler first). It clips over
every parameter that has a gradient; on a probe step that includes the frozen modules' gradients
(computed for the probe, never applied).

Distributed (DistributedDataParallel). Each rank probes its own samples; λ is all-reduced (mean
over ranks) before the policy, so every rank takes the same masks and frozen parameters stay
identical. λ_DDP = mean over ranks r of λ_max(K_r), K_r the Gram of rank r's samples: the
diagonal blocks of the global batch's K, not the global K (its cross-rank blocks would need the
factors exchanged). Wrap with ``find_unused_parameters=True``: frozen whole-tensor modules stop
requiring grad.

See docs/mat.md for the full semantics.

Compute skipping: ``Skipper.from_discovery(discovery, mode=backward, strict=False)``. With
``modules="auto"`` attention heads and FFN blocks are skipped in the backward; with an explicit
ModuleMap there are no discovered structures, so only whole-tensor modules are skipped (their
``requires_grad`` is toggled); row/column-group modules are then masked by the optimizer only.

Compute saved (``report()``): an analytic estimate counted on the host at every step, no
device work: a training step costs 6·N·T FLOPs (forward 2, backward 4, N = non-embedding
parameters, T tokens); a frozen, skipped module m saves 2·N_m·T (its weight gradient) or, in
``detach`` mode for heads and FFN/expert blocks, 4·N_m·T (its input gradient too). Probe steps
are dense. Attention score products and embeddings are left out of both.

Defaults: ``probe_every=100`` (probe overhead measured at ~0.4% of training time,
benchmarks/bench_mat.py), ``warmup=1000`` (task-dependent: the benchmark uses 20% of its run),
whole-batch probe; the policy's constants and the evidence for them: docs/policy.md.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .discovery import Discovery, resolve_modules, unwrap_model
from .linalg import lambda_max
from .mntk import LOSS_REDUCTIONS, MODES, MNTKProbe
from .modules import ModuleMap
from .nn import Skipper
from .optim import MaskedAdamW, MaskedSGD, _MaskedOptimizer
from .policy import MATPolicy, PolicyScheduleWarning

__all__ = ["MAT", "DEFAULT_PROBE_EVERY", "DEFAULT_WARMUP"]

DEFAULT_PROBE_EVERY = 100
DEFAULT_WARMUP = 1000
_BACKWARD_MODES = ("detach", "exact")
_NOT_UPDATED = ", no module is updated at this step"
_UNESTIMATED_KINDS = ("conv", "expert")   # compute_saved is None for maps with these
_DETACHED_KINDS = ("head", "ffn", "expert")  # kinds whose input gradient "detach" also skips
# Embeddings stay shared by default: a position table is looked up with indices that have no
# sample axis (one (T,) arange for the batch), which the loss-mode probe cannot split per sample.
MAT_DEFAULT_KINDS = ("head", "ffn", "expert", "conv")

# torch optimizers MAT rebuilds as their masked equivalent (exact classes: a subclass may
# change the update, which the fused kernels would silently ignore).
_WRAPPABLE = {torch.optim.AdamW: MaskedAdamW, torch.optim.SGD: MaskedSGD}


class MAT:
    """Modular Adaptive Training controller (see the module docstring for the semantics).

    Args:
        model: the ``nn.Module`` being trained (possibly DDP / torch.compile wrapped).
        optimizer: a :class:`MaskedAdamW` / :class:`MaskedSGD` built with this MAT's module map,
            or one MAT can rebuild on that map (a MaskedAdamW/MaskedSGD with another map, a
            ``torch.optim.AdamW`` or ``torch.optim.SGD``) before its first step: same param
            groups (the very dicts, so an LR scheduler on the old optimizer still works) and
            hyper-parameters. Use :attr:`optimizer` afterwards. Anything else raises TypeError.
        modules: ``"auto"`` (module discovery), a :class:`Discovery` of the model (e.g. from
            ``discover(model)``, to build a MaskedAdamW on its ``module_map`` first), or a
            :class:`ModuleMap` of the model (no attention/FFN structures: see below).
        policy: a :class:`MATPolicy` built on the map's kinds; or a factory
            ``policy(kinds, names) -> MATPolicy`` called with the map's module kinds and names
            (for ``modules="auto"``, whose kinds are known only after discovery); or None for
            ``MATPolicy(kinds, warmup=warmup, probe_every=probe_every)``.
        probe_every, warmup: for the default policy only (defaults 100 and 1000).
        probe_size: loss kernel: None (every sample of the batch) or p: K uses the first p
            samples. (The output kernels use ``probe_inputs`` as given.)
        kernel: the mNTK kernel mode (DESIGN.md): ``"loss"`` (default: per-sample loss
            gradients read from the probe step's own training backward, no extra pass),
            ``"output"`` (k random output projections: a forward and k backward passes on
            ``probe_inputs`` at each probe) or ``"logit_sum"`` (one backward on ``probe_inputs``).
        probe_inputs: the probe batch of the output kernels (required there, unused in loss
            mode): passed as ``model(probe_inputs)`` (tuple: ``model(*probe_inputs)``, dict:
            ``model(**probe_inputs)``) or ``probe_forward(probe_inputs)``, which must return the
            output tensor (n, ...). A fixed batch, so that λ is comparable across probes.
        probe_forward: optional callable for the output kernels (e.g. ``lambda b: model(**b).logits``).
        projections: k, the output projections of ``kernel="output"`` (default 4).
        backward: ``"detach"`` (default) or ``"exact"`` (see :class:`Skipper`).
        loss_reduction: ``"mean"`` (default) or ``"sum"``: how the loss sums per-sample terms.
        scaler: an optional ``torch.amp.GradScaler``.
        accumulation_steps: micro-batches per optimizer step (default 1).
        kinds: module kinds of discovery (``modules="auto"``); default heads, FFN blocks,
            experts and conv layers (add "embedding" when every embedding's indices have the
            sample axis first).
        lanczos_iters: Lanczos budget (default ``min(p, 32)``).
        process_group: the group λ is all-reduced over (default: the world, when
            torch.distributed is initialised with more than one rank).
        total_steps: the run's optimizer steps, when known. Used only to check the schedule:
            MAT warns (``PolicyScheduleWarning``) at construction when warm-up, probe interval
            and run length leave the policy fewer probes than it needs
            (``MATPolicy.schedule_warning``; without total_steps a run of 5 × warmup is assumed).

    Attributes: ``optimizer``, ``policy``, ``probe`` (MNTKProbe), ``skipper``, ``discovery``,
    ``module_map``, ``step_count`` (optimizer steps taken).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, modules="auto",
                 policy: Union[MATPolicy, Callable[..., MATPolicy], None] = None, *, probe_every: Optional[int] = None,
                 warmup: Optional[int] = None, probe_size: Optional[int] = None,
                 kernel: str = "loss", probe_inputs=None, probe_forward: Optional[Callable] = None,
                 projections: int = 4, backward: str = "detach", loss_reduction: str = "mean",
                 scaler: Optional[torch.amp.GradScaler] = None, accumulation_steps: int = 1,
                 kinds: Iterable[str] = MAT_DEFAULT_KINDS, lanczos_iters: Optional[int] = None,
                 process_group=None, total_steps: Optional[int] = None):
        _check_kernel(kernel, probe_inputs, probe_forward, probe_size)
        if backward not in _BACKWARD_MODES:
            raise ValueError(f"MAT: backward must be one of {_BACKWARD_MODES}, got {backward!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"MAT: loss_reduction must be one of {LOSS_REDUCTIONS}, "
                             f"got {loss_reduction!r}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
                or accumulation_steps < 1:
            raise ValueError(f"MAT: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"MAT: model must be an nn.Module, got {type(model).__name__}")
        _check_plain_args(scaler, lanczos_iters, process_group)
        self.model, self.inner = model, unwrap_model(model)
        self.backward, self.scaler = backward, scaler
        self.accumulation_steps, self.lanczos_iters = accumulation_steps, lanczos_iters
        self.process_group = process_group

        self.discovery = _resolve(self.inner, modules, kinds)
        self.module_map: ModuleMap = self.discovery.module_map
        mm = self.module_map
        if mm.num_modules == 0:
            raise ValueError("MAT: the model has no MAT modules (discovery found none, or the "
                             "ModuleMap is empty)")
        self.optimizer = _masked_optimizer(optimizer, mm)
        self.device = self.optimizer._device
        self.policy = _make_policy(policy, mm, probe_every, warmup)
        _warn_schedule(self.policy, total_steps)
        self.kernel, self.probe_inputs, self.probe_forward = kernel, probe_inputs, probe_forward
        self.probe = MNTKProbe(self.inner, mm, kernel, loss_reduction=loss_reduction,
                               probe_size=probe_size, projections=projections,
                               generator=_projection_generator(kernel, self.device),
                               defer_errors=True)
        try:
            self.skipper = Skipper.from_discovery(self.discovery, mode=backward, strict=False)
        except Exception:
            self.probe.close()
            raise
        self._closed = False
        M = mm.num_modules
        self.step_count = 0           # optimizer steps taken
        self._micro = 0               # micro-batches of the current step already stepped
        self._retry = False           # the last probe was dropped (non-finite λ): probe again
        self._vectors: Optional[torch.Tensor] = None   # (M, p) Ritz vectors of the last probe
        self._mask_host = [True] * M  # the mask in force, host copy (made at each probe)
        self._probe_cm = None         # the Skipper's probe_mode context while a probe step runs
        self._armed = False           # probe.begin() called for the coming micro-batch
        self._dense = False           # the step in progress ran in probe mode (nothing skipped)
        self._probed_at = -1          # step whose probe already ran (a retried step skips it)
        self._step_mask = None        # (M,) bool for this step's update only (invalid λ held out)
        self._mask_in_force = None    # the mask to restore after a step that used _step_mask
        self.skipped_probes = 0
        self.probe_steps: list[int] = []
        self._flops_total = 0.0       # analytic units (per token) summed over steps
        self._flops_saved = 0.0
        try:
            self._init_cost_model()
            self._arm()
        except Exception:   # leave the model as it was
            self.close()
            raise

    # ---- the training-loop API ----
    @property
    def is_probe_step(self) -> bool:
        """Whether the step in progress (whose forward/backward come next) runs in probe mode
        (kernel "loss": every module computes its gradient, frozen ones included). The output
        kernels measure on their own batch inside :meth:`step`; their training steps never do."""
        return self._probe_cm is not None

    @property
    def probes_on_step(self) -> bool:
        """Whether the next :meth:`step` call runs a probe (K → λ → policy): the last
        micro-batch of a probe step, or of the step that retries a dropped probe. For the output
        kernels this is where their own passes on ``probe_inputs`` run."""
        return self.is_last_micro_batch and self._probe_due()

    @property
    def is_last_micro_batch(self) -> bool:
        """Whether the next :meth:`step` call steps the optimizer (always True without
        gradient accumulation)."""
        return self._micro == self.accumulation_steps - 1

    @property
    def should_stop(self) -> bool:
        """The temporal policy's verdict: every module kind has converged (host read)."""
        return self.policy.should_stop()

    def step(self) -> bool:
        """Call after each (micro-batch) backward. Returns True when the optimizer stepped.

        On the last micro-batch of a probe step: K → λ → policy → masks (optimizer and Skipper),
        then the masked optimizer step (through the scaler when given); then arms the next step.
        Equivalent to :meth:`before_optimizer_step`, the optimizer step and
        :meth:`after_optimizer_step`.
        """
        self._check_open("step")
        micro = self._micro
        if not self.before_optimizer_step():
            return False
        try:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        except BaseException:
            # Nothing counted yet: a second call retries this step (its probe is not run again).
            self._restore_mask_in_force()
            self._micro = micro
            raise
        self.after_optimizer_step()
        return True

    def before_optimizer_step(self, end_of_step: Optional[bool] = None) -> bool:
        """:meth:`step` up to the optimizer update, for a training loop that steps
        :attr:`optimizer` itself (the Hugging Face Trainer, Lightning). Call after each
        micro-batch's backward (and after clipping). Returns True when the optimizer must step
        now (the probe, when due, has run and the new mask is set); then step it (through the
        scaler if any) and call :meth:`after_optimizer_step`. Returns False between micro-batches.

        end_of_step: None counts micro-batches up to ``accumulation_steps``; True ends the step
        on this micro-batch whatever the count (a loop whose last accumulation window is short);
        False asserts that it does not end. A loss-kernel probe due on a step ended early, before
        its hooks were armed (they are armed for the counted last micro-batch), is postponed to
        the next step, as a dropped probe is.

        If this raises (a probe that fails is not an error: docs/failure.md), no counter has
        moved, and calling it again retries; a probe that already ran is not run again.
        """
        self._check_open("before_optimizer_step")
        micro = self._micro + 1
        last = micro >= self.accumulation_steps if end_of_step is None else bool(end_of_step)
        if not last:
            if micro >= self.accumulation_steps:   # raise before changing anything
                raise RuntimeError(f"MAT.before_optimizer_step(end_of_step=False): this is "
                                   f"micro-batch {micro} of a step of accumulation_steps="
                                   f"{self.accumulation_steps}; the optimizer must step now")
            self._micro = micro
            self._arm()
            return False
        already = self._probed_at == self.step_count
        # A probe step in probe mode whose hooks were never armed (they are armed for the counted
        # last micro-batch, which never came): postpone the probe.
        if (self.kernel == "loss" and not already and self._probe_due() and not self._armed
                and self._probe_cm is not None):
            self._leave_probe_mode()   # ended before the hooks were armed: probe the next step
            self._retry = True
            self._dense = True         # it ran in probe mode: nothing was skipped
            self._micro = 0
            return True
        probed = already or self._armed or (self.kernel != "loss" and self._probe_due())
        if probed and not already:
            self._finish_probe()
            self._probed_at = self.step_count
        elif self._probe_cm is not None:
            self._leave_probe_mode()
        self._dense = probed
        if self._step_mask is not None and self._mask_in_force is None:
            # modules with invalid λ sit out this one update
            self._mask_in_force = self.optimizer.module_mask.clone()
            self.optimizer.set_module_mask(self._step_mask)
        self._micro = 0
        return True

    def after_optimizer_step(self) -> None:
        """:meth:`step` after the optimizer update: counts the step (compute accounting
        included) and arms the next one. Call once after each optimizer step that
        :meth:`before_optimizer_step` asked for."""
        self._check_open("after_optimizer_step")
        self._restore_mask_in_force()
        self._step_mask = None
        self._count_flops(dense=self._dense)
        self._dense = False
        self.step_count += 1
        self._arm()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's zero_grad, except between the micro-batches of one step.

        It also drops what a probe armed for the coming backward has gathered so far: after a
        forward or backward that raised, ``mat.zero_grad()`` and running the batch again
        retries the step cleanly."""
        self._check_open("zero_grad")
        if self._micro == 0:
            self.optimizer.zero_grad(set_to_none=set_to_none)
            if self._armed:
                self.probe.cancel()
                self.probe.begin(loss_scale=self._loss_scale())

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of the optimizer's parameters (unscaled through the scaler first);
        returns the total norm (a device tensor). Call before :meth:`step` on the last
        micro-batch."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)

    # ---- probe steps ----
    def _probe_due(self) -> bool:
        """Whether the step in progress is a probe step (or retries a dropped probe)."""
        return self._retry or self.policy.is_probe(self.step_count)

    def _arm(self) -> None:
        """Loss kernel: prepare the coming micro-batch (probe mode for a probe step, hooks for
        its last). The output kernels measure on their own batch in step(): nothing to arm."""
        if self.kernel != "loss" or not self._probe_due():
            return
        if self._probe_cm is None:
            self._probe_cm = self.skipper.probe_mode()
            self._probe_cm.__enter__()
        if self.is_last_micro_batch and not self._armed:
            self.probe.begin(loss_scale=self._loss_scale())
            self._armed = True

    def _loss_scale(self):
        """The factor the loss was multiplied by beyond the per-sample weights: the scaler's
        scale (a device tensor) over the accumulation steps (the micro-batch loss is the batch
        loss / A); None when it is 1."""
        factor = 1.0 / self.accumulation_steps
        if self.scaler is not None and self.scaler.is_enabled():
            if self.scaler._scale is None:  # created lazily by the first scaler.scale()
                self.scaler._lazy_init_scale_growth_tracker(self.device)
            return self.scaler._scale * factor
        return None if factor == 1.0 else factor

    def _lambda(self, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """λ (M,) and the Ritz vectors (M, p) of this rank's K (M, p, p), warm-started."""
        v0 = self._vectors
        if v0 is not None and v0.shape != K.shape[:2]:
            v0 = None
        res = lambda_max(K, iters=self.lanczos_iters, v0=v0, return_vectors=True,
                         check_symmetric=False)
        return res.lambdas, res.vectors

    def _reduce_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """Mean of λ over the ranks of the process group (identity in one process)."""
        if not (dist.is_available() and dist.is_initialized()):
            return lam
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return lam
        lam = lam.clone()
        dist.all_reduce(lam, op=dist.ReduceOp.SUM, group=self.process_group)
        return lam / world

    def _finish_probe(self) -> None:
        """K → λ → policy → masks. Failure isolation (docs/failure.md): a probe that raises an
        out-of-memory or another RuntimeError (Gram or Lanczos) counts as λ = NaN for every
        module, so the ranks of a DDP run stay in step; non-finite λ entries hold their modules
        (policy state and mask kept, no update at this step); when none is valid the probe is
        dropped, the masks stay, and one warning says why."""
        self._armed = False
        M = self.module_map.num_modules
        failure, vectors = None, None
        try:
            if self.kernel == "loss":
                K = self.probe.gram()
            else:  # every module measured on the probe batch, frozen ones included
                with self.skipper.probe_mode():
                    K = self.probe.measure(self.probe_inputs, self.probe_forward)
            lam, vectors = self._lambda(K)
        except RuntimeError as e:   # torch.OutOfMemoryError included
            failure = e
            self.probe.cancel()
            lam = torch.full((M,), float("nan"), dtype=torch.float32, device=self.device)
        # One all-reduce carries λ and whether any rank's probe raised, so that every rank takes
        # the same decisions below (a rank that decided alone would leave its peers waiting in
        # the next collective, or step with other masks).
        flag = torch.ones(1, dtype=lam.dtype, device=lam.device) * (failure is not None)
        both = self._reduce_lambda(torch.cat([lam, flag]))
        lam, failed_flag = both[:M], both[M]
        self._leave_probe_mode()
        invalid = ~torch.isfinite(lam)
        n_invalid, failed = int(invalid.sum()), bool(failed_flag != 0)   # host reads, at a probe
        if n_invalid and not self._retry and self.scaler is not None and self.scaler.is_enabled():
            self.skipped_probes += 1   # an overflowing AMP step: the mask stays, probe again
            self._retry = True
            return
        self._retry = False
        if n_invalid == M:
            self.skipped_probes += 1
            why = (f"the probe raised {type(failure).__name__}: {failure}" if failure is not None
                   else "the probe raised on another rank" if failed
                   else "λ is NaN/Inf for every module")
            warnings.warn(f"MAT: probe at step {self.step_count} dropped ({why}); the masks stay "
                          f"as they were{'' if failed else _NOT_UPDATED}, and the "
                          "next scheduled probe runs as usual", RuntimeWarning, stacklevel=3)
            if not failed:   # every module's gradient is suspect; after a failure they are not
                self._step_mask = torch.zeros(M, dtype=torch.bool, device=self.device)
            return
        if vectors is not None:
            self._vectors = vectors if not n_invalid else \
                torch.where(invalid[:, None], vectors.new_zeros(()), vectors)
        hold = invalid if n_invalid else None
        mask = self.policy.step(self.step_count, lam, hold=hold).to(self.device)
        self.optimizer.set_module_mask(mask)
        self.skipper.set_mask(mask)      # its host copy: the mask update's one read
        self._mask_host = self.skipper.active
        self.probe_steps.append(self.step_count)
        if n_invalid:
            names = [n for n, bad in zip(self.module_map.names, invalid.tolist()) if bad]
            warnings.warn(f"MAT: probe at step {self.step_count}: λ is NaN/Inf for "
                          f"{len(names)} module(s) ({', '.join(names)}); they keep their mask "
                          "and policy state and are not updated at this step, the other "
                          "modules are decided as usual", RuntimeWarning, stacklevel=3)
            self._step_mask = mask & ~invalid

    def _restore_mask_in_force(self) -> None:
        if self._mask_in_force is not None:
            self.optimizer.set_module_mask(self._mask_in_force)
            self._mask_in_force = None

    def _leave_probe_mode(self) -> None:
        if self._probe_cm is not None:
            cm, self._probe_cm = self._probe_cm, None
            cm.__exit__(None, None, None)

    def _disarm(self) -> None:
        if self._armed:
            self.probe.cancel()
            self._armed = False
        self._leave_probe_mode()

    # ---- compute accounting ----
    def _init_cost_model(self) -> None:
        mm = self.module_map
        numel = list(self.discovery.module_numel)
        if len(numel) != mm.num_modules:
            numel = Discovery.from_module_map(self.inner, mm).module_numel
        embed = {m for m, k in enumerate(mm.kinds) if k == "embedding"}
        # The 6·N·T model assumes T rows per parameter: false for a conv layer (rows = its
        # output positions) and a routed expert (rows = its tokens); measured off by factors
        # there (tests/test_compute_saved.py), so no estimate is reported.
        self._estimate_valid = not any(k in _UNESTIMATED_KINDS for k in mm.kinds)
        skipped = set(self.skipper.skipped_modules)
        factor = [0 if (m in embed or m not in skipped) else
                  (4 if self.backward == "detach" and k in _DETACHED_KINDS else 2)
                  for m, k in enumerate(mm.kinds)]
        self._saving_per_module = [f * n for f, n in zip(factor, numel)]
        self._dense_per_step = 6.0 * (sum(n for m, n in enumerate(numel) if m not in embed)
                                      + self.discovery.shared_numel)

    def _count_flops(self, dense: bool) -> None:
        self._flops_total += self._dense_per_step
        if not dense:
            self._flops_saved += sum(s for s, a in zip(self._saving_per_module, self._mask_host)
                                     if not a)

    # ---- report and checkpoint ----
    @property
    def compute_saved(self) -> Optional[float]:
        """Fraction of the analytic training FLOPs saved so far (host counters; no device work);
        None when the module map has conv or expert modules, where the analytic estimate does
        not hold (measure with ``mat_cuda.flops.FlopMeter``)."""
        if not self._estimate_valid:
            return None
        return (self._flops_saved / self._flops_total) if self._flops_total else 0.0

    def report(self) -> dict:
        """Per-module λ history, active fraction over time, compute saved (host tensors).

        Returns the policy's report (``step`` (P,), ``lam`` (P, M), ``mask`` (P, M),
        ``active_fraction`` {kind: (P,)}, ``reentries``, ``retired``, ``converged_kinds``,
        ``names``, ``kinds``; P = probes recorded) plus ``steps`` (optimizer steps so far),
        ``skipped_probes``, ``module_steps`` ((M+1,) steps each module was updated, last =
        unmanaged), ``compute_saved`` (fraction of the analytic training FLOPs saved so far,
        see the module docstring; None when the map has conv or expert modules, where the
        estimate does not hold: measure with ``mat_cuda.flops.FlopMeter``) and
        ``unskipped_modules`` (masked by the optimizer only).
        """
        rep = self.policy.report()
        rep.update(
            steps=self.step_count,
            skipped_probes=self.skipped_probes,
            module_steps=self.optimizer.module_steps.cpu(),
            compute_saved=self.compute_saved,
            unskipped_modules=self.skipper.unskipped_modules,
        )
        return rep

    def state_dict(self) -> dict:
        """Masks, policy state (λ histories included), step counters, Ritz vectors, compute
        counters, per-module step counts and the output kernel's projection RNG state. The
        optimizer's state is its own state_dict."""
        return {
            "names": list(self.module_map.names),
            "kinds": list(self.module_map.kinds),
            "step_count": self.step_count,
            "micro": self._micro,
            "retry": self._retry,
            "mask": self.optimizer.module_mask.clone(),
            "module_steps": self.optimizer.module_steps.clone(),
            "vectors": None if self._vectors is None else self._vectors.clone(),
            "policy": self.policy.state_dict(),
            "skipped_probes": self.skipped_probes,
            "probe_steps": list(self.probe_steps),
            "flops": (self._flops_total, self._flops_saved),
            # The output kernel's projection RNG (None for the other kernels): without it a
            # resumed run would draw the projections of its next probes again from seed 0.
            "projection_rng": (None if self.probe.generator is None
                               else self.probe.generator.get_state()),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output: masks are applied to the optimizer and the
        Skipper, and the coming step is re-armed as the saved run would have armed it.

        A state of another module map (names, kinds or count), with a mask that is not bool, or
        with tensors of the wrong shape raises ValueError/TypeError and changes nothing. Tensors
        saved on another device are moved to this MAT's."""
        self._check_open("load_state_dict")
        _check_state(state, self.module_map)
        previous = self.state_dict()
        try:
            self._load(state)
        except Exception as e:   # e.g. a policy state that does not fit: back to where we were
            self._load(previous)
            raise ValueError(f"MAT.load_state_dict: the state does not fit this MAT "
                             f"({type(e).__name__}: {e}); nothing was changed") from e

    def _load(self, state: dict) -> None:
        mask = state["mask"].to(device=self.device)
        self._disarm()
        self._probed_at, self._step_mask = -1, None
        self.policy.load_state_dict(state["policy"])
        self.step_count, self._micro = int(state["step_count"]), int(state["micro"])
        self._retry = bool(state["retry"])
        self._vectors = None if state["vectors"] is None else state["vectors"].to(self.device)
        self.skipped_probes = int(state["skipped_probes"])
        self.probe_steps = list(state["probe_steps"])
        self._flops_total, self._flops_saved = state["flops"]
        rng = state.get("projection_rng")   # absent in checkpoints saved before it was kept
        if rng is not None and self.probe.generator is not None:
            self.probe.generator.set_state(rng)
        self.optimizer.set_module_mask(mask)
        self.optimizer.module_steps.copy_(state["module_steps"].to(self.device))
        self.skipper.set_mask(mask)
        self._mask_host = self.skipper.active
        self._arm()

    def close(self) -> None:
        """Remove the probe's hooks and undo the Skipper's conversion (the model as before).
        Idempotent: closing a closed MAT does nothing; step(), zero_grad() and
        load_state_dict() of a closed MAT raise."""
        if getattr(self, "_closed", False):
            return
        self._disarm()
        self.probe.close()
        self.skipper.restore()
        self._closed = True

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"MAT.{what}: this MAT is closed (close() removed its hooks and "
                               "restored the model); build a new MAT to train with MAT again")

    def __enter__(self) -> "MAT":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_plain_args(scaler, lanczos_iters, process_group) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"MAT: scaler must be a torch.amp.GradScaler or None, got "
                        f"{type(scaler).__name__}")
    if lanczos_iters is not None and (isinstance(lanczos_iters, bool)
                                      or not isinstance(lanczos_iters, int) or lanczos_iters < 1):
        raise ValueError(f"MAT: lanczos_iters must be None or an int >= 1, got {lanczos_iters!r}")
    if process_group is not None and dist.is_available() \
            and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"MAT: process_group must be a torch.distributed ProcessGroup or None, "
                        f"got {type(process_group).__name__}")


def _check_state(state, mm: ModuleMap) -> None:
    """Everything MAT.load_state_dict can check before it changes anything."""
    where = "MAT.load_state_dict"
    if not isinstance(state, dict):
        raise TypeError(f"{where}: expected the dict of MAT.state_dict(), got {type(state).__name__}")
    missing = [k for k in ("step_count", "micro", "retry", "mask", "module_steps", "vectors",
                           "policy", "skipped_probes", "probe_steps", "flops") if k not in state]
    if missing:
        raise ValueError(f"{where}: the state has no {missing} (not saved by MAT.state_dict())")
    M = mm.num_modules
    for key, want in (("names", mm.names), ("kinds", mm.kinds)):
        if key in state and list(state[key]) != list(want):   # absent in older checkpoints
            raise ValueError(f"{where}: the state was saved for another module map (its module "
                             f"{key} differ from this MAT's: {list(state[key])[:4]}... vs "
                             f"{list(want)[:4]}...)")
    rng = state.get("projection_rng")
    if rng is not None and not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8):
        raise TypeError(f"{where}: projection_rng must be None or a torch.Generator state "
                        f"(uint8 tensor), got {getattr(rng, 'dtype', type(rng).__name__)}")
    pol = state["policy"]
    need = ("modular", "temporal", "mask", "last_step", "history")
    if not isinstance(pol, dict) or any(k not in pol for k in need):
        raise ValueError(f"{where}: the policy state must be MATPolicy.state_dict()'s dict with "
                         f"keys {list(need)}, got "
                         f"{sorted(pol) if isinstance(pol, dict) else type(pol).__name__}")
    mask, steps, vectors = state["mask"], state["module_steps"], state["vectors"]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{where}: the mask must be a bool tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (M,):
        raise ValueError(f"{where}: the mask has shape {tuple(mask.shape)}, this MAT has {M} "
                         "modules (another module map)")
    if not isinstance(steps, torch.Tensor) or steps.dtype != torch.int64 \
            or tuple(steps.shape) != (M + 1,):
        raise ValueError(f"{where}: module_steps must be an int64 ({M + 1},) tensor, got "
                         f"{getattr(steps, 'dtype', type(steps).__name__)} "
                         f"{tuple(getattr(steps, 'shape', ()))}")
    if vectors is not None and (not isinstance(vectors, torch.Tensor) or vectors.dim() != 2
                                or vectors.shape[0] != M or not vectors.is_floating_point()):
        raise ValueError(f"{where}: vectors must be None or a float (M={M}, p) tensor, got "
                         f"{getattr(vectors, 'dtype', type(vectors).__name__)} "
                         f"{tuple(getattr(vectors, 'shape', ()))}")


def _resolve(model: nn.Module, modules, kinds) -> Discovery:
    if isinstance(modules, Discovery):
        if modules.model is not None and unwrap_model(modules.model) is not model:
            raise ValueError("MAT: the Discovery passed as modules= describes another model")
        try:
            modules.module_map.validate([p for p in model.parameters() if p.requires_grad])
        except ValueError as e:
            raise ValueError(f"MAT: the ModuleMap does not fit the model: {e}") from e
        return modules
    try:
        return resolve_modules(model, modules, kinds)
    except ValueError as e:
        raise ValueError(f"MAT: the ModuleMap does not fit the model: {e}") from e


def _check_kernel(kernel, probe_inputs, probe_forward, probe_size) -> None:
    if kernel not in MODES:
        raise ValueError(f"MAT: kernel must be one of {MODES}, got {kernel!r}")
    if kernel == "loss":
        if probe_inputs is not None or probe_forward is not None:
            raise ValueError("MAT: probe_inputs / probe_forward are for kernel='output' or "
                             "'logit_sum'; kernel='loss' reads the training backward")
        return
    if probe_inputs is None:
        raise ValueError(f"MAT: kernel={kernel!r} measures on a probe batch of its own: pass "
                         "probe_inputs (and probe_forward if model(probe_inputs) is not the "
                         "output tensor)")
    if probe_forward is not None and not callable(probe_forward):
        raise TypeError(f"MAT: probe_forward must be callable, got {type(probe_forward).__name__}")
    if probe_size is not None:
        raise ValueError(f"MAT: probe_size selects samples of the training batch (kernel='loss'); "
                         f"with kernel={kernel!r} pass the probe batch you want as probe_inputs")


def _projection_generator(kernel: str, device: torch.device) -> Optional[torch.Generator]:
    """The output kernel's own generator, so its projections never draw from the global RNG
    (which the training loop's dropout or data order may use)."""
    return torch.Generator(device=device).manual_seed(0) if kernel == "output" else None


def _make_policy(policy, mm: ModuleMap, probe_every, warmup) -> MATPolicy:
    if policy is None:
        return MATPolicy(mm.kinds, warmup=DEFAULT_WARMUP if warmup is None else warmup,
                         probe_every=DEFAULT_PROBE_EVERY if probe_every is None else probe_every,
                         names=mm.names)
    if probe_every is not None or warmup is not None:
        raise ValueError("MAT: probe_every and warmup configure the default policy; with "
                         "policy= set them on the MATPolicy")
    if callable(policy) and not isinstance(policy, MATPolicy):
        policy = policy(list(mm.kinds), list(mm.names))
    if not isinstance(policy, MATPolicy):
        raise TypeError(f"MAT: policy must be a MATPolicy (or a factory returning one), got "
                        f"{type(policy).__name__}")
    if list(policy.kinds) != mm.kinds:
        raise ValueError(f"MAT: the policy was built for {len(policy.kinds)} modules of kinds "
                         f"{sorted(set(policy.kinds))}, the module map has {mm.num_modules} of "
                         f"kinds {sorted(set(mm.kinds))}; build it with MATPolicy(mat.module_map"
                         ".kinds) (or module_map.kinds of the same map)")
    return policy


def _warn_schedule(policy: MATPolicy, total_steps: Optional[int]) -> None:
    try:
        message = policy.schedule_warning(total_steps)
    except ValueError as e:
        raise ValueError(f"MAT: {e}") from None
    if message:
        warnings.warn(f"MAT: {message}", PolicyScheduleWarning, stacklevel=3)


def _masked_optimizer(optimizer, mm: ModuleMap) -> _MaskedOptimizer:
    """``optimizer`` if it is masked on ``mm``, else its masked equivalent on ``mm``."""
    if isinstance(optimizer, _MaskedOptimizer):
        if optimizer.module_map is mm:
            return optimizer
        cls = type(optimizer)
    elif type(optimizer) in _WRAPPABLE:
        cls = _WRAPPABLE[type(optimizer)]
    else:
        raise TypeError(f"MAT: cannot use an optimizer of type {type(optimizer).__name__}: pass a "
                        "mat_cuda.MaskedAdamW / MaskedSGD, or a torch.optim.AdamW / SGD that MAT "
                        "rebuilds as one")
    if len(optimizer.state):
        raise ValueError(f"MAT: the {type(optimizer).__name__} already has state (it has "
                         "stepped); create MAT before the first optimizer step so it can be "
                         f"rebuilt as {cls.__name__} on MAT's module map")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "module_map"}
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    try:
        return cls(optimizer.param_groups, module_map=mm, **kwargs)
    except ValueError as e:
        raise ValueError(f"MAT: cannot rebuild the {type(optimizer).__name__} as {cls.__name__} "
                         f"on MAT's module map: {e}") from e
