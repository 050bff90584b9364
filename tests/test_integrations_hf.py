"""MATCallback in the Hugging Face Trainer, end to end on CPU with real objects (tiny BERT / GPT-2
built from configs, no download): optimizer swap, scheduler, accumulation, clipping, logging,
checkpoint and bit-identical resume, stop on convergence, bf16 autocast, the example script.
Skipped without transformers / accelerate."""
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from mat_cuda import MaskedAdamW, MATPolicy, ModularPolicy, TemporalPolicy  # noqa: E402
from mat_cuda.integrations.hf import MAT_STATE_NAME, MATCallback, MATTrainer  # noqa: E402
from helpers import load_example  # noqa: E402

V, T = 61, 8


def _bert():
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0))


def _data(n=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (n, T), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def _args(out, **kw):
    base = dict(max_steps=20, per_device_train_batch_size=4, learning_rate=3e-3,
                logging_steps=5, save_steps=10, report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=3,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def _budget_policy(kinds, names):
    return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=0.5),
                     warmup=4, probe_every=2, names=names)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_trainer_resume_is_bit_identical(make, tmp_path):
    cb = MATCallback(policy=_budget_policy)
    trainer = transformers.Trainer(model=make(), args=_args(tmp_path), train_dataset=_data(),
                                   callbacks=[cb])
    trainer.train()
    full = _weights(trainer.model)
    mat = cb.mat
    # The Trainer stepped MAT's masked optimizer, which the scheduler drives.
    assert isinstance(trainer.optimizer.optimizer, MaskedAdamW)
    assert trainer.optimizer.optimizer is mat.optimizer
    assert trainer.lr_scheduler.optimizer.optimizer is mat.optimizer
    assert mat.optimizer.param_groups[0]["lr"] == trainer.lr_scheduler.get_last_lr()[0]
    assert len(mat.optimizer.param_groups) == 2        # the Trainer's decay / no-decay groups
    assert mat.step_count == 20 and int(mat.optimizer.module_steps[-1]) == 20
    assert mat.probe_steps == list(range(0, 20, 2))
    rep = mat.report()
    assert not rep["mask"][-1].all() and rep["compute_saved"] > 0
    for step in (10, 20):
        assert os.path.isfile(tmp_path / f"checkpoint-{step}" / MAT_STATE_NAME)

    cb2 = MATCallback(policy=_budget_policy)
    resumed = transformers.Trainer(model=make(), args=_args(tmp_path), train_dataset=_data(),
                                   callbacks=[cb2])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    for p, q in zip(full, _weights(resumed.model)):
        assert torch.equal(p, q)
    rep2 = cb2.mat.report()
    assert torch.equal(rep["lam"], rep2["lam"]) and torch.equal(rep["mask"], rep2["mask"])
    assert torch.equal(rep["module_steps"], rep2["module_steps"])
    assert rep["compute_saved"] == rep2["compute_saved"]


@pytest.mark.filterwarnings("ignore:MATCallback. warm-up")
def test_resume_without_mat_state_raises(tmp_path):
    args = _args(tmp_path, max_steps=4, save_steps=2, logging_steps=2)
    transformers.Trainer(model=_bert(), args=args, train_dataset=_data(),
                         callbacks=[MATCallback(policy=_budget_policy)]).train()
    os.remove(tmp_path / "checkpoint-2" / MAT_STATE_NAME)
    trainer = transformers.Trainer(model=_bert(), args=args, train_dataset=_data(),
                                   callbacks=[MATCallback(policy=_budget_policy)])
    with pytest.raises(FileNotFoundError, match="resume_from"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # Another run's MAT state in the folder the Trainer resumes from is refused.
    elsewhere = tmp_path / "other"
    transformers.Trainer(model=_bert(), args=_args(elsewhere, max_steps=2, save_steps=2,
                                                   learning_rate=1e-3, logging_steps=1),
                         train_dataset=_data(), callbacks=[MATCallback(policy=_budget_policy)]).train()
    trainer = transformers.Trainer(model=_bert(), args=args, train_dataset=_data(),
                                   callbacks=[MATCallback(policy=_budget_policy,
                                                          resume_from=str(elsewhere / "checkpoint-2"))])
    with pytest.raises(ValueError, match="another run"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_all_active_mat_equals_plain_trainer_with_accumulation_and_clipping(tmp_path):
    """With every module active (warm-up longer than the run), Trainer + MATCallback matches the
    plain Trainer: same param groups (weight decay), LR schedule, gradient accumulation (with a
    short last window: 9 micro-batches per epoch, 2 per step) and clipping."""
    kw = dict(max_steps=8, gradient_accumulation_steps=2, max_grad_norm=0.05, weight_decay=0.1,
              save_strategy="no", logging_steps=4)
    plain = transformers.Trainer(model=_bert(), args=_args(tmp_path / "a", **kw),
                                 train_dataset=_data(36))
    plain.train()
    cb = MATCallback(warmup=1000, probe_every=4)
    with_mat = transformers.Trainer(model=_bert(), args=_args(tmp_path / "b", **kw),
                                    train_dataset=_data(36), callbacks=[cb])
    with pytest.warns(UserWarning, match="covers the whole run"):
        with_mat.train()
    # The converted attention and the fused kernel round differently from torch's path (see
    # tests/test_mat.py): last-bit differences, far below what a missed group, clip or step makes.
    for (name, p), q in zip(plain.model.named_parameters(), with_mat.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=2e-5, msg=name)
    mat = cb.mat
    assert mat.accumulation_steps == 2 and mat.step_count == 8
    # Epoch 1: 9 micro-batches = steps 0-3 of 2 micro-batches + step 4 of 1. The probe due at
    # step 4 had its hooks armed for a second micro-batch that never came: postponed to step 5.
    assert mat.probe_steps == [0, 5]


def test_clipping_reaches_the_masked_optimizer(tmp_path):
    norms = []

    class GradNorm(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))

    # Evaluation every 2 steps runs between a probe step's arming and its forward: its no-grad
    # forwards must not feed the probe.
    args = _args(tmp_path, max_steps=6, max_grad_norm=0.01, save_strategy="no",
                 gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=2)
    cb = MATCallback(policy=_budget_policy)
    trainer = transformers.Trainer(model=_gpt2(), args=args, train_dataset=_data(),
                                   eval_dataset=_data(8), callbacks=[cb, GradNorm()])
    trainer.train()
    assert len(norms) == 6 and max(norms) <= 0.01 * (1 + 1e-5)
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 3
    assert cb.mat.probe_steps == [0, 2, 4] and torch.isfinite(cb.mat.report()["lam"]).all()


def test_metrics_reach_log_history_and_mat_trainer_reaches_earlier_callbacks(tmp_path):
    seen = []

    class Reporter(transformers.TrainerCallback):   # stands for a report_to integration
        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in logs:
                seen.append(dict(logs))

    after = []

    class ReporterAfter(transformers.TrainerCallback):   # a reporter listed after MATCallback
        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in logs:
                after.append(dict(logs))

    args = _args(tmp_path, max_steps=8, logging_steps=4, save_strategy="no")
    plain = transformers.Trainer(model=_bert(), args=args, train_dataset=_data(),
                                 callbacks=[Reporter(), MATCallback(policy=_budget_policy),
                                            ReporterAfter()])
    plain.train()
    assert len(after) == 2 and all("mat/compute_saved" in s for s in after)
    logged = [h for h in plain.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("mat/compute_saved" in h for h in logged)
    assert logged[-1]["mat/active_fraction/head"] == 0.5      # budget policy after warm-up
    assert logged[-1]["mat/probes"] == 4.0
    assert "mat/lambda_mean/ffn" in logged[-1] and logged[-1]["mat/compute_saved"] > 0
    assert not any("mat/compute_saved" in s for s in seen)     # a callback before MATCallback

    seen.clear()
    trainer = MATTrainer(model=_bert(), args=args, train_dataset=_data(),
                         callbacks=[Reporter(), MATCallback(policy=_budget_policy)])
    trainer.train()
    assert len(seen) == 2 and all("mat/active_fraction/head" in s for s in seen)
    with pytest.raises(ValueError, match="exactly one MATCallback"):
        MATTrainer(model=_bert(), args=args, train_dataset=_data())


def test_stop_on_convergence_stops_the_trainer(tmp_path):
    def policy(kinds, names):
        # Every module trains (budget 1) and retires after its first trained interval.
        return MATPolicy(kinds, modular=ModularPolicy(kinds, mode="budget", budget=1.0),
                         temporal=TemporalPolicy(kinds, eps=1e9, patience=1),
                         warmup=2, probe_every=2, names=names)

    cb = MATCallback(policy=policy, stop_on_convergence=True)
    trainer = transformers.Trainer(model=_bert(), args=_args(tmp_path, save_strategy="no"),
                                   train_dataset=_data(), callbacks=[cb])
    trainer.train()
    assert cb.mat.should_stop
    assert trainer.state.global_step < 20
    assert trainer.state.global_step == cb.mat.probe_steps[-1] + 1


def test_bf16_autocast_trains(tmp_path):
    cb = MATCallback(policy=_budget_policy)
    trainer = transformers.Trainer(model=_gpt2(), args=_args(tmp_path, bf16=True, max_steps=8,
                                                             save_strategy="no"),
                                   train_dataset=_data(), callbacks=[cb])
    trainer.train()
    rep = cb.mat.report()
    assert torch.isfinite(rep["lam"]).all() and (rep["lam"] > 0).all()
    assert not rep["mask"][-1].all()


def test_bad_options_raise_before_training():
    with pytest.raises(ValueError, match="fraction"):
        MATCallback(warmup=1.5)
    with pytest.raises(TypeError, match="warmup"):
        MATCallback(warmup="10")
    with pytest.raises(ValueError, match="configure the default policy"):
        MATCallback(policy=_budget_policy, warmup=3)


def test_trainer_sgd_becomes_masked_sgd(tmp_path):
    from mat_cuda import MaskedSGD
    cb = MATCallback(warmup=0.5, probe_every=2)      # half of max_steps=6: 3 steps
    args = _args(tmp_path, optim="sgd", save_strategy="no", max_steps=6, learning_rate=0.1)
    transformers.Trainer(model=_bert(), args=args, train_dataset=_data(), callbacks=[cb]).train()
    assert isinstance(cb.mat.optimizer, MaskedSGD) and cb.mat.step_count == 6
    assert cb.mat.policy.warmup == 3
    assert cb.mat.report()["mask"][0].all() and not cb.mat.report()["mask"][-1].all()


def test_users_masked_optimizer_is_used_as_is(tmp_path):
    from mat_cuda import discover
    model = _bert()
    disc = discover(model, ("head", "ffn"))
    opt = MaskedAdamW(model.parameters(), lr=3e-3, module_map=disc.module_map)
    cb = MATCallback(modules=disc, policy=_budget_policy)
    args = _args(tmp_path, save_strategy="no", max_steps=6)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(),
                                   optimizers=(opt, None), callbacks=[cb])
    trainer.train()
    assert cb.mat.optimizer is opt and trainer.optimizer.optimizer is opt
    assert int(opt.module_steps[-1]) == 6 and not cb.mat.report()["mask"][-1].all()
    with pytest.raises(RuntimeError, match="already ran a training run"):
        trainer.train()


def test_unsupported_optimizer_raises(tmp_path):
    args = _args(tmp_path, optim="adafactor", save_strategy="no", max_steps=2)
    trainer = transformers.Trainer(model=_bert(), args=args, train_dataset=_data(),
                                   callbacks=[MATCallback(policy=_budget_policy)])
    with pytest.raises(TypeError, match="cannot use an optimizer of type Adafactor"):
        trainer.train()


def test_example_script_runs(tmp_path, capsys):
    # In this process (the frameworks are already imported): examples/hf_trainer.py --tiny.
    example = load_example("hf_trainer.py")
    example.main(["--tiny", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "steps 12, probes 6" in out
    assert float(re.search(r"compute saved ([0-9.]+)", out).group(1)) > 0
