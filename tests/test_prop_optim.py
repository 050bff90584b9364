"""Property tests: the fused masked optimizer ops against mat_cuda/reference.py on random
problems (shapes with 0, 1, primes and sizes past a chunk or block; float32 / bfloat16 / float16
parameters mixed in one call; whole, row-group and column-group layouts with unmanaged groups;
random masks, step counts, hyperparameters, AMP scale and found_inf).

Problems are built and checked on the CPU; the op runs on every available device (conftest).
Checks, per element: active elements are one rounding of the float64 reference's value
(helpers.assert_rounded_once, error bound derived from the float32 operation chain), state
within the same bound, masked elements and a skipped (found_inf) step bitwise unchanged.
"""
from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import STEP_ROUNDINGS, U32, adamw_error_scale, assert_rounded_once, sgd_error_scale
from mat_cuda import reference as ref
from mat_cuda._ops import ops
from mat_cuda.modules import ModuleMap
from prop_strategies import (DTYPES, LARGE_NUMELS, dim, divisors, generator, group_modules, seeds,
                             tally)


@st.composite
def tensor_specs(draw, num_modules: int):
    """(shape, dtype name, layout) of one parameter; layout is ("none",), ("whole", m),
    ("rows", group_size, group_module) or ("cols", group_size, group_module)."""
    if draw(st.integers(0, 39)) == 0:  # rare: past the chunk / block boundaries
        n = draw(st.sampled_from(LARGE_NUMELS))
        shape = draw(st.sampled_from([(n,), (1, n), (n, 1)]))
    else:
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(dim(0, 60 if ndim == 1 else 12)) for _ in range(ndim))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    kinds = ["none"] + (["whole"] if num_modules else []) + (["rows", "cols"] if shape else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return shape, dtype, ("none",)
    if kind == "whole":
        return shape, dtype, ("whole", draw(st.integers(0, num_modules - 1)))
    size = shape[0] if kind == "rows" else shape[-1]
    gs = draw(st.sampled_from(divisors(size)))
    return shape, dtype, (kind, gs, draw(group_modules(size // gs, num_modules)))


@st.composite
def optim_problems(draw):
    num_modules = draw(st.integers(0, 6))
    specs = draw(st.lists(tensor_specs(num_modules), min_size=0, max_size=4))
    steps = draw(st.lists(st.sampled_from([0, 1, 2, 5, 1000]), min_size=num_modules + 1,
                          max_size=num_modules + 1))
    mask = draw(st.lists(st.booleans(), min_size=num_modules, max_size=num_modules))
    amp = draw(st.sampled_from([(None, None), (1024.0, None), (3.0, 0.0), (None, 0.0),
                                (1024.0, 1.0), (None, 1.0)]))
    return dict(num_modules=num_modules, specs=specs, steps=steps, mask=mask,
                grad_scale=amp[0], found_inf=amp[1], maximize=draw(st.booleans()),
                seed=draw(seeds()))


def _build(pb):
    """Tensors, module map tables and AMP tensors of a drawn problem (CPU)."""
    g = generator(pb["seed"])
    scale = pb["grad_scale"] or 1.0
    params, grads = [], []
    for shape, dtype, _ in pb["specs"]:
        params.append(torch.randn(shape, generator=g).to(DTYPES[dtype]))
        grads.append((torch.randn(shape, generator=g) * scale).to(DTYPES[dtype]))
    mm = ModuleMap()
    for m in range(pb["num_modules"]):
        mm.add_module(f"m{m}")
    for p, (_, _, lay) in zip(params, pb["specs"]):
        if lay[0] == "whole":
            mm.assign_whole(p, lay[1])
        elif lay[0] == "rows":
            mm.assign_row_groups(p, lay[1], lay[2])
        elif lay[0] == "cols":
            mm.assign_col_groups(p, lay[1], lay[2])
    layout, groups = mm.kernel_tables(params, torch.device("cpu"))
    steps = torch.tensor(pb["steps"], dtype=torch.int64)
    mask = torch.tensor(pb["mask"], dtype=torch.bool)
    amp = lambda v: None if v is None else torch.tensor([v], dtype=torch.float32)  # noqa: E731
    return (params, grads, layout, groups, steps, mask, amp(pb["grad_scale"]),
            amp(pb["found_inf"]), g)


def _on(device, tensors):
    """Copies of ``tensors`` on ``device`` (the op's inputs; the reference runs on the CPU)."""
    return [t.to(device, copy=True) for t in tensors]


def _opt(t, device):
    return None if t is None else t.to(device)


def _per_element(layout, groups, mask, steps, p):
    """(active mask, module step count + 1 as float64), both p's shape."""
    mods = ref.element_modules_ref(layout, groups, p.numel())
    active = ref._active_elements(layout, groups, mask, p.numel()).view(p.shape)
    return active, (steps[mods] + 1).double().view(p.shape)


def _check_list(outs, refs64, scales, befores, actives, what):
    for i, (o, r, s, b, a) in enumerate(zip(outs, refs64, scales, befores, actives)):
        assert torch.equal(o[~a], b[~a]), f"{what}[{i}]: masked elements changed"
        assert_rounded_once(o[a], r[a], STEP_ROUNDINGS * U32 * s[a], msg=f"{what}[{i}]")


def _skipped(pb):
    return pb["found_inf"] is not None and pb["found_inf"] != 0.0


ADAMW_HP = st.fixed_dictionaries(dict(
    lr=st.sampled_from([0.0, 1e-3, 1e-2, 0.1, 1.0]),
    beta1=st.sampled_from([0.0, 0.3, 0.9, 0.99]),
    beta2=st.sampled_from([0.0, 0.9, 0.999]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3])))

# A problem past the CPU inline threshold and the CUDA block size, mixed dtypes, every layout.
LARGE = dict(num_modules=3, specs=[((131101,), "float32", ("whole", 1)),
                                   ((65537, 1), "bfloat16", ("rows", 65537, (2,))),
                                   ((5, 7), "float16", ("cols", 1, (0, -1, 2, 1, 0, 0, 2))),
                                   ((3,), "bfloat16", ("none",))],
             steps=[0, 3, 1000, 7], mask=[True, False, True], grad_scale=1024.0, found_inf=0.0,
             maximize=True, seed=1)


@given(pb=optim_problems(), hp=ADAMW_HP)
@example(pb=LARGE, hp=dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8))
def test_masked_adamw_step_property(device, pb, hp):
    tally("test_masked_adamw_step_property")
    params, grads, layout, groups, steps, mask, gscale, finf, g = _build(pb)
    m = [torch.randn(p.shape, generator=g) for p in params]
    v = [torch.rand(p.shape, generator=g) for p in params]
    rp, rm, rv = ref.masked_adamw_step_ref([p.double() for p in params], grads, m, v, steps, mask,
                                           layout, groups, maximize=pb["maximize"],
                                           grad_scale=gscale, found_inf=finf, **hp)
    p2, m2, v2 = _on(device, params), _on(device, m), _on(device, v)
    steps2 = steps.to(device, copy=True)
    ops.masked_adamw_step_(p2, _on(device, grads), m2, v2, steps2, mask.to(device), layout,
                           groups.to(device), hp["lr"], hp["beta1"], hp["beta2"],
                           hp["weight_decay"], hp["eps"], pb["maximize"], _opt(gscale, device),
                           _opt(finf, device))
    p2, m2, v2 = _on("cpu", p2), _on("cpu", m2), _on("cpu", v2)
    assert torch.equal(steps2.cpu(), steps), "the update op must not advance the step counts"
    if _skipped(pb):
        for out, before in zip(p2 + m2 + v2, params + m + v):
            assert torch.equal(out, before), "a found_inf step changed a tensor"
        return
    actives, scales_p, scales_m, scales_v = [], [], [], []
    for i, p in enumerate(params):
        active, step = _per_element(layout[i], groups, mask, steps, p)
        sp, sm, sv = adamw_error_scale(p, grads[i], m[i], v[i], step, grad_scale=pb["grad_scale"],
                                       **hp)
        actives.append(active), scales_p.append(sp), scales_m.append(sm), scales_v.append(sv)
    _check_list(p2, rp, scales_p, params, actives, "param")
    _check_list(m2, rm, scales_m, m, actives, "exp_avg")
    _check_list(v2, rv, scales_v, v, actives, "exp_avg_sq")


SGD_HP = st.sampled_from([  # (momentum, dampening, nesterov): nesterov needs dampening 0
    (0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.1, False), (0.5, 0.0, True), (0.99, 0.0, True)])


@given(pb=optim_problems(), mom=SGD_HP, lr=st.sampled_from([0.0, 1e-2, 0.1, 1.0]),
       wd=st.sampled_from([0.0, 0.01, 0.1]))
@example(pb=LARGE, mom=(0.9, 0.1, False), lr=0.1, wd=0.01)
def test_masked_sgd_step_property(device, pb, mom, lr, wd):
    tally("test_masked_sgd_step_property")
    momentum, dampening, nesterov = mom
    params, grads, layout, groups, steps, mask, gscale, finf, g = _build(pb)
    bufs = [torch.randn(p.shape, generator=g) for p in params] if momentum else []
    rp, rb = ref.masked_sgd_step_ref([p.double() for p in params], grads, bufs, steps, mask,
                                     layout, groups, lr, momentum, dampening, wd, nesterov,
                                     maximize=pb["maximize"], grad_scale=gscale, found_inf=finf)
    p2, b2 = _on(device, params), _on(device, bufs)
    ops.masked_sgd_step_(p2, _on(device, grads), b2, steps.to(device), mask.to(device), layout,
                         groups.to(device), lr, momentum, dampening, wd, nesterov, pb["maximize"],
                         _opt(gscale, device), _opt(finf, device))
    p2, b2 = _on("cpu", p2), _on("cpu", b2)
    if _skipped(pb):
        for out, before in zip(p2 + b2, params + bufs):
            assert torch.equal(out, before), "a found_inf step changed a tensor"
        return
    actives, scales_p, scales_b = [], [], []
    for i, p in enumerate(params):
        active, _ = _per_element(layout[i], groups, mask, steps, p)
        sp, sb = sgd_error_scale(p, grads[i], bufs[i] if momentum else None, lr, momentum, wd,
                                 grad_scale=pb["grad_scale"])
        actives.append(active), scales_p.append(sp), scales_b.append(sb)
    _check_list(p2, rp, scales_p, params, actives, "param")
    if momentum:
        _check_list(b2, rb, scales_b, bufs, actives, "momentum_buffer")


@given(num_modules=st.integers(0, 40), data=st.data())
def test_masked_module_steps_property(device, num_modules, data):
    tally("test_masked_module_steps_property")
    steps = torch.tensor(data.draw(st.lists(st.integers(0, 2**40), min_size=num_modules + 1,
                                            max_size=num_modules + 1)), dtype=torch.int64)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=num_modules,
                                           max_size=num_modules)), dtype=torch.bool)
    finf = data.draw(st.sampled_from([None, 0.0, 1.0, float("inf")]))
    finf_t = None if finf is None else torch.tensor([finf])
    out = steps.to(device, copy=True)
    ops.masked_module_steps_(out, mask.to(device), _opt(finf_t, device))
    assert torch.equal(out.cpu(), ref.masked_module_steps_ref(steps, mask, finf_t))
