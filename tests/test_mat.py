"""MAT controller: masks reach the optimizer and the backward, all-active MAT equals AdamW,
checkpoint/resume identity, gradient accumulation, GradScaler, clipping, report, bad configs.

The end-to-end tests take `device` (CPU always, CUDA when available: conftest.py), so that a GPU
machine runs MAT end to end on CUDA (scripts/gpu_check.sh); the bad-configuration tests fail
before any kernel runs and stay on the CPU."""
import copy
import io

import pytest
import torch

import mat_cuda
from mat_cuda import MAT, MATPolicy, MNTKProbe, ModularPolicy, ModuleMap
from mat_cuda.models import BertEncoderMLM, mlm_loss
from helpers import assert_close_rel, rel_err

V, N, T = 30, 4, 6


def make_model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return BertEncoderMLM(V, hidden=16, layers=2, heads=2, ffn=32, max_len=8).to(device)


def make_batches(k, n=N, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randint(0, V, (n, T), generator=g)
        y = torch.where(torch.rand(n, T, generator=g) < 0.4, x, torch.full_like(x, -100))
        y[:, 0] = x[:, 0]  # every sample predicts at least one token
        out.append((x.to(device), y.to(device)))
    return out


def assert_same(a, b, device, rtol=1e-5, atol=1e-7):
    """Bitwise equal on the CPU. On CUDA the Gram's explicit embedding form scatters with
    atomics (index_add_), whose summation order varies between runs: λ, and the parameters
    through the masks' timing only, may differ in the last bits."""
    if torch.device(device).type == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def freezing_policy(mm, probe_every=2, temporal=True):
    """Budget mode: half of each kind trains after the first probe (no warm-up)."""
    kinds = mm.kinds
    kw = {} if temporal else {"temporal": None}
    return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.5),
                     warmup=0, probe_every=probe_every, **kw)


def build(model, policy_fn=freezing_policy, **kw):
    """MAT on `model` with a plain AdamW rebuilt as MaskedAdamW and a policy on MAT's map."""
    mm = mat_cuda.discover(model, ("head", "ffn")).module_map
    # MAT runs discovery itself; build the policy from the same kinds (discovery is deterministic).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return MAT(model, opt, policy=policy_fn(mm), **kw)


def step(mat, model, batch, factor=1.0):
    x, y = batch
    (mlm_loss(model(x), y) * factor).backward()
    stepped = mat.step()
    mat.zero_grad()
    return stepped


def element_mask(mm, p, frozen):
    """(p.shape) bool: the elements of `p` that belong to a module in `frozen`."""
    lay = mm.layout(p)
    out = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
    if lay is None:
        return out
    if lay.kind == "whole":
        out[...] = lay.module in frozen
        return out
    for g, m in enumerate(lay.group_module):
        if m in frozen:
            sl = slice(g * lay.group_size, (g + 1) * lay.group_size)
            if lay.kind == "rows":
                out[sl] = True
            else:
                out[..., sl] = True
    return out


@pytest.mark.parametrize("backward", ["detach", "exact"])
def test_masks_reach_optimizer_and_backward(backward, device):
    model = make_model(device=device)
    mat = build(model, backward=backward)
    mm = mat.module_map
    ffn_blocks = {f.module: f.block for f in mat.discovery.ffns}
    frozen_seen = set()
    for k, batch in enumerate(make_batches(7, device=device)):
        before = [p.detach().clone() for p in mm.params()]
        probe_step = mat.is_probe_step
        x, y = batch
        mlm_loss(model(x), y).backward()
        mask_before = mat.optimizer.module_mask.clone()
        if not probe_step:
            # Frozen FFN blocks: no gradient at all; frozen heads: zero gradient rows/columns.
            for m in (~mask_before).nonzero().flatten().tolist():
                if m in ffn_blocks:
                    assert all(q.grad is None for q in ffn_blocks[m].parameters())
            for p in mm.params():
                em = element_mask(mm, p, set((~mask_before).nonzero().flatten().tolist()))
                if p.grad is not None and em.any():
                    assert not p.grad[em].any()
        mat.step()
        mat.zero_grad()
        frozen = set((~mat.optimizer.module_mask).nonzero().flatten().tolist())
        frozen_seen |= frozen
        for p, b in zip(mm.params(), before):
            em = element_mask(mm, p, frozen)
            assert torch.equal(p.detach()[em], b[em]), f"step {k}: a frozen module moved"
            assert not torch.equal(p.detach()[~em], b[~em]) or (~em).sum() == 0
    assert frozen_seen, "the budget policy froze nothing: the test checked nothing"
    assert mat.probe_steps == [0, 2, 4, 6]
    mat.close()


def test_all_active_policy_equals_adamw(device):
    model, ref = make_model(device=device), make_model(device=device)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    mat = MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-2), warmup=10**6, probe_every=2)
    for batch in make_batches(5, device=device):
        step(mat, model, batch)
        x, y = batch
        mlm_loss(ref(x), y).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        assert mat.optimizer.module_mask.all()
    # The converted attention and the fused kernel round differently from torch's path; Adam
    # turns last-bit gradient differences into ~1e-6 moves (lr 1e-2: a step moves ~1e-2), while
    # a wrong mask, bias correction or missed step would differ by ~1e-3.
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=5e-6, msg=name)
    assert len(mat.report()["step"]) == 3  # probes at 0, 2, 4
    mat.close()


def _checkpoint(*objs):
    buf = io.BytesIO()
    torch.save([o.state_dict() for o in objs], buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_resume_equals_uninterrupted_run(device):
    data = make_batches(8, device=device)
    model_a = make_model(device=device)
    mat_a = build(model_a)
    for b in data:
        step(mat_a, model_a, b)

    model_b = make_model(device=device)
    mat_b = build(model_b)
    for b in data[:4]:
        step(mat_b, model_b, b)
    saved = _checkpoint(model_b, mat_b.optimizer, mat_b)
    mat_b.close()

    model_c = make_model(seed=123, device=device)          # different weights: all must come from the checkpoint
    mat_c = build(model_c)
    model_c.load_state_dict(saved[0])
    mat_c.optimizer.load_state_dict(saved[1])
    mat_c.load_state_dict(saved[2])
    assert mat_c.is_probe_step            # step 4 is a probe step: re-armed on load
    for b in data[4:]:
        step(mat_c, model_c, b)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert_same(p, q, device)
    ra, rc = mat_a.report(), mat_c.report()
    assert_same(ra["lam"], rc["lam"], device) and torch.equal(ra["mask"], rc["mask"])
    assert torch.equal(ra["module_steps"], rc["module_steps"])
    assert ra["compute_saved"] == rc["compute_saved"] > 0
    mat_a.close()
    mat_c.close()


def test_resume_with_the_output_kernel_continues_its_projections(device):
    """The output kernel draws random projections from MAT's own generator: a resumed run
    must continue that stream, not restart it, to match the uninterrupted run."""
    data = make_batches(8, device=device)
    x_probe = make_batches(1, n=5, seed=7, device=device)[0][0]
    model_a = make_model(device=device)
    mat_a = build(model_a, kernel="output", probe_inputs=x_probe)
    for b in data:
        step(mat_a, model_a, b)

    model_b = make_model(device=device)
    mat_b = build(model_b, kernel="output", probe_inputs=x_probe)
    for b in data[:4]:
        step(mat_b, model_b, b)
    saved = _checkpoint(model_b, mat_b.optimizer, mat_b)
    mat_b.close()
    assert saved[2]["projection_rng"] is not None

    model_c = make_model(seed=123, device=device)
    mat_c = build(model_c, kernel="output", probe_inputs=x_probe)
    for b in data[:2]:                      # moves its generator away from a fresh one's state
        step(mat_c, model_c, b)
    model_c.load_state_dict(saved[0])
    mat_c.optimizer.load_state_dict(saved[1])
    mat_c.load_state_dict(saved[2])
    for b in data[4:]:
        step(mat_c, model_c, b)
    ra, rc = mat_a.report(), mat_c.report()
    assert_same(ra["lam"], rc["lam"], device) and torch.equal(ra["mask"], rc["mask"])
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert_same(p, q, device)
    mat_a.close()
    mat_c.close()


def test_load_state_dict_rejects_a_bad_projection_rng():
    model = make_model()
    mat = build(model)
    state = mat.state_dict()
    state["projection_rng"] = [1, 2, 3]
    with pytest.raises(TypeError, match="projection_rng"):
        mat.load_state_dict(state)
    mat.close()


def test_accumulation_probes_only_the_last_micro_batch(device):
    A = 2
    model = make_model(device=device)
    ref = copy.deepcopy(model)
    mat = build(model, accumulation_steps=A)
    micro = make_batches(A, seed=5, device=device)
    assert mat.is_probe_step and not mat.is_last_micro_batch and not mat.probes_on_step
    assert step(mat, model, micro[0], 1 / A) is False
    assert mat.is_last_micro_batch and mat.probes_on_step
    assert step(mat, model, micro[1], 1 / A) is True
    lam = mat.report()["lam"][0]
    # Reference: a standalone probe on the last micro-batch alone, at the same weights.
    probe = MNTKProbe(ref, mat_cuda.discover(ref, ("head", "ffn")).module_map)
    probe.begin(loss_scale=1 / A)
    x, y = micro[1]
    (mlm_loss(ref(x), y) / A).backward()
    lam_ref = mat_cuda.lambda_max(probe.gram())
    # rtol: float32 Grams and Lanczos on both sides, summed in another order (~10 u32 · n).
    torch.testing.assert_close(lam.cpu(), lam_ref.double().cpu(), rtol=1e-5, atol=0)
    # The optimizer stepped once, on the sum of both micro-batches' gradients.
    assert mat.step_count == 1 and int(mat.optimizer.module_steps[-1]) == 1
    mat.close()


def test_split_step_equals_step():
    """before_optimizer_step + the loop's own optimizer step + after_optimizer_step (how the
    Trainer and Lightning callbacks drive MAT) is MAT.step, bit for bit, accumulation included."""
    data = make_batches(12)
    model_a, model_b = make_model(), make_model()
    mat_a, mat_b = build(model_a, accumulation_steps=2), build(model_b, accumulation_steps=2)
    for b in data:
        step(mat_a, model_a, b, 0.5)
        x, y = b
        (mlm_loss(model_b(x), y) * 0.5).backward()
        if mat_b.before_optimizer_step():
            mat_b.optimizer.step()
            mat_b.after_optimizer_step()
        mat_b.zero_grad()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    ra, rb = mat_a.report(), mat_b.report()
    assert torch.equal(ra["lam"], rb["lam"]) and ra["compute_saved"] == rb["compute_saved"] > 0
    mat_a.close()
    mat_b.close()


def test_step_ended_early_postpones_its_probe():
    """end_of_step=True on a probe step whose counted last micro-batch never came (a short last
    accumulation window): the probe's hooks were never armed, so it probes the next step."""
    model = make_model()
    mat = build(model, accumulation_steps=3)
    x, y = make_batches(1)[0]
    mlm_loss(model(x), y).backward()
    assert mat.is_probe_step and not mat.probes_on_step
    assert mat.before_optimizer_step(end_of_step=True) is True
    mat.optimizer.step()
    mat.after_optimizer_step()
    mat.zero_grad()
    assert mat.probe_steps == [] and mat.is_probe_step      # postponed to step 1
    for i in range(3):
        mlm_loss(model(x), y).backward()
        assert mat.before_optimizer_step() is (i == 2)
    mat.optimizer.step()
    mat.after_optimizer_step()
    assert mat.probe_steps == [1]
    assert mat.before_optimizer_step(end_of_step=False) is False
    assert mat.before_optimizer_step(end_of_step=False) is False
    with pytest.raises(RuntimeError, match="the optimizer must step now"):
        mat.before_optimizer_step(end_of_step=False)
    assert mat.is_last_micro_batch                  # the refused call changed nothing
    mat.close()


def test_accumulation_steps_on_the_summed_gradient():
    # The optimizer sees Σ over micro-batches of ∇(loss_k / A), the gradient of the mean loss
    # over all A micro-batches, and updates the weights from that sum.
    A = 3
    model = make_model()
    ref = copy.deepcopy(model)
    mat = build(model, accumulation_steps=A)
    micro = make_batches(A, seed=6)
    seen = {}
    inner_step = mat.optimizer.step

    def recording_step(*args, **kwargs):
        seen["grads"] = [p.grad.detach().clone() for p in model.parameters()]
        return inner_step(*args, **kwargs)

    mat.optimizer.step = recording_step
    for k, b in enumerate(micro):
        assert step(mat, model, b, 1 / A) is (k == A - 1)
    # Reference: plain autograd on the copy, the micro-batch losses summed into one backward.
    total = sum(mlm_loss(ref(x), y) / A for x, y in micro)
    total.backward()
    for (name, q), g in zip(ref.named_parameters(), seen["grads"]):
        # float32 gradients accumulated in another order: a few u32 relative (1e-6 = 16 u32).
        assert_close_rel(g, q.grad, tol=1e-6, msg=name)
    # A single micro-batch's gradient is far from the sum (the check can fail).
    single = copy.deepcopy(make_model())
    (mlm_loss(single(micro[-1][0]), micro[-1][1]) / A).backward()
    assert rel_err(next(single.parameters()).grad, next(ref.parameters()).grad) > 1e-2
    # The update used that gradient: AdamW's first step on the probe's mask, with the same
    # gradients, lands on the same weights.
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_opt.step()
    frozen = set((~mat.optimizer.module_mask).nonzero().flatten().tolist())
    mm = mat.module_map
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(),
                                make_model().parameters()):
        em = element_mask(mm, p, frozen)
        assert torch.equal(p.detach()[em], p0.detach()[em]), f"{name}: frozen elements moved"
        # AdamW's first step moves each element by ~lr: 1e-6 relative is float32 rounding.
        assert_close_rel(p.detach()[~em], q.detach()[~em], tol=1e-6, msg=name)
    mat.close()


def test_grad_scaler_gives_the_unscaled_run(device):
    data = make_batches(4, device=device)
    model, ref = make_model(device=device), make_model(device=device)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 10)
    mat = build(model, scaler=scaler)
    mat_ref = build(ref)
    for b in data:
        x, y = b
        scaler.scale(mlm_loss(model(x), y)).backward()
        mat.step()
        mat.zero_grad()
        step(mat_ref, ref, b)
    r, rr = mat.report(), mat_ref.report()
    # The scale is a power of two (exact); λ: float32 Gram + Lanczos, ~(4n + 32)·u32 → 1e-5.
    torch.testing.assert_close(r["lam"].cpu(), rr["lam"].cpu(), rtol=1e-5, atol=0)
    assert torch.equal(r["mask"], rr["mask"])
    # Same float32 math on the same gradients (scaling exact): ~16 u32; atol for values near 0.
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    mat.close()
    mat_ref.close()


def test_overflowing_probe_is_dropped_and_retried(device):
    model = make_model(device=device)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 10)
    mat = build(model, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batches(1, device=device)[0]
    scaler.scale(mlm_loss(model(x), y) * float("inf")).backward()
    mat.step()
    mat.zero_grad()
    assert mat.skipped_probes == 1 and mat.is_probe_step and scaler.get_scale() == 2.0 ** 9
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    scaler.scale(mlm_loss(model(x), y)).backward()
    mat.step()
    assert mat.probe_steps == [1] and len(mat.report()["step"]) == 1
    mat.close()


def test_clip_grad_norm_with_scaler(device):
    model = make_model(device=device)
    scaler = torch.amp.GradScaler(torch.device(device).type, init_scale=2.0 ** 8)
    mat = build(model, scaler=scaler)
    x, y = make_batches(1, device=device)[0]
    scaler.scale(mlm_loss(model(x), y)).backward()
    total = mat.clip_grad_norm_(1e-3)
    assert float(total) > 1e-3
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # clip_grad_norm_ scales by max_norm / (total + 1e-6): the norm lands at max_norm within
    # float32 rounding; 1.001 allows that and nothing like an unclipped gradient.
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) <= 1e-3 * 1.001
    mat.step()
    mat.close()


def test_report_and_should_stop(device):
    model = make_model(device=device)
    mat = build(model)
    for b in make_batches(5, device=device):
        step(mat, model, b)
    r = mat.report()
    M = mat.module_map.num_modules
    assert r["lam"].shape == (3, M) and r["mask"].shape == (3, M)
    assert set(r["active_fraction"]) == {"head", "ffn"}
    assert r["active_fraction"]["head"][-1] == 0.5
    assert r["steps"] == 5 and r["module_steps"].shape == (M + 1,)
    # Frozen half of heads and FFNs on 2 non-probe steps of 5: a positive saving below 1/2.
    assert 0 < r["compute_saved"] < 0.5
    assert mat.should_stop is False  # the default temporal policy needs more probes than 3
    mat.close()


@pytest.mark.parametrize("eps, scale_probes, stops_at",
                         [(1e9, 1, 4), (1e9, 5, 8), (1e-300, 5, None)])
def test_should_stop_becomes_true_when_every_module_retires(eps, scale_probes, stops_at):
    # Every module trains (budget 1.0) and is probed at every step. With ε huge, every ratio is
    # below ε: the first probe only records λ, the next scale_probes intervals set the temporal
    # scale (they never count towards retirement), then the streak reaches patience = 2. So
    # should_stop is False until probe 1 + scale_probes + 2 and True from then on (4 with a
    # one-interval scale, 8 with the default robust scale of 5 intervals).
    # With ε tiny no module retires and should_stop stays False.
    model = make_model()

    def policy(mm):
        kinds = mm.kinds
        return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=1.0),
                         temporal=mat_cuda.TemporalPolicy(kinds, eps=eps, patience=2,
                                                          scale_probes=scale_probes),
                         warmup=0, probe_every=1)

    mat = build(model, policy_fn=policy)
    assert mat.policy.temporal.probes_to_retire == 1 + scale_probes + 2
    seen = []
    for b in make_batches(10):
        step(mat, model, b)
        seen.append(mat.should_stop)
    want = [stops_at is not None and k + 1 >= stops_at for k in range(10)]
    assert seen == want
    if stops_at is not None:
        assert mat.report()["converged_kinds"] == ["head", "ffn"]
        assert not mat.optimizer.module_mask.any()  # retired modules are frozen
    mat.close()


def test_plain_torch_optimizer_is_rebuilt_sharing_param_groups():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mat = MAT(model, opt)
    assert isinstance(mat.optimizer, mat_cuda.MaskedSGD)
    assert mat.optimizer.param_groups[0] is opt.param_groups[0]  # an LR scheduler still works
    assert mat.optimizer.param_groups[0]["momentum"] == 0.9
    mat.close()


def test_close_restores_the_model(device):
    model = make_model(device=device)
    ref = copy.deepcopy(model)
    mat = build(model)
    step(mat, model, make_batches(1, device=device)[0])
    mat.close()
    model.load_state_dict(ref.state_dict())
    x, _ = make_batches(1, device=device)[0]
    assert torch.equal(model(x), ref(x))
    assert all(p.requires_grad for p in model.parameters())


# ---- bad configuration: clear errors before training starts ----

def test_probe_size_larger_than_batch():
    model = make_model()
    mat = MAT(model, torch.optim.AdamW(model.parameters()), probe_size=N + 1)
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match=f"probe_size={N + 1}.*batch of {N}"):
        model(x)
    mat.close()


def test_module_map_that_does_not_fit():
    model, other = make_model(), make_model()
    mm = ModuleMap.per_parameter(other)
    with pytest.raises(ValueError, match="does not fit the model"):
        MAT(model, torch.optim.AdamW(model.parameters()), modules=mm)


def test_optimizer_that_cannot_be_wrapped():
    model = make_model()
    with pytest.raises(TypeError, match="cannot use an optimizer of type Adam"):
        MAT(model, torch.optim.Adam(model.parameters()))
    opt = torch.optim.AdamW(model.parameters())
    x, y = make_batches(1)[0]
    mlm_loss(model(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match="already has state"):
        MAT(model, opt)
    with pytest.raises(ValueError, match="amsgrad"):
        MAT(make_model(), torch.optim.AdamW(make_model().parameters(), amsgrad=True))


def test_other_bad_arguments():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="kernel must be one of"):
        MAT(model, opt, kernel="hessian")
    with pytest.raises(ValueError, match="probe batch of its own"):
        MAT(model, opt, kernel="output")
    x_probe = make_batches(1)[0][0]
    with pytest.raises(ValueError, match="kernel='loss' reads the training backward"):
        MAT(model, opt, probe_inputs=x_probe)
    with pytest.raises(ValueError, match="probe_size selects samples"):
        MAT(model, opt, kernel="logit_sum", probe_inputs=x_probe, probe_size=2)
    with pytest.raises(TypeError, match="probe_forward must be callable"):
        MAT(model, opt, kernel="logit_sum", probe_inputs=x_probe, probe_forward=3)
    with pytest.raises(ValueError, match="backward must be"):
        MAT(model, opt, backward="skip")
    with pytest.raises(ValueError, match="accumulation_steps"):
        MAT(model, opt, accumulation_steps=0)
    with pytest.raises(ValueError, match="policy was built for"):
        MAT(model, opt, policy=MATPolicy(["head"] * 3))
    with pytest.raises(ValueError, match="probe_every and warmup"):
        MAT(model, opt, policy=MATPolicy(["head"] * 4 + ["ffn"] * 2), probe_every=5)
    with pytest.raises(TypeError, match="factory returning one"):
        MAT(model, opt, policy=lambda kinds, names: None)
    with pytest.raises(ValueError, match="policy was built for"):
        MAT(model, opt, policy=lambda kinds, names: MATPolicy(kinds[:-1]))
    # Nothing was left converted or hooked by the failed constructions.
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("kernel", ["logit_sum", "output"])
def test_output_kernels_measure_every_module_on_the_probe_batch(kernel, device):
    from mat_cuda.reference import (lambda_max_reference, module_grams_reference,
                                    per_sample_grads_reference)

    model = make_model(device=device)
    x_probe = make_batches(1, n=5, seed=7, device=device)[0][0]
    batches = make_batches(5, device=device)
    # Reference for the first probe (step 0, before any update): logit_sum's row i is
    # ∇ Σ_o f_o(x_i), by torch.func on an unconverted copy of the model.
    twin = copy.deepcopy(model)
    grads = per_sample_grads_reference(twin, lambda out: out.sum(), x_probe)
    K_ref = module_grams_reference(twin, mat_cuda.discover(twin, ("head", "ffn")).module_map, grads)
    mat = build(model, kernel=kernel, probe_inputs=x_probe)
    rng = torch.random.get_rng_state()
    for i, b in enumerate(batches):
        assert mat.probes_on_step == (i % 2 == 0)  # probe_every=2: steps 0, 2, 4
        step(mat, model, b)
        assert not mat.is_probe_step  # the training steps never run in probe mode
    # The output kernel's projections come from MAT's own generator, not the global RNG.
    assert torch.equal(torch.random.get_rng_state(), rng)
    rep = mat.report()
    assert rep["step"].tolist() == [0, 2, 4]
    if kernel == "logit_sum":
        # float32 probe (logit-sum kernel: Grams over V logits, ~V·u32 ≈ 2e-6 per entry) and
        # Lanczos at the default tol 1e-6: 1e-4 leaves margin for the float32 forward too.
        torch.testing.assert_close(rep["lam"][0].double().cpu(), lambda_max_reference(K_ref).cpu(),
                                   rtol=1e-4, atol=1e-8)
    # Every module is measured at every probe, the frozen ones included.
    assert bool((rep["lam"] > 0).all())
    assert not bool(rep["mask"][1].all()) and bool(rep["mask"][1].any())


def test_policy_factory_gets_the_discovered_kinds_and_names():
    model = make_model()
    seen = {}

    def factory(kinds, names):
        seen.update(kinds=kinds, names=names)
        return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.25),
                         temporal=None, warmup=0, probe_every=1, names=names)

    mat = MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-3), policy=factory)
    assert seen["kinds"] == mat.module_map.kinds and seen["names"] == mat.module_map.names
    assert mat.policy.modular.mode == "budget" and mat.policy.temporal is None


def test_explicit_module_map_skips_whole_tensor_modules(device):
    # An explicit map has no discovered attention/FFN structures: whole-tensor modules are
    # skipped through requires_grad, row/column groups would be masked by the optimizer only.
    model = make_model(device=device)
    mm = ModuleMap()
    for i, layer in enumerate(model.layers):
        m = mm.add_module(f"ffn{i}", "ffn")
        for p in layer.ffn.parameters():
            mm.assign_whole(p, m)
    kinds = mm.kinds
    policy = MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.5),
                       warmup=0, probe_every=3)
    mat = MAT(model, torch.optim.AdamW(model.parameters(), lr=1e-2), modules=mm, policy=policy)
    assert mat.skipper.attentions == [] and mat.skipper.skipped_modules == [0, 1]
    data = make_batches(2, device=device)
    step(mat, model, data[0])               # probe step: one FFN frozen from here on
    frozen = (~mat.optimizer.module_mask).nonzero().flatten().tolist()
    assert len(frozen) == 1
    frozen_params = list(model.layers[frozen[0]].ffn.parameters())
    assert not any(p.requires_grad for p in frozen_params)
    before = [p.detach().clone() for p in frozen_params]
    x, y = data[1]
    mlm_loss(model(x), y).backward()
    assert all(p.grad is None for p in frozen_params)
    mat.step()
    assert all(torch.equal(p, b) for p, b in zip(frozen_params, before))
    mat.close()


def test_discovery_and_masked_optimizer_built_first(device):
    # A MaskedAdamW on a discovery's map is used as it is, and the discovered heads/FFNs are
    # converted for skipping.
    model = make_model(device=device)
    disc = mat_cuda.discover(model, ("head", "ffn"))
    opt = mat_cuda.MaskedAdamW(model.parameters(), lr=1e-2, module_map=disc.module_map)
    mat = MAT(model, opt, modules=disc, policy=freezing_policy(disc.module_map))
    assert mat.optimizer is opt and len(mat.skipper.attentions) == 2
    step(mat, model, make_batches(1, device=device)[0])
    assert not opt.module_mask.all()
    mat.close()
    # A MaskedAdamW on another map (its default per-parameter map) is rebuilt on MAT's map.
    opt2 = mat_cuda.MaskedAdamW(model.parameters(), lr=1e-2)
    mat2 = MAT(model, opt2)
    assert mat2.optimizer is not opt2 and mat2.optimizer.module_map is mat2.module_map
    mat2.close()
    with pytest.raises(ValueError, match="another model"):
        MAT(make_model(device=device), torch.optim.AdamW(model.parameters()), modules=disc)
