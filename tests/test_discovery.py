"""Module discovery on torch and mat_cuda.models architectures (HF ones: test_discovery_hf.py)."""
import dataclasses
import re
import warnings

import pytest
import torch
from torch import nn

from discovery_checks import (check_coverage, check_head_slices, check_heads_drive_forward, check_summary,
                              owner)
from mat_cuda.discovery import AttentionSpec, Discovery, FFNSpec, discover
from mat_cuda.models import BertEncoderMLM, SwitchMoELM, VGGNet
from mat_cuda.modules import ModuleMap


def _kind_counts(disc):
    kinds = disc.module_map.kinds
    return {k: kinds.count(k) for k in set(kinds)}


def _discover_quietly(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised architecture must not warn
        return discover(model, **kw)


def _mlm_loss_fn(vocab, n=2, t=5):
    ids = torch.randint(0, vocab, (n, t))
    return lambda model: (model(ids) * torch.randn(n, t, vocab, generator=torch.Generator().manual_seed(1))).sum()


def test_contract_fields():
    names = {f.name for f in dataclasses.fields(AttentionSpec)}
    assert {"path", "block", "num_heads", "head_dim", "q", "k", "v", "qkv", "o", "head_modules", "style"} <= names
    assert {"path", "block", "linears", "module"} <= {f.name for f in dataclasses.fields(FFNSpec)}
    assert {"module_map", "attentions", "ffns", "others", "shared"} <= {f.name for f in dataclasses.fields(Discovery)}


@pytest.mark.parametrize("qkv", ["separate", "packed"])
def test_bert_encoder(qkv):
    layers, heads, hidden = 3, 4, 24
    model = BertEncoderMLM(37, hidden=hidden, layers=layers, heads=heads, ffn=40, max_len=16, qkv=qkv)
    disc = _discover_quietly(model)
    assert _kind_counts(disc) == {"head": layers * heads, "ffn": layers, "embedding": 2}
    assert [a.path for a in disc.attentions] == [f"layers.{i}.attn" for i in range(layers)]
    for i, spec in enumerate(disc.attentions):
        attn = model.layers[i].attn
        assert spec.block is attn and spec.style == "mat_bert" and spec.o is attn.o
        assert (spec.num_heads, spec.head_dim) == (heads, hidden // heads)
        if qkv == "separate":
            assert (spec.q, spec.k, spec.v, spec.qkv) == (attn.q, attn.k, attn.v, None)
        else:
            assert (spec.q, spec.k, spec.v, spec.qkv) == (None, None, None, attn.qkv)
        check_head_slices(disc.module_map, spec)
        assert [disc.module_map.names[m] for m in spec.head_modules] == [f"layers.{i}.attn.head{h}" for h in range(heads)]
    for i, f in enumerate(disc.ffns):
        ffn = model.layers[i].ffn
        assert (f.path, f.block, f.linears, f.kind) == (f"layers.{i}.ffn", ffn, [ffn.fc1, ffn.fc2], "ffn")
        for p in ffn.parameters():
            assert disc.module_map.layout(p).module == f.module
    assert set(disc.others) == {"embeddings.tokens", "embeddings.positions"}
    assert "mlm_head.decoder.weight" in disc.shared and "layers.0.attn.o.bias" in disc.shared
    check_coverage(model, disc)
    check_summary(disc)
    check_heads_drive_forward(model, disc.module_map, disc.attentions[1], _mlm_loss_fn(37))


def test_packed_qkv_rows_of_each_block():
    model = BertEncoderMLM(11, hidden=12, layers=1, heads=3, ffn=8, max_len=8, qkv="packed")
    disc = discover(model)
    own = owner(disc.module_map, model.layers[0].attn.qkv.weight)  # (36, 12)
    head = disc.attentions[0].head_modules
    for h in range(3):
        for block in range(3):  # Q, K, V
            assert (own[block * 12 + h * 4: block * 12 + (h + 1) * 4] == head[h]).all()


def test_switch_moe_experts():
    layers, experts = 2, 3
    model = SwitchMoELM(29, hidden=16, layers=layers, heads=2, num_experts=experts, expert_ffn=24, max_len=8)
    disc = _discover_quietly(model)
    assert _kind_counts(disc) == {"head": layers * 2, "expert": layers * experts, "embedding": 2}
    assert [f.path for f in disc.ffns] == [f"layers.{i}.moe.experts.{e}" for i in range(layers) for e in range(experts)]
    for f in disc.ffns:
        assert f.kind == "expert" and disc.module_map.kinds[f.module] == "expert"
        assert f.linears == [f.block.fc1, f.block.fc2]
        assert {disc.module_map.layout(p).module for p in f.block.parameters()} == {f.module}
    assert "layers.0.moe.router.weight" in disc.shared
    check_coverage(model, disc)
    check_summary(disc)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_convs(batch_norm):
    model = VGGNet(in_channels=3, num_classes=5, widths=(4, 6), image_size=8, batch_norm=batch_norm,
                   convs_per_stage=2, fc_hidden=7)
    disc = _discover_quietly(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert _kind_counts(disc) == {"conv": len(convs)}
    assert list(disc.others) == convs
    for path in convs:
        conv = model.get_submodule(path)
        assert {disc.module_map.layout(p).module for p in conv.parameters()} == {disc.others[path]}
    assert {"classifier.fc1.weight", "classifier.fc2.bias"} <= set(disc.shared)  # shapes do not chain: no FFN
    check_coverage(model, disc)
    check_summary(disc)


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layer(batch_first):
    d, heads, layers = 16, 4, 2
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, 24, dropout=0.0, batch_first=batch_first),
                                  layers, enable_nested_tensor=False)
    disc = _discover_quietly(model)
    assert _kind_counts(disc) == {"head": layers * heads, "ffn": layers}
    for i, spec in enumerate(disc.attentions):
        layer = model.layers[i]
        assert spec.style == "torch_mha" and spec.block is layer.self_attn and spec.o is layer.self_attn.out_proj
        assert (spec.q, spec.k, spec.v, spec.qkv) == (None, None, None, None)
        assert set(spec.params) == {"in_proj_weight", "in_proj_bias", "o.weight", "o.bias"}
        check_head_slices(disc.module_map, spec)
    assert [(f.path, f.linears) for f in disc.ffns] == [(f"layers.{i}", [model.layers[i].linear1, model.layers[i].linear2])
                                                      for i in range(layers)]
    assert disc.module_map.names[disc.ffns[0].module] == "layers.0.ffn"
    check_coverage(model, disc)
    check_summary(disc)
    x = torch.randn(3, 5, d)
    check_heads_drive_forward(model, disc.module_map, disc.attentions[0], lambda m: (m(x) * x).sum())


def test_mha_separate_kdim_vdim():
    mha = nn.MultiheadAttention(12, 3, kdim=5, vdim=7, batch_first=True)
    disc = _discover_quietly(mha)
    assert _kind_counts(disc) == {"head": 3}
    spec = disc.attentions[0]
    assert spec.path == "" and disc.module_map.names == ["head0", "head1", "head2"]
    assert set(spec.params) == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "o.weight", "o.bias"}
    check_head_slices(disc.module_map, spec)
    check_coverage(mha, disc)
    q, k, v = torch.randn(2, 4, 12), torch.randn(2, 6, 5), torch.randn(2, 6, 7)
    check_heads_drive_forward(mha, disc.module_map, spec, lambda m: (m(q, k, v)[0] * q).sum())


def test_unknown_architecture_falls_back_to_leaf_layers():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3), nn.LSTM(3, 5))
    with pytest.warns(UserWarning, match=r"found no attention heads.*Sequential.*'0', '3', '4'"):
        disc = discover(model)
    assert disc.module_map.names == ["0", "3", "4"] and _kind_counts(disc) == {"layer": 3}
    assert disc.shared == ["2.weight", "2.bias"]  # norms stay shared
    assert {n for n, p in model[4].named_parameters()} and all(
        disc.module_map.layout(p).module == 2 for p in model[4].parameters())
    check_coverage(model, disc)
    check_summary(disc)


class _GroupedKVAttention(nn.Module):
    """An attention block the patterns cannot split: K/V narrower than Q (grouped heads)."""

    def __init__(self, d=8, heads=4):
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d // 2), nn.Linear(d, d // 2), nn.Linear(d, d)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _GroupedKVAttention()
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)


def test_unsplit_attention_block_warns_and_uses_leaf_layers():
    model = nn.ModuleDict({"blocks": nn.ModuleList([_Block(), _Block()])})
    with pytest.warns(UserWarning, match=r"could not split 'blocks\.0\.attn' \(_GroupedKVAttention\), "
                                         r"'blocks\.1\.attn' .*'blocks\.0\.attn\.q', 'blocks\.0\.attn\.k'"):
        disc = discover(model)
    assert disc.unsplit == ["blocks.0.attn", "blocks.1.attn"]
    assert _kind_counts(disc) == {"ffn": 2, "layer": 8}
    assert "not split (one module per leaf layer): blocks.0.attn, blocks.1.attn" in disc.summary()
    check_coverage(model, disc)
    check_summary(disc)


def test_kinds_filter_and_layer_kind():
    model = BertEncoderMLM(23, hidden=8, layers=2, heads=2, ffn=12, max_len=8)
    only_ffn = _discover_quietly(model, kinds=("ffn",))
    assert _kind_counts(only_ffn) == {"ffn": 2}
    assert "layers.0.attn.q.weight" in only_ffn.shared and only_ffn.attentions == []
    check_coverage(model, only_ffn)
    with_layers = _discover_quietly(model, kinds=("head", "ffn", "embedding", "layer"))
    assert _kind_counts(with_layers) == {"head": 4, "ffn": 2, "embedding": 2, "layer": 2}
    assert {with_layers.module_map.names[m] for m in with_layers.module_map.modules_of_kind("layer")} == {
        "mlm_head.transform", "mlm_head.decoder"}
    check_coverage(model, with_layers)
    with pytest.raises(ValueError, match="unknown module kind.*'heads'"):
        discover(model, kinds=("heads",))


def test_tied_weights_are_left_shared():
    model = BertEncoderMLM(23, hidden=8, layers=1, heads=2, ffn=12, max_len=8)
    model.mlm_head.decoder.weight = model.embeddings.tokens.weight  # tie the decoder to the embedding
    disc = _discover_quietly(model)
    assert disc.tied == [["embeddings.tokens.weight", "mlm_head.decoder.weight"]]
    assert disc.module_map.layout(model.embeddings.tokens.weight) is None
    assert "embeddings.tokens.weight" in disc.shared and list(disc.others) == ["embeddings.positions"]
    assert "tied (left shared): embeddings.tokens.weight = mlm_head.decoder.weight" in disc.summary()
    check_coverage(model, disc)


def test_frozen_parameters_are_left_out():
    model = BertEncoderMLM(23, hidden=8, layers=1, heads=2, ffn=12, max_len=8)
    model.embeddings.positions.weight.requires_grad_(False)
    model.layers[0].attn.q.bias.requires_grad_(False)
    disc = _discover_quietly(model)
    assert disc.frozen == ["embeddings.positions.weight", "layers.0.attn.q.bias"]
    assert "embeddings.positions" not in disc.others and "embeddings.positions.weight" not in disc.shared
    assert disc.module_map.layout(model.layers[0].attn.q.bias) is None
    assert _kind_counts(disc)["head"] == 2
    check_coverage(model, disc)
    assert "frozen (requires_grad=False, left out): 2 tensors" in disc.summary()


def test_wrapped_models_are_unwrapped(tmp_path):
    model = BertEncoderMLM(23, hidden=8, layers=1, heads=2, ffn=12, max_len=8)
    plain = discover(model)
    wrapped = [torch.compile(model), nn.DataParallel(model), torch.compile(nn.DataParallel(model))]
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped.append(nn.parallel.DistributedDataParallel(model))
        for w in wrapped:
            disc = discover(w)
            assert disc.model is model and disc.module_map.names == plain.module_map.names
            assert disc.shared == plain.shared
            for p in model.parameters():
                assert disc.module_map.layout(p) == plain.module_map.layout(p)
    finally:
        dist.destroy_process_group()


def test_from_module_map():
    model = VGGNet(widths=(4,), image_size=4, fc_hidden=5)
    mm = ModuleMap.per_parameter(model)
    disc = Discovery.from_module_map(model, mm)
    assert disc.shared == [] and disc.shared_numel == 0
    assert sum(disc.module_numel) == sum(p.numel() for p in model.parameters())
    check_coverage(model, disc)
    check_summary(disc)
    partial = ModuleMap()
    w = model.classifier["fc1"].weight
    partial.assign_col_groups(w, w.shape[1] // 2, [partial.add_module("left"), -1], name="fc1.weight")
    disc = Discovery.from_module_map(model, partial)
    assert disc.module_numel == [w.numel() // 2]
    check_coverage(model, disc)
    foreign = ModuleMap()
    foreign.assign_whole(torch.zeros(3, requires_grad=True), foreign.add_module("x"), name="stray")
    with pytest.raises(ValueError, match="stray"):
        Discovery.from_module_map(model, foreign)


def test_verbose_prints_summary(capsys):
    model = BertEncoderMLM(23, hidden=8, layers=1, heads=2, ffn=12, max_len=8)
    disc = discover(model, verbose=True)
    assert capsys.readouterr().out.strip() == disc.summary()
    assert re.match(r"MAT modules of BertEncoderMLM: 5 modules", disc.summary())


def test_kernel_tables_build_from_discovered_map():
    model = BertEncoderMLM(23, hidden=8, layers=1, heads=2, ffn=12, max_len=8, qkv="packed")
    disc = discover(model)
    params = list(model.parameters())
    layout_table, group_table = disc.module_map.kernel_tables(params, "cpu")
    assert layout_table.shape == (len(params), 4)
    assert int(group_table.max()) <= disc.module_map.num_modules


def test_resolve_modules():
    from mat_cuda.discovery import resolve_modules
    model = BertEncoderMLM(23, hidden=8, layers=1, heads=2, ffn=12, max_len=8)
    auto = resolve_modules(model, "auto", kinds=("ffn",))
    assert auto.module_map.kinds == ["ffn"]
    mm = ModuleMap.per_parameter(model)
    assert resolve_modules(model, mm).module_map is mm
    with pytest.raises(TypeError, match="'auto' or a ModuleMap"):
        resolve_modules(model, "heads")


def test_summary_of_a_hand_built_discovery_counts_from_the_map():
    model = BertEncoderMLM(23, hidden=8, layers=1, heads=2, ffn=12, max_len=8)
    disc = discover(model)
    bare = Discovery(disc.module_map, disc.attentions, disc.ffns, disc.others, disc.shared,
                     shared_numel=disc.shared_numel, model_name="BertEncoderMLM")
    assert bare.summary() == disc.summary()


def test_single_kind_string_and_root_level_layers():
    conv = nn.Conv2d(2, 3, 3)
    disc = _discover_quietly(conv, kinds="conv")
    assert disc.module_map.names == ["Conv2d"] and disc.others == {"": 0}
    check_coverage(conv, disc)


def test_nested_unsplit_blocks_are_named_once():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.w = 2, nn.Linear(4, 4)

    class OuterAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.scale = Inner(), nn.Parameter(torch.ones(4))

    model = nn.Sequential(OuterAttention(), nn.Conv1d(2, 2, 1))
    with pytest.warns(UserWarning, match=r"could not split '0' \(OuterAttention\) into heads.*: '0', '0.inner.w'$"):
        disc = discover(model)
    assert disc.unsplit == ["0"] and _kind_counts(disc) == {"conv": 1, "layer": 2}
    check_coverage(model, disc)
