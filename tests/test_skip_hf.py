"""Compute skipping on Hugging Face attention (styles hf_bert, hf_vit, hf_gpt2): tiny configs only.

Run with transformers importable (e.g. PYTHONPATH=/tmp/hfsite); skipped otherwise.
Semantics checked (see mat_cuda/nn/attention.py): the forward is unchanged; frozen heads' Q/K/V
rows (GPT-2: c_attn columns) and W_O columns (GPT-2: c_proj rows) get no gradient; ``exact``:
every other gradient and dX equal the unconverted model's; ``detach``: they equal the
unconverted model's with the frozen heads' attention context detached at W_O's input and frozen
FFN blocks' inputs detached, and HF's attention function runs with grad on the active heads only
(frozen heads: under no_grad).
"""
import copy
import importlib
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from mat_cuda.discovery import discover  # noqa: E402
from mat_cuda.nn import Skipper, convert_attention  # noqa: E402
from mat_cuda.nn import attention as attention_module  # noqa: E402
from mat_cuda.nn.attention import ROUTE_NAME  # noqa: E402

from helpers import assert_close_rel  # noqa: E402

ARCHS = ["bert", "roberta", "vit", "gpt2"]
IMPLS = ["eager", "sdpa"]
STYLE = {"bert": "hf_bert", "roberta": "hf_bert", "vit": "hf_vit", "gpt2": "hf_gpt2"}
D, HEADS, DH, N, T = 32, 4, 8, 2, 7


def _model(arch, impl, dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    t = transformers
    drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    common = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "bert":
            m = t.BertModel(t.BertConfig(vocab_size=99, attn_implementation=impl, **common, **drop))
        elif arch == "roberta":
            m = t.RobertaModel(t.RobertaConfig(vocab_size=99, attn_implementation=impl, **common, **drop))
        elif arch == "vit":
            m = t.ViTModel(t.ViTConfig(image_size=8, patch_size=4, attn_implementation=impl, **common, **drop))
        else:
            m = t.GPT2Model(t.GPT2Config(vocab_size=99, n_embd=D, n_layer=2, n_head=HEADS, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0, attn_implementation=impl))
    assert m.config._attn_implementation == impl
    return m.to(dtype=dtype, device=device)


def _input(arch, dtype=torch.float64, device="cpu"):
    """A leaf input whose gradient is the model's dX: embeddings, or ViT's pixels."""
    g = torch.Generator().manual_seed(1)
    shape = (N, 3, 8, 8) if arch == "vit" else (N, T, D)
    return torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_()


def _run(arch, model, x, **kwargs):
    out = model(pixel_values=x, **kwargs) if arch == "vit" else model(inputs_embeds=x, **kwargs)
    return out.last_hidden_state


def _loss(y):
    g = torch.Generator().manual_seed(2)
    return (y * torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)).sum()


def _grads(model):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _mask(found, frozen_heads, frozen_ffns=()):
    """frozen_heads: {layer: [head, ...]}; frozen_ffns: layer indices."""
    mask = torch.ones(found.module_map.num_modules, dtype=torch.bool)
    for layer, heads in frozen_heads.items():
        for h in heads:
            mask[found.attentions[layer].head_modules[h]] = False
    for layer in frozen_ffns:
        mask[found.ffns[layer].module] = False
    return mask


FROZEN = {0: [1, 2], 1: [0, 1, 2, 3]}  # one layer partly, one layer wholly frozen


def _head_slices(spec, frozen):
    """(param, index of its frozen-head slice, index of its active slice) for Q/K/V and W_O weights."""
    rows = torch.zeros(HEADS, dtype=torch.bool, device=spec.o.weight.device)
    rows[list(frozen)] = True
    rows = rows.repeat_interleave(DH)  # (H·d_h,): True = frozen head
    out = []
    if spec.qkv is not None:  # GPT-2 c_attn: weight (d, 3·H·d_h), columns [Q; K; V]
        cols = rows.repeat(3)
        out += [(spec.qkv.weight, (slice(None), cols), (slice(None), ~cols)),
                (spec.qkv.bias, cols, ~cols)]
        out.append((spec.o.weight, rows, ~rows))  # c_proj: weight (H·d_h, d), head = rows
    else:
        for lin in (spec.q, spec.k, spec.v):
            out += [(lin.weight, rows, ~rows), (lin.bias, rows, ~rows)]
        out.append((spec.o.weight, (slice(None), rows), (slice(None), ~rows)))
    return out


def _check(model, ref, found, frozen, frozen_ffns, x, x_ref):
    names = {id(p): n for n, p in model.named_parameters()}
    g_ref = _grads(ref)
    assert_close_rel(x.grad, x_ref.grad, msg="dX")
    checked = set()
    for i, spec in enumerate(found.attentions):
        fz = frozen.get(i, [])
        for p, f_idx, a_idx in _head_slices(spec, fz):
            n = names[id(p)]
            checked.add(n)
            if len(fz) == HEADS:
                assert p.grad is None, n  # no active head: nothing computed or written
                continue
            assert torch.all(p.grad[f_idx] == 0), n
            # atol: the key bias's true gradient is 0 (softmax is shift invariant): roundoff only.
            torch.testing.assert_close(p.grad[a_idx], g_ref[n][a_idx], rtol=1e-9, atol=1e-14, msg=n)
    ffn_params = {names[id(p)] for i in frozen_ffns for lin in found.ffns[i].linears for p in lin.parameters()}
    for n, p in model.named_parameters():
        if n in checked:
            continue
        if n in ffn_params:
            assert p.grad is None and not p.requires_grad, n
        elif g_ref[n] is None:  # unused by this loss (e.g. BERT's pooler)
            assert p.grad is None, n
        elif p.grad is None:  # detach: reaches the loss only through frozen heads (a pre-LN
            assert torch.all(g_ref[n] == 0), n  # feeding a wholly frozen layer): not computed
        else:
            # float64 grads through attention (~10^3-term sums): ≲ 10^3·u64 → 1e-9
            torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-9, atol=1e-14, msg=n)


def _detach_hooks(ref, found, model, frozen, frozen_ffns):
    """The detach reference on the unconverted copy: frozen heads' context detached at W_O's
    input, frozen FFN blocks' input projections fed detached inputs."""
    paths = {id(m): n for n, m in model.named_modules()}

    def ctx_hook(rows):
        def hook(_mod, args):
            c = args[0]
            return (torch.where(rows.to(c.device), c.detach(), c),)
        return hook

    for i, spec in enumerate(found.attentions):
        rows = torch.zeros(HEADS, dtype=torch.bool)
        rows[list(frozen.get(i, []))] = True
        ref.get_submodule(paths[id(spec.o)]).register_forward_pre_hook(ctx_hook(rows.repeat_interleave(DH)))
    for i in frozen_ffns:
        for lin in found.ffns[i].linears[:-1]:
            ref.get_submodule(paths[id(lin)]).register_forward_pre_hook(
                lambda _m, args: tuple(a.detach() for a in args))


@pytest.mark.parametrize("arch", ARCHS)
def test_discovery_styles_are_all_converted(arch):
    model = _model(arch, "eager")
    found = discover(model)
    assert [a.style for a in found.attentions] == [STYLE[arch]] * 2
    sk = Skipper.from_discovery(found)
    assert sk.unconverted == [] and len(sk.attentions) == 2
    assert not set(sk.unskipped_modules) & set(found.module_map.modules_of_kind("head"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["detach", "exact"])
def test_forward_unchanged(arch, impl, mode, device):
    model = _model(arch, impl, torch.float32, device)
    ref = copy.deepcopy(model)
    found = discover(model)
    sk = Skipper.from_discovery(found, mode=mode)
    sk.set_mask(_mask(found, FROZEN, [1]).to(device))
    x = _input(arch, torch.float32, device)
    with torch.no_grad():
        # float32 on both sides, other GEMM split: REL_TOL[float32] (16 u32 ≈ 1e-6)
        assert_close_rel(_run(arch, model, x), _run(arch, ref, x), tol=1e-6)
    sk.restore()
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_all_active_and_probe_gradients_equal_unconverted(arch, impl):
    model = _model(arch, impl)
    ref = copy.deepcopy(model)
    found = discover(model)
    sk = Skipper.from_discovery(found, mode="detach")
    x, x_ref = _input(arch), _input(arch)
    sk.set_mask(torch.ones(found.module_map.num_modules, dtype=torch.bool))
    _loss(_run(arch, model, x)).backward()
    _loss(_run(arch, ref, x_ref)).backward()
    g, g_ref = _grads(model), _grads(ref)
    assert all(_same(g[n], g_ref[n]) for n in g_ref)
    sk.set_mask(_mask(found, FROZEN, [0]))
    model.zero_grad(set_to_none=True)
    with sk.probe_mode():  # a probe step: every module measured, as unconverted
        _loss(_run(arch, model, x)).backward()
    g = _grads(model)
    assert all(_same(g[n], g_ref[n]) for n in g_ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["detach", "exact"])
def test_grads_equal_reference(arch, impl, mode, device):
    """detach: the gradients (dX included) equal the unconverted model's with the frozen heads'
    attention context detached at W_O's input and the frozen FFN blocks' inputs detached;
    exact: the unconverted model's own. (float64: on CUDA too, the tolerances hold.)"""
    model = _model(arch, impl, device=device)
    ref = copy.deepcopy(model)
    found = discover(model)
    sk = Skipper.from_discovery(found, mode=mode)
    sk.set_mask(_mask(found, FROZEN, [1]).to(device))
    if mode == "detach":
        _detach_hooks(ref, found, model, FROZEN, [1])
    x, x_ref = _input(arch, device=device), _input(arch, device=device)
    _loss(_run(arch, model, x)).backward()
    _loss(_run(arch, ref, x_ref)).backward()
    _check(model, ref, found, FROZEN, [1], x, x_ref)


def _backward_flops(arch, model, x) -> int:
    y = _run(arch, model, x)
    loss = _loss(y)
    with FlopCounterMode(display=False) as fc:
        loss.backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["detach", "exact"])
def test_backward_flops_fall_by_the_frozen_heads_share(arch, mode):
    """Each head frozen in layer 0 saves exactly its dW in Q, K, V and W_O and, in detach mode,
    its share of those projections' dX and its attention core's backward (QKᵀ and PV: four
    matmuls); in exact mode the core's backward runs for every head. Eager attention only: the
    flop counter does not count CPU sdpa's backward (sdpa is covered by the call-spy test)."""
    model = _model(arch, "eager", torch.float32)
    found = discover(model)
    sk = Skipper.from_discovery(found, mode=mode)
    x = _input(arch, torch.float32)
    seq = 5 if arch == "vit" else T  # ViT: 4 patches + the class token
    tokens = N * seq
    flops = []
    for n_frozen in (1, 2, 3, 4):
        sk.set_mask(_mask(found, {0: list(range(n_frozen))}))
        model.zero_grad(set_to_none=True)
        flops.append(_backward_flops(arch, model, x))
    per_head_dw = 4 * 2 * tokens * DH * D
    per_head_dx = 4 * 2 * tokens * DH * D
    per_head_core = 4 * 2 * N * seq * seq * DH  # dQ, dK (of QKᵀ), dP, dV (of PV)
    expected = per_head_dw + (per_head_dx + per_head_core if mode == "detach" else 0)
    # 3 -> 4 frozen: the last head; the Q/K/V dX rows are then empty (no GEMM) as well.
    assert [a - b for a, b in zip(flops[:2], flops[1:3])] == [expected, expected], flops
    assert flops[2] > flops[3]


def test_convert_errors_and_restore():
    model = _model("gpt2", "eager")
    attn = model.h[0].attn
    spec = dict(num_heads=HEADS, head_dim=DH, head_modules=[0, 1, 2, 3], style="hf_gpt2")
    with pytest.raises(ValueError, match="qkv"):
        convert_attention(attn, o=attn.c_proj, **spec)
    with pytest.raises(ValueError, match="outputs"):
        convert_attention(attn, o=attn.c_proj, qkv=attn.c_proj, **spec)
    assert all("forward" not in vars(m) for m in model.modules())
    conv = convert_attention(attn, o=attn.c_proj, qkv=attn.c_attn, **spec)
    with pytest.raises(ValueError, match="already converted"):
        convert_attention(attn, o=attn.c_proj, qkv=attn.c_attn, **spec)
    conv.restore()
    assert all("forward" not in vars(m) for m in model.modules())


def _spy_attention(monkeypatch, arch, impl, calls):
    """Record each attention-core call of ``arch``'s models under ``impl`` in ``calls``:
    (heads, grad enabled, query requires grad); the call itself is unchanged."""
    if impl == "eager":
        code = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        where, name = code, "eager_attention_forward"
        original = code.eager_attention_forward
    else:
        where, name = transformers.AttentionInterface._global_mapping, impl
        original = where[impl]

    def spy(module, query, *args, **kwargs):
        calls.append((query.shape[1], torch.is_grad_enabled(), query.requires_grad))
        return original(module, query, *args, **kwargs)

    if impl == "eager":
        monkeypatch.setattr(where, name, spy)
    else:
        monkeypatch.setitem(where, name, spy)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["detach", "exact"])
def test_frozen_heads_attention_core_runs_without_grad(arch, impl, mode, monkeypatch):
    """detach: HF's attention function runs with grad on the active heads only and on the frozen
    heads under no_grad (a wholly frozen layer: one no_grad call); exact: one call on every head
    with grad, as unconverted."""
    calls = []
    _spy_attention(monkeypatch, arch, impl, calls)
    model = _model(arch, impl)
    found = discover(model)
    sk = Skipper.from_discovery(found, mode=mode)
    sk.set_mask(_mask(found, FROZEN))
    _loss(_run(arch, model, _input(arch))).backward()
    if mode == "exact":
        assert calls == [(HEADS, True, True)] * 2
    else:
        assert calls == [(2, True, True), (2, False, False), (HEADS, False, False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_weights_returned_in_head_order(arch):
    """Eager attention returns the weights (n, H, T, S): assembled in head order, the active
    heads' with grad."""
    model = _model(arch, "eager")
    ref = copy.deepcopy(model)
    found = discover(model)
    Skipper.from_discovery(found, mode="detach").set_mask(_mask(found, FROZEN))
    x = _input(arch)
    kw = dict(pixel_values=x) if arch == "vit" else dict(inputs_embeds=x)
    att = model(**kw, output_attentions=True).attentions
    att_ref = ref(**kw, output_attentions=True).attentions
    assert len(att) == len(att_ref) == 2
    for a, b in zip(att, att_ref):
        assert a.shape == b.shape and a.shape[1] == HEADS
        # float64, same ops in another order: ≈16 u64 relative, no absolute slack
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert att[0].requires_grad and not att[1].requires_grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("mode", ["detach", "exact"])
def test_padding_mask(arch, impl, mode):
    """A padding mask (HF expands it to (n, 1, T, T) or lets sdpa take it) is shared by the heads."""
    model = _model(arch, impl)
    ref = copy.deepcopy(model)
    found = discover(model)
    sk = Skipper.from_discovery(found, mode=mode)
    sk.set_mask(_mask(found, FROZEN, [1]))
    if mode == "detach":
        _detach_hooks(ref, found, model, FROZEN, [1])
    pad = torch.ones(N, T, dtype=torch.long)
    pad[1, -3:] = 0
    x, x_ref = _input(arch), _input(arch)
    _loss(_run(arch, model, x, attention_mask=pad)).backward()
    _loss(_run(arch, ref, x_ref, attention_mask=pad)).backward()
    _check(model, ref, found, FROZEN, [1], x, x_ref)


def test_per_head_mask_is_split_with_the_heads():
    """A mask with a head dimension (n, H, T, T) is split with the heads (BERT block, called
    directly: HF's eager attention adds whatever mask it is given)."""
    model = _model("bert", "eager")
    ref = copy.deepcopy(model)
    found = discover(model)
    Skipper.from_discovery(found, mode="detach").set_mask(_mask(found, {0: [1, 2]}))
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, T, D, generator=g, dtype=torch.float64)
    mask = torch.randn(N, HEADS, T, T, generator=g, dtype=torch.float64)  # distinct per head
    y = model.encoder.layer[0].attention(h, attention_mask=mask)[0]
    y_ref = ref.encoder.layer[0].attention(h, attention_mask=mask)[0]
    # float64, same ops in another order (≈16 u64); atol for entries that cancel to ~0
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["detach", "exact"])
def test_gpt2_reorder_and_upcast_attention(mode, monkeypatch):
    """GPT-2's own eager variant (reorder_and_upcast_attn: float32 scores) is the function split."""
    model = _model("gpt2", "eager", torch.float32)
    for layer in model.h:
        layer.attn.reorder_and_upcast_attn = True
    ref = copy.deepcopy(model)
    cls = type(model.h[0].attn)
    original = cls._upcast_and_reordered_attn
    calls = []

    def spy(self, query, *args):
        calls.append((query.shape[1], torch.is_grad_enabled()))
        return original(self, query, *args)

    monkeypatch.setattr(cls, "_upcast_and_reordered_attn", spy)
    found = discover(model)
    sk = Skipper.from_discovery(found, mode=mode)
    sk.set_mask(_mask(found, {0: [1, 2]}))
    if mode == "detach":
        _detach_hooks(ref, found, model, {0: [1, 2]}, [])
    x, x_ref = _input("gpt2", torch.float32), _input("gpt2", torch.float32)
    y = _run("gpt2", model, x)
    expected = [(2, True), (2, False), (HEADS, True)] if mode == "detach" else [(HEADS, True)] * 2
    assert calls == expected
    y_ref = _run("gpt2", ref, x_ref)
    # float32 on both sides, other GEMM split: REL_TOL[float32] (16 u32 ≈ 1e-6)
    assert_close_rel(y, y_ref, tol=1e-6)
    _loss(y).backward()
    _loss(y_ref).backward()
    # float32 dX through softmax attention and several GEMMs: ~10^2 u32 → 1e-5
    assert_close_rel(x.grad, x_ref.grad, tol=1e-5, msg="dX")


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_is_per_block_and_restore_undoes_it(arch, monkeypatch):
    """The shared config is never changed; a block with every head active, and another model on
    the same config, call HF's attention as unconverted; restore() removes every trace."""
    calls = []
    _spy_attention(monkeypatch, arch, "eager", calls)
    model = _model(arch, "eager")
    config = model.config
    other = type(model)(config).to(torch.float64)  # another model, same config object
    other.load_state_dict(model.state_dict())
    holders = [m for net in (model, other) for m in net.modules() if "config" in vars(m)]
    assert all(m.config is config for m in holders) and len(holders) > 2
    found = discover(model)
    routing_before = attention_module._routing_blocks
    sk = Skipper.from_discovery(found, mode="detach")
    sk.set_mask(_mask(found, {0: [1, 2]}))  # layer 1: every head active
    x = _input(arch)
    y = _run(arch, model, x)
    assert calls == [(2, True, True), (2, False, False), (HEADS, True, True)]
    assert ROUTE_NAME in transformers.AttentionInterface._global_mapping  # until restore()
    assert all(m.config is config for m in holders) and config._attn_implementation == "eager"
    calls.clear()
    # float64 both sides, same math in other GEMMs: REL_TOL[float64] (helpers.py)
    assert_close_rel(_run(arch, other, x), y, tol=1e-12)
    assert calls == [(HEADS, True, True)] * 2

    def failing(*args, **kwargs):
        raise RuntimeError("attention failed")

    monkeypatch.setattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"),
                        "eager_attention_forward", failing)
    with pytest.raises(RuntimeError, match="attention failed"):
        _run(arch, model, x)
    assert all(m.config is config for m in holders)
    monkeypatch.undo()
    sk.restore()
    # The route stays registered while converted blocks of other (unrestored) models exist.
    assert (ROUTE_NAME in transformers.AttentionInterface._global_mapping) == (
        attention_module._routing_blocks > 0)
    assert attention_module._routing_blocks == routing_before
    assert all("forward" not in vars(m) for m in model.modules())
    calls.clear()
    _spy_attention(monkeypatch, arch, "eager", calls)
    _run(arch, model, x)
    assert calls == [(HEADS, True, True)] * 2
