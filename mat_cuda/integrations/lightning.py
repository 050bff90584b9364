"""MAT in PyTorch Lightning: ``Trainer(..., callbacks=[MATCallback()])``.

For a LightningModule with automatic optimization and one optimizer (see docs/lightning.md):

- ``on_fit_start`` (Lightning has built the optimizer and schedulers from
  ``configure_optimizers``): builds :class:`mat_cuda.MAT` on the LightningModule and that
  AdamW/SGD, which MAT rebuilds as a MaskedAdamW/MaskedSGD with the *same param-group dicts*;
  the masked optimizer replaces it in ``trainer.strategy.optimizers`` and every scheduler built
  on it is pointed at the masked one. ``accumulate_grad_batches`` and the precision plugin's
  GradScaler (``16-mixed``) are handed to MAT. On a resume, MAT's state (saved by the callback's
  ``state_dict`` in the checkpoint) is restored; Lightning then loads the masked optimizer's
  state into the masked optimizer (it restores optimizer states after ``on_fit_start``).
- ``on_before_optimizer_step`` (after the last micro-batch's backward, before clipping and the
  optimizer step): ``MAT.before_optimizer_step`` (probe, new masks);
  ``on_train_batch_end``: ``MAT.after_optimizer_step`` when the optimizer stepped in this batch,
  else counts the micro-batch (arming the probe for the last one); then logs MAT's metrics with
  ``pl_module.log_dict`` and, with ``stop_on_convergence``, sets ``trainer.should_stop`` when the
  temporal policy reports every kind converged.
- ``on_fit_end``: ``MAT.close()`` (the model as before conversion).

Manual optimization: the module creates MAT itself and calls it around its own optimizer step
(docs/lightning.md); the callback refuses a module with ``automatic_optimization = False``.
The standalone ``pytorch_lightning`` package: :mod:`mat_cuda.integrations.pytorch_lightning`.
"""
from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError('mat_cuda.integrations.lightning needs lightning: pip install '
                      '"mat_cuda[lightning]" (for the standalone pytorch_lightning package use '
                      'mat_cuda.integrations.pytorch_lightning)') from e

from ._lightning_logic import MATCallbackLogic

__all__ = ["MATCallback"]


class MATCallback(MATCallbackLogic, Callback):
    __doc__ = MATCallbackLogic.__doc__
