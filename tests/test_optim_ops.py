"""The fused masked step ops against their float64 references (mat_cuda/reference.py):
every layout, every parameter dtype, odd and empty shapes, masked elements untouched bitwise."""
import pytest
import torch

from helpers import (STEP_ROUNDINGS, U32, adamw_error_scale, assert_close_rel,
                     assert_rounded_once)
from mat_cuda import reference as ref
from mat_cuda._ops import ops
from mat_cuda.modules import ModuleMap


def _problem(device, dtype, num_modules=5):
    """Parameters of odd shapes in every layout, with grads, fp32 state and a random mask."""
    shapes = [(7, 5), (12, 3), (3, 9), (33,), (0, 4), (1,), (4, 2, 6), (10, 1000)]
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    mm = ModuleMap()
    for m in range(num_modules):
        mm.add_module(f"m{m}")
    mods = lambda n: torch.randint(-1, num_modules, (n,)).tolist()  # noqa: E731
    mm.assign_whole(params[0], 0)
    mm.assign_row_groups(params[1], 3, mods(4))
    mm.assign_col_groups(params[2], 3, mods(3))
    mm.assign_row_groups(params[3], 11, mods(3))
    mm.assign_row_groups(params[4], 2, [])
    # params[5] unmanaged
    mm.assign_col_groups(params[6], 2, mods(3))
    mm.assign_row_groups(params[7], 5, mods(2))
    grads = [torch.randn_like(p) for p in params]
    layout, groups = mm.kernel_tables(params, device)
    steps = torch.randint(0, 4, (num_modules + 1,), device=device)
    mask = torch.rand(num_modules, device=device) < 0.5
    return params, grads, steps, mask, layout, groups


def _assert_matches(outs, refs, originals, active_fn, dtype_of, per_list):
    # Relative error over each list (params, then each state list) flattened together: a single
    # element whose update cancels its value would make a per-tensor relative error meaningless.
    for start in range(0, len(outs), per_list):
        o = torch.cat([t.flatten().double() for t in outs[start:start + per_list]])
        r = torch.cat([t.flatten().double() for t in refs[start:start + per_list]])
        assert_close_rel(o, r, dtype=dtype_of(outs[start]), msg=f"list starting at {start}")
    for i, (o, orig) in enumerate(zip(outs, originals)):
        active = active_fn(i)
        # masked elements keep their exact bits
        assert torch.equal(o[~active], orig[~active]), f"tensor {i}: masked elements changed"


def _assert_adamw_params_rounded_once(outs, params, grads, m, v, steps, mask, layout, groups,
                                      lr, beta1, beta2, weight_decay, eps, maximize=False,
                                      grad_scale=None, r64=None):
    """Every active element of outs is one rounding (to its dtype) of the float64 reference
    computed from the same inputs (helpers.assert_rounded_once): fp32 master math, one rounding
    at the write. Masked elements are checked bitwise by the callers. r64: the reference's
    float64 parameters if the caller has them already."""
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps)
    if r64 is None:
        r64, _, _ = ref.masked_adamw_step_ref([p.double() for p in params], grads, m, v, steps,
                                              mask, layout, groups, maximize=maximize,
                                              grad_scale=grad_scale, **hp)
    for i, (o, p) in enumerate(zip(outs, params)):
        mods = ref.element_modules_ref(layout[i], groups, p.numel()).cpu()
        active = ref._active_elements(layout[i], groups, mask, p.numel()).view(p.shape).cpu()
        step = (steps.cpu()[mods] + 1).double().view(p.shape)
        scale, _, _ = adamw_error_scale(p.cpu(), grads[i].cpu(), m[i].cpu(), v[i].cpu(), step,
                                        grad_scale=None if grad_scale is None else float(grad_scale),
                                        **hp)
        assert_rounded_once(o.cpu()[active], r64[i].cpu()[active],
                            STEP_ROUNDINGS * U32 * scale[active], msg=f"param {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("maximize, scaled", [(False, False), (True, True)])
def test_masked_adamw_step_matches_reference(device, dtype, maximize, scaled):
    params, grads, steps, mask, layout, groups = _problem(device, dtype)
    m = [torch.randn(p.shape, device=device) for p in params]
    v = [torch.rand(p.shape, device=device) for p in params]
    scale = torch.tensor([1024.0], device=device) if scaled else None
    if scaled:
        grads = [(g.float() * 1024).to(dtype) for g in grads]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.05, eps=1e-6, maximize=maximize)
    rp, rm, rv = ref.masked_adamw_step_ref(params, grads, m, v, steps, mask, layout, groups,
                                           grad_scale=scale, **hp)
    originals = [t.clone() for t in params + m + v]
    p2, m2, v2 = [t.clone() for t in params], [t.clone() for t in m], [t.clone() for t in v]
    ops.masked_adamw_step_(p2, grads, m2, v2, steps, mask, layout, groups, hp["lr"], hp["beta1"],
                           hp["beta2"], hp["weight_decay"], hp["eps"], maximize, scale, None)
    n = len(params)
    act = lambda i: ref._active_elements(layout[i % n], groups, mask, params[i % n].numel()).view(  # noqa: E731
        params[i % n].shape)
    _assert_matches(p2 + m2 + v2, rp + rm + rv, originals, act,
                    lambda t: t.dtype, n)
    # The norm-wise check above allows bf16's 1e-2 (about one update at lr 1e-2); this one
    # fails an update that was dropped, doubled or misplaced.
    _assert_adamw_params_rounded_once(p2, params, grads, m, v, steps, mask, layout, groups,
                                      grad_scale=scale, **hp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum, dampening, nesterov, wd", [
    (0.0, 0.0, False, 0.0), (0.9, 0.1, False, 0.01), (0.9, 0.0, True, 0.0)])
def test_masked_sgd_step_matches_reference(device, dtype, momentum, dampening, nesterov, wd):
    params, grads, steps, mask, layout, groups = _problem(device, dtype)
    bufs = [torch.randn(p.shape, device=device) for p in params] if momentum else []
    hp = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov)
    rp, rb = ref.masked_sgd_step_ref(params, grads, bufs, steps, mask, layout, groups, **hp)
    originals = [t.clone() for t in params + bufs]
    p2, b2 = [t.clone() for t in params], [t.clone() for t in bufs]
    ops.masked_sgd_step_(p2, grads, b2, steps, mask, layout, groups, hp["lr"], momentum, dampening,
                         wd, nesterov, False, None, None)
    n = len(params)
    act = lambda i: ref._active_elements(layout[i % n], groups, mask, params[i % n].numel()).view(  # noqa: E731
        params[i % n].shape)
    _assert_matches(p2 + b2, rp + rb, originals, act, lambda t: t.dtype, n)


def test_module_steps_and_found_inf(device):
    steps = torch.randint(0, 9, (6,), device=device)
    mask = torch.tensor([True, False, True, False, False], device=device)
    expected = ref.masked_module_steps_ref(steps, mask)
    s2 = steps.clone()
    ops.masked_module_steps_(s2, mask, torch.zeros(1, device=device))
    assert torch.equal(s2, expected)
    ops.masked_module_steps_(s2, mask, torch.ones(1, device=device))
    assert torch.equal(s2, expected)
    # a found inf leaves parameters and state untouched
    params, grads, steps, mask, layout, groups = _problem(device, torch.float32)
    m = [torch.zeros_like(p) for p in params]
    before = [p.clone() for p in params]
    ops.masked_adamw_step_(params, grads, m, [x.clone() for x in m], steps, mask, layout, groups,
                           0.1, 0.9, 0.999, 0.0, 1e-8, False, None, torch.ones(1, device=device))
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_empty_list_and_all_masked(device):
    steps = torch.zeros(3, dtype=torch.int64, device=device)
    mask = torch.zeros(2, dtype=torch.bool, device=device)
    empty_layout = torch.zeros(0, 4, dtype=torch.int64)
    groups = torch.full((1,), 2, dtype=torch.int64, device=device)
    ops.masked_adamw_step_([], [], [], [], steps, mask, empty_layout, groups, 0.1, 0.9, 0.99, 0.0,
                           1e-8, False, None, None)
    p = torch.randn(1000, device=device)
    mm = ModuleMap()
    mm.add_module("a"), mm.add_module("b")
    mm.assign_row_groups(p, 500, [0, 1])
    layout, groups = mm.kernel_tables([p], device)
    before = p.clone()
    state = [torch.zeros_like(p), torch.zeros_like(p)]
    ops.masked_adamw_step_([p], [torch.randn_like(p)], [state[0]], [state[1]], steps, mask, layout,
                           groups, 0.1, 0.9, 0.99, 0.1, 1e-8, False, None, None)
    assert torch.equal(p, before) and not state[0].any() and not state[1].any()


def _opcheck_args(device):
    params, grads, steps, mask, layout, groups = _problem(device, torch.float32)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    return params, grads, m, v, steps, mask, layout, groups


def test_opcheck(device):
    params, grads, m, v, steps, mask, layout, groups = _opcheck_args(device)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.masked_adamw_step_, (params, grads, m, v, steps, mask, layout, groups,
                                                   0.1, 0.9, 0.99, 0.01, 1e-8, False, None, None),
                          test_utils=tests)
    torch.library.opcheck(ops.masked_sgd_step_, (params, grads, m, steps, mask, layout, groups, 0.1,
                                                 0.9, 0.0, 0.0, False, False, None, None),
                          test_utils=tests)
    torch.library.opcheck(ops.masked_module_steps_, (steps, mask, None), test_utils=tests)


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.update(mask=a["mask"][:-1]), "module_steps must have shape"),
    (lambda a: a.update(mask=a["mask"].int()), "module_mask must have dtype"),
    (lambda a: a.update(layout=a["layout"][:-1]), "layout_table must have shape"),
    (lambda a: a["layout"].__setitem__((0, 1), 99), "out of range"),
    (lambda a: a["layout"].__setitem__((1, 2), 5), "does not divide"),
    (lambda a: a["grads"].__setitem__(2, a["grads"][2].double()), "grads\\[2\\] must have the dtype"),
    (lambda a: a["m"].pop(), "exp_avgs has"),
    (lambda a: a["params"].__setitem__(1, a["params"][1].double()), "float32, bfloat16 or float16"),
    (lambda a: a.update(scale=torch.ones(2)), "grad_scale must have one element"),
])
def test_op_rejects_bad_input_untouched(bad, match):
    params, grads, m, v, steps, mask, layout, groups = _opcheck_args("cpu")
    a = dict(params=params, grads=grads, m=m, v=v, mask=mask, layout=layout.clone(), scale=None)
    bad(a)
    before = [p.clone() for p in a["params"]]
    with pytest.raises(RuntimeError, match=match):
        ops.masked_adamw_step_(a["params"], a["grads"], a["m"], a["v"], steps, a["mask"], a["layout"],
                               groups, 0.1, 0.9, 0.99, 0.0, 1e-8, False, a["scale"], None)
    assert all(torch.equal(x, y) for x, y in zip(a["params"], before))



def _adamw(params, steps, mask, layout, groups):
    return ops.masked_adamw_step_(params, [torch.ones_like(p) for p in params],
                                  [torch.zeros_like(p) for p in params],
                                  [torch.zeros_like(p) for p in params], steps, mask, layout,
                                  groups, 0.1, 0.9, 0.99, 0.0, 1e-8, False, None, None)


@pytest.mark.parametrize("bad_value", [7, 3, -1])
def test_group_table_values_checked_on_every_device(device, bad_value):
    # A module id outside [0, num_modules] would index past module_mask: rejected, nothing
    # written, with the same message on CPU and CUDA (group_table_check.h).
    p = torch.randn(4, 3, device=device)
    steps = torch.zeros(3, dtype=torch.long, device=device)
    mask = torch.ones(2, dtype=torch.bool, device=device)
    layout = torch.tensor([[1, 0, 3, 0]], dtype=torch.long)  # 4 row groups of one row
    groups = torch.tensor([0, 1, 2, bad_value], device=device)
    before = p.clone()
    with pytest.raises(RuntimeError, match=rf"group_table\[3\] = {bad_value} is out of range \[0, 2\]"):
        _adamw([p], steps, mask, layout, groups)
    assert torch.equal(p, before)


def test_group_table_rechecked_after_in_place_change(device):
    # The check runs once per table version: a valid table passes and is remembered; writing a
    # bad value into it in place bumps its version and the next step rejects it; a table checked
    # against more modules is checked again for fewer.
    p = torch.randn(4, 3, device=device)
    layout = torch.tensor([[1, 0, 3, 0]], dtype=torch.long)
    groups = torch.tensor([0, 1, 2, 0], device=device)
    steps3, mask3 = torch.zeros(4, dtype=torch.long, device=device), torch.ones(3, dtype=torch.bool, device=device)
    _adamw([p], steps3, mask3, layout, groups)
    _adamw([p], steps3, mask3, layout, groups)
    groups[1] = 9
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"group_table\[1\] = 9 is out of range"):
        _adamw([p], steps3, mask3, layout, groups)
    assert torch.equal(p, before)
    groups[1] = 3  # valid for 3 modules (the unmanaged slot)
    _adamw([p], steps3, mask3, layout, groups)
    steps1, mask1 = torch.zeros(2, dtype=torch.long, device=device), torch.ones(1, dtype=torch.bool, device=device)
    with pytest.raises(RuntimeError, match=r"group_table\[1\] = 3 is out of range \[0, 1\]"):
        _adamw([p], steps1, mask1, layout, groups)


def test_more_tensors_than_one_launch_holds(device):
    # 230 small tensors: more than one CUDA launch's 192 tensor slots (CUDA >= 12.1; 16 with
    # 4 KB kernel parameters), every layout among them, against the reference.
    params, layouts = [], []
    mm = ModuleMap()
    ids = [mm.add_module(f"m{i}") for i in range(5)]
    for i in range(230):
        p = torch.randn(4 + i % 5, 8, device=device)
        params.append(p)
        if i % 3 == 0:
            mm.assign_row_groups(p, 1 if p.shape[0] % 2 else 2,
                                 [ids[(i + j) % 5] for j in range(p.shape[0] // (1 if p.shape[0] % 2 else 2))])
        elif i % 3 == 1:
            mm.assign_col_groups(p, 4, [ids[i % 5], -1])
    grads = [torch.randn_like(p) for p in params]
    layout, groups = mm.kernel_tables(params, device)
    steps = torch.randint(0, 3, (6,), device=device)
    mask = torch.tensor([True, False, True, False, True], device=device)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    rp, rm, rv = ref.masked_adamw_step_ref(params, grads, m, v, steps, mask, layout, groups,
                                           1e-2, 0.9, 0.999, 0.01, 1e-8)
    p2 = [t.clone() for t in params]
    ops.masked_adamw_step_(p2, grads, m, v, steps, mask, layout, groups, 1e-2, 0.9, 0.999, 0.01,
                           1e-8, False, None, None)
    assert_close_rel(torch.cat([t.flatten() for t in p2]), torch.cat([t.flatten() for t in rp]))
    assert_close_rel(torch.cat([t.flatten() for t in m]), torch.cat([t.flatten() for t in rm]))


def test_many_large_tensors_mixed_dtypes(device):
    # More tensors than one CUDA launch holds with 4 KB kernel parameters (16) and more 64K-element
    # chunks than its blocks (320), so tensors are cut between launches there; fp32 and bf16 in
    # one list (one launch series per dtype); column groups of odd width (the kernel's
    # one-element path) among them. (CUDA >= 12.1 launches hold 192 tensors and 1024 blocks:
    # test_cuda_paths.py::test_cuda_step_spanning_launches_matches_cpu goes past those.)
    shapes = [(1100, 700)] * 28 + [(7 * 18725,), (5, 65536 + 1)]
    params = [torch.randn(s, device=device).to(torch.bfloat16 if i % 7 == 3 else torch.float32)
              for i, s in enumerate(shapes)]
    grads = [torch.randn_like(p) for p in params]
    mm = ModuleMap()
    ids = [mm.add_module(f"m{i}") for i in range(6)]
    for i, p in enumerate(params):
        if i % 3 == 0:  # 5 row groups
            mm.assign_row_groups(p, p.shape[0] // 5, [ids[(i + j) % 6] for j in range(5)])
        elif i % 3 == 1:  # 7 column groups, the first unmanaged
            mm.assign_col_groups(p, p.shape[-1] // 7, [-1] + [ids[(i + j) % 6] for j in range(6)])
        # every third tensor unmanaged
    layout, groups = mm.kernel_tables(params, device)
    steps = torch.randint(0, 3, (7,), device=device)
    mask = torch.tensor([True, False, True, True, False, False], device=device)
    m = [torch.zeros(p.shape, device=device) for p in params]
    v = [torch.zeros(p.shape, device=device) for p in params]
    rp, rm, rv = ref.masked_adamw_step_ref([p.double() for p in params], grads, m, v, steps,
                                           mask, layout, groups, 1e-2, 0.9, 0.999, 0.01, 1e-8)
    p2 = [t.clone() for t in params]
    ops.masked_adamw_step_(p2, grads, m, v, steps, mask, layout, groups, 1e-2, 0.9, 0.999, 0.01,
                           1e-8, False, None, None)
    # fp32 state: REL_TOL[float32] (≈16 u32). Params: one rounding of the float64 reference
    # (a bf16 tensor with a dropped or wrong write-back fails; REL_TOL[bf16] = 1e-2 would not).
    for out, r in ((m, rm), (v, rv)):
        assert_close_rel(torch.cat([t.flatten() for t in out]), torch.cat([t.flatten() for t in r]))
    m0 = [torch.zeros(p.shape, device=device) for p in params]
    _assert_adamw_params_rounded_once(p2, params, grads, m0, m0, steps, mask, layout, groups,
                                      1e-2, 0.9, 0.999, 0.01, 1e-8, r64=rp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropped_write_back_fails_the_rounding_check(dtype):
    # The parameter check must catch an update that was computed but never written: compare the
    # un-updated parameters (what a dropped bf16/fp16 write-back leaves) with the reference.
    params, grads, steps, mask, layout, groups = _problem("cpu", dtype)
    mask[:] = True
    m = [torch.zeros(p.shape) for p in params]
    v = [torch.zeros(p.shape) for p in params]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8)
    p2 = [t.clone() for t in params]
    ops.masked_adamw_step_(p2, grads, [t.clone() for t in m], [t.clone() for t in v], steps, mask,
                           layout, groups, *hp.values(), False, None, None)
    _assert_adamw_params_rounded_once(p2, params, grads, m, v, steps, mask, layout, groups, **hp)
    with pytest.raises(AssertionError, match="not a single"):
        _assert_adamw_params_rounded_once(params, params, grads, m, v, steps, mask, layout,
                                          groups, **hp)
    # The old norm-wise tolerance alone would not have caught it (bf16): that is the point.
    if dtype == torch.bfloat16:
        rp, _, _ = ref.masked_adamw_step_ref(params, grads, m, v, steps, mask, layout, groups, **hp)
        flat = lambda ts: torch.cat([t.flatten().double() for t in ts])  # noqa: E731
        from helpers import REL_TOL, rel_err
        assert rel_err(flat(params), flat(rp)) <= REL_TOL[torch.bfloat16]


def test_cpu_path_without_avx_matches_reference():
    # The fp32 CPU loops use AVX when the CPU has it; this runs the at::vec fallback (what CPUs
    # without AVX execute) in a fresh process and checks it against the same reference.
    import os
    import subprocess
    import sys
    code = (
        "import torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "import test_optim_ops as t\n"
        "for dtype in (torch.float32,):\n"
        "    t.test_masked_adamw_step_matches_reference('cpu', dtype, True, True)\n"
        "    t.test_masked_sgd_step_matches_reference('cpu', dtype, 0.9, 0.1, False, 0.01)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MAT_CUDA_DISABLE_AVX="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_torch_compile_fullgraph_traces_the_ops(device):
    # The fake kernels let Dynamo/AOTAutograd trace a step with no graph break.
    params, grads, steps, mask, layout, groups = _problem(device, torch.float32)
    m = [torch.zeros(p.shape, device=device) for p in params]
    v = [torch.zeros(p.shape, device=device) for p in params]
    rp, _, _ = ref.masked_adamw_step_ref(params, grads, m, v, steps, mask, layout, groups,
                                         0.1, 0.9, 0.99, 0.01, 1e-8)
    expected_steps = ref.masked_module_steps_ref(steps, mask)

    def step(params, grads, m, v, steps, mask):
        ops.masked_adamw_step_(params, grads, m, v, steps, mask, layout, groups, 0.1, 0.9, 0.99,
                               0.01, 1e-8, False, None, None)
        ops.masked_module_steps_(steps, mask, None)

    torch.compile(step, fullgraph=True, backend="aot_eager")(params, grads, m, v, steps, mask)
    assert_close_rel(torch.cat([p.flatten() for p in params]), torch.cat([p.flatten() for p in rp]))
    assert torch.equal(steps, expected_steps)
