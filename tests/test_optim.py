"""MaskedAdamW / MaskedSGD against torch.optim on a real small model, against a per-module torch
oracle under random masks, bitwise untouched masked state, AMP, checkpoints and bad input."""
import copy
import io

import pytest
import torch

from helpers import STEP_ROUNDINGS, U32, adamw_error_scale, assert_close_rel, assert_rounded_once
from mat_cuda import MaskedAdamW, MaskedSGD, ModuleMap
from mat_cuda import reference as ref


def _small_model(device):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=24,
                                             dropout=0.0, batch_first=True)
    return torch.nn.Sequential(layer, torch.nn.Linear(16, 3)).to(device)


def _loss(model, device, sign=1.0):
    x = torch.randn(4, 5, 16, device=device)
    return sign * model(x).square().mean()


def _copy_grads(src, dst):
    for a, b in zip(src.parameters(), dst.parameters()):
        b.grad = None if a.grad is None else a.grad.clone()


@pytest.mark.parametrize("opt_cls, torch_cls, kwargs", [
    (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    (MaskedAdamW, torch.optim.AdamW, dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0,
                                          maximize=True)),
    (MaskedSGD, torch.optim.SGD, dict(lr=0.05)),
    (MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    (MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
])
def test_all_active_matches_torch(device, opt_cls, torch_cls, kwargs):
    ours_model = _small_model(device)
    torch_model = copy.deepcopy(ours_model)
    ours, theirs = opt_cls(ours_model.parameters(), **kwargs), torch_cls(torch_model.parameters(), **kwargs)
    sign = -1.0 if kwargs.get("maximize") else 1.0  # maximize a bounded objective
    for _ in range(50):
        theirs.zero_grad()
        _loss(torch_model, device, sign).backward()
        _copy_grads(torch_model, ours_model)  # same gradients: only the optimizers differ
        theirs.step()
        ours.step()
    for (name, a), b in zip(ours_model.named_parameters(), torch_model.parameters()):
        # float32 both; the same op order as torch's single-tensor AdamW/SGD, but 50 steps let
        # last-bit differences (AVX vs torch) compound: 1e-6 ≈ 16 u32.
        assert_close_rel(a, b, tol=1e-6, msg=name)
    assert ours.module_steps.tolist() == [50] * (ours.num_modules + 1)


def _head_map(qkv, wo, b, heads, unmanaged_group=True):
    """Head modules over a packed QKV weight (rows), its bias (rows) and W_O (cols), plus one
    whole-tensor module; the last head's W_O share is left unmanaged when asked."""
    mm = ModuleMap()
    ids = [mm.add_module(f"head{h}", "head") for h in range(heads)]
    dh = wo.shape[1] // heads
    mm.assign_row_groups(qkv, dh, ids * 3, name="qkv")
    mm.assign_row_groups(b, dh, ids * 3, name="qkv_bias")
    mm.assign_col_groups(wo, dh, ids[:-1] + [-1] if unmanaged_group else ids, name="wo")
    return mm, ids


class _PerModuleOracle:
    """torch.optim run separately on each module's elements, stepped only when it is active;
    the unmanaged elements form one more always-active module."""

    def __init__(self, params, mm, torch_cls, kwargs):
        self.params = params
        m = mm.num_modules
        layout, groups = mm.kernel_tables(params, "cpu")
        mods = [ref.element_modules_ref(layout[i], groups.cpu(), p.numel()) for i, p in enumerate(params)]
        self.index = [[(i, (mods[i] == k).nonzero().flatten()) for i in range(len(params))]
                      for k in range(m + 1)]
        self.slices = [torch.cat([p.detach().flatten().cpu()[idx] for (i, idx), p in zip(ix, params)])
                       .clone().requires_grad_() for ix in self.index]
        self.opts = [torch_cls([s], **kwargs) for s in self.slices]

    def step(self, grads, mask):
        active = mask.tolist() + [True]
        for k, (s, opt) in enumerate(zip(self.slices, self.opts)):
            if active[k] and s.numel():
                s.grad = torch.cat([grads[i].flatten().cpu()[idx] for i, idx in self.index[k]])
                opt.step()

    def values(self):
        out = [torch.empty(p.numel()) for p in self.params]
        for ix, s in zip(self.index, self.slices):
            start = 0
            for i, idx in ix:
                out[i][idx] = s.detach()[start:start + idx.numel()]
                start += idx.numel()
        return [o.view(p.shape) for o, p in zip(out, self.params)]


@pytest.mark.parametrize("opt_cls, torch_cls, kwargs", [
    (MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (MaskedSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=1e-2)),
])
def test_random_masks_match_per_module_oracle(device, opt_cls, torch_cls, kwargs):
    heads, dh, d = 4, 3, 10
    qkv = torch.randn(3 * heads * dh, d, device=device, requires_grad=True)
    b = torch.randn(3 * heads * dh, device=device, requires_grad=True)
    wo = torch.randn(d, heads * dh, device=device, requires_grad=True)
    ffn = torch.randn(17, 5, device=device, requires_grad=True)
    free = torch.randn(6, device=device, requires_grad=True)  # unmanaged
    mm, ids = _head_map(qkv, wo, b, heads)
    mm.assign_whole(ffn, mm.add_module("ffn", "ffn"))
    params = [qkv, b, wo, ffn, free]
    oracle = _PerModuleOracle(params, mm, torch_cls, kwargs)
    opt = opt_cls(params, module_map=mm, **kwargs)
    active_steps = torch.zeros(mm.num_modules, dtype=torch.int64)
    for _ in range(30):
        mask = torch.rand(mm.num_modules) < 0.5
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.set_module_mask(mask.to(device))
        opt.step()
        oracle.step(grads, mask)
        active_steps += mask
    for i, (p, o) in enumerate(zip(params, oracle.values())):
        # float32 vs the per-module oracle (float32 torch optimizers): 1e-6 ≈ 16 u32.
        assert_close_rel(p, o, tol=1e-6, msg=f"param {i}")
    assert opt.module_steps[:-1].tolist() == active_steps.tolist()
    assert opt.module_steps[-1].item() == 30


def test_masked_state_untouched_bitwise(device):
    heads, dh, d = 3, 4, 8
    qkv = torch.randn(3 * heads * dh, d, device=device, requires_grad=True)
    b = torch.randn(3 * heads * dh, device=device, requires_grad=True)
    wo = torch.randn(d, heads * dh, device=device, requires_grad=True)
    mm, ids = _head_map(qkv, wo, b, heads, unmanaged_group=False)
    params = [qkv, b, wo]
    opt = MaskedAdamW(params, lr=0.1, weight_decay=0.1, module_map=mm)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state exists and is nonzero
    mask = torch.tensor([True, False, True], device=device)
    opt.set_module_mask(mask)
    layout, groups = mm.kernel_tables(params, device)
    before = {k: [t.clone() for t in v] for k, v in dict(
        p=params, m=[opt.state[p]["exp_avg"] for p in params],
        v=[opt.state[p]["exp_avg_sq"] for p in params]).items()}
    steps_before = opt.module_steps.clone()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    after = dict(p=params, m=[opt.state[p]["exp_avg"] for p in params],
                 v=[opt.state[p]["exp_avg_sq"] for p in params])
    for i, p in enumerate(params):
        active = ref._active_elements(layout[i], groups, mask, p.numel()).view(p.shape)
        for k in before:
            assert torch.equal(after[k][i][~active], before[k][i][~active]), f"{k}[{i}] masked changed"
            assert (after[k][i][active] != before[k][i][active]).all(), f"{k}[{i}] active unchanged"
    assert opt.module_steps.tolist() == (steps_before + torch.tensor([1, 0, 1, 1], device=device)).tolist()


def test_all_masked_updates_only_unmanaged(device):
    w = torch.randn(5, 3, device=device, requires_grad=True)
    free = torch.randn(4, device=device, requires_grad=True)
    mm = ModuleMap()
    mm.assign_whole(w, mm.add_module("w"))
    opt = MaskedSGD([w, free], lr=0.1, momentum=0.5, module_map=mm)
    opt.set_module_mask(torch.zeros(1, dtype=torch.bool, device=device))
    w0, f0 = w.detach().clone(), free.detach().clone()
    w.grad, free.grad = torch.ones_like(w), torch.ones_like(free)
    opt.step()
    assert torch.equal(w, w0) and not opt.state[w]["momentum_buffer"].any()
    # allclose defaults (rtol 1e-5): one float32 SGD step, a single rounding (u32 ≈ 6e-8).
    assert torch.allclose(free, f0 - 0.1)
    assert opt.module_steps.tolist() == [0, 1]


def test_zero_size_and_none_grads(device):
    empty = torch.empty(0, 3, device=device, requires_grad=True)
    w = torch.randn(4, device=device, requires_grad=True)
    nograd = torch.randn(2, device=device, requires_grad=True)
    opt = MaskedAdamW([empty, w, nograd], lr=0.1)
    empty.grad, w.grad = torch.empty(0, 3, device=device), torch.randn(4, device=device)
    n0, w0 = nograd.detach().clone(), w.detach().clone()
    opt.step()
    assert torch.equal(nograd, n0) and nograd not in opt.state
    assert not torch.equal(w, w0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_parameters_track_fp32_run(device, dtype):
    # The half run does fp32 master math and rounds once at the write; the fp32 run does the same
    # math on the same (half-representable) values without the rounding. So at every step the
    # half parameter must be one rounding of the fp32 run's value: the two fp32 results differ
    # only by rounding in their fp32 chains (vector vs scalar paths), ≤ 2 · STEP_ROUNDINGS · u32
    # times the chain's magnitudes (helpers.adamw_error_scale). A step whose update was not
    # written, or written twice, fails at once (tests/test_optim_ops.py shows it does).
    w32 = torch.randn(64, 33, device=device)
    w_half = w32.to(dtype).requires_grad_()
    w_ref = w_half.detach().float().requires_grad_()
    opt_half, opt_ref = MaskedAdamW([w_half], lr=1e-2), MaskedAdamW([w_ref], lr=1e-2)
    for t in range(10):
        g = torch.randn_like(w32)
        w_half.grad, w_ref.grad = g.to(dtype), g.to(dtype).float()
        st = opt_ref.state.get(w_ref, {})
        m0 = st.get("exp_avg", torch.zeros_like(w32)).clone()
        v0 = st.get("exp_avg_sq", torch.zeros_like(w32)).clone()
        w_before = w_ref.detach().clone()
        opt_half.step()
        opt_ref.step()
        scale, _, _ = adamw_error_scale(w_before.cpu(), w_ref.grad.cpu(), m0.cpu(), v0.cpu(),
                                        torch.full(w32.shape, t + 1.0, dtype=torch.float64),
                                        lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=1e-2,
                                        eps=1e-8)
        assert_rounded_once(w_half.detach(), w_ref.detach(), 2 * STEP_ROUNDINGS * U32 * scale,
                            msg=f"step {t}")
        # the fp32 reference continues from the half run's rounded value, as the half run does
        w_ref.data.copy_(w_ref.detach().to(dtype).float())
    assert opt_half.state[w_half]["exp_avg"].dtype == torch.float32


def test_grad_scaler_with_injected_inf(device):
    model = _small_model(device)
    plain_model = copy.deepcopy(model)
    opt, plain = MaskedAdamW(model.parameters(), lr=1e-2), MaskedAdamW(plain_model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    for step in range(4):
        opt.zero_grad()
        plain.zero_grad()
        x = torch.randn(4, 5, 16, device=device)
        scaler.scale(model(x).square().mean()).backward()
        plain_model(x).square().mean().backward()
        if step == 2:
            next(model.parameters()).grad.view(-1)[3] = float("inf")
            snapshot = copy.deepcopy(opt.state_dict())
            params_before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params_before))
            assert torch.equal(opt.module_steps, snapshot["module_steps"])
            for k, st in opt.state_dict()["state"].items():
                for name, t in st.items():
                    assert torch.equal(t, snapshot["state"][k][name]), name
            assert scaler.get_scale() == 2.0 ** 9
        else:
            plain.step()
    # Unscaling by a power of two is exact; the rest is the same float32 math: 16 u32.
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert_close_rel(a, b, tol=1e-6)


def _run(opt, params, steps, gen, device):
    for _ in range(steps):
        mask = torch.rand(opt.num_modules, generator=gen) < 0.6
        opt.set_module_mask(mask.to(device))
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
        opt.step()


@pytest.mark.parametrize("opt_cls, kwargs", [(MaskedAdamW, dict(lr=1e-2)),
                                             (MaskedSGD, dict(lr=0.1, momentum=0.9))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_resume_is_bit_identical(device, opt_cls, kwargs, dtype):
    def build():
        torch.manual_seed(1)
        params = [torch.randn(12, 5, device=device).to(dtype).requires_grad_(),
                  torch.randn(7, device=device).to(dtype).requires_grad_()]
        mm = ModuleMap()
        mm.assign_row_groups(params[0], 3, [mm.add_module(f"h{i}") for i in range(4)])
        mm.assign_whole(params[1], mm.add_module("b"))
        return params, opt_cls(params, module_map=mm, **kwargs)

    params_a, opt_a = build()
    _run(opt_a, params_a, 20, torch.Generator().manual_seed(5), device)

    params_b, opt_b = build()
    gen = torch.Generator().manual_seed(5)
    _run(opt_b, params_b, 10, gen, device)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_b], "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params_c, opt_c = build()
    with torch.no_grad():
        for p, saved in zip(params_c, ckpt["params"]):
            p.copy_(saved)
    opt_c.load_state_dict(ckpt["opt"])
    _run(opt_c, params_c, 10, gen, device)

    for a, c in zip(params_a, params_c):
        assert torch.equal(a, c)
    assert torch.equal(opt_a.module_steps, opt_c.module_steps)
    for pa, pc in zip(params_a, params_c):
        for key, t in opt_a.state[pa].items():
            assert opt_c.state[pc][key].dtype == torch.float32
            assert torch.equal(t, opt_c.state[pc][key]), key


# ---- bad input: a clear error, and nothing changes ----

def _params(device):
    return [torch.randn(6, 4, device=device, requires_grad=True),
            torch.randn(4, device=device, requires_grad=True)]


@pytest.mark.parametrize("mask_fn, match", [
    (lambda d: torch.ones(3, dtype=torch.bool, device=d), r"shape \(2,\)"),
    (lambda d: torch.ones(2, device=d), "dtype torch.bool"),
    (lambda d: torch.ones(2, dtype=torch.bool, device="meta"), "parameters' device"),
    (lambda d: [True, True], "torch.Tensor"),
])
def test_bad_mask(device, mask_fn, match):
    opt = MaskedAdamW(_params(device))
    with pytest.raises((ValueError, TypeError), match=match):
        opt.set_module_mask(mask_fn(device))
    assert opt.module_mask.all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "learning rate"), (dict(eps=-1e-8), "eps"),
    (dict(betas=(1.0, 0.999)), "beta1"), (dict(betas=(0.9, -0.1)), "beta2"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(amsgrad=True), "amsgrad"),
])
def test_bad_adamw_hyperparameters(device, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskedAdamW(_params(device), **kwargs)


def test_bad_hyperparameter_set_later_leaves_params_untouched(device):
    params = _params(device)
    opt = MaskedAdamW(params)
    opt.param_groups[0]["lr"] = -1.0
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert not opt.module_steps.any()


def test_bad_sgd_hyperparameters(device):
    with pytest.raises(ValueError, match="nesterov"):
        MaskedSGD(_params(device), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        MaskedSGD(_params(device), lr=0.1, momentum=-0.5)


def test_module_map_that_does_not_fit(device):
    params = _params(device)
    other = torch.randn(3, device=device)
    mm = ModuleMap()
    mm.assign_whole(other, mm.add_module("x"))
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        MaskedAdamW(params, module_map=mm)
    mm2 = ModuleMap()
    mm2.assign_row_groups(params[0], 3, [mm2.add_module("a"), mm2.add_module("b")])
    mm2.add_module("empty")
    with pytest.raises(ValueError, match="cover no parameter"):
        MaskedAdamW(params, module_map=mm2)
    with pytest.raises(ValueError, match="overlap"):
        mm2.assign_whole(params[0], 2)
    with torch.no_grad():  # the parameter changes shape after the map was built
        params[0].data = torch.randn(5, 4, device=device)
    mm3 = ModuleMap()
    mm3.assign_row_groups(params[1], 2, [mm3.add_module("a"), mm3.add_module("b")])
    # two groups: the bad second group must stop the step before the first one is written
    opt = MaskedAdamW([{"params": [params[0]]}, {"params": [params[1]]}], module_map=mm3)
    params[1].data = torch.randn(5, device=device)
    params[1].grad = torch.ones(5, device=device)
    params[0].grad = torch.ones_like(params[0])
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="does not divide"):
        opt.step()
    assert torch.equal(params[0], before) and not opt.module_steps.any()


def test_sparse_and_complex_gradients_rejected_untouched(device):
    emb = torch.nn.Embedding(10, 3, sparse=True).to(device)
    w = torch.randn(3, device=device, requires_grad=True)
    opt = MaskedAdamW([w, emb.weight])
    w.grad = torch.ones_like(w)
    emb(torch.tensor([1, 2], device=device)).sum().backward()
    before = w.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(w, before) and not opt.module_steps.any()
    z = torch.randn(3, dtype=torch.complex64, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="complex64"):   # rejected at construction
        MaskedSGD([w, z], lr=0.1)
    assert torch.equal(w, before)


def test_parameters_on_different_devices_rejected():
    with pytest.raises(ValueError, match="one device"):
        MaskedAdamW([torch.randn(3, requires_grad=True), torch.randn(3, device="meta", requires_grad=True)])


@pytest.mark.skipif(not (torch.cuda.is_available() and __import__("mat_cuda").build_info()["cuda"]),
                    reason="needs a CUDA device and a CUDA build")
def test_cuda_step_captures_in_a_graph_without_sync():
    # A host synchronisation inside step() would make capture fail; replays must equal eager steps
    # bit for bit, with the mask changed between replays through set_module_mask.
    w = torch.randn(96, 40, device="cuda", requires_grad=True)
    free = torch.randn(7, device="cuda", requires_grad=True)
    mm = ModuleMap()
    mm.assign_row_groups(w, 8, [mm.add_module(f"h{i}") for i in range(12)])
    w2, free2 = w.detach().clone().requires_grad_(), free.detach().clone().requires_grad_()
    opt, eager = (MaskedAdamW([w, free], lr=1e-2, module_map=mm),
                  MaskedAdamW([w2, free2], lr=1e-2, module_map=_copy_map(mm, w, w2)))
    for p, q in ((w, w2), (free, free2)):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    eager.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        mask = torch.rand(12, device="cuda") < 0.5
        opt.set_module_mask(mask)
        eager.set_module_mask(mask)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    assert torch.equal(w, w2) and torch.equal(free, free2)
    assert torch.equal(opt.module_steps, eager.module_steps)


def _copy_map(mm, old, new):
    out = ModuleMap()
    for name, kind in zip(mm.names, mm.kinds):
        out.add_module(name, kind)
    lay = mm.layout(old)
    out.assign_row_groups(new, lay.group_size, lay.group_module)
    return out
