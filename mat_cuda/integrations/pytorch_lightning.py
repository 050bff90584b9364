"""MATCallback for the standalone ``pytorch_lightning`` package (same as
:mod:`mat_cuda.integrations.lightning`, whose callback derives from ``lightning.pytorch.Callback``,
a different class that a ``pytorch_lightning.Trainer`` does not accept)."""
from __future__ import annotations

try:
    from pytorch_lightning import Callback
except ImportError as e:  # pragma: no cover - exercised only without pytorch_lightning
    raise ImportError("mat_cuda.integrations.pytorch_lightning needs pytorch_lightning: "
                      "pip install pytorch-lightning (or use mat_cuda.integrations.lightning with "
                      "the lightning package)") from e

from ._lightning_logic import MATCallbackLogic

__all__ = ["MATCallback"]


class MATCallback(MATCallbackLogic, Callback):
    __doc__ = MATCallbackLogic.__doc__
