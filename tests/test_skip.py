"""Compute skipping (mat_cuda.nn): grouped linear backward, converted attention, Skipper."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from mat_cuda.models import BertEncoderMLM, VGGNet, mlm_loss
from mat_cuda.modules import ModuleMap
from mat_cuda.nn import (Skipper, active_cols_linear, active_rows_linear, col_grouped_linear,
                         convert_attention, row_grouped_linear)
from mat_cuda.discovery import discover

from helpers import assert_close_rel

# Forward of a converted block: same ops on subsets of heads (1e-6 relative allowed by the issue).
# Skipping changes only which GEMMs run and their blocking: ~16 u of the dtype (REL_TOL).
FWD_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


# ---------------------------------------------------------------- grouped linear
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("exact_dx", [True, False])
def test_row_grouped_linear_matches_masked_reference(device, bias, exact_dx):
    d_in, d_out, gs = 7, 12, 3  # 4 groups of 3 rows
    x = torch.randn(2, 5, d_in, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, device=device, dtype=torch.float64, requires_grad=True) if bias else None
    rows = torch.tensor([3, 4, 5, 9, 10, 11], device=device)
    y = row_grouped_linear(x, w, b, rows, None if exact_dx else rows)
    assert torch.equal(y, F.linear(x, w, b))
    dy = torch.randn_like(y)
    y.backward(dy)
    row_mask = torch.zeros(d_out, dtype=torch.bool, device=device)
    row_mask[rows] = True
    # Reference: exact dX (or dX of the active rows only), dW/db of the active rows, zeros elsewhere.
    dy_ref = dy if exact_dx else dy * row_mask
    assert_close_rel(x.grad, dy_ref @ w.detach())
    dw_ref = (dy.reshape(-1, d_out).t() @ x.detach().reshape(-1, d_in)) * row_mask[:, None]
    assert_close_rel(w.grad, dw_ref)
    assert torch.all(w.grad[~row_mask] == 0)
    if bias:
        assert_close_rel(b.grad, dy.reshape(-1, d_out).sum(0) * row_mask)
        assert torch.all(b.grad[~row_mask] == 0)


@pytest.mark.parametrize("exact_dx", [True, False])
def test_col_grouped_linear_matches_masked_reference(device, exact_dx):
    d_in, d_out = 8, 5
    x = torch.randn(3, 4, d_in, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, device=device, dtype=torch.float64, requires_grad=True)
    cols = torch.tensor([0, 1, 6, 7], device=device)
    y = col_grouped_linear(x, w, b, cols, None if exact_dx else cols)
    assert torch.equal(y, F.linear(x, w, b))
    dy = torch.randn_like(y)
    y.backward(dy)
    col_mask = torch.zeros(d_in, dtype=torch.bool, device=device)
    col_mask[cols] = True
    dx_full = dy @ w.detach()
    assert_close_rel(x.grad, dx_full if exact_dx else dx_full * col_mask)
    dw_full = dy.reshape(-1, d_out).t() @ x.detach().reshape(-1, d_in)
    assert_close_rel(w.grad, dw_full * col_mask)
    assert torch.all(w.grad[:, ~col_mask] == 0)
    assert_close_rel(b.grad, dy.reshape(-1, d_out).sum(0))  # shared bias: full gradient


@pytest.mark.parametrize("bias", [True, False])
def test_active_rows_and_cols_linear(device, bias):
    """Detach-mode variants: only the active part carries grad; results equal plain autograd."""
    x = torch.randn(2, 5, 8, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 8, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, device=device, dtype=torch.float64, requires_grad=True) if bias else None
    rows = torch.tensor([0, 1, 2, 9, 10, 11], device=device)
    frozen = torch.tensor([3, 4, 5, 6, 7, 8], device=device)
    y_a, y_f = active_rows_linear(x, w, b, rows, frozen)
    y = F.linear(x, w, b).detach()
    # float64 both sides, same math in other GEMMs: REL_TOL[float64] (helpers.py)
    assert_close_rel(y_a, y[..., rows], tol=1e-12)
    # float64 both sides, same math in other GEMMs: REL_TOL[float64] (helpers.py)
    assert_close_rel(y_f, y[..., frozen], tol=1e-12)
    assert y_a.requires_grad and not y_f.requires_grad
    dy = torch.randn_like(y_a)
    y_a.backward(dy)
    x2, w2 = (t.detach().clone().requires_grad_() for t in (x, w))
    b2 = b.detach().clone().requires_grad_() if bias else None
    F.linear(x2, w2, b2)[..., rows].backward(dy)
    assert_close_rel(x.grad, x2.grad)
    assert_close_rel(w.grad, w2.grad)  # frozen rows: exactly zero in both
    assert torch.all(w.grad[frozen] == 0)
    if bias:
        assert_close_rel(b.grad, b2.grad)
    # Columns: y = x W_oᵀ + b with x's columns `rows` = x_active, `frozen` = x_frozen.
    wo = torch.randn(5, 12, device=device, dtype=torch.float64, requires_grad=True)
    bo = torch.randn(5, device=device, dtype=torch.float64, requires_grad=True) if bias else None
    xa = y_a.detach().clone().requires_grad_()
    out = active_cols_linear(xa, y_f, wo, bo, rows, frozen)
    # float64 both sides, same math in other GEMMs: REL_TOL[float64] (helpers.py)
    assert_close_rel(out, F.linear(y, wo, bo), tol=1e-12)
    dout = torch.randn_like(out)
    out.backward(dout)
    wo2 = wo.detach().clone().requires_grad_()
    bo2 = bo.detach().clone().requires_grad_() if bias else None
    xa2 = y_a.detach().clone().requires_grad_()
    full = y.clone()
    full[..., rows] = 0
    F.linear(full.index_add(-1, rows, xa2), wo2, bo2).backward(dout)
    assert_close_rel(xa.grad, xa2.grad)
    assert_close_rel(wo.grad[:, rows], wo2.grad[:, rows])
    assert torch.all(wo.grad[:, frozen] == 0)
    if bias:
        assert_close_rel(bo.grad, bo2.grad)


def test_active_rows_and_cols_linear_without_frozen_part(device):
    """f = 0 (an empty frozen part) is allowed: the layer is then the plain one."""
    x = torch.randn(3, 4, device=device, requires_grad=True)
    w = torch.randn(6, 4, device=device, requires_grad=True)
    none = torch.empty(0, dtype=torch.int64, device=device)
    y_a, y_f = active_rows_linear(x, w, None, torch.arange(6, device=device), none)
    assert y_f.shape == (3, 0)
    # float32 on both sides, other GEMM split: REL_TOL[float32] (16 u32 ≈ 1e-6)
    assert_close_rel(y_a, F.linear(x, w).detach(), tol=1e-6)
    out = active_cols_linear(y_a, y_f, w.t().contiguous(), None, torch.arange(6, device=device), none)
    assert out.shape == (3, 4)
    # float32 on both sides, other GEMM split: REL_TOL[float32] (16 u32 ≈ 1e-6)
    assert_close_rel(out, F.linear(y_a, w.t()).detach(), tol=1e-6)


def test_grouped_linear_all_and_no_groups(device):
    x = torch.randn(6, 4, device=device, requires_grad=True)
    w = torch.randn(8, 4, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    row_grouped_linear(x, w, b, torch.arange(8, device=device)).sum().backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.linear(x2, w2, b2).sum().backward()
    for a, r in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert torch.equal(a, r)
    # No active group: no weight gradient is written at all; dX of no row is zero.
    x.grad = w.grad = b.grad = None
    none = torch.zeros(0, dtype=torch.int64, device=device)
    row_grouped_linear(x, w, b, none, none).sum().backward()
    assert w.grad is None and b.grad is None
    assert torch.all(x.grad == 0)


def test_grouped_linear_dw_gemm_uses_only_active_groups():
    n_tok, d_in, d_out = 64, 32, 48
    x = torch.randn(n_tok, d_in)
    w = torch.randn(d_out, d_in, requires_grad=True)
    for r in (0, 12, 24, 48):
        rows = torch.arange(r)
        y = row_grouped_linear(x, w, None, rows)
        dy = torch.randn_like(y)
        assert _flops(lambda: y.backward(dy)) == 2 * n_tok * r * d_in  # dW GEMM only (x needs no grad)
        y = col_grouped_linear(x, w, None, rows[rows < d_in])
        c = min(r, d_in)
        assert _flops(lambda: y.backward(dy)) == 2 * n_tok * d_out * c


def test_grouped_linear_autocast_matches_linear():
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    rows = torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = row_grouped_linear(x, w, None, rows)
        ref = F.linear(x, w)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert torch.all(w.grad[4:] == 0)


# ---------------------------------------------------------------- converted BERT
def _bert(device, qkv="separate", dtype=torch.float64):
    torch.manual_seed(1234)
    return BertEncoderMLM(vocab_size=50, hidden=24, layers=3, heads=4, ffn=40, max_len=16,
                          qkv=qkv).to(device=device, dtype=dtype)


def _split(model):
    """Module discovery's split: (module_map, attention specs, FFN specs)."""
    d = discover(model)
    return d.module_map, d.attentions, d.ffns


def _batch(device, n=3, t=9):
    ids = torch.randint(0, 50, (n, t), device=device)
    amask = torch.ones(n, t, dtype=torch.bool, device=device)
    amask[0, 6:] = False
    labels = torch.where(torch.rand(n, t, device=device) < 0.5, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    return ids, amask, labels


def _random_mask(mm, frac_frozen, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    mask = torch.ones(mm.num_modules, dtype=torch.bool)
    for kind in ("head", "ffn"):
        ids = torch.tensor(mm.modules_of_kind(kind))
        k = int(round(frac_frozen * len(ids)))
        mask[ids[torch.randperm(len(ids), generator=g)[:k]]] = False
    return mask


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("qkv", ["separate", "packed"])
@pytest.mark.parametrize("mode", ["detach", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converted_forward_unchanged(device, qkv, mode, dtype):
    model = _bert(device, qkv, dtype)
    ref = copy.deepcopy(model)
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns, mode=mode)
    skipper.set_mask(_random_mask(mm, 0.5))
    ids, amask, _ = _batch(device)
    out, out_ref = model(ids, amask), ref(ids, amask)
    assert_close_rel(out, out_ref, tol=FWD_TOL[dtype])


@pytest.mark.parametrize("qkv", ["separate", "packed"])
def test_all_active_gradients_equal_unconverted(device, qkv):
    model = _bert(device, qkv)
    ref = copy.deepcopy(model)
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns, mode="detach")
    skipper.set_mask(torch.ones(mm.num_modules, dtype=torch.bool))
    ids, amask, labels = _batch(device)
    mlm_loss(model(ids, amask), labels).backward()
    mlm_loss(ref(ids, amask), labels).backward()
    g, g_ref = _grads(model), _grads(ref)
    for name in g_ref:
        assert torch.equal(g[name], g_ref[name]), name


def _ref_attention(attn, x, amask, frozen_heads):
    """SelfAttention.forward in plain torch with the frozen heads' Q, K, V detached."""
    n, t, _ = x.shape
    q, k, v = attn.project(x)  # (n, H, T, d)
    fz = torch.zeros(attn.heads, dtype=torch.bool, device=x.device)
    fz[list(frozen_heads)] = True
    fz = fz[None, :, None, None]
    q, k, v = (torch.where(fz, y.detach(), y) for y in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(~amask[:, None, None, :], torch.finfo(scores.dtype).min)
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, attn.hidden)
    return attn.o(ctx)


def _ref_detached_loss(model, ids, amask, labels, frozen_heads_per_layer, frozen_ffn_layers):
    x = model.embeddings(ids)
    for i, layer in enumerate(model.layers):
        x = layer.attn_norm(x + _ref_attention(layer.attn, x, amask, frozen_heads_per_layer[i]))
        f_in = x.detach() if i in frozen_ffn_layers else x
        x = layer.ffn_norm(x + layer.ffn(f_in))
    return mlm_loss(model.mlm_head(x), labels)


def _frozen_sets(mm, attns, ffns, mask):
    heads = [{h for h, m in enumerate(a.head_modules) if not mask[m]} for a in attns]
    ffn_layers = {i for i, f in enumerate(ffns) if not mask[f.module]}
    return heads, ffn_layers


def _check_head_grads(model, ref_grads, attns, frozen_heads):
    """Active rows/cols equal the reference; frozen Q/K/V rows and W_O columns are zero."""
    names = {id(p): n for n, p in model.named_parameters()}
    for a, fz in zip(attns, frozen_heads):
        d = a.head_dim
        rows = torch.ones(a.num_heads * d, dtype=torch.bool)
        for h in fz:
            rows[h * d:(h + 1) * d] = False
        projs = [a.qkv] if a.qkv is not None else [a.q, a.k, a.v]
        if not rows.any():  # every head frozen: no weight gradient written at all
            assert all(p.grad is None for lin in projs for p in (lin.weight, lin.bias))
            assert a.o.weight.grad is None
            assert_close_rel(a.o.bias.grad, ref_grads[names[id(a.o.bias)]])
            continue
        for lin in projs:
            rr = rows.repeat(3) if lin is a.qkv else rows
            for p in (lin.weight, lin.bias):
                g, gr = p.grad.cpu(), ref_grads[names[id(p)]].cpu()
                # atol: the key bias's true gradient is 0 (softmax is shift invariant): roundoff only.
                torch.testing.assert_close(g[rr], gr[rr], rtol=1e-9, atol=1e-15, msg=names[id(p)])
                assert torch.all(g[~rr] == 0), names[id(p)]
        g, gr = a.o.weight.grad.cpu(), ref_grads[names[id(a.o.weight)]].cpu()
        assert_close_rel(g[:, rows], gr[:, rows])
        assert torch.all(g[:, ~rows] == 0)
        assert_close_rel(a.o.bias.grad, ref_grads[names[id(a.o.bias)]])


@pytest.mark.parametrize("qkv", ["separate", "packed"])
def test_detach_mode_grads_equal_detached_reference(device, qkv):
    model = _bert(device, qkv)
    ref = copy.deepcopy(model)
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns, mode="detach")
    mask = _random_mask(mm, 0.5, gen_seed=3)
    mask[mm.modules_of_kind("head")[4:8]] = False  # one layer with every head frozen
    skipper.set_mask(mask)
    frozen_heads, frozen_ffn = _frozen_sets(mm, attns, ffns, mask.tolist())
    assert frozen_ffn and any(len(f) == 4 for f in frozen_heads)
    ids, amask, labels = _batch(device)
    mlm_loss(model(ids, amask), labels).backward()
    _ref_detached_loss(ref, ids, amask, labels, frozen_heads, frozen_ffn).backward()
    ref_grads = _grads(ref)
    _check_head_grads(model, ref_grads, attns, frozen_heads)
    for n, p in model.named_parameters():
        if ".ffn." in n and int(n.split(".")[1]) in frozen_ffn:
            assert p.grad is None and not p.requires_grad, n  # frozen FFN: nothing computed
        elif ".attn." not in n:  # embeddings, norms, MLM head, active FFNs
            assert_close_rel(p.grad, ref_grads[n], msg=n)


@pytest.mark.parametrize("qkv", ["separate", "packed"])
def test_exact_mode_keeps_dx_exact(device, qkv):
    model = _bert(device, qkv)
    ref = copy.deepcopy(model)
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns, mode="exact")
    mask = _random_mask(mm, 0.5, gen_seed=5)
    skipper.set_mask(mask)
    frozen_heads, frozen_ffn = _frozen_sets(mm, attns, ffns, mask.tolist())
    ids, amask, labels = _batch(device)
    # dX: the gradient of the embedding output, exactly the unconverted model's.
    h, h_ref = model.embeddings(ids), ref.embeddings(ids)
    h.retain_grad(), h_ref.retain_grad()
    x, x_ref = h, h_ref
    for layer, layer_ref in zip(model.layers, ref.layers):
        x, x_ref = layer(x, amask), layer_ref(x_ref, amask)
    mlm_loss(model.mlm_head(x), labels).backward()
    mlm_loss(ref.mlm_head(x_ref), labels).backward()
    assert_close_rel(h.grad, h_ref.grad)
    ref_grads = _grads(ref)
    _check_head_grads(model, ref_grads, attns, frozen_heads)
    for n, p in model.named_parameters():
        if ".ffn." in n and int(n.split(".")[1]) in frozen_ffn:
            assert p.grad is None, n
        elif ".attn." not in n:
            assert_close_rel(p.grad, ref_grads[n], msg=n)


@pytest.mark.parametrize("mode", ["detach", "exact"])
def test_step_flops_fall_with_frozen_fraction(mode):
    model = _bert("cpu", dtype=torch.float32)
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns, mode=mode)
    ids, amask, labels = _batch("cpu", n=4, t=12)
    flops = []
    for frac in (0.0, 0.25, 0.5, 0.75):
        skipper.set_mask(_random_mask(mm, frac, gen_seed=7))
        model.zero_grad(set_to_none=True)
        flops.append(_flops(lambda: mlm_loss(model(ids, amask), labels).backward()))
    assert all(a > b for a, b in zip(flops, flops[1:])), flops


@pytest.mark.parametrize("mode", ["detach", "exact"])
def test_converted_forward_flops_equal_unconverted(mode):
    """The forward does the same work whatever the mask (every head is computed), so FLOP
    counters see the same forward FLOPs: a product the counter cannot see (e.g. an in-place
    addmm_) would show up here."""
    model = _bert("cpu", dtype=torch.float32)
    mm, attns, ffns = _split(model)
    ids, amask, _ = _batch("cpu", n=3, t=11)
    with torch.no_grad():
        full = _flops(lambda: model(ids, amask))
    skipper = Skipper(mm, attns, ffns, mode=mode)
    for frac in (0.25, 0.5, 1.0):
        skipper.set_mask(_random_mask(mm, frac, gen_seed=3))
        assert _flops(lambda: model(ids, amask)) == full, frac


def test_frozen_heads_dw_flops_counted_exactly():
    """One converted attention block: backward FLOPs of each projection's dW match the active count."""
    torch.manual_seed(0)
    model = BertEncoderMLM(vocab_size=20, hidden=32, layers=1, heads=4, ffn=16, max_len=8)
    mm, attns, ffns = _split(model)
    attn = model.layers[0].attn
    x = torch.randn(2, 8, 32)  # no grad to x: only weight gradients and the attention backward
    res = {}
    for mode in ("detach", "exact"):
        sk = Skipper(mm, attns, (), mode=mode)
        for n_active in (4, 2, 1):
            mask = torch.ones(mm.num_modules, dtype=torch.bool)
            mask[attns[0].head_modules[n_active:]] = False
            sk.set_mask(mask)
            out = attn(x)
            dy = torch.randn_like(out)
            res[mode, n_active] = _flops(lambda: out.backward(dy))
        sk.restore()
    n_tok, d, dh = 16, 32, 8
    for mode in ("detach", "exact"):
        # Going from 2 active heads to 1 saves one head's dW in q, k, v (rows) and o (columns).
        saved = res[mode, 2] - res[mode, 1]
        dw_head = 4 * 2 * n_tok * dh * d
        attn_bwd_head = 4 * 2 * 2 * 8 * 8 * dh  # per head: dscores, dv (bmm) and dq, dk (bmm)
        o_dx_head = 2 * n_tok * d * dh  # W_O's dX columns of the head (x needs no grad: no q/k/v dX)
        expected = dw_head + (attn_bwd_head + o_dx_head if mode == "detach" else 0)
        assert saved == expected, (mode, saved, expected)


def test_whole_modules_requires_grad_toggled_and_probe_mode():
    model = _bert("cpu")
    mm, attns, ffns = _split(model)
    model.embeddings.positions.weight.requires_grad_(False)  # frozen by the user: stays frozen
    skipper = Skipper(mm, attns, ffns)
    mask = torch.ones(mm.num_modules, dtype=torch.bool)
    mask[ffns[1].module] = False
    mask[mm.modules_of_kind("embedding")[0]] = False
    skipper.set_mask(mask)
    assert not model.layers[1].ffn.fc1.weight.requires_grad and not model.layers[1].ffn.fc2.bias.requires_grad
    assert model.layers[0].ffn.fc1.weight.requires_grad
    assert not model.embeddings.tokens.weight.requires_grad
    with skipper.probe_mode():
        assert model.layers[1].ffn.fc1.weight.requires_grad and model.embeddings.tokens.weight.requires_grad
        assert not model.embeddings.positions.weight.requires_grad
    assert not model.layers[1].ffn.fc1.weight.requires_grad
    skipper.restore()
    assert model.layers[1].ffn.fc1.weight.requires_grad and not model.embeddings.positions.weight.requires_grad


def test_nothing_below_lowest_active_module():
    """Frozen embeddings and a frozen lowest layer: no GEMM runs for layer 0's backward."""
    model = _bert("cpu", dtype=torch.float32)
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns, mode="detach")
    ids, amask, labels = _batch("cpu")
    mask = torch.ones(mm.num_modules, dtype=torch.bool)
    mask[mm.modules_of_kind("embedding")] = False
    mask[list(attns[0].head_modules) + [ffns[0].module]] = False
    skipper.set_mask(mask)
    base = _flops(lambda: mlm_loss(model(ids, amask), labels).backward())
    mask[list(attns[1].head_modules) + [ffns[1].module]] = False
    skipper.set_mask(mask)
    model.zero_grad(set_to_none=True)
    fewer = _flops(lambda: mlm_loss(model(ids, amask), labels).backward())
    assert fewer < base
    for p in list(model.layers[0].ffn.parameters()) + [model.embeddings.tokens.weight]:
        assert p.grad is None
    assert model.layers[0].attn.q.weight.grad is None  # no active head in layer 0: nothing written


def test_probe_mode_runs_unconverted_model():
    model = _bert("cpu")
    ref = copy.deepcopy(model)
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns, mode="detach")
    skipper.set_mask(_random_mask(mm, 0.75))
    ids, amask, labels = _batch("cpu")
    with skipper.probe_mode():
        mlm_loss(model(ids, amask), labels).backward()
    mlm_loss(ref(ids, amask), labels).backward()
    g, g_ref = _grads(model), _grads(ref)
    for name in g_ref:
        assert torch.equal(g[name], g_ref[name]), name
    assert skipper.active == _random_mask(mm, 0.75).tolist()
    assert attns[0].block.forward.__self__.groups is not None or all(
        skipper.active[m] for m in attns[0].head_modules)


def test_set_mask_bad_input_changes_nothing():
    model = _bert("cpu")
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns)
    good = _random_mask(mm, 0.5)
    skipper.set_mask(good)
    before = (skipper.active, [p.requires_grad for p in model.parameters()],
              [a.block.forward.__self__.groups for a in attns])
    for bad, err in ((good.to(torch.int64), TypeError), (good[:-1], ValueError),
                     (good[None], ValueError), (good.tolist(), TypeError)):
        with pytest.raises(err, match="set_mask"):
            skipper.set_mask(bad)
        after = (skipper.active, [p.requires_grad for p in model.parameters()],
                 [a.block.forward.__self__.groups for a in attns])
        assert after == before


def test_convert_errors_and_restore():
    model = _bert("cpu")
    attn = model.layers[0].attn
    with pytest.raises(ValueError, match="either q, k, v or qkv"):
        convert_attention(attn, num_heads=4, head_dim=6, o=attn.o, head_modules=[0, 1, 2, 3],
                          q=attn.q, k=attn.k, v=attn.v, qkv=attn.q)
    with pytest.raises(ValueError, match="head_modules"):
        convert_attention(attn, num_heads=4, head_dim=6, o=attn.o, head_modules=[0, 1],
                          q=attn.q, k=attn.k, v=attn.v)
    with pytest.raises(NotImplementedError, match="packed_linear"):
        convert_attention(attn, num_heads=4, head_dim=6, o=attn.o, head_modules=[0, 1, 2, 3],
                          style="packed_linear")
    with pytest.raises(ValueError, match="hf_gpt2"):  # GPT-2 needs the packed c_attn
        convert_attention(attn, num_heads=4, head_dim=6, o=attn.o, head_modules=[0, 1, 2, 3],
                          style="hf_gpt2", q=attn.q, k=attn.k, v=attn.v)
    params = [id(p) for p in model.parameters()]
    conv = convert_attention(attn, num_heads=4, head_dim=6, o=attn.o, head_modules=[0, 1, 2, 3],
                             q=attn.q, k=attn.k, v=attn.v)
    with pytest.raises(ValueError, match="already converted"):
        convert_attention(attn, num_heads=4, head_dim=6, o=attn.o, head_modules=[0, 1, 2, 3],
                          q=attn.q, k=attn.k, v=attn.v)
    assert [id(p) for p in model.parameters()] == params
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict())
    conv.restore()
    assert "forward" not in vars(attn)
    mm, attns, ffns = _split(model)
    attns[1].head_modules = [0, 1, 2, mm.num_modules]
    with pytest.raises(ValueError, match="not module ids"):
        Skipper(mm, attns, ffns)
    assert all("forward" not in vars(a.block) for a in attns)  # nothing left converted
    # A style that is not converted: an error, or with strict=False left as it is and reported.
    mm, attns, ffns = _split(model)
    attns[0].style = "separate_linear"
    with pytest.raises(NotImplementedError, match="separate_linear"):
        Skipper(mm, attns, ffns)
    sk = Skipper(mm, attns, ffns, strict=False)
    assert sk.unconverted == ["layers.0.attn"] and "forward" not in vars(attns[0].block)
    assert set(attns[0].head_modules) <= set(sk.unskipped_modules)
    assert not set(attns[1].head_modules) & set(sk.unskipped_modules)


# ---------------------------------------------------------------- nn.MultiheadAttention
def _mha_spec(block, head_modules):
    return dict(num_heads=block.num_heads, head_dim=block.head_dim, o=block.out_proj,
                head_modules=head_modules, style="torch_mha")


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_mha_converted_forward_and_grads(device, batch_first):
    layer = nn.TransformerEncoderLayer(24, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first,
                                       device=device, dtype=torch.float64)
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 7, 24, device=device, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    pad = torch.zeros(3, 7, dtype=torch.bool, device=device)
    pad[1, 5:] = True
    for mode in ("exact", "detach"):
        layer.zero_grad(), ref.zero_grad()
        conv = convert_attention(layer.self_attn, mode=mode, **_mha_spec(layer.self_attn, [0, 1, 2, 3]))
        conv.set_active([True, False, True, False])
        out, out_ref = layer(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad)
        # float64 both sides, same math in other GEMMs: REL_TOL[float64] (helpers.py)
        assert_close_rel(out, out_ref, tol=1e-12)
        dy = torch.randn_like(out)
        out.backward(dy)
        out_ref.backward(dy)
        w, w_ref = layer.self_attn.in_proj_weight.grad, ref.self_attn.in_proj_weight.grad
        rows = torch.zeros(4, 6, dtype=torch.bool, device=device)
        rows[[0, 2]] = True
        rows = rows.flatten().repeat(3)
        assert torch.all(w[~rows] == 0)
        if mode == "exact":  # gradients of active heads exactly the unconverted layer's
            assert_close_rel(w[rows], w_ref[rows])
            assert_close_rel(layer.linear1.weight.grad, ref.linear1.weight.grad)
        with pytest.raises(NotImplementedError, match="need_weights"):
            layer.self_attn(x, x, x)
        conv.restore()


# ---------------------------------------------------------------- whole modules in a CNN
def test_cnn_backward_stops_below_lowest_active_conv():
    torch.manual_seed(0)
    model = VGGNet(widths=(8, 16), image_size=8, fc_hidden=16)
    mm = ModuleMap.per_parameter(model)
    skipper = Skipper(mm)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    flops = []
    # Freezing the lowest conv layers (weight and bias each): their dW and the dX of the conv
    # above them are no longer computed, so the FLOPs fall strictly.
    for n_frozen in (0, 2, 4, 6):
        mask = torch.ones(mm.num_modules, dtype=torch.bool)
        mask[:n_frozen] = False
        skipper.set_mask(mask)
        model.zero_grad(set_to_none=True)
        flops.append(_flops(lambda: F.cross_entropy(model(x), y).backward()))
        for i, (n, p) in enumerate(model.named_parameters()):
            assert (p.grad is None) == (i < n_frozen), n
    assert all(a > b for a, b in zip(flops, flops[1:])), flops


# ---------------------------------------------------------------- no host sync between probes
def test_training_step_does_not_sync(device):
    if device != "cuda":
        pytest.skip("host synchronisation is observable on CUDA only")
    model = _bert(device, "packed", torch.float32)
    mm, attns, ffns = _split(model)
    skipper = Skipper(mm, attns, ffns, mode="detach")
    skipper.set_mask(_random_mask(mm, 0.5).to(device))  # the mask update may read the mask
    ids, amask, labels = _batch(device)
    mlm_loss(model(ids, amask), labels).backward()  # warm-up outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = model(ids, amask)
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_torch_mha_detach_grads_equal_detached_reference(device):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, device=device, dtype=torch.float64)
    ref = copy.deepcopy(mha)
    conv = convert_attention(mha, mode="detach", **_mha_spec(mha, [0, 1, 2, 3]))
    active = [False, True, True, False]
    conv.set_active(active)
    x = torch.randn(2, 5, 16, device=device, dtype=torch.float64, requires_grad=True)
    out, _ = mha(x, x, x, need_weights=False)
    dy = torch.randn_like(out)
    out.backward(dy)
    # Plain torch: packed projection, frozen heads' q, k, v detached, SDPA, out_proj.
    x_ref = x.detach().clone().requires_grad_()
    q, k, v = F.linear(x_ref, ref.in_proj_weight, ref.in_proj_bias).split(16, dim=-1)
    fz = torch.tensor([not a for a in active], device=device)[None, :, None, None]
    q, k, v = (torch.where(fz, y.view(2, 5, 4, 4).transpose(1, 2).detach(), y.view(2, 5, 4, 4).transpose(1, 2))
               for y in (q, k, v))
    ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 16)
    ref.out_proj(ctx).backward(dy)
    assert_close_rel(x.grad, x_ref.grad)
    rows = torch.tensor(active, device=device).repeat_interleave(4)
    # float64 grads through attention (~10^3-term sums): ≲ 10^3·u64 → 1e-9
    torch.testing.assert_close(mha.in_proj_weight.grad[rows.repeat(3)], ref.in_proj_weight.grad[rows.repeat(3)],
                               rtol=1e-9, atol=1e-15)
    assert torch.all(mha.in_proj_weight.grad[~rows.repeat(3)] == 0)
    assert_close_rel(mha.out_proj.weight.grad[:, rows], ref.out_proj.weight.grad[:, rows])
    assert torch.all(mha.out_proj.weight.grad[:, ~rows] == 0)
    assert_close_rel(mha.out_proj.bias.grad, ref.out_proj.bias.grad)
