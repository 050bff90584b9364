"""Train a small BERT (masked LM) or GPT-2 (causal LM) with the Hugging Face Trainer and MAT.

    python examples/hf_trainer.py                       # BERT, 300 steps on the embedded corpus
    python examples/hf_trainer.py --model gpt2 --max-steps 500
    python examples/hf_trainer.py --tiny                # a few seconds: what the tests run
    python examples/hf_trainer.py --resume              # continue from the last checkpoint

The model is built from a config (nothing is downloaded); the text is mat_cuda's embedded corpus,
byte-tokenized. MAT is the one line ``callbacks=[MATCallback(...)]``; ``MATTrainer`` instead of
``Trainer`` only so that MAT's metrics also reach ``report_to`` (TensorBoard, W&B, ...).
"""
import argparse

import torch
import transformers

from mat_cuda.data import ByteTokenizer, load_corpus, mask_tokens
from mat_cuda.integrations.hf import MATCallback, MATTrainer


def dataset(kind: str, seq_len: int, limit: int):
    """Fixed-length sequences of the byte-tokenized embedded corpus (BERT: statically masked)."""
    tok = ByteTokenizer()
    ids = tok.encode_to_tensor(load_corpus()["train"])
    n = min(limit, ids.numel() // seq_len)
    seqs = ids[: n * seq_len].view(n, seq_len)
    if kind == "bert":
        inputs, labels = mask_tokens(seqs, torch.Generator().manual_seed(0), 0.15, tok.mask_id,
                                     tok.vocab_size, tok.special_ids)
    else:
        inputs, labels = seqs, seqs     # GPT-2 shifts the labels itself
    return tok.vocab_size, [{"input_ids": x, "labels": y} for x, y in zip(inputs, labels)]


def model(kind: str, vocab: int, hidden: int, layers: int, heads: int, seq_len: int):
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=4 * hidden,
            max_position_embeddings=seq_len))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=seq_len))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("bert", "gpt2"), default="bert")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--output-dir", default="runs/hf_trainer")
    ap.add_argument("--tiny", action="store_true", help="tiny model, 12 steps (for the tests)")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    a = ap.parse_args(argv)
    hidden, layers, heads, seq_len, limit = (128, 4, 4, 64, 4096)
    if a.tiny:
        hidden, layers, heads, seq_len, limit, a.max_steps = 32, 2, 4, 16, 64, 12
    vocab, train = dataset(a.model, seq_len, limit)
    args = transformers.TrainingArguments(
        a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
        lr_scheduler_type="linear", warmup_steps=a.max_steps // 10, weight_decay=0.01,
        gradient_accumulation_steps=2, max_grad_norm=1.0, logging_steps=max(1, a.max_steps // 6),
        save_steps=max(1, a.max_steps // 2), report_to=[], use_cpu=not torch.cuda.is_available(),
        seed=0, disable_tqdm=True)
    mat = MATCallback(probe_every=max(2, a.max_steps // 20), warmup=0.2)
    trainer = MATTrainer(model=model(a.model, vocab, hidden, layers, heads, seq_len), args=args,
                         train_dataset=train, callbacks=[mat])
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    rep = mat.mat.report()
    active = {k: float(v[-1]) for k, v in rep["active_fraction"].items()}
    print(f"steps {rep['steps']}, probes {len(rep['step'])}, active fraction at the end "
          f"{active}, compute saved {rep['compute_saved']:.3f}")


if __name__ == "__main__":
    main()
