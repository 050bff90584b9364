"""Module discovery on Hugging Face models built from tiny configs (no weights downloaded).

transformers is an optional extra (`pip install mat_cuda[hf]`): these tests skip without it.
"""
import warnings

import pytest
import torch

from discovery_checks import (check_coverage, check_head_slices, check_heads_drive_forward, check_summary,
                              owner)
from mat_cuda.discovery import discover

transformers = pytest.importorskip("transformers")

LAYERS, HEADS, HIDDEN, FFN, VOCAB = 2, 4, 32, 37, 99


def _discover_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return discover(model)


def _kind_counts(disc):
    kinds = disc.module_map.kinds
    return {k: kinds.count(k) for k in set(kinds)}


def _lm_loss_fn(n=2, t=6):
    ids = torch.randint(0, VOCAB, (n, t))
    r = torch.randn(n, t, VOCAB)
    return lambda model: (model(input_ids=ids).logits * r).sum()


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bert_style_masked_lm(arch):
    if arch == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=16))
        base = model.bert
    else:
        model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=20))
        base = model.roberta
    model.eval()  # no dropout; gradients still flow
    disc = _discover_quietly(model)
    # word embeddings are tied to the MLM decoder: left shared, so 2 embedding modules, not 3
    assert _kind_counts(disc) == {"head": LAYERS * HEADS, "ffn": LAYERS, "embedding": 2}
    word = base.embeddings.word_embeddings.weight
    assert disc.module_map.layout(word) is None and any(len(g) >= 2 and g[0].endswith("word_embeddings.weight")
                                                         for g in disc.tied)
    for i, spec in enumerate(disc.attentions):
        layer = base.encoder.layer[i]
        sa = layer.attention.self
        assert spec.block is layer.attention and spec.style == "hf_bert"
        assert (spec.q, spec.k, spec.v, spec.qkv, spec.o) == (sa.query, sa.key, sa.value, None,
                                                              layer.attention.output.dense)
        assert (spec.num_heads, spec.head_dim) == (HEADS, HIDDEN // HEADS)
        check_head_slices(disc.module_map, spec)
        ffn = disc.ffns[i]
        assert ffn.block is layer and ffn.linears == [layer.intermediate.dense, layer.output.dense]
    check_coverage(model, disc)
    check_summary(disc)
    assert "tied (left shared)" in disc.summary()
    check_heads_drive_forward(model, disc.module_map, disc.attentions[0], _lm_loss_fn())


def test_gpt2_packed_conv1d():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=16,
        bos_token_id=0, eos_token_id=0)).eval()
    disc = _discover_quietly(model)
    assert _kind_counts(disc) == {"head": LAYERS * HEADS, "ffn": LAYERS, "embedding": 1}  # wte tied to lm_head
    assert disc.tied == [["transformer.wte.weight", "lm_head.weight"]]
    assert list(disc.others) == ["transformer.wpe"]
    dh = HIDDEN // HEADS
    for i, spec in enumerate(disc.attentions):
        attn = model.transformer.h[i].attn
        assert spec.style == "hf_gpt2" and spec.qkv is attn.c_attn and spec.o is attn.c_proj
        assert (spec.qkv_axis, spec.o_axis) == ("cols", "rows")
        check_head_slices(disc.module_map, spec)
        # c_attn.weight (d, 3d): head h owns columns h·d_h … (h+1)·d_h of each of the Q, K, V blocks
        own = owner(disc.module_map, attn.c_attn.weight)
        for h, m in enumerate(spec.head_modules):
            for block in range(3):
                assert (own[:, block * HIDDEN + h * dh: block * HIDDEN + (h + 1) * dh] == m).all()
            # c_proj.weight (d, d): its rows are input features, head h's are h·d_h … (h+1)·d_h
            assert (owner(disc.module_map, attn.c_proj.weight)[h * dh:(h + 1) * dh] == m).all()
        assert f"transformer.h.{i}.attn.c_proj.bias" in disc.shared
        mlp = model.transformer.h[i].mlp
        assert disc.ffns[i].path == f"transformer.h.{i}.mlp" and disc.ffns[i].linears == [mlp.c_fc, mlp.c_proj]
    check_coverage(model, disc)
    check_summary(disc)
    check_heads_drive_forward(model, disc.module_map, disc.attentions[1], _lm_loss_fn())


def test_vit_image_classification():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN,
                                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                                    num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    disc = _discover_quietly(model)
    assert _kind_counts(disc) == {"head": LAYERS * HEADS, "ffn": LAYERS, "conv": 1}
    assert [d.style for d in disc.attentions] == ["hf_vit"] * LAYERS
    patch = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert list(disc.others) == patch
    for spec in disc.attentions:
        check_head_slices(disc.module_map, spec)
    assert "classifier.weight" in disc.shared
    assert any(n.endswith("cls_token") for n in disc.shared)
    check_coverage(model, disc)
    check_summary(disc)
    pixels, r = torch.randn(2, 3, 8, 8), torch.randn(2, 3)
    check_heads_drive_forward(model, disc.module_map, disc.attentions[0],
                              lambda m: (m(pixel_values=pixels).logits * r).sum())
