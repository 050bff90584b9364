"""Failure isolation (docs/failure.md): NaN/Inf in one module's gradients or Gram holds that
module only; a probe that raises (an out-of-memory in the Gram or Lanczos, simulated) leaves
training running on the previous masks with one warning; a step that raises part-way can be
retried and gives the uninterrupted run's result, bit for bit on CPU."""
import copy
import warnings

import pytest
import torch
from torch import nn

import mat_cuda
from mat_cuda import MAT, MATPolicy, ModularPolicy, ModuleMap
from mat_cuda.models import mlm_loss

from test_mat import build, make_batches, make_model, step


# ---- a model whose modules do not feed each other's gradients ----

class Branches(nn.Module):
    """y = l2(relu(l1(x))) + l3(x) + l4(x): l3 and l4 read the raw input, so a NaN put into
    l3's output gradient reaches l3's parameters and Gram and nothing else."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(5, 7), nn.Linear(7, 3)
        self.l3, self.l4 = nn.Linear(5, 3), nn.Linear(5, 3)
        self.poison = False   # put NaN into l3's output gradient in the next backward

    def forward(self, x):
        y3 = self.l3(x)
        if self.poison:   # on a tensor downstream of l3's output: the probe sees the NaN too
            y3 = y3 + 0
            y3.register_hook(lambda g: torch.full_like(g, float("nan")))
        return self.l2(torch.relu(self.l1(x))) + y3 + self.l4(x)


def branches(seed=0):
    torch.manual_seed(seed)
    model = Branches()
    mm = ModuleMap()
    for name in ("l1", "l2", "l3", "l4"):
        m = mm.add_module(name, "ffn")
        mm.assign_whole(getattr(model, name).weight, m)
        mm.assign_whole(getattr(model, name).bias, m)
    return model, mm


def branch_batches(k, n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)) for _ in range(k)]


def branch_mat(model, mm, **kw):
    policy = MATPolicy(mm.kinds, modular=ModularPolicy(mm.kinds, mode="budget", budget=0.5),
                       warmup=0, probe_every=2, names=mm.names)
    return MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-2), modules=mm,
               policy=policy, **kw)


def branch_step(mat, model, batch):
    x, y = batch
    ((model(x) - y) ** 2).sum(dim=1).mean().backward()
    mat.step()
    mat.zero_grad()


def module_state(mat, m):
    """Everything MAT and the optimizer keep about module m (policy entries, mask, steps)."""
    pol = mat.policy
    out = {"mask": bool(mat.optimizer.module_mask[m]), "skip": mat.skipper.active[m],
           "steps": int(mat.optimizer.module_steps[m])}
    for name, sub in (("modular", pol.modular), ("temporal", pol.temporal)):
        for key, value in sub.state_dict().items():
            if isinstance(value, torch.Tensor) and value.shape == (mat.module_map.num_modules,):
                out[f"{name}.{key}"] = value[m].item()
    return out


def params_of(model, name):
    return [p.detach().clone() for p in getattr(model, name).parameters()]


def moments_of(mat, model, name):
    return [mat.optimizer.state[p][k].clone() for p in getattr(model, name).parameters()
            for k in ("exp_avg", "exp_avg_sq")]


def same(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


# ---- NaN/Inf in one module ----

def test_nan_in_one_modules_gradient_holds_that_module_only():
    data = branch_batches(7)
    model, mm = branches()
    ref, ref_mm = branches()
    mat, mat_ref = branch_mat(model, mm), branch_mat(ref, ref_mm)
    for b in data[:4]:   # probes at steps 0 and 2: some modules are frozen by now
        branch_step(mat, model, b)
        branch_step(mat_ref, ref, b)
    assert mat.probes_on_step and not all(mat.skipper.active)
    l3 = mm.names.index("l3")
    held = module_state(mat, l3)
    before = {n: (params_of(model, n), moments_of(mat, model, n)) for n in ("l1", "l2", "l3", "l4")}
    model.poison = True
    with pytest.warns(RuntimeWarning, match=r"NaN/Inf for 1 module\(s\) \(l3\)") as rec:
        branch_step(mat, model, data[4])
    model.poison = False
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    branch_step(mat_ref, ref, data[4])

    r, rr = mat.report(), mat_ref.report()
    assert mat.probe_steps == mat_ref.probe_steps == [0, 2, 4]
    lam = r["lam"][-1]
    assert torch.isnan(lam[l3]) and torch.isfinite(torch.cat([lam[:l3], lam[l3 + 1:]])).all()
    others = [m for m in range(4) if m != l3]
    # Neighbours were measured exactly as without the NaN.
    assert torch.equal(lam[others], rr["lam"][-1][others])
    # l3: its policy state and mask are held, its parameters and moments untouched this step.
    assert module_state(mat, l3) == held
    assert same(params_of(model, "l3"), before["l3"][0])
    assert same(moments_of(mat, model, "l3"), before["l3"][1])
    # Every active neighbour was updated (frozen ones keep their parameters as always).
    for m in others:
        name = mm.names[m]
        changed = not same(params_of(model, name), before[name][0])
        assert changed == bool(mat.optimizer.module_mask[m]), name
    # Training goes on: the next probe measures l3 again and nothing is NaN.
    for b in data[5:]:
        branch_step(mat, model, b)
    assert torch.isfinite(mat.report()["lam"][-1]).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    mat.close()
    mat_ref.close()


def _gram_with_poison(monkeypatch, module, value):
    """linear_gram_ that writes `value` into K[module] after the real accumulation."""
    real = mat_cuda.gram.linear_gram_

    def poisoned(K, *args, **kw):
        out = real(K, *args, **kw)
        K[module] = value
        return out

    monkeypatch.setattr(mat_cuda.gram, "linear_gram_", poisoned)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_one_modules_gram_holds_that_module_only(monkeypatch, value):
    data = make_batches(6)
    model = make_model()
    mat = build(model)
    for b in data[:4]:
        step(mat, model, b)
    m = 1
    held = module_state(mat, m)
    heads_before = [p.detach().clone() for p in model.parameters()]
    mask_before = mat.optimizer.module_mask.clone()
    policy_before = mat.policy.state_dict()
    _gram_with_poison(monkeypatch, m, value)
    with pytest.warns(RuntimeWarning, match=mat.module_map.names[m]):
        step(mat, model, data[4])
    monkeypatch.undo()
    assert module_state(mat, m) == held
    lam = mat.report()["lam"][-1]
    assert torch.isnan(lam[m]) and int(torch.isnan(lam).sum()) == 1
    # The history before this probe is untouched; one row was added.
    after = mat.policy.state_dict()["history"]
    for key in ("step", "lam", "mask"):
        assert len(after[key]) == len(policy_before["history"][key]) + 1
        for x, y in zip(after[key][:-1], policy_before["history"][key]):
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    # Module m was not updated at this step: every element it owns is as before.
    from test_mat import element_mask
    for p, b in zip(model.parameters(), heads_before):
        own = element_mask(mat.module_map, p, {m})
        assert torch.equal(p.detach()[own], b[own])
    assert bool(mat.optimizer.module_mask[m]) == bool(mask_before[m])
    step(mat, model, data[5])
    mat.close()


def test_every_lambda_invalid_drops_the_probe_and_skips_the_update(monkeypatch):
    data = make_batches(3)
    model = make_model()
    mat = build(model)
    step(mat, model, data[0])
    step(mat, model, data[1])
    state = copy.deepcopy(mat.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    managed = {id(p) for p in mat.module_map.params()}
    _gram_with_poison(monkeypatch, slice(None), float("nan"))
    with pytest.warns(RuntimeWarning, match="dropped.*every module.*no module is updated"):
        step(mat, model, data[2])
    assert mat.skipped_probes == 1 and mat.probe_steps == state["probe_steps"]
    assert torch.equal(mat.optimizer.module_mask, state["mask"])
    for p, b in zip(model.parameters(), before):
        if id(p) in managed:
            assert torch.equal(p, b)
    mat.close()


def test_scaler_retries_once_then_holds_a_module_with_a_bad_gram(monkeypatch):
    data = make_batches(4)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    mat = build(model, scaler=scaler)
    _gram_with_poison(monkeypatch, 0, float("nan"))
    x, y = data[0]
    scaler.scale(mlm_loss(model(x), y)).backward()
    mat.step()                      # dropped: it may be an overflow, probe again
    mat.zero_grad()
    assert mat.skipped_probes == 1 and mat.probes_on_step
    scaler.scale(mlm_loss(model(x), y)).backward()
    with pytest.warns(RuntimeWarning, match="NaN/Inf for 1 module"):
        mat.step()                  # the retry is not an overflow: module 0 held, others decided
    mat.zero_grad()
    assert mat.probe_steps == [1] and mat.skipped_probes == 1
    mat.close()


# ---- a probe that raises ----

def _raise_once(monkeypatch, owner, name, exc):
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise exc
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, failing)
    return calls


@pytest.mark.parametrize("where,exc", [
    ("gram", torch.OutOfMemoryError("CPU out of memory (simulated)")),
    ("gram", RuntimeError("kernel failure (simulated)")),
    ("lanczos", torch.OutOfMemoryError("out of memory in Lanczos (simulated)")),
])
def test_failed_probe_keeps_training_on_the_previous_masks(monkeypatch, where, exc):
    data = make_batches(7)
    model, ref = make_model(), make_model()
    mat, mat_ref = build(model), build(ref)
    for b in data[:2]:
        step(mat, model, b)
        step(mat_ref, ref, b)
    assert mat.probes_on_step   # step 2 probes
    state = copy.deepcopy(mat.state_dict())
    if where == "gram":
        _raise_once(monkeypatch, mat_cuda.gram, "linear_gram_", exc)
    else:
        _raise_once(monkeypatch, mat_cuda.mat, "lambda_max", exc)
    x, y = data[2]
    mlm_loss(model(x), y).backward()          # the backward completes: no exception here
    mlm_loss(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):   # gradients are complete
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mat.step()
    mat.zero_grad()
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and type(exc).__name__ in msgs[0] and "masks stay" in msgs[0]
    monkeypatch.undo()
    # Nothing of the probe was applied: masks, policy, vectors, probe list as before the step.
    after = mat.state_dict()
    assert torch.equal(after["mask"], state["mask"])
    assert after["probe_steps"] == state["probe_steps"] and mat.skipped_probes == 1
    assert torch.equal(after["vectors"], state["vectors"])
    assert len(after["policy"]["history"]["step"]) == len(state["policy"]["history"]["step"])
    # The update used the previous masks: it equals a run whose probe at step 2 kept them.
    mat_ref.optimizer.set_module_mask(state["mask"])
    mat_ref._finish_probe = lambda: None
    mat_ref._armed = False
    mat_ref.probe.cancel()
    mat_ref._leave_probe_mode()
    mat_ref.step()
    mat_ref.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    # The next scheduled probe runs as usual.
    for b in data[3:5]:
        step(mat, model, b)
    assert mat.probe_steps == state["probe_steps"] + [4]
    assert not mat.probe._handles is None and all(pl.input is None for pl in mat.probe._layers)
    mat.close()


def test_failed_output_kernel_probe_keeps_training(monkeypatch):
    model = make_model()
    x_probe = make_batches(1, seed=9)[0][0]
    mm = mat_cuda.discover(model, ("head", "ffn")).module_map
    mat = MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-2), kernel="logit_sum",
              probe_inputs=x_probe, policy=MATPolicy(mm.kinds, warmup=0, probe_every=2))
    _raise_once(monkeypatch, mat_cuda.gram, "linear_gram_", torch.OutOfMemoryError("simulated"))
    with pytest.warns(RuntimeWarning, match="OutOfMemoryError"):
        step(mat, model, make_batches(1)[0])
    assert mat.skipped_probes == 1 and mat.probe_steps == [] and mat.step_count == 1
    assert all(p.requires_grad for p in mat.module_map.params())   # measure() restored them
    for b in make_batches(2, seed=4):
        step(mat, model, b)
    assert mat.probe_steps == [2]
    mat.close()


# ---- a step that raises part-way, then is retried ----

def _uninterrupted(data, **kw):
    model = make_model()
    mat = build(model, **kw)
    for b in data:
        for micro in (b if isinstance(b, list) else [b]):
            step(mat, model, micro)
    return model, mat


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("fail_at", [2, 3])   # a probe step and a plain step
def test_optimizer_step_that_raises_can_be_retried(fail_at, accumulation):
    data = make_batches(6 * accumulation)
    if accumulation > 1:
        data = [data[i:i + accumulation] for i in range(0, len(data), accumulation)]
    ref_model, ref = _uninterrupted(data, accumulation_steps=accumulation)
    model = make_model()
    mat = build(model, accumulation_steps=accumulation)
    for i, b in enumerate(data):
        micros = b if isinstance(b, list) else [b]
        for micro in micros[:-1]:
            step(mat, model, micro)
        x, y = micros[-1]
        mlm_loss(model(x), y).backward()
        if i == fail_at:
            real = mat.optimizer.step
            mat.optimizer.step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
            opt_state = copy.deepcopy(mat.optimizer.state_dict())
            with pytest.raises(RuntimeError, match="boom"):
                mat.step()
            mat.optimizer.step = real
            # Nothing moved: the optimizer's state and MAT's counters are as before the call.
            assert mat.step_count == i and mat._micro == accumulation - 1
            now = mat.optimizer.state_dict()
            assert torch.equal(now["module_steps"], opt_state["module_steps"])
            for k, st in opt_state["state"].items():
                for key, v in st.items():
                    assert torch.equal(now["state"][k][key], v)
        assert mat.step()       # the retry
        mat.zero_grad()
    assert mat.probe_steps == ref.probe_steps
    assert torch.equal(mat.report()["lam"], ref.report()["lam"])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    mat.close()
    ref.close()


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_step_whose_forward_or_backward_raises_can_be_redone(phase):
    """A user hook raises in the middle of a probe step's forward (or backward); the loop calls
    mat.zero_grad() and runs the batch again: the result is the uninterrupted run's."""
    data = make_batches(5)
    ref_model, ref = _uninterrupted(data)
    model = make_model()
    mat = build(model)
    layer = mat.inner.layers[1] if hasattr(mat.inner, "layers") else list(model.children())[1]
    armed = {"fail": False}

    def fwd_hook(mod, inp, out):
        if armed["fail"]:
            armed["fail"] = False
            if phase == "forward":
                raise RuntimeError("forward hook failed")
            out.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("backward failed")))
        return None

    handle = layer.register_forward_hook(fwd_hook)
    for i, (x, y) in enumerate(data):
        if i == 2:   # a probe step
            assert mat.probes_on_step
            armed["fail"] = True
            with pytest.raises(RuntimeError, match="failed"):
                mlm_loss(model(x), y).backward()
            mat.zero_grad()
        step(mat, model, (x, y))
    handle.remove()
    assert mat.probe_steps == ref.probe_steps
    assert torch.equal(mat.report()["lam"], ref.report()["lam"])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    mat.close()
    ref.close()
