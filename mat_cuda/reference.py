"""Plain-PyTorch versions of mat_cuda's ops: the tests' oracles, readable as documentation.

Each function takes the op's arguments and returns new tensors instead of writing in place;
the math runs in float64 so that a test measures only the kernel's own rounding.
"""
from __future__ import annotations

from typing import Optional

import torch

# ---- optim ----

def element_modules_ref(layout_row: torch.Tensor, group_table: torch.Tensor, numel: int) -> torch.Tensor:
    """The module of every flat element of a contiguous tensor, (numel,) int64, decoded from one
    row of ModuleMap.kernel_tables' layout table (see mat_cuda/modules.py)."""
    code, a, b, c = (int(v) for v in layout_row)
    idx = torch.arange(numel, device=group_table.device)
    if code == 0:
        return torch.full((numel,), a, dtype=torch.int64, device=group_table.device)
    groups = idx // b if code == 1 else (idx % c) // b
    return group_table[a + groups]


def _active_elements(layout_row, group_table, module_mask, numel):
    """(numel,) bool: the element's module is active (slot num_modules, unmanaged, always is)."""
    full_mask = torch.cat([module_mask, module_mask.new_ones(1)])
    return full_mask[element_modules_ref(layout_row, group_table, numel)]


def masked_module_steps_ref(module_steps, module_mask, found_inf=None) -> torch.Tensor:
    """Step counts after one step: active slots (and the unmanaged last slot) advance by one
    unless found_inf is nonzero. module_steps: (M + 1,) int64; module_mask: (M,) bool."""
    if found_inf is not None and float(found_inf) != 0.0:
        return module_steps.clone()
    active = torch.cat([module_mask, module_mask.new_ones(1)])
    return module_steps + active.to(module_steps.dtype)


def _prepared_grad(g, grad_scale, maximize):
    g = g.double()
    if grad_scale is not None:
        g = g / grad_scale.double()
    return -g if maximize else g


def masked_adamw_step_ref(params, grads, exp_avgs, exp_avg_sqs, module_steps, module_mask,
                          layout_table, group_table, lr, beta1, beta2, weight_decay, eps,
                          maximize=False, grad_scale=None, found_inf=None):
    """torch.optim.AdamW's update applied to the elements of active modules, bias-corrected at
    each element's module step count + 1. Returns (params, exp_avgs, exp_avg_sqs) as new lists
    (params in their dtype, state float32); masked elements keep their input values exactly."""
    if found_inf is not None and float(found_inf) != 0.0:
        return [p.clone() for p in params], [m.clone() for m in exp_avgs], [v.clone() for v in exp_avg_sqs]
    out_p, out_m, out_v = [], [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        flat_mod = element_modules_ref(layout_table[i], group_table, p.numel())
        active = _active_elements(layout_table[i], group_table, module_mask, p.numel()).view(p.shape)
        step = (module_steps[flat_mod] + 1).double().view(p.shape)
        g64 = _prepared_grad(g, grad_scale, maximize)
        p64 = p.double() * (1 - lr * weight_decay)
        m64 = m.double() * beta1 + (1 - beta1) * g64
        v64 = v.double() * beta2 + (1 - beta2) * g64 * g64
        bc1 = 1 - beta1 ** step
        bc2 = 1 - beta2 ** step
        p64 = p64 - (lr / bc1) * m64 / (v64.sqrt() / bc2.sqrt() + eps)
        out_p.append(torch.where(active, p64.to(p.dtype), p))
        out_m.append(torch.where(active, m64.float(), m))
        out_v.append(torch.where(active, v64.float(), v))
    return out_p, out_m, out_v


def masked_sgd_step_ref(params, grads, momentum_buffers, module_steps, module_mask, layout_table,
                        group_table, lr, momentum, dampening, weight_decay, nesterov,
                        maximize=False, grad_scale=None, found_inf=None):
    """torch.optim.SGD's update applied to the elements of active modules; a module at step
    count 0 starts its momentum buffer at the gradient. Returns (params, momentum_buffers)."""
    if found_inf is not None and float(found_inf) != 0.0:
        return [p.clone() for p in params], [b.clone() for b in momentum_buffers]
    out_p, out_b = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        flat_mod = element_modules_ref(layout_table[i], group_table, p.numel())
        active = _active_elements(layout_table[i], group_table, module_mask, p.numel()).view(p.shape)
        first = (module_steps[flat_mod] == 0).view(p.shape)
        d = _prepared_grad(g, grad_scale, maximize)
        if weight_decay != 0:
            d = d + weight_decay * p.double()
        if momentum != 0:
            buf = momentum_buffers[i]
            b64 = torch.where(first, d, buf.double() * momentum + (1 - dampening) * d)
            d = d + momentum * b64 if nesterov else b64
            out_b.append(torch.where(active, b64.float(), buf))
        p64 = p.double() - lr * d
        out_p.append(torch.where(active, p64.to(p.dtype), p))
    return out_p, out_b


# ---- mntk: Gram ----

def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, 1, d); (n, T, d) unchanged."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def _scatter_group_grams(K: torch.Tensor, grams: torch.Tensor, group_module, scale: float) -> None:
    """K[group_module[g]] += scale * grams[g] for every group with a module id >= 0."""
    for g, m in enumerate(torch.as_tensor(group_module).tolist()):
        if m >= 0:
            K[m] += (scale * grams[g]).to(K.dtype).to(K.device)


def linear_gram_(K, A, B, group_module, *, group_dim=0, group_size=None, weight=True, bias=False,
                 scale=1.0, algorithm="auto"):
    """Reference for mat_cuda.gram.linear_gram_: per-sample gradients g_i = B_iᵀ A_i built
    explicitly (einsum, float64), split into row (group_dim=0) or column (group_dim=1) groups,
    Gram of each group's flattened slice (plus its bias slice Σ_t B_it) added to K[module]."""
    A64, B64 = _as_3d(A).double(), _as_3d(B).double()
    n = A64.shape[0]
    g = torch.einsum("nto,nti->noi", B64, A64)  # (n, d_out, d_in) per-sample weight grads
    bsum = B64.sum(1)  # (n, d_out) per-sample bias grads
    dim = g.shape[1 + group_dim]
    gs = dim if group_size is None else group_size
    num_groups = len(group_module)
    grams = []
    for k in range(num_groups):
        parts = []
        if weight:
            sl = g[:, k * gs:(k + 1) * gs, :] if group_dim == 0 else g[:, :, k * gs:(k + 1) * gs]
            parts.append(sl.flatten(1))
        if bias:
            parts.append(bsum[:, k * gs:(k + 1) * gs])
        flat = torch.cat(parts, 1) if parts else torch.zeros(n, 0, dtype=torch.float64)
        grams.append(flat @ flat.T)
    _scatter_group_grams(K, grams, group_module, scale)
    return K


def embedding_gram_(K, indices, B, module, *, padding_idx=None, scale=1.0):
    """Reference for mat_cuda.gram.embedding_gram_: per-sample embedding weight gradients
    (num_embeddings x d, scatter-added rows B_it at idx_it, padding positions skipped), Gram."""
    idx = indices.long().cpu()
    B64 = B.double().cpu()
    n, T, d = B64.shape
    num_embeddings = int(idx.max().item()) + 1 if idx.numel() else 1
    if padding_idx is not None:
        num_embeddings = max(num_embeddings, padding_idx + 1)
    g = torch.zeros(n, num_embeddings, d, dtype=torch.float64)
    for i in range(n):
        keep = idx[i] != padding_idx if padding_idx is not None else torch.ones(T, dtype=torch.bool)
        g[i].index_add_(0, idx[i][keep], B64[i][keep])
    flat = g.flatten(1)
    if module >= 0:
        K[module] += (scale * (flat @ flat.T)).to(K.dtype).to(K.device)
    return K


def sample_gram_(K, G, group_module, *, group_size=None, scale=1.0):
    """Reference for mat_cuda.gram.sample_gram_: explicit per-sample gradients G (n, p), columns
    in groups of group_size, K[group_module[g]] += scale * G_g G_gᵀ."""
    G64 = G.double().cpu()
    p = G64.shape[1]
    gs = p if group_size is None else group_size
    grams = [G64[:, k * gs:(k + 1) * gs] @ G64[:, k * gs:(k + 1) * gs].T
             for k in range(len(group_module))]
    _scatter_group_grams(K, grams, group_module, scale)
    return K


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
            slices = [(lay.module, g.flatten(1))]
        elif lay.kind == "rows":  # explicit sizes, not -1: n may be 0
            g = g.reshape(n, len(lay.group_module), p.numel() // max(len(lay.group_module), 1))
            slices = [(m, g[:, i]) for i, m in enumerate(lay.group_module)]
        else:
            g = g.reshape(n, p.numel() // max(p.shape[-1], 1), len(lay.group_module), lay.group_size)
            slices = [(m, g[:, :, i].flatten(1)) for i, m in enumerate(lay.group_module)]
        for m, G in slices:
            if m >= 0:
                K[m] += G @ G.T
    return K


# ---- linalg ----

def lambda_max_reference(K: torch.Tensor, topk: Optional[int] = None) -> torch.Tensor:
    """What ``mat_cuda.linalg.lambda_max`` computes, by a full eigendecomposition in float64.

    K: (M, n, n) symmetric. Returns (M,) float64 λ_max, or (M, k) the k largest eigenvalues in
    descending order when ``topk=k``.
    """
    evals = torch.linalg.eigvalsh(K.double())  # (M, n) ascending
    if topk is None:
        return evals[:, -1]
    return evals.flip(-1)[:, :topk]
