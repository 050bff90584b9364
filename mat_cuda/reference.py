"""Plain-PyTorch versions of every mat_cuda op: the tests' oracle, readable as documentation.

Each function has the signature of its op's public wrapper and the same in-place semantics, but
computes in float64 the obvious way (no tiling, no cleverness), then adds into the given tensor.
"""
from __future__ import annotations

import torch


# ---- probe: per-module mNTK by torch.func (the oracle of mat_cuda.mntk.MNTKProbe) ----

def per_sample_grads_reference(model: torch.nn.Module, sample_scalar, inputs, *per_sample,
                               dtype: torch.dtype = torch.float64) -> dict:
    """Per-sample gradients by ``torch.func`` (vmap over grad), the model run in ``dtype``.

    sample_scalar(output_i, *per_sample_i) -> scalar: sample i's scalar (its loss term, a
    projection ⟨v, f(x_i)⟩, ...), given the model's output for sample i alone (batch axis
    removed) and the i-th rows of ``per_sample`` tensors. ``inputs``: a tensor (n, ...) fed as
    ``model(inputs[i:i+1])``. Floating inputs and every parameter and floating buffer are cast
    to ``dtype``. Returns {parameter name: (n, *param.shape)} in ``dtype``.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach().to(dtype) for k, p in model.named_parameters()}
    buffers = {k: (b.detach().to(dtype) if b.is_floating_point() else b)
               for k, b in model.named_buffers()}
    x = inputs.to(dtype) if inputs.is_floating_point() else inputs

    def one_sample(p, xi, *rest):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return sample_scalar(out.squeeze(0), *rest)

    return vmap(grad(one_sample), in_dims=(None, 0) + (0,) * len(per_sample))(params, x,
                                                                              *per_sample)


def module_grams_reference(model: torch.nn.Module, module_map, grads: dict) -> torch.Tensor:
    """K (M, n, n) float64: K[m] = Σ over module m's parameter slices of G Gᵀ, G the slice of
    the per-sample gradients ``grads`` ({name: (n, *shape)}, e.g. from
    per_sample_grads_reference) flattened per sample. Layouts come from ``module_map``."""
    n = next(iter(grads.values())).shape[0]
    K = torch.zeros(module_map.num_modules, n, n, dtype=torch.float64)
    for name, p in model.named_parameters():
        lay = module_map.layout(p)
        if lay is None:
            continue
        g = grads[name].detach().to(torch.float64).cpu()
        if lay.kind == "whole":
            slices = [(lay.module, g.reshape(n, -1))]
        elif lay.kind == "rows":
            g = g.reshape(n, len(lay.group_module), -1)
            slices = [(m, g[:, i]) for i, m in enumerate(lay.group_module)]
        else:
            g = g.reshape(n, -1, len(lay.group_module), lay.group_size)
            slices = [(m, g[:, :, i].reshape(n, -1)) for i, m in enumerate(lay.group_module)]
        for m, G in slices:
            if m >= 0:
                K[m] += G @ G.T
    return K
