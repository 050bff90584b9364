"""Skipper: turns MAT's module mask into backward compute that is really not done.

    skipper = Skipper(module_map, attentions=discovery.attentions, ffns=discovery.ffns,
                      mode="detach")
    ...
    skipper.set_mask(mask)          # at a mask update (after a probe): the one host read
    with skipper.probe_mode():      # a probe step: every module active, all factors produced
        loss = ...; loss.backward()

- Heads (row/column groups of attention projections): the attention blocks are converted in
  place (:func:`mat_cuda.nn.attention.convert_attention`); frozen heads' dW is not computed, and
  in ``detach`` mode neither is their projections' dX nor their attention backward (HF blocks:
  HF's attention call is split by heads for the forward).
- Whole-tensor modules (FFN blocks, experts, conv layers, embeddings): ``requires_grad`` is
  toggled (:class:`mat_cuda.nn.whole.WholeModuleSkipper`); FFN blocks' inputs are detached while
  frozen in ``detach`` mode.
- Modules of other layouts (row/column groups of parameters that no converted block owns) are
  still masked by the optimizer but cost the same in backward: :attr:`unskipped_modules`.

Modes: ``"detach"`` — gradients stop at frozen modules (the paper's partial back-propagation;
the gradient of active modules below a frozen one is that of the model with the frozen
modules' inputs detached). ``"exact"`` — the gradient of every active module is exactly the
unconverted model's; only frozen modules' weight gradients are skipped.

Probing: a probe step must measure every module, frozen ones included, so inside
:meth:`probe_mode` the model is as before conversion (original attention forwards, every
trainable parameter requires grad); the mask in force is restored on exit. Its cost is part of
the probe overhead. Between mask updates nothing here reads from the device.

The attention/FFN descriptions are module discovery's AttentionSpec / FFNSpec
(mat_cuda/discovery.py) or any objects with the same fields: attentions need ``block,
num_heads, head_dim, q, k, v, qkv, o, head_modules, style``; ffns need ``block, module``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch

from ..modules import ModuleMap
from .attention import MODES, STYLES, ConvertedAttention, convert_attention
from .whole import WholeModuleSkipper


class Skipper:
    """Compute skipping for a model described by a ModuleMap (see the module docstring).

    module_map: the ModuleMap whose module ids the mask indexes (M modules);
    attentions: AttentionSpec-like objects, converted in place now;
    ffns: FFNSpec-like objects (``module``, and ``linears`` (input projection(s) first, output
    projection last) or else ``block``); while frozen in ``detach`` mode the inputs of its input
    projections (all linears but the last) are detached, so the gradient passes the block by
    its residual path only (for a spec without linears, ``block``'s inputs: it must then be the
    residual branch itself);
    mode: ``"detach"`` (default) or ``"exact"``;
    strict: True (default) raises for an attention block whose style is not converted
    (``separate_linear``, ``packed_linear``: blocks of unknown code); False leaves such blocks as they are (their heads are then listed in
    :attr:`unskipped_modules` and :attr:`unconverted`: masked by the optimizer, no compute saved).
    Every module is active until :meth:`set_mask`.
    """

    def __init__(self, module_map: ModuleMap, attentions: Iterable = (), ffns: Iterable = (),
                 mode: str = "detach", strict: bool = True):
        if mode not in MODES:
            raise ValueError(f"Skipper: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(module_map, ModuleMap):
            raise TypeError(f"Skipper: module_map must be a ModuleMap, got "
                            f"{type(module_map).__name__}")
        self.module_map, self.mode = module_map, mode
        self.attentions: list[ConvertedAttention] = []
        self.unconverted: list[str] = []  # paths of attention blocks left as they are (strict=False)
        try:
            for s in attentions:
                if s.style not in STYLES and not strict:
                    self.unconverted.append(getattr(s, "path", type(s.block).__name__))
                    continue
                self.attentions.append(convert_attention(
                    s.block, num_heads=s.num_heads, head_dim=s.head_dim, o=s.o,
                    head_modules=s.head_modules, style=s.style, mode=mode,
                    q=s.q, k=s.k, v=s.v, qkv=s.qkv))
        except Exception:
            for a in self.attentions:  # leave the model as it was
                a.restore()
            raise
        m = module_map.num_modules
        for a in self.attentions:
            bad = [i for i in a.head_modules if not 0 <= i < m]
            if bad:
                for b in self.attentions:
                    b.restore()
                raise ValueError(f"Skipper: head_modules {bad} of {type(a.block).__name__} are not "
                                 f"module ids of the map (0 .. {m - 1})")
        self.whole = WholeModuleSkipper(module_map, {int(f.module): _ffn_inputs(f) for f in ffns}, mode)
        self._active = [True] * module_map.num_modules
        self._probing = False

    @classmethod
    def from_discovery(cls, discovery, mode: str = "detach", strict: bool = True) -> "Skipper":
        """From a mat_cuda.discovery.Discovery (its module_map, attentions and ffns)."""
        return cls(discovery.module_map, discovery.attentions, discovery.ffns, mode, strict)

    # ---- state ----
    @property
    def active(self) -> list[bool]:
        """The mask in force (host copy made at the last set_mask): active[m] = module m trains."""
        return list(self._active)

    @property
    def skipped_modules(self) -> list[int]:
        """Module ids whose backward compute is skipped while frozen."""
        heads = {m for a in self.attentions for m in a.head_modules}
        return sorted(heads | set(self.whole.modules))

    @property
    def unskipped_modules(self) -> list[int]:
        """Module ids masked by the optimizer only (no backward compute saved)."""
        done = set(self.skipped_modules)
        return [m for m in range(self.module_map.num_modules) if m not in done]

    def set_mask(self, mask: torch.Tensor) -> None:
        """mask: bool (M,) on any device, True = module trains. Read to the host once, here.

        Raises TypeError / ValueError (nothing changed) for a non-bool or wrongly sized mask."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"Skipper.set_mask: mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"Skipper.set_mask: mask must be torch.bool, got {mask.dtype}")
        m = self.module_map.num_modules
        if mask.dim() != 1 or mask.numel() != m:
            raise ValueError(f"Skipper.set_mask: mask must have shape ({m},) (one flag per module), "
                             f"got {tuple(mask.shape)}")
        self._active = [bool(a) for a in mask.tolist()]  # the host read of a mask update
        self._apply()

    @contextmanager
    def probe_mode(self):
        """Within: every module active, the model as before conversion (a probe step)."""
        if self._probing:
            raise RuntimeError("Skipper.probe_mode: already probing")
        self._probing = True
        self._apply()
        try:
            yield self
        finally:
            self._probing = False
            self._apply()

    def restore(self) -> None:
        """Undo everything: original forwards, every toggled parameter requires grad again."""
        for a in self.attentions:
            a.restore()
        self.whole.restore()
        self.attentions = []

    def _apply(self) -> None:
        for a in self.attentions:
            a.set_active([self._active[m] for m in a.head_modules], probing=self._probing)
        self.whole.set_active(self._active, probing=self._probing)


def _ffn_inputs(ffn) -> list:
    """The layers whose inputs are detached while the FFN block is frozen (detach mode).

    The input projections, not the block: discovery may describe an FFN by the whole transformer
    layer (HF BERT's BertLayer), whose input also feeds the attention and the residual path."""
    linears = list(getattr(ffn, "linears", None) or [])
    return linears[:-1] if len(linears) >= 2 else [ffn.block]
