"""MAT in the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[MATCallback()])``.

The callback (see docs/huggingface.md):

- ``on_train_begin`` (the Trainer has built its optimizer, wrapped it in accelerate's
  ``AcceleratedOptimizer`` and built the LR scheduler on it): builds :class:`mat_cuda.MAT` on
  ``trainer.model`` (module discovery, the Skipper's conversion) and the Trainer's AdamW/SGD,
  which MAT rebuilds as a MaskedAdamW/MaskedSGD with the *same param-group dicts* (so the
  scheduler's learning rates and weight-decay groups apply unchanged), and makes the
  ``AcceleratedOptimizer`` step the masked one (the scheduler holds the AcceleratedOptimizer, so
  it drives the masked optimizer). The Trainer's GradScaler (fp16) and
  ``gradient_accumulation_steps`` are handed to MAT. On a resume it restores MAT's state and the
  masked optimizer's (module step counts included) from the checkpoint.
- after each micro-batch (``on_substep_end``) and before each optimizer step
  (``on_pre_optimizer_step``, after the Trainer clipped the gradients):
  ``MAT.before_optimizer_step`` (probe on schedule, new masks before the update); after it
  (``on_optimizer_step``): ``MAT.after_optimizer_step``.
- ``on_save``: writes ``mat_state.pt`` (MAT's state) into the checkpoint folder the Trainer just
  wrote; ``on_log``: adds MAT's metrics (:class:`~mat_cuda.integrations._common.MATMetrics`) to
  the training logs; ``on_step_end``: with ``stop_on_convergence``, stops training when the
  temporal policy reports every kind converged; ``on_train_end``: ``MAT.close()`` (the model as
  before conversion).

Why :class:`MATTrainer` exists: a callback's ``on_log`` runs *after* the ``report_to``
integrations (TensorBoard, W&B, ... are callbacks registered before the user's), and the Trainer
passes callbacks no handle to add values earlier. ``MATTrainer`` overrides ``Trainer.log`` (the
documented extension point) to add MAT's metrics before any callback sees the logs. With a plain
``Trainer`` they reach ``trainer.state.log_history`` (and so ``trainer_state.json``) and the
console, not the report_to integrations.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from typing import Optional

import torch

try:
    import accelerate  # noqa: F401  (the Trainer's optimizer wrapper)
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("mat_cuda.integrations.hf needs transformers and accelerate: "
                      'pip install "mat_cuda[hf]"') from e
try:  # the Trainer's checkpoint layout: <output_dir>/<PREFIX>-<step>/<OPTIMIZER_NAME>
    from transformers.trainer import OPTIMIZER_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as e:  # pragma: no cover - a transformers upgrade moved them
    raise ImportError("mat_cuda.integrations.hf: this transformers version does not define "
                      "transformers.trainer.OPTIMIZER_NAME / transformers.trainer_utils."
                      "PREFIX_CHECKPOINT_DIR (the checkpoint layout MATCallback reads)") from e

from ..mat import MAT
from ..optim import _MaskedOptimizer
from . import _private
from ._common import MATMetrics, MATOptions, converged_at_new_probe

__all__ = ["MATCallback", "MATTrainer", "MAT_STATE_NAME"]

logger = logging.getLogger(__name__)

MAT_STATE_NAME = "mat_state.pt"
_FORMAT = 1


class MATCallback(TrainerCallback):
    """Modular Adaptive Training for ``transformers.Trainer``.

    Args (keyword only): those of :class:`mat_cuda.MAT` (``modules``, ``policy``,
    ``probe_every``, ``warmup``, ``probe_size``, ``kernel``, ``probe_inputs``, ``probe_forward``,
    ``projections``, ``backward``, ``loss_reduction``, ``kinds``, ``lanczos_iters``), except that
    ``warmup`` may also be a float in [0, 1): a fraction of the run's ``max_steps``. The scaler
    and the accumulation steps come from the Trainer.
        stop_on_convergence: set ``control.should_training_stop`` when the temporal policy
            reports every module kind converged (default False).
        log_metrics: add MAT's metrics to the Trainer's training logs (default True).
        resume_from: the checkpoint folder to read MAT's state from on a resume (default: the
            folder the Trainer itself resumes from when it is ``<output_dir>/checkpoint-<step>``;
            pass it when resuming from a checkpoint stored elsewhere).

    Attributes: ``mat`` (the :class:`MAT`, from ``on_train_begin`` on; closed at the end of
    training, its ``report()`` stays readable), ``metrics()`` (the current metrics dict).
    """

    def __init__(self, *, stop_on_convergence: bool = False, log_metrics: bool = True,
                 resume_from: Optional[str] = None, **mat_options):
        self.options = MATOptions(**mat_options)
        self.stop_on_convergence = bool(stop_on_convergence)
        self.log_metrics = bool(log_metrics)
        self.resume_from = resume_from
        self.mat: Optional[MAT] = None
        self._metrics: Optional[MATMetrics] = None
        self._probes_seen = 0

    # ---- set-up ----
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       **kwargs):
        if self.mat is not None:
            raise RuntimeError("MATCallback: this callback already ran a training run; use a new "
                               "Trainer and MATCallback (resume_from_checkpoint continues a run)")
        if model is None or optimizer is None:
            raise RuntimeError("MATCallback: the Trainer passed no model or optimizer to "
                               "on_train_begin")
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError("MATCallback: DeepSpeed and FSDP shard the optimizer, which MAT's "
                             "masked optimizer does not support; use DDP")
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"MATCallback: expected the Trainer's optimizer to be accelerate's "
                            f"AcceleratedOptimizer, got {type(optimizer).__name__}")
        resume = state.global_step > 0
        saved = self._read_checkpoint(args, state) if resume else None
        # A resumed Trainer has loaded the checkpoint's optimizer state into its fresh AdamW;
        # MAT rebuilds only an optimizer that has not stepped: set that state aside while MAT
        # builds, and load the checkpoint's masked state (module step counts included) after.
        loaded_state, inner.state = inner.state, collections.defaultdict(dict)
        try:
            mat = self.options.build(model, inner, total_steps=state.max_steps,
                                     scaler=getattr(optimizer, "scaler", None),
                                     accumulation_steps=args.gradient_accumulation_steps)
        except BaseException:
            inner.state = loaded_state
            raise
        try:
            _make_torch_loadable(mat.optimizer)
            if saved is not None:
                folder, mat_state = saved
                opt_file = os.path.join(folder, OPTIMIZER_NAME)
                if len(loaded_state):
                    if not os.path.isfile(opt_file):
                        raise FileNotFoundError(f"MATCallback: {opt_file} is missing; MAT needs "
                                                "the checkpoint's optimizer state file")
                    mat.optimizer.load_state_dict(torch.load(opt_file, map_location=mat.device,
                                                             weights_only=True))
                mat.load_state_dict(mat_state)
            _private.swap_accelerated_optimizer(optimizer, mat.optimizer)
            if lr_scheduler is not None:
                _private.retarget_lr_scheduler(lr_scheduler, inner, mat.optimizer)
        except BaseException:
            mat.close()
            inner.state = loaded_state
            raise
        self.mat, self._metrics = mat, MATMetrics(mat)
        self._probes_seen = len(mat.probe_steps)

    def _read_checkpoint(self, args, state):
        folder = self.resume_from or os.path.join(args.output_dir,
                                                  f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, MAT_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"MATCallback: resuming at step {state.global_step}, but {path} does not exist. "
                "MAT's state is saved beside each checkpoint the Trainer writes with MATCallback; "
                "when resuming from a checkpoint outside output_dir pass "
                "MATCallback(resume_from=<that checkpoint folder>)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != _FORMAT:
            raise ValueError(f"MATCallback: {path} has format {blob.get('format')!r}, "
                             f"expected {_FORMAT}")
        if blob["global_step"] != state.global_step or blob["fingerprint"] != _fingerprint(state):
            raise ValueError(
                f"MATCallback: {path} was saved at step {blob['global_step']} of a run whose "
                f"logged history differs from the checkpoint being resumed (step "
                f"{state.global_step}): it belongs to another run; pass "
                "MATCallback(resume_from=<the folder you resume from>)")
        return folder, blob["mat"]

    # ---- the step ----
    def on_substep_end(self, args, state, control, **kwargs):
        self._require_mat().before_optimizer_step(end_of_step=False)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The Trainer has clipped the gradients; the probe reads the layer factors its hooks
        # took during the backward, not .grad, so clipping first does not change λ.
        self._require_mat().before_optimizer_step(end_of_step=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._require_mat().after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        mat = self._require_mat()
        if self.stop_on_convergence:
            stop, self._probes_seen = converged_at_new_probe(mat, self._probes_seen,
                                                             state.global_step, logger)
            if stop:
                control.should_training_stop = True
        return control

    # ---- checkpoints, logs, end ----
    def on_save(self, args, state, control, **kwargs):
        if self.mat is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"MATCallback: the Trainer's checkpoint folder {folder} does "
                                    "not exist (hyper-parameter search runs are not supported)")
        torch.save({"format": _FORMAT, "global_step": state.global_step,
                    "fingerprint": _fingerprint(state), "mat": self.mat.state_dict()},
                   os.path.join(folder, MAT_STATE_NAME))

    def metrics(self) -> dict[str, float]:
        """MAT's current metrics (``mat/compute_saved``, ``mat/active_fraction/<kind>``, λ
        statistics per kind, ...; see MATMetrics); empty before training starts."""
        return {} if self._metrics is None else self._metrics()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_metrics or logs is None or "loss" not in logs or self._metrics is None:
            return
        if "mat/compute_saved" in logs:      # MATTrainer added them already
            return
        extra = self._metrics()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self.mat is not None:
            self.mat.close()

    def _require_mat(self) -> MAT:
        if self.mat is None:
            raise RuntimeError("MATCallback: training step before on_train_begin")
        return self.mat


def _make_torch_loadable(optimizer: _MaskedOptimizer) -> None:
    """Make the masked optimizer's state dict (the Trainer's ``optimizer.pt``) loadable by the
    torch optimizer a resuming Trainer builds before the callback runs: torch's AdamW requires a
    per-parameter ``step``, which the masked optimizer does not keep (it counts steps per
    module). A state-dict hook (public torch API) adds ``step`` = the optimizer steps taken to
    each parameter's state; a load pre-hook drops it again when the callback loads the file
    into the masked optimizer (which reads only its own keys and ``module_steps``)."""
    if getattr(optimizer, "_mat_hf_hooks", False):
        return

    def add_step(opt, state_dict):
        steps = float(opt.module_steps[-1])
        for s in state_dict["state"].values():
            if s:
                s["step"] = torch.tensor(steps, dtype=torch.float32)
        return state_dict

    def drop_step(opt, state_dict):
        state_dict = dict(state_dict)
        state_dict["state"] = {k: {n: v for n, v in s.items() if n != "step"}
                               for k, s in state_dict["state"].items()}
        return state_dict

    optimizer.register_state_dict_post_hook(add_step)
    optimizer.register_load_state_dict_pre_hook(drop_step)
    optimizer._mat_hf_hooks = True


def _fingerprint(state) -> str:
    """Identifies a checkpoint's TrainerState (its step and logged history, which the Trainer
    writes to trainer_state.json just before on_save and reads back on resume)."""
    payload = json.dumps({"global_step": state.global_step, "log_history": state.log_history},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class MATTrainer(Trainer):
    """A ``transformers.Trainer`` whose :meth:`log` adds the :class:`MATCallback`'s metrics to
    the training logs *before* the callbacks see them, so that they reach the ``report_to``
    integrations (with a plain Trainer they reach ``state.log_history`` and the console only:
    a callback's ``on_log`` runs after the integrations'). Needs a MATCallback in ``callbacks``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cbs = [cb for cb in self.callback_handler.callbacks if isinstance(cb, MATCallback)]
        if len(cbs) != 1:
            raise ValueError(f"MATTrainer: pass exactly one MATCallback in callbacks=, got "
                             f"{len(cbs)}")
        self.mat_callback: MATCallback = cbs[0]

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        cb = self.mat_callback
        if cb.log_metrics and "loss" in logs:
            logs.update(cb.metrics())
        super().log(logs, *args, **kwargs)
