"""Train a small BERT-style encoder (masked LM) with PyTorch Lightning and MAT.

    python examples/lightning_fit.py                    # 300 steps on the embedded corpus
    python examples/lightning_fit.py --tiny             # a few seconds: what the tests run
    python examples/lightning_fit.py --resume           # continue from the last checkpoint

The model is mat_cuda's plain-PyTorch reference encoder; the text is mat_cuda's embedded corpus,
byte-tokenized and statically masked. MAT is the one line ``callbacks=[MATCallback(...)]``.
"""
import argparse
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from mat_cuda.data import ByteTokenizer, load_corpus, mask_tokens
from mat_cuda.integrations.lightning import MATCallback
from mat_cuda.models import BertEncoderMLM, mlm_loss


class MaskedLM(pl.LightningModule):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, seq_len: int,
                 lr: float = 1e-3, total_steps: int = 300):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = BertEncoderMLM(vocab, hidden=hidden, layers=layers, heads=heads,
                                  ffn=4 * hidden, max_len=seq_len)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = mlm_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1,
                                                  total_iters=self.hparams.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data(seq_len: int, limit: int, batch_size: int):
    tok = ByteTokenizer()
    ids = tok.encode_to_tensor(load_corpus()["train"])
    n = min(limit, ids.numel() // seq_len)
    seqs = ids[: n * seq_len].view(n, seq_len)
    x, y = mask_tokens(seqs, torch.Generator().manual_seed(0), 0.15, tok.mask_id,
                       tok.vocab_size, tok.special_ids)
    y[:, 0] = seqs[:, 0]   # every sample predicts at least one token
    return tok.vocab_size, DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--output-dir", default="runs/lightning_fit")
    ap.add_argument("--tiny", action="store_true", help="tiny model, 12 steps (for the tests)")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    a = ap.parse_args(argv)
    hidden, layers, heads, seq_len, limit = 128, 4, 4, 64, 4096
    if a.tiny:
        hidden, layers, heads, seq_len, limit, a.max_steps = 32, 2, 4, 16, 64, 12
    vocab, loader = data(seq_len, limit, batch_size=8)
    module = MaskedLM(vocab, hidden, layers, heads, seq_len, total_steps=a.max_steps)
    mat = MATCallback(probe_every=max(2, a.max_steps // 20), warmup=0.2)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(a.output_dir, "checkpoints"),
                                        save_last=True,
                                        every_n_train_steps=max(1, a.max_steps // 2))
    trainer = pl.Trainer(max_steps=a.max_steps, accelerator="auto", devices=1,
                         accumulate_grad_batches=2, gradient_clip_val=1.0,
                         callbacks=[mat, ckpt], default_root_dir=a.output_dir,
                         logger=pl.loggers.CSVLogger(a.output_dir), log_every_n_steps=1,
                         enable_progress_bar=False, enable_model_summary=False)
    last = os.path.join(a.output_dir, "checkpoints", "last.ckpt")
    trainer.fit(module, loader, ckpt_path=last if a.resume and os.path.exists(last) else None)
    rep = mat.mat.report()
    active = {k: float(v[-1]) for k, v in rep["active_fraction"].items()}
    print(f"steps {rep['steps']}, probes {len(rep['step'])}, active fraction at the end "
          f"{active}, compute saved {rep['compute_saved']:.3f}")


if __name__ == "__main__":
    main()
