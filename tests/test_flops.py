"""mat_cuda.flops: the FLOP meter against torch.utils.flop_counter and the analytic table."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from mat_cuda import flops as fl


def _ce(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _torch_count(model, loss_fn, batch):
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).backward()
    return counter.get_total_flops()


def _mlp():
    return nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 11), nn.Tanh(),
                         nn.Linear(11, 5, bias=False))


def _mlp_batch(n=9):
    return torch.randn(n, 7), torch.randint(5, (n,))


class Block(nn.Module):
    """Post-norm transformer block on (B, T, E) with nn.MultiheadAttention."""

    def __init__(self, e=16, h=4, ffn=24, need_weights=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(e), nn.LayerNorm(e)
        self.ffn_in, self.ffn_out = nn.Linear(e, ffn), nn.Linear(ffn, e)
        self.need_weights = need_weights

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=self.need_weights)
        x = self.norm1(x + a)
        return self.norm2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class TinyEncoder(nn.Module):
    def __init__(self, vocab=50, e=16, layers=2, need_weights=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, e)
        self.blocks = nn.ModuleList(Block(e, need_weights=need_weights) for _ in range(layers))
        self.head = nn.Linear(e, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _tokens(b=3, t=10, vocab=50):
    ids = torch.randint(vocab, (b, t))
    return ids, torch.randint(vocab, (b, t))


class MatmulAttention(nn.Module):
    """Single-projection attention written with torch.matmul, as custom models do."""

    def __init__(self, e=12, h=3):
        super().__init__()
        self.h = h
        self.qkv, self.out = nn.Linear(e, 3 * e), nn.Linear(e, e)

    def forward(self, x):  # (B, T, E)
        b, t, e = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, e // self.h).permute(2, 0, 3, 1, 4)
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / (e // self.h) ** 0.5, dim=-1)
        return self.out(torch.matmul(p, v).transpose(1, 2).reshape(b, t, e))


class SdpaAttention(MatmulAttention):
    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, e // self.h).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, e))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(16, 6, 1, bias=False), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


def _images(n=5):
    return torch.randn(n, 3, 8, 8), torch.randint(10, (n,))


def _phases(r):
    return {k: r[k] for k in ("forward", "grad_input", "grad_weight", "recompute", "total")}


MODELS = {
    "mlp": (_mlp, _mlp_batch),
    "encoder": (TinyEncoder, _tokens),
    "cnn": (_cnn, _images),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_meter_matches_torch_flop_counter_and_analytic(name):
    make, batch_fn = MODELS[name]
    model, batch = make(), batch_fn()
    got = fl.count_step_flops(model, _ce, batch)
    # torch counts a grouped conv's dW `groups` times (it uses all input channels); we do not.
    grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    overcount = sum((m.groups - 1) * got["per_module"][n]["grad_weight"]
                    for n, m in model.named_modules() if m in grouped)
    assert got["total"] + overcount == _torch_count(model, _ce, batch) > 0
    assert (overcount > 0) == (name == "cnn")
    assert got["backward"] == got["grad_input"] + got["grad_weight"]
    assert got["total"] == got["forward"] + got["backward"]
    ana = fl.analytic_step_flops(model, _ce, batch)
    assert _phases(got) == _phases(ana)
    # Per module and per kind too (the meter attributes nothing outside the model's modules).
    assert got["per_module"] == {n: c for n, c in ana["per_module"].items()}
    assert got["per_kind"] == ana["per_kind"]


def test_first_layer_has_no_dx_and_counts_are_per_layer_formulas():
    model, (x, y) = _mlp(), _mlp_batch(9)
    got = fl.count_step_flops(model, _ce, (x, y))["per_module"]
    for name, (d_in, d_out) in {"0": (7, 13), "2": (13, 11), "4": (11, 5)}.items():
        mm = 2 * 9 * d_in * d_out
        assert got[name]["forward"] == mm and got[name]["grad_weight"] == mm
        assert got[name]["grad_input"] == (0 if name == "0" else mm)  # x needs no gradient


def test_input_requiring_grad_adds_first_layer_dx():
    model, (x, y) = _mlp(), _mlp_batch()
    base = fl.count_step_flops(model, _ce, (x, y))
    with_dx = fl.count_step_flops(model, _ce, (x.requires_grad_(), y))
    assert with_dx["grad_input"] - base["grad_input"] == 2 * 9 * 7 * 13


@pytest.mark.parametrize("name,layer", [("mlp", "2"), ("mlp", "4"), ("cnn", "2"), ("cnn", "4"), ("cnn", "6"),
                                        ("encoder", "blocks.1.ffn_in"), ("encoder", "head")])
def test_frozen_weight_removes_exactly_its_dw(name, layer):
    make, batch_fn = MODELS[name]
    model, batch = make(), batch_fn()
    before = fl.count_step_flops(model, _ce, batch)
    model.get_submodule(layer).weight.requires_grad_(False)
    after = fl.count_step_flops(model, _ce, batch)
    removed = before["per_module"][layer]["grad_weight"]
    assert removed == before["per_module"][layer]["forward"] > 0
    assert after["per_module"][layer]["grad_weight"] == 0
    assert before["total"] - after["total"] == removed
    for other in before["per_module"]:
        if other != layer:
            assert after["per_module"][other] == before["per_module"][other], other
    assert _phases(after) == _phases(fl.analytic_step_flops(model, _ce, batch))


@pytest.mark.parametrize("name,frozen,boundary", [
    ("mlp", ["0", "2"], "4"),
    ("cnn", ["0"], "2"),
    ("encoder", ["embed", "blocks.0"], "blocks.1.attn"),
])
def test_freezing_everything_below_removes_their_dw_and_the_boundary_dx(name, frozen, boundary):
    make, batch_fn = MODELS[name]
    model, batch = make(), batch_fn()
    before = fl.count_step_flops(model, _ce, batch)
    for n in frozen:
        model.get_submodule(n).requires_grad_(False)
    after = fl.count_step_flops(model, _ce, batch)
    below = [m for m in before["per_module"] if any(m == f or m.startswith(f + ".") for f in frozen)]
    for m in below:
        assert after["per_module"][m]["grad_input"] == 0 and after["per_module"][m]["grad_weight"] == 0
        assert after["per_module"][m]["forward"] == before["per_module"][m]["forward"]
    b_before, b_after = before["per_module"][boundary], after["per_module"][boundary]
    assert b_before["grad_input"] > 0
    assert b_after["grad_weight"] == b_before["grad_weight"]
    if name == "encoder":
        # The attention core still needs dQ/dK/dV for its own projections' dW: only the
        # input projections' dX (3 * 2*N*E*E) goes, N = 3*10 tokens, E = 16.
        assert b_before["grad_input"] - b_after["grad_input"] == 3 * 2 * 30 * 16 * 16
    else:
        assert b_after["grad_input"] == 0
    removed = sum(before["per_module"][m]["grad_input"] + before["per_module"][m]["grad_weight"]
                  for m in below) + b_before["grad_input"] - b_after["grad_input"]
    assert before["total"] - after["total"] == removed
    assert _phases(after) == _phases(fl.analytic_step_flops(model, _ce, batch))


def test_detach_stops_dx_below():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.low, self.high = nn.Linear(6, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.high(torch.relu(self.low(x)).detach())

    model = Detached()
    got = fl.count_step_flops(model, _ce, (torch.randn(5, 6), torch.randint(4, (5,))))
    assert got["per_module"]["low"] == {"forward": 2 * 5 * 6 * 8, "grad_input": 0,
                                        "grad_weight": 0, "recompute": 0, "total": 2 * 5 * 6 * 8}
    assert got["per_module"]["high"]["grad_input"] == 0
    assert got["per_module"]["high"]["grad_weight"] == 2 * 5 * 8 * 4


def test_matmul_attention_counted_and_attributed():
    model = nn.Sequential(MatmulAttention(12, 3), nn.Linear(12, 7))
    b, t = 2, 6
    batch = (torch.randn(b, t, 12), torch.randint(7, (b, t)))
    got = fl.count_step_flops(model, _ce, batch)
    assert got["total"] == _torch_count(model, _ce, batch)
    core = fl.attention_flops(b, 3, t, t, 4)
    qkv = fl.linear_flops(b * t, 12, 36, grad_input=False)
    out = fl.linear_flops(b * t, 12, 12)
    attn = got["per_module"]["0"]
    assert attn["forward"] == core["forward"]  # the projections are their own modules
    assert attn["grad_input"] == core["grad_input"]
    assert got["per_module"]["0.qkv"]["forward"] == qkv["forward"]
    assert got["per_module"]["0.qkv"]["grad_input"] == 0
    assert got["per_module"]["0.out"]["grad_weight"] == out["grad_weight"]
    assert got["per_kind"]["MatmulAttention"]["grad_weight"] == 0


def test_mha_sdpa_path_and_cpu_flash_kernel():
    # need_weights=False sends nn.MultiheadAttention through scaled_dot_product_attention.
    model, batch = TinyEncoder(need_weights=False), _tokens()
    got = fl.count_step_flops(model, _ce, batch)
    assert _phases(got) == _phases(fl.analytic_step_flops(model, _ce, batch))
    sdpa = SdpaAttention(12, 3)
    x = torch.randn(2, 6, 12)
    got = fl.count_step_flops(sdpa, lambda m, x: m(x).square().sum(), x)
    core = sdpa_flop_count((2, 3, 6, 4), (2, 3, 6, 4), (2, 3, 6, 4))
    assert got["per_module"][""]["forward"] == core == fl.attention_flops(2, 3, 6, 6, 4)["forward"]
    # The fused kernel recomputes the scores in its backward (torch's SDPA backward formula).
    scores = 2 * 2 * 3 * 6 * 6 * 4
    assert got["per_module"][""]["grad_input"] == 2 * core + scores
    assert fl.attention_flops(2, 3, 6, 6, 4, fused=True)["grad_input"] == 2 * core + scores


def test_work_outside_the_model_is_unattributed():
    model = nn.Linear(4, 6)
    w = torch.randn(6, 3)

    def loss_fn(m, x):
        return (m(x) @ w).sum()

    got = fl.count_step_flops(model, loss_fn, torch.randn(5, 4))
    assert got["per_module"][fl.UNATTRIBUTED]["forward"] == 2 * 5 * 6 * 3
    assert got["per_kind"][fl.UNATTRIBUTED]["forward"] == 2 * 5 * 6 * 3
    assert got["per_module"][""]["grad_weight"] == 2 * 5 * 4 * 6


def test_checkpoint_recompute_is_its_own_phase():
    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(checkpoint(self.inner, x, use_reentrant=True))

    model = Ckpt()
    batch = (torch.randn(4, 6, requires_grad=True), torch.randint(3, (4,)))
    got = fl.count_step_flops(model, _ce, batch)
    assert got["recompute"] == got["per_module"]["inner"]["recompute"] == 2 * 4 * 6 * 8
    assert got["per_module"]["inner"]["grad_weight"] == 2 * 4 * 6 * 8
    assert got["per_module"]["inner"]["grad_input"] == 2 * 4 * 6 * 8
    assert got["total"] == _torch_count(model, _ce, batch)


def test_extra_formulas_for_uncounted_ops():
    class MV(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):  # x (4,)
            return torch.mv(self.w, x)

    model, x = MV(), torch.randn(4, requires_grad=True)
    loss = lambda m, x: m(x).sum()  # noqa: E731
    assert fl.count_step_flops(model, loss, x)["total"] == 0  # torch has no formula for mv
    mv_flops = lambda w, v, out_val=None: 2 * w.shape[0] * w.shape[1]  # noqa: E731
    got = fl.count_step_flops(model, loss, x, extra_formulas={torch.ops.aten.mv: mv_flops})
    # forward mv; backward: grad_x = mv(wᵀ, g) reads the parameter -> grad_input (dW is an outer
    # product, uncounted).
    assert got["per_module"][""]["forward"] == 40 and got["per_module"][""]["grad_input"] == 40
    tagged = lambda w, v, out_val=None: {"grad_weight": 7}  # noqa: E731
    got = fl.count_step_flops(model, loss, x, extra_formulas={torch.ops.aten.mv: tagged})
    assert got["grad_weight"] == 14 and got["forward"] == 0


def test_meter_restores_hooks_and_accumulates():
    model, batch = _mlp(), _mlp_batch()
    with fl.FlopMeter(model) as meter:
        _ce(model, batch).backward()
        _ce(model, batch).backward()
    once = fl.count_step_flops(model, _ce, batch)
    assert meter.summary()["total"] == 2 * once["total"]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_linear_flops_head_fraction():
    full = fl.linear_flops(10, 8, 12)
    half = fl.linear_flops(10, 8, 12, weight_grad_fraction=0.5)
    assert half["grad_weight"] * 2 == full["grad_weight"] == full["forward"] == 2 * 10 * 8 * 12
    assert fl.linear_flops(10, 8, 12, grad_weight=False)["grad_weight"] == 0


def test_time_step_runs_real_steps_and_leaves_grads():
    model, batch = _mlp(), _mlp_batch()
    t = fl.time_step(model, _ce, batch, repeat=3, warmup=1)
    assert t["n"] == 3 and t["forward_ms"] > 0 and t["backward_ms"] > 0
    assert t["step_ms"] >= max(t["forward_ms"], t["backward_ms"])
    model2 = _mlp()
    model2.load_state_dict(model.state_dict())
    _ce(model2, batch).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), model2.parameters()))
