"""MNTKProbe on Switch MoE experts: routed rows scattered back to their samples (routed_tokens).

The oracle is a per-sample loop in float64 (torch.func's vmap cannot run the data-dependent
dispatch); routing is per sample, so model(x[i:i+1]) is exactly sample i's computation. Only
the cross-entropy is probed: the load-balancing aux loss couples the samples of a batch."""
import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from mat_cuda import MNTKProbe
from mat_cuda.discovery import discover
from mat_cuda.models import SwitchMoELM
from mat_cuda.reference import module_grams_reference

TOL = 1e-5  # fp32 probe vs float64 oracle, as tests/test_probe.py (≈ 16 u32 … sqrt(L)·u32)
N, T, VOCAB = 4, 5, 29


def _moe(capacity_factor, layers=2):
    model = SwitchMoELM(VOCAB, hidden=16, layers=layers, heads=2, num_experts=3, expert_ffn=12,
                        capacity_factor=capacity_factor, max_len=8)
    # embeddings stay shared: the position embedding has no sample axis
    mm = discover(model, kinds=("head", "expert")).module_map
    x, y = torch.randint(0, VOCAB, (N, T)), torch.randint(0, VOCAB, (N, T))
    return model, mm, x, y


def _routing(model):
    return [layer.moe.last_routing.clone() for layer in model.layers]


def _per_sample_grads(model, scalar, x, y):
    """{name: (n, *shape)} float64, one backward per sample; also each sample's routing."""
    m64 = SwitchMoELM(**model.config)   # not deepcopy: a forward leaves non-leaf aux_loss
    m64.load_state_dict(model.state_dict())
    m64.double()
    names, params = zip(*m64.named_parameters())
    grads, routing = {k: [] for k in names}, []
    for i in range(x.shape[0]):
        out = m64(x[i:i + 1].cpu())
        routing.append(_routing(m64))
        gs = torch.autograd.grad(scalar(out[0], y[i].cpu()), params, allow_unused=True)
        for k, p, g in zip(names, params, gs):
            grads[k].append(torch.zeros_like(p) if g is None else g)
    routing = [torch.cat([r[l] for r in routing]) for l in range(len(model.layers))]
    return {k: torch.stack(v) for k, v in grads.items()}, routing


def _assert_close(K, ref, mm):
    assert K.dtype == torch.float32 and K.shape == ref.shape
    for m in range(mm.num_modules):
        err = rel_err(K[m], ref[m])
        assert err <= TOL, f"module {mm.names[m]}: relative error {err:.2e} > {TOL:.0e}"
    experts = [m for m, k in enumerate(mm.kinds) if k == "expert"]
    assert sum(bool(ref[m].abs().sum() > 0) for m in experts) >= 2   # a routed comparison


def _ce_mean(out_i, y_i):
    return F.cross_entropy(out_i, y_i)


@pytest.mark.parametrize("algorithm", ["ghost", "explicit"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_loss_mode_on_switch_experts_matches_per_sample_grads(device, capacity_factor, algorithm):
    model, mm, x, y = _moe(capacity_factor)
    model, x, y = model.to(device), x.to(device), y.to(device)
    with MNTKProbe(model, mm, algorithm=algorithm) as probe:
        probe.begin()
        out = model(x)
        routing = _routing(model)
        # all samples have T positions: the token mean is the mean of the samples' own means
        F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1)).backward()
        K = probe.gram()
    grads, ref_routing = _per_sample_grads(model, _ce_mean, x, y)
    for r, ref_r in zip(routing, ref_routing):
        assert torch.equal(r.cpu(), ref_r)
    if capacity_factor is not None:
        assert all((r == -1).any() for r in routing)   # capacity 1 per expert: tokens dropped
    _assert_close(K, module_grams_reference(model, mm, grads), mm)


def test_probe_size_and_logit_sum_on_switch_experts(device):
    model, mm, x, y = _moe(None, layers=1)
    model, x, y = model.to(device), x.to(device), y.to(device)
    grads, _ = _per_sample_grads(model, _ce_mean, x, y)
    with MNTKProbe(model, mm, probe_size=3) as probe:
        probe.begin()
        out = model(x)
        F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1)).backward()
        K = probe.gram()
    _assert_close(K, module_grams_reference(model, mm, grads)[:, :3, :3], mm)

    sums, _ = _per_sample_grads(model, lambda o, t: o.sum(), x, y)
    with MNTKProbe(model, mm, mode="logit_sum") as probe:
        K = probe.measure(x)
    _assert_close(K, module_grams_reference(model, mm, sums), mm)


def test_expert_given_no_token_contributes_zero(device):
    model, mm, x, y = _moe(None, layers=1)
    w = model.layers[0].moe.router.weight
    with torch.no_grad():   # expert 2's logit is the mean of experts 0 and 1's: it never wins
        w[2] = (w[0] + w[1]) / 2
    model, x, y = model.to(device), x.to(device), y.to(device)
    with MNTKProbe(model, mm) as probe:
        probe.begin()
        out = model(x)
        F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1)).backward()
        K = probe.gram()
    assert not (model.layers[0].moe.last_routing == 2).any()
    expert2 = mm.names.index("layers.0.moe.experts.2")
    assert torch.count_nonzero(K[expert2]) == 0
    grads, _ = _per_sample_grads(model, _ce_mean, x, y)
    ref = module_grams_reference(model, mm, grads)
    for m in range(mm.num_modules):
        assert rel_err(K[m], ref[m]) <= TOL
