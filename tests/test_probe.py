"""MNTKProbe against the torch.func oracle (per-sample gradients in float64) on tiny real models:
every mode, every supported layer type, with and without a sequence axis, ghost and explicit
Gram paths forced, plus accumulation, autocast, hook hygiene and the errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import rel_err
from mat_cuda import MNTKProbe
from mat_cuda.modules import ModuleMap
from mat_cuda.reference import module_grams_reference, per_sample_grads_reference
from probe_models import MODELS, make_cnn, make_embed_norm, make_encoder, make_mlp

# fp32 probe vs float64 oracle (the bound): Grams summed over ≲ 10^3 terms per entry,
# norm-wise error ~sqrt(L)·u32 … L·u32 ≈ 2e-6 … 6e-5 worst case; 1e-5 is the target.
TOL = 1e-5
ALGORITHMS = ["ghost", "explicit"]


def _to(device, model, *tensors):
    return (model.to(device),) + tuple(t.to(device) for t in tensors)


def _ce(out_i, y_i, reduction="mean"):
    # sample i's cross-entropy over its positions (one position without a sequence axis)
    return F.cross_entropy(out_i.reshape(-1, out_i.shape[-1]), y_i.reshape(-1),
                           reduction=reduction)


def _assert_modules_close(K, ref, mm, tol=TOL):
    assert K.dtype == torch.float32 and K.shape == ref.shape
    for m in range(mm.num_modules):
        err = rel_err(K[m], ref[m])
        assert err <= tol, f"module {mm.names[m]}: relative error {err:.2e} > {tol:.0e}"
    assert ref.abs().sum() > 0


def _oracle(model, mm, scalar, x, *per_sample):
    return module_grams_reference(model, mm, per_sample_grads_reference(model, scalar, x,
                                                                        *per_sample))


# ---- mode "loss" --------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_mode_mean_matches_torch_func(device, name, algorithm):
    model, mm, x, y = MODELS[name]()
    model, x, y = _to(device, model, x, y)
    with MNTKProbe(model, mm, algorithm=algorithm) as probe:
        probe.begin()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        K = probe.gram()
        assert all(pl.input is None for pl in probe._layers) and probe._K is None
    # mean over every position = mean over samples of each sample's own position mean
    _assert_modules_close(K, _oracle(model, mm, _ce, x, y), mm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_loss_mode_sum(device, algorithm):
    model, mm, x, y = make_encoder(packed=True)
    model, x, y = _to(device, model, x, y)
    probe = MNTKProbe(model, mm, loss_reduction="sum", algorithm=algorithm)
    probe.begin()
    out = model(x)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum").backward()
    K = probe.gram()
    probe.close()
    ref = _oracle(model, mm, lambda o, t: _ce(o, t, "sum"), x, y)
    _assert_modules_close(K, ref, mm)


def _masked_lm(n, T, device):
    mask = torch.rand(n, T, device=device) < 0.4
    mask[torch.arange(n), torch.randint(0, T, (n,))] = True        # >= 1 masked token each
    return mask


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_loss_mode_token_mean_masked_lm(device, algorithm):
    # L = Σ_{i,t} mask·l_it / N. Convention "mean": ℓ_i = (n / N) Σ_t mask·l_it.
    model, mm, x, y = make_encoder(packed=False, rms=True)
    model, x, y = _to(device, model, x, y)
    n, T = x.shape
    mask = _masked_lm(n, T, device)
    N = int(mask.sum())
    with MNTKProbe(model, mm, algorithm=algorithm) as probe:
        probe.begin()
        out = model(x)
        F.cross_entropy(out[mask], y[mask]).backward()
        K = probe.gram()

    def share(o, t, msk):
        return (n / N) * (_ce(o, t, "none") * msk).sum()

    _assert_modules_close(K, _oracle(model, mm, share, x, y, mask.double()), mm)


def test_loss_weights_tensor_gives_own_token_mean(device):
    # ℓ_i = the sample's own token mean Σ_t mask·l_it / N_i: L = Σ_i (N_i / N) ℓ_i.
    model, mm, x, y = make_encoder(packed=True)
    model, x, y = _to(device, model, x, y)
    n, T = x.shape
    mask = _masked_lm(n, T, device)
    Ni, N = mask.sum(1).double(), mask.sum()
    with MNTKProbe(model, mm) as probe:
        probe.begin(loss_weights=(Ni / N).float())
        out = model(x)
        F.cross_entropy(out[mask], y[mask]).backward()
        K = probe.gram()

    def own_mean(o, t, msk):
        return (_ce(o, t, "none") * msk).sum() / msk.sum()

    _assert_modules_close(K, _oracle(model, mm, own_mean, x, y, mask.double()), mm)


def test_loss_weights_float_and_accumulation(device):
    # A scaled loss (e.g. a GradScaler factor S on a mean): loss_weights = S / n; and out=
    # accumulates: K_total = K_before + this batch.
    model, mm, x, y = make_mlp()
    model, x, y = _to(device, model, x, y)
    n, S = x.shape[0], 8.0
    ref = _oracle(model, mm, _ce, x, y)
    K0 = torch.rand(mm.num_modules, n, n, device=device)
    with MNTKProbe(model, mm) as probe:
        probe.begin(out=K0.clone(), loss_weights=S / n)
        (S * F.cross_entropy(model(x), y)).backward()
        K = probe.gram()
    _assert_modules_close(K - K0, ref, mm)


def test_loss_weights_0d_tensor(device):
    # e.g. a GradScaler scale kept on the device: w = S / n as a 0-d tensor, no host read.
    model, mm, x, y = make_cnn()
    model, x, y = _to(device, model, x, y)
    S = torch.tensor(1024.0, device=device)
    with MNTKProbe(model, mm, algorithm="explicit") as probe:
        probe.begin(loss_weights=S / x.shape[0])
        (S * F.cross_entropy(model(x), y)).backward()
        K = probe.gram()
    _assert_modules_close(K, _oracle(model, mm, _ce, x, y), mm)


def test_loss_mode_n_equals_one(device):
    model, mm, x, y = make_mlp(n=1)
    model, x, y = _to(device, model, x, y)
    with MNTKProbe(model, mm) as probe:
        probe.begin()
        F.cross_entropy(model(x), y).backward()
        K = probe.gram()
    assert K.shape == (mm.num_modules, 1, 1)
    _assert_modules_close(K, _oracle(model, mm, _ce, x, y), mm)


def test_loss_mode_hooks_idle_outside_a_probe(device):
    # A step without begin() stores nothing; the next probed step is unaffected by it.
    model, mm, x, y = make_cnn()
    model, x, y = _to(device, model, x, y)
    with MNTKProbe(model, mm) as probe:
        F.cross_entropy(model(x), y).backward()
        assert all(pl.input is None for pl in probe._layers)
        probe.begin()
        F.cross_entropy(model(x), y).backward()
        K = probe.gram()
    _assert_modules_close(K, _oracle(model, mm, _ce, x, y), mm)


def test_loss_mode_under_autocast(device):
    # bf16 autocast: the Linear factors arrive in bf16 (8-bit mantissa), so the Gram carries
    # about 1e-2 relative error against the float64 oracle; LayerNorm runs in fp32.
    model, mm, x, y = make_encoder(packed=True)
    model, x, y = _to(device, model, x, y)
    with MNTKProbe(model, mm) as probe:
        probe.begin()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        K = probe.gram()
    ref = _oracle(model, mm, _ce, x, y)
    # bf16 autocast forward: activations carry bf16 rounding (u = 3.9e-3) through ~3 layers
    # into both Gram factors; 5e-2 ≈ 12 u_bf16 vs the float32 oracle on the unrounded model.
    assert rel_err(K, ref) <= 5e-2


# ---- modes "output" and "logit_sum" -------------------------------------------------------------

def _freeze_some_and_sentinel_grads(model, mm):
    frozen = mm.params()[::3]
    for p in frozen:
        p.requires_grad_(False)
    sentinels = {}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
            sentinels[p] = p.grad.clone()
    return frozen, sentinels


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_mode_matches_torch_func(device, name, algorithm):
    model, mm, x, _ = MODELS[name]()
    model, x = _to(device, model, x)
    frozen, sentinels = _freeze_some_and_sentinel_grads(model, mm)
    k = 3
    with MNTKProbe(model, mm, mode="output", projections=k, algorithm=algorithm) as probe:
        out_shape = model(x).shape[1:]
        V = torch.randn((k,) + tuple(out_shape), device=device)
        K = probe.measure(x, vectors=V)
    # .grad untouched, frozen parameters measured and left frozen
    for p, g in sentinels.items():
        assert torch.equal(p.grad, g)
    assert all(not p.requires_grad for p in frozen)
    ref = sum(_oracle(model, mm, lambda o, v=v: (o * v).sum(), x) for v in V) / k
    _assert_modules_close(K, ref, mm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logit_sum_mode_matches_torch_func(device, name, algorithm):
    model, mm, x, _ = MODELS[name]()
    model, x = _to(device, model, x)
    with MNTKProbe(model, mm, mode="logit_sum", algorithm=algorithm) as probe:
        K = probe.measure(x)
    _assert_modules_close(K, _oracle(model, mm, lambda o: o.sum(), x), mm)


def test_output_mode_basis_projections_give_full_jacobian_ntk(device):
    # v_r = sqrt(O)·e_r (E[v vᵀ] = I over the basis): K = Σ_o J_o J_oᵀ exactly (jacrev oracle).
    from torch.func import functional_call, jacrev, vmap

    model, mm, x, _ = make_embed_norm()
    model, x = _to(device, model, x)
    O = model(x).shape[1]
    with MNTKProbe(model, mm, mode="output", projections=O) as probe:
        K = probe.measure(x, vectors=math.sqrt(O) * torch.eye(O, device=device))
    params = {k: p.detach().double() for k, p in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),))[0]),
               in_dims=(None, 0))(params, x)                     # {name: (n, O, *shape)}
    ref = sum(module_grams_reference(model, mm, {k: j[:, o] for k, j in jac.items()})
              for o in range(O))
    _assert_modules_close(K, ref, mm)


def test_output_mode_default_projections_are_seeded_rademacher(device):
    model, mm, x, _ = make_mlp()
    model, x = _to(device, model, x)
    k = 4
    gen = torch.Generator(device=device).manual_seed(123)
    with MNTKProbe(model, mm, mode="output", projections=k, generator=gen) as probe:
        K = probe.measure(x)
    again = torch.Generator(device=device).manual_seed(123)
    V = 2 * torch.randint(0, 2, (k, 5), generator=again, device=device) - 1
    ref = sum(_oracle(model, mm, lambda o, v=v: (o * v).sum(), x) for v in V.double()) / k
    _assert_modules_close(K, ref, mm)


def test_measure_accumulates_and_accepts_forward_fn(device):
    model, mm, x, _ = make_encoder(packed=True)
    model, x = _to(device, model, x)
    x2 = torch.randint(1, 13, x.shape, device=device)
    with MNTKProbe(model, mm, mode="logit_sum") as probe:
        K = probe.measure(x, forward_fn=lambda b: model(b)[:, 1:])
        K = probe.measure({"ids": x2}, out=K)
    ref = _oracle(model, mm, lambda o: o[1:].sum(), x) + _oracle(model, mm, lambda o: o.sum(), x2)
    _assert_modules_close(K, ref, mm)


class _Branches(nn.Module):
    """A Linear fed a 4-D input (n, a, b, d), and a branch the loss never reaches."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 2)

    def forward(self, x):                                   # x (n, 2, 3, 5)
        self.unused(x)
        return torch.tanh(self.fc(x)).sum(dim=(1, 2))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_multi_axis_input_and_layer_off_the_loss_path(device, algorithm):
    model = _Branches().to(device)
    mm = ModuleMap.per_parameter(model)
    x = torch.randn(6, 2, 3, 5, device=device)
    y = torch.randint(0, 3, (6,), device=device)
    with MNTKProbe(model, mm, algorithm=algorithm) as probe:
        probe.begin()
        F.cross_entropy(model(x), y).backward()
        K = probe.gram()
    ref = _oracle(model, mm, _ce, x, y)
    assert [mm.names[m] for m in range(mm.num_modules) if ref[m].abs().sum() == 0] == \
        ["unused.weight", "unused.bias"]
    _assert_modules_close(K, ref, mm)


# ---- hooks and state ----------------------------------------------------------------------------

def test_hooks_removed_on_close_and_context_exit():
    model, mm, x, _ = make_encoder()
    hooked = [m for m in model.modules() if any(mm.layout(p) is not None
                                                for p in m.parameters(recurse=False))]
    with MNTKProbe(model, mm) as probe:
        assert all(len(m._forward_hooks) == 1 for m in hooked)
        assert len(probe.layers) == len(hooked)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    probe.close()                                   # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        probe.begin()


def test_inplace_op_on_layer_output(device):
    # MLP applies ReLU(inplace=True) to fc1's output: both modes still see ∂/∂(fc1 output).
    model, mm, x, y = make_mlp()
    model, x, y = _to(device, model, x, y)
    with MNTKProbe(model, mm, mode="logit_sum") as probe:
        K = probe.measure(x)
    _assert_modules_close(K, _oracle(model, mm, lambda o: o.sum(), x), mm)


# ---- errors -------------------------------------------------------------------------------------

class _Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.gain


def test_unsupported_layer_reported_by_name_at_construction():
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(_Scale(5)), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"'1\.0'.*_Scale.*gain"):
        MNTKProbe(model, ModuleMap.per_parameter(model))
    mm = ModuleMap()                                    # the unsupported layer unmanaged: fine
    mm.assign_whole(model[0].weight, mm.add_module("a"))
    assert MNTKProbe(model, mm).layers == ["0"]


@pytest.mark.parametrize("build,match", [
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), r"'0'.*groups=2"),
    (lambda: nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True)), "scale_grad_by_freq"),
    (lambda: nn.Sequential(nn.MultiheadAttention(4, 2)), "bypasses submodule hooks"),
    (lambda: nn.Sequential(nn.Conv1d(3, 4, 2)), r"'0'.*Conv1d"),
])
def test_unsupported_configurations(build, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        MNTKProbe(model, ModuleMap.per_parameter(model))


def test_unsupported_layouts():
    emb = nn.Sequential(nn.Embedding(6, 4))
    mm = ModuleMap()
    mm.assign_row_groups(emb[0].weight, 3, [mm.add_module("a"), -1], "emb")
    with pytest.raises(ValueError, match="only a whole-weight module"):
        MNTKProbe(emb, mm)
    conv = nn.Sequential(nn.Conv2d(2, 3, 2))
    mm = ModuleMap()
    mm.assign_col_groups(conv[0].weight, 1, [mm.add_module("a"), -1], "conv")
    with pytest.raises(ValueError, match="column groups"):
        MNTKProbe(conv, mm)


def test_tied_weights_rejected():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    with pytest.raises(ValueError, match="shared with layer"):
        MNTKProbe(model, ModuleMap.per_parameter(model))


def test_batchnorm_in_training_mode_is_an_error():
    model, mm, x, y = make_cnn()
    probe = MNTKProbe(model, mm)              # constructed in eval BN: fine
    model.train()
    with pytest.raises(RuntimeError, match=r"BatchNorm 'bn'.*batch statistics"):
        probe.begin()
    out_probe = MNTKProbe(model, mm, mode="logit_sum")
    with pytest.raises(RuntimeError, match=r"BatchNorm 'bn'"):
        out_probe.measure(x)
    model.eval()
    probe.begin()
    F.cross_entropy(model(x), y).backward()
    assert probe.gram().shape[0] == mm.num_modules


def test_layer_called_twice_is_an_error():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    probe = MNTKProbe(model, ModuleMap.per_parameter(model), mode="logit_sum")
    with pytest.raises(RuntimeError, match="called more than once"):
        probe.measure(torch.randn(4, 3))
    assert probe._active is None                 # the failed measure left nothing in flight
    probe.close()


class _InplaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x) + 1.0
        y = self.fc2(h)
        h.mul_(2.0)            # changes fc2's input after its forward
        return y


def test_input_modified_in_place_is_an_error():
    # The probe's check fires at fc2's output gradient, before autograd's own version check.
    model = _InplaceAfter()
    probe = MNTKProbe(model, ModuleMap.per_parameter(model))
    probe.begin()
    with pytest.raises(RuntimeError, match="input of layer 'fc2' was modified in place"):
        model(torch.randn(5, 3)).sum().backward()


def test_bad_arguments():
    model, mm, x, y = make_mlp()
    with pytest.raises(ValueError, match="mode"):
        MNTKProbe(model, mm, mode="jacobian")
    with pytest.raises(ValueError, match="projections"):
        MNTKProbe(model, mm, mode="output", projections=0)
    with pytest.raises(ValueError, match="loss_reduction"):
        MNTKProbe(model, mm, loss_reduction="token")
    with pytest.raises(ValueError, match="algorithm"):
        MNTKProbe(model, mm, algorithm="fast")
    with pytest.raises(TypeError, match="ModuleMap"):
        MNTKProbe(model, {"fc1": 0})
    other = nn.Linear(2, 2)
    bad = ModuleMap()
    bad.assign_whole(other.weight, bad.add_module("x"), "other.weight")
    with pytest.raises(ValueError, match="other.weight"):
        MNTKProbe(model, bad)

    probe = MNTKProbe(model, mm)
    with pytest.raises(RuntimeError, match="without a matching begin"):
        probe.gram()
    with pytest.raises(RuntimeError, match="measure\\(\\) is for modes"):
        probe.measure(x)
    with pytest.raises(ValueError, match="out must be a float32"):
        probe.begin(out=torch.zeros(mm.num_modules, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="loss_weights"):
        probe.begin(loss_weights=torch.ones(6, 2))
    with pytest.raises(ValueError, match="loss_weights"):
        probe.begin(loss_weights=torch.ones(6, dtype=torch.int64))
    probe.begin()
    with pytest.raises(RuntimeError, match="already in flight"):
        probe.begin()
    with pytest.raises(RuntimeError, match="no gradient reached"):
        probe.gram()
    probe.begin(loss_weights=torch.ones(4))
    with pytest.raises(RuntimeError, match="loss_weights has 4 entries"):
        F.cross_entropy(model(x), y).backward()
    probe.close()

    out_probe = MNTKProbe(model, mm, mode="output", projections=2)
    with pytest.raises(RuntimeError, match="begin\\(\\)/gram\\(\\) are for mode 'loss'"):
        out_probe.begin()
    with pytest.raises(ValueError, match="vectors must have shape"):
        out_probe.measure(x, vectors=torch.ones(2, 4))
    with pytest.raises(TypeError, match="forward_fn"):
        out_probe.measure(x, forward_fn=lambda b: (model(b),))
