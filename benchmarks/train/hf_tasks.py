"""Hugging Face models as `mat-bench` tasks: what a new user trains, off the home benchmark.

Each model is built from a tiny config with random initialisation (nothing is downloaded) and
the configs' other defaults (dropout included), trained with the plain HF loss
(``model(..., labels=...).loss``), as a user would:

- ``hf-bert``: ``BertForMaskedLM``, masked-LM on the benchmark's text (BERT's 80/10/10 masking);
- ``hf-roberta``: ``RobertaForMaskedLM``, the same data;
- ``hf-gpt2``: ``GPT2LMHeadModel``, causal LM on random windows of the same text;
- ``hf-vit``: ``ViTForImageClassification`` on the benchmark's images.

Text: the embedded corpus (mat_cuda.data.load_corpus) as UTF-8 bytes (ByteTokenizer, vocab 261),
windows of ``seq_len`` tokens. Images: mat_cuda.data.load_images (scikit-learn's digits
upsampled to 3 × 32 × 32 by default). Evaluation: a fixed validation set, the same for every seed
and method (loss summed over predicted tokens / images, divided by their count).

Returns the runner's :class:`~benchmarks.train.tasks.Task`, so ``run_one`` trains it unchanged.
Needs ``transformers`` (a clear error otherwise).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from mat_cuda.data import ByteTokenizer, load_corpus, load_images, mlm_eval_batches, MLMBatcher

from .methods import MethodError

HF_TASKS = ("hf-bert", "hf-gpt2", "hf-roberta", "hf-vit")

# The models' shape (a 2-layer, hidden-64 transformer: 8 heads and 2 FFN blocks as MAT modules)
# and the data, sized so that the robustness table (4 models × 2 lengths × 3 seeds × 2 methods)
# runs in about an hour single-threaded on a 2-core CPU. The setting: batch 16 × 64
# tokens, AdamW lr 2e-3, no LR schedule.
HF_MODEL = dict(hidden=64, layers=2, heads=4, ffn=256, seq_len=64, batch_size=16,
                image_batch_size=32, patch=8, eval_tokens=16_384, lr=2e-3)
PROBE_SEED_OFFSET = 7_919


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MethodError("the hf-* tasks need the `transformers` package: pip install "
                          "transformers") from None
    return transformers


@functools.lru_cache(maxsize=1)
def _byte_streams():
    corpus = load_corpus(None)
    tok = ByteTokenizer()
    return tok, tok.encode_to_tensor(corpus["train"]), tok.encode_to_tensor(corpus["valid"])


def _text_model(name: str, cfg: dict, tok):
    t = _transformers()
    common = dict(vocab_size=tok.vocab_size, hidden_size=cfg["hidden"],
                  num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                  intermediate_size=cfg["ffn"], pad_token_id=tok.special_ids[0])
    if name == "hf-bert":
        return t.BertForMaskedLM(t.BertConfig(max_position_embeddings=cfg["seq_len"], **common))
    if name == "hf-roberta":
        # RoBERTa numbers positions from pad_token_id + 1 (its table needs pad + 1 + seq_len
        # rows), so it keeps its default pad id 1: byte 0x01 never occurs in the text.
        common["pad_token_id"] = 1
        return t.RobertaForMaskedLM(t.RobertaConfig(max_position_embeddings=cfg["seq_len"] + 2,
                                                    **common))
    return t.GPT2LMHeadModel(t.GPT2Config(
        vocab_size=tok.vocab_size, n_embd=cfg["hidden"], n_layer=cfg["layers"],
        n_head=cfg["heads"], n_inner=cfg["ffn"], n_positions=cfg["seq_len"],
        bos_token_id=tok.special_ids[0], eos_token_id=tok.special_ids[0]))


def build_hf_task(name: str, cfg: dict, seed: int, device: str):
    """The task ``name`` (HF_TASKS) with settings ``cfg`` for ``seed`` on ``device``; the
    model's initial weights and the batch order depend only on ``seed``."""
    from .tasks import Task

    if name not in HF_TASKS:
        raise ValueError(f"unknown HF task {name!r}; choose from {HF_TASKS}")
    if name == "hf-vit":
        return _vit_task(cfg, seed, device)
    tok, train_ids, valid_ids = _byte_streams()
    valid_ids = valid_ids[: cfg["eval_tokens"]]
    torch.manual_seed(seed)
    model = _text_model(name, cfg, tok).to(device)
    seq, bs = cfg["seq_len"], cfg["batch_size"]
    config = dict(model=type(model).__name__, hidden=cfg["hidden"], layers=cfg["layers"],
                  heads=cfg["heads"], ffn=cfg["ffn"], tokenizer="byte (vocab 261)",
                  seq_len=seq, batch_size=bs, train_tokens=int(train_ids.numel()),
                  eval_tokens=int(valid_ids.numel()),
                  data="embedded (Python standard library docs)",
                  parameters=sum(p.numel() for p in model.parameters()))
    masks = dict(mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tok.special_ids)
    if name == "hf-gpt2":
        return _causal_task(name, model, train_ids, valid_ids, seq, bs, seed, device, config, Task)
    batcher = MLMBatcher(train_ids, seq, bs, seed=seed, **masks)
    eval_set = [(x.to(device), y.to(device))
                for x, y in mlm_eval_batches(valid_ids, seq, 64, seed=0, **masks)]

    def loss_fn(m, batch):
        x, y = batch
        return m(input_ids=x, labels=y).loss

    @torch.no_grad()
    def evaluate(m) -> dict:
        return _token_eval(m, [(x, y, y) for x, y in eval_set], shift=False)

    def batches():
        while True:
            for x, y in batcher:
                yield x.to(device), y.to(device)

    probe_x, _ = next(iter(MLMBatcher(train_ids, seq, bs, seed=seed + PROBE_SEED_OFFSET, **masks)))
    return Task(name, model, batches, loss_fn, evaluate, "perplexity", config,
                (probe_x.to(device), lambda m, x: m(input_ids=x).logits))


def _causal_task(name, model, train_ids, valid_ids, seq, bs, seed, device, config, Task):
    n_valid = valid_ids.numel() // seq
    eval_windows = valid_ids[: n_valid * seq].reshape(n_valid, seq)
    eval_set = [eval_windows[i:i + 64].to(device) for i in range(0, n_valid, 64)]
    starts_max = train_ids.numel() - seq

    def draw(generator):
        starts = torch.randint(0, starts_max, (bs,), generator=generator)
        return torch.stack([train_ids[s:s + seq] for s in starts.tolist()])

    def loss_fn(m, x):
        return m(input_ids=x, labels=x).loss

    @torch.no_grad()
    def evaluate(m) -> dict:
        return _token_eval(m, [(x, x, None) for x in eval_set], shift=True)

    def batches():
        g = torch.Generator().manual_seed(seed * 1_000_003)
        while True:
            yield draw(g).to(device)

    probe_x = draw(torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)).to(device)
    return Task(name, model, batches, loss_fn, evaluate, "perplexity", config,
                (probe_x, lambda m, x: m(input_ids=x).logits))


def _token_eval(m, batches, shift: bool) -> dict:
    """Mean cross-entropy per predicted token over (inputs, targets, _) batches: targets -100
    are ignored; with ``shift`` position t predicts token t + 1 (causal LM)."""
    from .tasks import _eval_mode

    total, count = 0.0, 0
    with _eval_mode(m):
        for x, y, _ in batches:
            logits = m(input_ids=x).logits
            if shift:
                logits, y = logits[:, :-1], y[:, 1:]
            keep = y != -100
            total += float(F.cross_entropy(logits[keep].float(), y[keep], reduction="sum"))
            count += int(keep.sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@functools.lru_cache(maxsize=1)
def _image_data():
    # The robust suite's two-way split (issue 15's recorded rows were measured on it): no test
    # images, train = the three-way split's train + test.
    return load_images(None, test_split=False)


def _vit_task(cfg, seed, device):
    from .tasks import Task, _eval_mode

    t = _transformers()
    data = _image_data()
    tx, ty, vx, vy = data.train_x, data.train_y, data.valid_x, data.valid_y
    torch.manual_seed(seed)
    model = t.ViTForImageClassification(t.ViTConfig(
        image_size=tx.shape[-1], patch_size=cfg["patch"], num_channels=tx.shape[1],
        hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], intermediate_size=cfg["ffn"],
        num_labels=data.num_classes)).to(device)
    bs = cfg["image_batch_size"]
    eval_set = [(vx[i:i + 256].to(device), vy[i:i + 256].to(device)) for i in range(0, len(vx), 256)]

    def batches():
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            epoch += 1
            order = torch.randperm(len(tx), generator=g)
            for i in range(0, len(order) - bs + 1, bs):
                idx = order[i:i + bs]
                yield tx[idx].to(device), ty[idx].to(device)

    def loss_fn(m, batch):
        x, y = batch
        return m(pixel_values=x, labels=y).loss

    @torch.no_grad()
    def evaluate(m) -> dict:
        total, correct = 0.0, 0
        with _eval_mode(m):
            for x, y in eval_set:
                logits = m(pixel_values=x).logits
                total += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(-1) == y).sum())
        return {"loss": total / len(vx), "accuracy": correct / len(vx)}

    config = dict(model="ViTForImageClassification", hidden=cfg["hidden"], layers=cfg["layers"],
                  heads=cfg["heads"], ffn=cfg["ffn"], patch=cfg["patch"], batch_size=bs,
                  data=data.source, train_images=len(tx), eval_images=len(vx),
                  parameters=sum(p.numel() for p in model.parameters()))
    g = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
    probe_x = tx[torch.randperm(len(tx), generator=g)[:bs]].to(device)
    return Task("hf-vit", model, batches, loss_fn, evaluate, "accuracy", config,
                (probe_x, lambda m, x: m(pixel_values=x).logits))
