"""The MATCallback logic shared by ``lightning.pytorch`` and the standalone
``pytorch_lightning`` package (the same hooks, two different ``Callback`` base classes).
Framework-free: it reaches the Trainer only through the objects the hooks receive.
See mat_cuda/integrations/lightning.py for what each hook does."""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..mat import MAT
from . import _private
from ._common import MATMetrics, MATOptions, converged_at_new_probe

logger = logging.getLogger("mat_cuda.integrations.lightning")


class MATCallbackLogic:
    """Modular Adaptive Training for a LightningModule with automatic optimization.

    Args (keyword only): those of :class:`mat_cuda.MAT` (``modules``, ``policy``,
    ``probe_every``, ``warmup``, ``probe_size``, ``kernel``, ``probe_inputs``, ``probe_forward``,
    ``projections``, ``backward``, ``loss_reduction``, ``kinds``, ``lanczos_iters``), except that
    ``warmup`` may also be a float in [0, 1): a fraction of ``trainer.estimated_stepping_batches``.
    The scaler and the accumulation steps come from the Trainer.
        stop_on_convergence: set ``trainer.should_stop`` when the temporal policy reports every
            module kind converged (default False).
        log_metrics: log MAT's metrics (``mat/compute_saved``, ``mat/active_fraction/<kind>``, λ
            statistics per kind, ...) with ``pl_module.log_dict`` at every optimizer step
            (default True; Lightning's loggers write them every ``log_every_n_steps``).

    Attributes: ``mat`` (the :class:`MAT`, from ``on_fit_start`` on; closed at the end of fit,
    its ``report()`` stays readable).
    """

    def __init__(self, *, stop_on_convergence: bool = False, log_metrics: bool = True,
                 **mat_options):
        self.options = MATOptions(**mat_options)
        self.stop_on_convergence = bool(stop_on_convergence)
        self.log_metrics = bool(log_metrics)
        self.mat: Optional[MAT] = None
        self._metrics: Optional[MATMetrics] = None
        self._pending_state: Optional[dict] = None   # MAT's state from a checkpoint
        self._stepped = False                        # the optimizer stepped in this batch
        self._probes_seen = 0

    # ---- set-up ----
    def on_fit_start(self, trainer, pl_module) -> None:
        if self.mat is not None:
            raise RuntimeError("MATCallback: this callback already ran a fit; use a new Trainer "
                               "and MATCallback (fit(ckpt_path=...) continues a run)")
        if not pl_module.automatic_optimization:
            raise ValueError("MATCallback: the LightningModule uses manual optimization; create "
                             "mat_cuda.MAT yourself and call mat.step() (docs/lightning.md)")
        optimizers = trainer.strategy.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"MATCallback: configure_optimizers must return one optimizer, got "
                             f"{len(optimizers)}")
        old = optimizers[0]
        total = trainer.estimated_stepping_batches
        total = int(total) if total != float("inf") else None
        mat = self.options.build(pl_module, old, total_steps=total,
                                 scaler=getattr(trainer.precision_plugin, "scaler", None),
                                 accumulation_steps=trainer.accumulate_grad_batches)
        try:
            if self._pending_state is not None:
                mat.load_state_dict(self._pending_state)
                self._pending_state = None
            trainer.strategy.optimizers = [mat.optimizer]
            for config in trainer.strategy.lr_scheduler_configs:
                _private.retarget_lr_scheduler(config.scheduler, old, mat.optimizer)
        except BaseException:
            mat.close()
            raise
        self.mat, self._metrics = mat, MATMetrics(mat)
        self._probes_seen = len(mat.probe_steps)

    # ---- the step ----
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._require_mat().before_optimizer_step(end_of_step=True)
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mat = self._require_mat()
        if not self._stepped:
            mat.before_optimizer_step(end_of_step=False)
            return
        self._stepped = False
        mat.after_optimizer_step()
        if self.log_metrics:
            pl_module.log_dict(self._metrics(), on_step=True, on_epoch=False)
        if self.stop_on_convergence:
            stop, self._probes_seen = converged_at_new_probe(mat, self._probes_seen,
                                                             trainer.global_step, logger)
            if stop:
                trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.mat is not None:
            self.mat.close()

    def metrics(self) -> dict[str, float]:
        """MAT's current metrics (see MATMetrics); empty before fit starts."""
        return {} if self._metrics is None else self._metrics()

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        return {} if self.mat is None else {"mat": self.mat.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it builds the optimizer: keep MAT's state until
        # on_fit_start builds MAT.
        if "mat" in state_dict:
            if self.mat is not None:
                self.mat.load_state_dict(state_dict["mat"])
            else:
                self._pending_state = state_dict["mat"]

    def _require_mat(self) -> MAT:
        if self.mat is None:
            raise RuntimeError("MATCallback: training step before on_fit_start")
        return self.mat
