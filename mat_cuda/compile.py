"""torch.compile with MAT: the model's training steps compiled, MAT's probe steps eager.

    mat = mat_cuda.MAT(model, optimizer, backward="detach")
    forward = mat_cuda.compile_model(mat)            # torch.compile(model, **kwargs) inside
    for x, y in loader:
        loss = loss_fn(forward(x), y)
        loss.backward()
        mat.step()
        mat.zero_grad()

What is compiled: the model's forward and, through AOTAutograd, its backward, with the masked
layers of :mod:`mat_cuda.nn` traced into the graph (no graph breaks: ``fullgraph=True`` works).
What stays eager: :meth:`MAT.step` (the probe's Grams, λ, the policy and the fused optimizer
step: host logic and in-place custom ops on the optimizer state), and the model on MAT's probe
steps (:attr:`MAT.is_probe_step`, loss kernel): the probe's hooks record layer inputs on the
probe object and register gradient hooks, side effects Dynamo cannot keep in a graph. The
output kernels' passes run inside :meth:`MAT.step` on the unwrapped model, eager as well.

One graph per mask. MAT saves compute by changing what the backward computes: frozen heads'
weight-gradient GEMMs shrink to the active rows (index tensors whose sizes depend on the mask),
frozen whole-tensor modules stop requiring grad, and in ``detach`` mode frozen blocks' inputs are
detached. Those are graph structure, so the first step under a new mask compiles a new graph
(Dynamo guards on the parameters' ``requires_grad``, the index tensors' sizes and the skipper's
state). A mask seen before reuses its graph; a mask change that only touches modules the
optimizer alone masks (:attr:`Skipper.unskipped_modules`) compiles nothing. Dynamo keeps at most
``torch._dynamo.config.recompile_limit`` graphs per function (8 by default); steps under further
masks run the model eagerly (same numbers, no compile speed-up), and :class:`CompiledModel`
warns once when the count of distinct masks reaches that limit. Raise the limit for long runs
whose policy visits many masks. Measured costs: docs/compile.md.
"""
from __future__ import annotations

import warnings

import torch

from ._dynamo import recompile_limit

__all__ = ["CompiledModel", "compile_model"]


class CompiledModel:
    """Calls ``torch.compile(mat.model, **compile_kwargs)`` on MAT's training steps and the
    eager ``mat.model`` on its probe steps (see the module docstring). Call it like the model.

    Attributes: ``mat``, ``model`` (the eager model), ``compiled`` (the torch.compile wrapper),
    ``masks_seen`` (the distinct masks of the skipped modules the compiled model has run under,
    a set of bool tuples: an upper bound of the graphs compiled for them).
    """

    def __init__(self, mat, **compile_kwargs):
        model = mat.model
        if model is not mat.inner and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            raise ValueError("compile_model: MAT was given a torch.compile'd model; give MAT the "
                             "model itself and let compile_model compile it, so that probe steps "
                             "can run eagerly")
        self.mat, self.model = mat, model
        self.compiled = torch.compile(model, **compile_kwargs)
        self._skipped = tuple(mat.skipper.skipped_modules)
        self.masks_seen: set[tuple[bool, ...]] = set()
        self._warned = False

    def __call__(self, *args, **kwargs):
        if self.mat.is_probe_step:
            return self.model(*args, **kwargs)
        active = self.mat.skipper.active  # host copy made at the last mask update: no device read
        key = tuple(active[m] for m in self._skipped)
        if key not in self.masks_seen:
            self.masks_seen.add(key)
            limit = recompile_limit()
            if len(self.masks_seen) > limit and not self._warned:
                self._warned = True
                warnings.warn(
                    f"compile_model: MAT has now trained under {len(self.masks_seen)} distinct "
                    f"masks; torch.compile keeps at most {limit} graphs of the model "
                    "(torch._dynamo.config.recompile_limit), so steps under further masks run "
                    "the model eagerly (same results, no compile speed-up). Raise "
                    "torch._dynamo.config.recompile_limit to compile them (docs/compile.md).",
                    stacklevel=2)
        return self.compiled(*args, **kwargs)


def compile_model(mat, **compile_kwargs) -> CompiledModel:
    """A callable that runs ``mat.model`` compiled on training steps and eagerly on probe steps.

    mat: a :class:`mat_cuda.MAT` built on the uncompiled model (possibly DDP-wrapped);
    compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``fullgraph``,
    ``dynamic``, ...). Raises ValueError when MAT's model is already a torch.compile wrapper.
    """
    return CompiledModel(mat, **compile_kwargs)
