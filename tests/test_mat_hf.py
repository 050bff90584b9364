"""MAT trains Hugging Face models end to end (tiny configs, no weights downloaded).

HF attention blocks are converted by the Skipper (frozen heads' dW and, in detach mode, dX
through their projections are skipped; see docs/discovery.md); FFN blocks are skipped by
requires_grad.
Skipped without transformers. Runs on every available device (conftest.py: CUDA when present).
"""
import pytest
import torch

from mat_cuda import MAT, MATPolicy, ModularPolicy

transformers = pytest.importorskip("transformers")

VOCAB, N, T = 61, 4, 7


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_hf_model_trains_with_mat(make, device):
    torch.manual_seed(0)
    model = make().to(device)
    model.train()
    ids = torch.randint(0, VOCAB, (N, T)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Build the policy on the map MAT discovers (heads and FFN blocks).
    from mat_cuda import discover
    kinds = discover(model, ("head", "ffn")).module_map.kinds
    policy = MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.5),
                       warmup=2, probe_every=2)
    mat = MAT(model, opt, policy=policy)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        mat.step()
        mat.zero_grad()
        losses.append(float(loss.detach()))
    r = mat.report()
    assert losses[-1] < losses[0]
    assert r["lam"].shape[0] == 4 and (r["lam"] > 0).all()
    assert not r["mask"][-1].all()           # the policy froze modules after warm-up
    mat.close()
