"""MAT inside training frameworks that step the optimizer themselves.

- :mod:`mat_cuda.integrations.hf`: ``MATCallback`` for the Hugging Face ``Trainer`` (and
  ``MATTrainer``, a Trainer whose ``log`` hands MAT's metrics to the ``report_to`` integrations);
  needs ``transformers`` and ``accelerate`` (``pip install "mat_cuda[hf]"``).
- :mod:`mat_cuda.integrations.lightning`: ``MATCallback`` for PyTorch Lightning's automatic
  optimization; needs ``lightning`` (``pip install "mat_cuda[lightning]"``).

Both wrap :class:`mat_cuda.MAT` through its two public halves of a step
(``before_optimizer_step`` / ``after_optimizer_step``); the core never imports this package.
Import the submodule you need: this package imports no framework itself.
"""
