"""Compute skipping for whole-tensor modules (FFN blocks, experts, conv layers, embeddings).

A frozen whole-tensor module's parameters get ``requires_grad_(False)``, so autograd computes no
weight gradient for them, and no gradient at all below the lowest module (or shared parameter)
that still needs one. Only parameters that required grad when the skipper was built are toggled
(a parameter the user froze stays frozen, also while probing).

Blocks that sit on a residual branch (FFN blocks, experts: ``detach_blocks``, given by their
input layers) additionally get their input detached while frozen in ``detach`` mode, so their dX
is not computed either (the
gradient reaches the layers below through the residual path only, as in the paper's partial
back-propagation). In ``exact`` mode their dX is computed, so the gradient below is exact.
Conv layers and embeddings on the main path are never detached: that would cut off the
gradient of every active module below them.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
from torch import nn

from ..modules import ModuleMap


class WholeModuleSkipper:
    """Toggles ``requires_grad`` of whole-tensor modules and detaches frozen residual blocks.

    module_map: the ModuleMap (parameters with the ``whole`` layout are handled here);
    detach_blocks: module id -> the nn.Module, or a list of them, whose inputs are detached while
    that module is frozen (``detach`` mode only); mode: ``"detach"`` or ``"exact"``.
    """

    def __init__(self, module_map: ModuleMap, detach_blocks: Mapping[int, Union[nn.Module, Sequence[nn.Module]]] | None = None,
                 mode: str = "detach"):
        self.mode = mode
        self.params: dict[int, list[torch.Tensor]] = {}
        for p in module_map.params():
            lay = module_map.layout(p)
            if lay is not None and lay.kind == "whole" and p.requires_grad:
                self.params.setdefault(lay.module, []).append(p)
        self._detaching: set[int] = set()  # module ids whose block input is detached now
        self._hooks = []
        for mid, blocks in (detach_blocks or {}).items():
            for block in (blocks if isinstance(blocks, (list, tuple)) else [blocks]):
                self._hooks.append(block.register_forward_pre_hook(self._make_hook(int(mid)),
                                                                   with_kwargs=True))

    def _make_hook(self, mid: int):
        def hook(module, args, kwargs):
            if mid not in self._detaching:
                return None
            return (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                    {k: (a.detach() if isinstance(a, torch.Tensor) else a) for k, a in kwargs.items()})
        return hook

    @property
    def modules(self) -> list[int]:
        """The module ids whose parameters this skipper toggles."""
        return sorted(self.params)

    def set_active(self, active: Sequence[bool], probing: bool = False) -> None:
        """active[m]: module m trains. probing: everything that was trainable needs grad and no
        block is detached (every module's factors are produced on a probe step)."""
        for mid, params in self.params.items():
            on = probing or bool(active[mid])
            for p in params:
                p.requires_grad_(on)
        self._detaching = set() if (probing or self.mode != "detach") else {
            mid for mid in range(len(active)) if not active[mid]}

    def restore(self) -> None:
        """Every toggled parameter requires grad again; the detach hooks are removed."""
        for params in self.params.values():
            for p in params:
                p.requires_grad_(True)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._detaching = set()
