"""MATCallback in PyTorch Lightning, end to end on CPU with real objects: a small LightningModule
through Trainer.fit() (automatic optimization: optimizer swap, scheduler, accumulation with a short
last window, clipping, metrics through log, checkpoint and bit-identical resume, stop on
convergence, bf16-mixed), manual optimization with MAT called by the module, the example script.
Skipped without lightning."""
import os
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from mat_cuda import MAT, MaskedAdamW, MATPolicy, ModularPolicy, TemporalPolicy  # noqa: E402
from mat_cuda.integrations.lightning import MATCallback  # noqa: E402
from mat_cuda.models import BertEncoderMLM, mlm_loss  # noqa: E402
from helpers import load_example  # noqa: E402

V, T = 30, 6


class _MLMBody:
    """The module's content, shared by lightning.pytorch and pytorch_lightning modules."""

    def __init__(self, lr=1e-2):
        super().__init__()
        torch.manual_seed(0)
        self.net = BertEncoderMLM(V, hidden=16, layers=2, heads=2, ffn=32, max_len=8)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = mlm_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", mlm_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=30)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MLM(_MLMBody, pl.LightningModule):
    pass


class ManualMLM(MLM):
    """Manual optimization: the module drives MAT itself (docs/lightning.md)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.mat = None
        self._mat_state = None

    def configure_optimizers(self):
        self.mat = MAT(self, torch.optim.AdamW(self.parameters(), lr=self.lr),
                       policy=_budget_policy)
        if self._mat_state is not None:
            self.mat.load_state_dict(self._mat_state)
        return self.mat.optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        loss = mlm_loss(self.net(x), y)
        self.manual_backward(loss)
        if self.mat.before_optimizer_step():
            opt.step()                       # through Lightning: it counts the step
            self.mat.after_optimizer_step()
            opt.zero_grad()
        self.log("train_loss", loss)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["mat"] = self.mat.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self._mat_state = checkpoint["mat"]  # MAT is built later, in configure_optimizers


def _budget_policy(kinds, names):
    return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.5),
                     warmup=4, probe_every=2, names=names)


def _loader(n=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (n, T), generator=g)
    y = torch.where(torch.rand(n, T, generator=g) < 0.4, x, torch.full_like(x, -100))
    y[:, 0] = x[:, 0]
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def _trainer(tmp_path, callbacks, **kw):
    base = dict(max_epochs=3, accelerator="cpu", devices=1, logger=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks))
    base.update(kw)
    return pl.Trainer(callbacks=callbacks, **base)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(m):
    return [p.detach().clone() for p in m.parameters()]


def test_fit_resume_is_bit_identical(tmp_path):
    cb = MATCallback(policy=_budget_policy)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_epochs=1,
                                        save_top_k=-1)
    module = MLM()
    trainer = _trainer(tmp_path, [cb, ckpt], accumulate_grad_batches=2, gradient_clip_val=0.5)
    trainer.fit(module, _loader())
    mat = cb.mat
    assert trainer.optimizers[0] is mat.optimizer and isinstance(mat.optimizer, MaskedAdamW)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.optimizer is mat.optimizer
    assert mat.optimizer.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
    assert mat.step_count == trainer.global_step == 12 and mat.accumulation_steps == 2
    assert mat.probe_steps == list(range(0, 12, 2))
    rep = mat.report()
    assert not rep["mask"][-1].all() and rep["compute_saved"] > 0
    logged = trainer.logged_metrics
    assert float(logged["mat/active_fraction/head"]) == 0.5
    assert float(logged["mat/compute_saved"]) == pytest.approx(rep["compute_saved"])
    assert "mat/lambda_mean/ffn" in logged

    cb2 = MATCallback(policy=_budget_policy)
    resumed = MLM(lr=0.5)     # the checkpoint restores weights, optimizer and schedule
    _trainer(tmp_path, [cb2], accumulate_grad_batches=2, gradient_clip_val=0.5).fit(
        resumed, _loader(), ckpt_path=str(tmp_path / "ck" / "epoch=0-step=4.ckpt"))
    for p, q in zip(_weights(module), _weights(resumed)):
        assert torch.equal(p, q)
    rep2 = cb2.mat.report()
    assert torch.equal(rep["lam"], rep2["lam"]) and torch.equal(rep["mask"], rep2["mask"])
    assert torch.equal(rep["module_steps"], rep2["module_steps"])
    assert rep["compute_saved"] == rep2["compute_saved"]


def test_all_active_mat_equals_plain_fit_with_short_accumulation_window(tmp_path):
    """Every module active (warm-up longer than the run): fit + MATCallback matches plain fit
    (param groups, scheduler, clipping, accumulation). 8 batches per epoch with
    accumulate_grad_batches=3: steps of 3, 3 and 2 micro-batches (Lightning steps at the end of
    the epoch); a probe due on the short step is postponed to the next."""
    plain = MLM()
    _trainer(tmp_path, [], accumulate_grad_batches=3, gradient_clip_val=0.05).fit(plain, _loader())
    cb = MATCallback(warmup=1000, probe_every=2)
    with_mat = MLM()
    with pytest.warns(UserWarning, match="covers the whole run"):
        _trainer(tmp_path, [cb], accumulate_grad_batches=3, gradient_clip_val=0.05).fit(
            with_mat, _loader())
    # Last-bit differences of the converted attention and the fused kernel (tests/test_mat.py).
    for (name, p), q in zip(plain.named_parameters(), with_mat.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=2e-5, msg=name)
    # Steps 0-2 | 3-5 | 6-8, the last of each epoch short: the probes due at 2 and 8 move on.
    assert cb.mat.step_count == 9 and cb.mat.probe_steps == [0, 3, 4, 6]


def test_stop_on_convergence_stops_fit(tmp_path):
    def policy(kinds, names):
        # Every module trains (budget 1) and retires after its first trained interval.
        return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=1.0),
                         temporal=TemporalPolicy(kinds, eps=1e9, patience=1),
                         warmup=2, probe_every=2, names=names)

    cb = MATCallback(policy=policy, stop_on_convergence=True)
    # Validation every 3 batches runs no-grad forwards while a probe may be armed.
    trainer = _trainer(tmp_path, [cb], val_check_interval=3, num_sanity_val_steps=0)
    trainer.fit(MLM(), _loader(), _loader(8))
    assert "val_loss" in trainer.callback_metrics
    assert cb.mat.should_stop and trainer.global_step < 24
    assert trainer.global_step == cb.mat.probe_steps[-1] + 1


def test_bf16_mixed_trains(tmp_path):
    cb = MATCallback(warmup=0.25, probe_every=2)     # of 2 epochs x 8 steps: 4 steps
    _trainer(tmp_path, [cb], precision="bf16-mixed", max_epochs=2).fit(MLM(), _loader())
    assert cb.mat.policy.warmup == 4
    rep = cb.mat.report()
    assert torch.isfinite(rep["lam"]).all() and (rep["lam"] > 0).all()
    assert not rep["mask"][-1].all()


def test_manual_optimization_drives_mat_and_resumes(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_epochs=1,
                                        save_top_k=-1)
    module = ManualMLM()
    trainer = _trainer(tmp_path, [ckpt])
    trainer.fit(module, _loader())
    assert trainer.global_step == 24 == module.mat.step_count
    rep = module.mat.report()
    assert not rep["mask"][-1].all() and rep["compute_saved"] > 0
    resumed = ManualMLM()
    _trainer(tmp_path, []).fit(resumed, _loader(), ckpt_path=str(tmp_path / "ck" / "epoch=0-step=8.ckpt"))
    for p, q in zip(_weights(module), _weights(resumed)):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="manual optimization"):
        _trainer(tmp_path, [MATCallback()]).fit(ManualMLM(), _loader())


def test_standalone_pytorch_lightning_package(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")
    from mat_cuda.integrations.pytorch_lightning import MATCallback as PTLCallback

    class PTLModule(_MLMBody, ptl.LightningModule):
        pass

    cb = PTLCallback(policy=_budget_policy)
    trainer = ptl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, default_root_dir=str(tmp_path),
                          callbacks=[cb])
    trainer.fit(PTLModule(), _loader())
    assert trainer.optimizers[0] is cb.mat.optimizer and cb.mat.step_count == 16
    assert not cb.mat.report()["mask"][-1].all()
    trainer.save_checkpoint(str(tmp_path / "last.ckpt"))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert "mat" in saved["MATCallback"]


def test_example_script_runs(tmp_path, capsys):
    # In this process (the frameworks are already imported): examples/lightning_fit.py --tiny.
    example = load_example("lightning_fit.py")
    example.main(["--tiny", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "steps 12, probes 6" in out
    assert float(re.search(r"compute saved ([0-9.]+)", out).group(1)) > 0
