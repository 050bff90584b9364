"""Reference models: shapes, training on tiny synthetic tasks, packed vs separate QKV,
determinism, and per-sample independence (MoE routing, no BatchNorm)."""
import pytest
import torch

from mat_cuda.models import BertEncoderMLM, SwitchMoELM, VGGNet, mlm_loss

VOCAB = 50


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: intra-op threads only add synchronisation, and on a shared, loaded
    # machine spinning threads make a 30-step run 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
SMALL = dict(hidden=32, layers=2, heads=4, max_len=16)


def bert(**kw):
    return BertEncoderMLM(VOCAB, ffn=64, **{**SMALL, **kw})


def moe(**kw):
    return SwitchMoELM(VOCAB, num_experts=4, expert_ffn=32, **{**SMALL, **kw})


def mlm_batch(n=8, t=12, device="cpu"):
    """Sequences counting up from a random start (learnable), 25% of positions masked with token 0."""
    start = torch.randint(1, VOCAB - t, (n, 1))
    ids = start + torch.arange(t)
    masked = torch.rand(n, t) < 0.25
    masked[:, 0] = True  # every sample predicts at least one token
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    return ids.masked_fill(masked, 0).to(device), labels.to(device)


def image_batch(n=16, classes=10, size=16, device="cpu"):
    """Images whose class sets the mean of one channel-position pattern, plus noise."""
    y = torch.arange(n) % classes
    patterns = torch.randn(classes, 3, size, size)
    x = patterns[y] + 0.5 * torch.randn(n, 3, size, size)
    return x.to(device), y.to(device)


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("make", [bert, moe], ids=["bert", "moe"])
@pytest.mark.parametrize("qkv", ["separate", "packed"])
def test_encoder_shapes(device, make, qkv):
    model = make(qkv=qkv).to(device)
    ids, labels = mlm_batch(3, 7, device)
    mask = torch.ones(3, 7, dtype=torch.bool, device=device)
    mask[1, 5:] = False
    logits = model(ids, mask)
    assert logits.shape == (3, 7, VOCAB) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert mlm_loss(logits, labels).dim() == 0
    assert mlm_loss(logits, labels, reduction="none").shape == (3, 7)
    layer = model.layers[0]
    names = ["q", "k", "v", "o"] if qkv == "separate" else ["qkv", "o"]
    assert all(isinstance(getattr(layer.attn, nm), torch.nn.Linear) for nm in names)
    if make is bert:
        assert layer.ffn.fc1.out_features == 64 and layer.ffn.fc2.in_features == 64
    else:
        assert layer.moe.router.out_features == 4
        assert layer.moe.experts[3].fc1.out_features == 32 and model.aux_loss.dim() == 0


@pytest.mark.parametrize("make", [bert, moe], ids=["bert", "moe"])
def test_predicted_positions_equal_full_logits(device, make):
    # The MLM head at the predicted positions only: the same logits and loss as the full head.
    model = make().to(device).double()
    ids, labels = mlm_batch(5, 11, device)
    predict = labels != -100
    full = model(ids)
    sparse = model(ids, predict=predict)
    assert sparse.shape == (int(predict.sum()), VOCAB)
    # float64 model: the same ops on a subset of rows, ~u64 per op; 1e-12 ≈ 10^4 u64.
    torch.testing.assert_close(sparse, full[predict], rtol=1e-12, atol=1e-12)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(mlm_loss(sparse, labels, reduction=reduction),
                                   mlm_loss(full, labels, reduction=reduction))
    g_sparse = torch.autograd.grad(mlm_loss(sparse, labels), model.layers[0].attn.q.weight)[0]
    g_full = torch.autograd.grad(mlm_loss(model(ids), labels), model.layers[0].attn.q.weight)[0]
    # float64 gradients through the whole model (sums of ~10^3 terms in another order): 1e-10.
    torch.testing.assert_close(g_sparse, g_full, rtol=1e-10, atol=1e-12)


def test_predicted_positions_reject_bad_input():
    model = bert()
    ids, labels = mlm_batch(2, 6)
    with pytest.raises(ValueError, match="predict must be a bool"):
        model(ids, predict=(labels != -100).long())
    with pytest.raises(ValueError, match="predict must be a bool"):
        model(ids, predict=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="predicted positions"):
        mlm_loss(torch.zeros(3, VOCAB), torch.full((2, 6), -100))


def test_encoder_rejects_bad_input():
    with pytest.raises(ValueError, match="max_len"):
        bert()(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="divisible"):
        bert(hidden=30)
    with pytest.raises(ValueError, match="qkv"):
        bert(qkv="fused")
    with pytest.raises(ValueError, match="disagree"):
        mlm_loss(torch.zeros(2, 3, VOCAB), torch.zeros(2, 4, dtype=torch.int64))


def test_padding_is_ignored(device):
    # Keys at padded positions get no attention: changing padded tokens leaves real outputs alone.
    model = bert().to(device)
    ids, _ = mlm_batch(2, 10, device)
    mask = torch.ones(2, 10, dtype=torch.bool, device=device)
    mask[:, 6:] = False
    other = ids.clone()
    other[:, 6:] = (other[:, 6:] + 7) % VOCAB
    torch.testing.assert_close(model(ids, mask)[:, :6], model(other, mask)[:, :6])


def test_vgg_shapes(device):
    model = VGGNet(widths=(8, 16), image_size=16, fc_hidden=32).to(device)
    x, _ = image_batch(5, size=16, device=device)
    assert model(x).shape == (5, 10)
    assert isinstance(model.classifier.fc1, torch.nn.Linear) and isinstance(model.stages[1][0], torch.nn.Conv2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in VGGNet(widths=(8,), image_size=8, batch_norm=True).modules())
    with pytest.raises(ValueError, match="divisible"):
        VGGNet(widths=(8, 16, 32), image_size=20)


# ---------------------------------------------------------------- training

def train(model, batch_loss, steps=30, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = batch_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["bert", "moe", "vgg"])
def test_loss_falls(name):
    if name == "vgg":
        model = VGGNet(widths=(8, 16), image_size=16, fc_hidden=32)
        x, y = image_batch(size=16)
        losses = train(model, lambda m: torch.nn.functional.cross_entropy(m(x), y))
    else:
        model = bert() if name == "bert" else moe()
        ids, labels = mlm_batch(16, 12)
        aux = 0.01 if name == "moe" else 0.0
        losses = train(model, lambda m: mlm_loss(m(ids), labels) + (aux * m.aux_loss if aux else 0.0))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # A fixed batch, 30 AdamW steps: a working model at least cuts its loss by 30% (a loose
    # sanity bound; a model whose gradients do not flow stays near its first loss).
    assert last < 0.7 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


# ---------------------------------------------------------------- equivalences

def test_packed_and_separate_qkv_agree(device):
    sep = bert(qkv="separate").double().to(device)
    packed = bert(qkv="packed").double().to(device)
    state = sep.state_dict()
    for i in range(len(sep.layers)):
        p = f"layers.{i}.attn."
        for part in ("weight", "bias"):
            state[p + "qkv." + part] = torch.cat([state.pop(p + x + "." + part) for x in "qkv"])
    packed.load_state_dict(state)
    ids, _ = mlm_batch(4, 9, device)
    mask = torch.ones(4, 9, dtype=torch.bool, device=device)
    mask[2, 4:] = False
    # float64: packed vs separate projections differ only in GEMM blocking (~d·u64 ≪ 1e-12).
    torch.testing.assert_close(packed(ids, mask), sep(ids, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["bert", "moe", "vgg"])
def test_deterministic_for_fixed_seed(device, name):
    def build_and_run():
        torch.manual_seed(1234)
        if name == "vgg":
            model = VGGNet(widths=(8, 16), image_size=16, fc_hidden=32).to(device)
            return model(image_batch(4, size=16, device=device)[0])
        model = (bert() if name == "bert" else moe()).to(device)
        return model(mlm_batch(4, 8, device)[0])

    assert torch.equal(build_and_run(), build_and_run())


# ---------------------------------------------------------------- per-sample independence

@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_samples_independent(device, capacity_factor):
    model = moe(capacity_factor=capacity_factor).to(device)
    ids, _ = mlm_batch(6, 12, device)
    out = model(ids)
    routing = model.layers[0].moe.last_routing.clone()
    if capacity_factor is not None:
        assert (routing == -1).any(), "capacity 1.0 should drop some tokens at this size"
    for trial in range(3):
        other = mlm_batch(6, 12, device)[0]
        other[2] = ids[2]  # sample 2 kept, all others replaced
        out2 = model(other)
        # float32: another batch changes only GEMM blocking for this row (~d·u32 ≈ 1e-6).
        torch.testing.assert_close(out2[2], out[2], rtol=1e-6, atol=1e-6)
        assert torch.equal(model.layers[0].moe.last_routing[2], routing[2])
    alone = model(ids[2:3])
    # float32, batch of 1 vs 6: GEMM blocking only, as above.
    torch.testing.assert_close(alone[0], out[2], rtol=1e-6, atol=1e-6)


def test_vgg_samples_independent(device):
    model = VGGNet(widths=(8, 16), image_size=16, fc_hidden=32).to(device)
    x, _ = image_batch(6, size=16, device=device)
    out = model(x)
    x2 = torch.randn_like(x)
    x2[4] = x[4]
    # float32 convolutions, another batch: blocking-order rounding only (~d·u32).
    torch.testing.assert_close(model(x2)[4], out[4], rtol=1e-6, atol=1e-6)


def test_moe_aux_loss_is_balanced_minimum():
    # With a router that outputs zeros, every expert has P_e = 1/E and all tokens go to expert 0
    # (argmax ties), so the loss is E · 1 · 1/E = 1; perfect balance would also give 1, the minimum.
    model = moe()
    for layer in model.layers:
        torch.nn.init.zeros_(layer.moe.router.weight)
    model(mlm_batch(2, 8)[0])
    torch.testing.assert_close(model.aux_loss, torch.tensor(float(len(model.layers))))
