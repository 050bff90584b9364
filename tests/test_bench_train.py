"""`mat-bench train`: CLI errors, every task × method for a few steps, results.json schema,
plots, the headline statistics and baseline determinism. Tiny sizes, CPU only."""
import io
import json
import math
import os
import sys

import pytest
import torch

from mat_cuda.benchmarks.__main__ import main
from mat_cuda.benchmarks.train.methods import MethodError, build_method
from mat_cuda.benchmarks.train.report import summarize_task
from mat_cuda.benchmarks.train.runner import run_one
from mat_cuda.benchmarks.train.tasks import size_config

FRACTIONS = {"head": 0.5, "ffn": 0.5, "expert": 0.5, "conv": 0.5}


def _tiny(task, steps=4):
    cfg = size_config(task, "tiny")
    cfg.update(steps=steps, eval_every=2, warmup=2, probe_every=1)
    return cfg


def _needs_task_deps(task):
    if task == "cnn":
        pytest.importorskip("sklearn", reason="the embedded image data needs scikit-learn")


# ---------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("argv, message", [
    (["--task", "nlp"], "unknown task"),
    (["--method", "magic"], "unknown method"),
    (["--seeds", "0,a"], "--seeds"),
    (["--seeds", "1,1"], "distinct"),
    (["--method", "random"], "add mat"),
    (["--active-fraction", "head=1.5", "--method", "random"], "[0, 1]"),
    (["--steps", "0"], "--steps"),
    (["--text-data", "/nonexistent/corpus"], "does not exist"),
    (["--task", "cnn", "--image-data", "/nonexistent/cifar"], "does not exist"),
    (["--mat-policy", "mode=lottery"], "mode must be"),
    (["--mat-policy", "alpha"], "key=value"),
    (["--mat-policy", "speed=3"], "unknown option"),
    (["--mat-policy", "temporal=off,eps=0.1"], "temporal=off"),
])
def test_cli_errors_exit_2_without_traceback(argv, message, tmp_path, capsys):
    rc = main(["train", "--size", "tiny", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o" / "results.json")


def test_cli_bad_text_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xff")
    rc = main(["train", "--size", "tiny", "--method", "baseline", "--seeds", "0",
               "--text-data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "bad.txt" in err


def test_cli_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--size", "huge"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["fly"])
    assert exc.value.code == 2


# ------------------------------------------------------------------ each task, each method
@pytest.mark.parametrize("task", ["mlm", "cnn", "moe"])
@pytest.mark.parametrize("method", ["baseline", "random", "gradnorm", "freeze_all", "mat"])
def test_each_task_runs_each_method(task, method):
    _needs_task_deps(task)
    kind = {"mlm": "head", "cnn": "conv", "moe": "expert"}[task] if method == "freeze_all" else None
    rec = run_one(task, method, 0, _tiny(task), fractions=FRACTIONS, kind=kind, progress=False)
    assert rec["steps_run"] == 4
    assert [e["step"] for e in rec["evals"]] == [0, 2, 4]
    assert all(math.isfinite(e["loss"]) for e in rec["evals"])
    assert rec["total_flops"] > 0
    # FLOPs are cumulative and charged per step
    assert [e["flops"] for e in rec["evals"]] == sorted(e["flops"] for e in rec["evals"])
    frac = rec["mean_active_fraction_after_warmup"]
    if method == "freeze_all":
        assert frac[kind] == 0.0
    if method in ("random", "gradnorm"):
        kinds = rec["modules"]["kinds"]
        for k, f in frac.items():
            n = kinds.count(k)
            assert f == round(FRACTIONS[k] * n) / n
    if method == "baseline":
        assert all(f == 1.0 for f in frac.values())


def test_freezing_removes_measured_flops():
    base = run_one("mlm", "baseline", 0, _tiny("mlm"), progress=False)
    frozen = run_one("mlm", "freeze_all", 0, _tiny("mlm"), kind="head", progress=False)
    per_state = {tuple(s["state"]) if s["state"] != "probe" else "probe": s["total"]
                 for s in frozen["flops_measured"]}
    assert len(per_state) == 2  # all active during warm-up, heads frozen after
    assert frozen["total_flops"] < base["total_flops"]


def test_gradnorm_scores_are_module_gradient_norms():
    task_cfg = _tiny("mlm")
    from mat_cuda.benchmarks.train.tasks import build_task
    task = build_task("mlm", task_cfg, 0, "cpu")
    method = build_method("gradnorm", task.model, lr=1e-3, warmup=0, probe_every=1, seed=0,
                          fractions=FRACTIONS)
    with method.backward_context(0):
        task.loss_fn(task.model, next(task.train_batches())).backward()
        scores = method.scores()
    # Expected per module, element by element: each gradient element's module comes from the
    # kernels' layout tables (mat_cuda.reference.element_modules_ref), a different code path from
    # the method's reshapes; Σ g² per module, then the square root.
    from mat_cuda.reference import element_modules_ref
    mm = method.module_map
    M = mm.num_modules
    sq = torch.zeros(M + 1, dtype=torch.float64)
    for p in mm.params():
        if p.grad is None:
            continue
        layout, groups = mm.kernel_tables([p], torch.device("cpu"))
        mods = element_modules_ref(layout[0], groups, p.numel())
        sq.index_add_(0, mods, p.grad.detach().double().flatten().pow(2))
    expect = sq[:M].sqrt()
    # rel 1e-9: float64 sums of the same float32 squares in another order (~n·u64 ≪ 1e-9).
    for m in range(M):
        assert scores[m].item() == pytest.approx(expect[m].item(), rel=1e-9), mm.names[m]
    # The check tells modules apart: head scores differ, so a permutation of them would fail.
    heads = [i for i, k in enumerate(mm.kinds) if k == "head"]
    vals = sorted(expect[h].item() for h in heads)
    assert len(heads) > 1 and all(b > a * (1 + 1e-6) for a, b in zip(vals, vals[1:]))


def test_selection_without_fraction_is_an_error():
    from mat_cuda.benchmarks.train.tasks import build_task
    task = build_task("mlm", _tiny("mlm"), 0, "cpu")
    with pytest.raises(MethodError, match="active fraction"):
        build_method("random", task.model, lr=1e-3, warmup=0, probe_every=1, seed=0, fractions={})


# ---------------------------------------------------------------------- determinism (CPU)
def test_baseline_is_deterministic_for_a_seed():
    a = run_one("mlm", "baseline", 3, _tiny("mlm"), progress=False)
    b = run_one("mlm", "baseline", 3, _tiny("mlm"), progress=False)
    c = run_one("mlm", "baseline", 4, _tiny("mlm"), progress=False)
    assert [e["loss"] for e in a["evals"]] == [e["loss"] for e in b["evals"]]
    assert a["total_flops"] == b["total_flops"]
    assert [e["loss"] for e in a["evals"]][1:] != [e["loss"] for e in c["evals"]][1:]


# ------------------------------------------------------------------------ statistics
def _record(method, seed, losses, flops_per_eval=10.0, wall_per_eval=1.0):
    evals = [{"step": 10 * i, "flops": flops_per_eval * i, "wall_s": wall_per_eval * i,
              "loss": l} for i, l in enumerate(losses)]
    return {"task": "mlm", "method": method, "seed": seed, "evals": evals,
            "final_loss": losses[-1], "best_loss": min(losses),
            "total_flops": flops_per_eval * (len(losses) - 1),
            "wall_s": wall_per_eval * (len(losses) - 1),
            "mean_active_fraction_after_warmup": {"head": 1.0}}


def test_headline_follows_the_issue_rules():
    runs = [_record("baseline", 0, [5.0, 4.0, 3.0, 2.0]),
            _record("baseline", 1, [5.0, 4.0, 3.2, 2.2]),
            # reaches the target (2.1 + std 0.1414) at its 3rd evaluation, at half the FLOPs
            _record("mat", 0, [5.0, 3.0, 2.1, 2.0], flops_per_eval=5.0, wall_per_eval=0.8),
            _record("mat", 1, [5.0, 3.0, 2.3, 2.2], flops_per_eval=5.0, wall_per_eval=0.8),
            _record("random", 0, [5.0, 4.5, 4.0, 3.0]),
            _record("random", 1, [5.0, 4.5, 4.0, 3.0])]
    s = summarize_task(runs, None)
    head = s["headline"]
    std = math.sqrt(((2.0 - 2.1) ** 2 + (2.2 - 2.1) ** 2) / 1)
    # approx (rel 1e-6): a few float64 operations on short lists, exact to ~u64.
    assert head["baseline_best"] == pytest.approx(2.1)
    assert head["target"] == pytest.approx(2.1 + std)
    mat = head["rows"]["mat"]
    assert mat["reached"] and mat["step"] == 20
    # baseline reaches the target at its last evaluation (30 FLOPs, 3 s); MAT at 10, 1.6
    assert mat["flops_fraction"] == pytest.approx(10.0 / 30.0)
    assert mat["wall_fraction"] == pytest.approx(1.6 / 3.0)
    assert not head["rows"]["random"]["reached"]
    assert head["rows"]["random"]["gap_to_target"] == pytest.approx(3.0 - (2.1 + std))
    diff = s["methods"]["mat"]["paired_diff_final_loss"]
    assert diff[0] == pytest.approx(0.0) and diff[1] == pytest.approx(0.0)
    assert s["methods"]["random"]["paired_diff_final_loss"][0] == pytest.approx(0.9)


# --------------------------------------------------------------- results.json and plots
def test_results_json_schema_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "res"
    rc = main(["train", "--size", "tiny", "--task", "mlm", "--method",
               "baseline,mat,random,freeze_all", "--seeds", "0,1", "--steps", "4",
               "--eval-every", "2", "--warmup", "2", "--probe-every", "1", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("schema_version", "environment", "config", "task_configs", "ceilings", "runs",
                "summary", "plots", "skipped"):
        assert key in res
    assert res["config"]["seeds"] == [0, 1]
    methods = {(r["method"], r["seed"]) for r in res["runs"]}
    assert methods == {(m, s) for s in (0, 1) for m in
                       ("baseline", "mat", "random", "freeze_all:head",
                        "freeze_all:ffn")}
    for r in res["runs"]:
        for key in ("evals", "final_loss", "best_loss", "total_flops", "wall_s",
                    "flops_measured", "active_fraction", "modules", "task_config"):
            assert key in r
    mat = next(r for r in res["runs"] if r["method"] == "mat")
    assert len(mat["lambda_history"]["lam"]) == len(mat["lambda_history"]["step"]) > 0
    summ = res["summary"]["mlm"]
    assert set(summ["methods"]) == {m for m, _ in methods}
    assert summ["headline"]["rows"]["baseline"]["reached"]
    assert set(res["ceilings"]["mlm"]["per_kind"]) == {"head", "ffn", "(all kinds)"}
    assert "mlm_lambda_heatmap.png" in res["plots"]
    for name in res["plots"] + ["summary.md"]:
        assert (out / name).stat().st_size > 0
    assert "| mat |" in (out / "summary.md").read_text()


def test_kernels_unknown_name_exits_2(tmp_path, capsys):
    rc = main(["kernels", "--only", "nosuch", "--out", str(tmp_path / "k")])
    err = capsys.readouterr().err
    assert rc == 2 and "nosuch" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "k")


# ------------------------------------------------------------- --mat-policy and `report`
def test_mat_policy_options_reach_the_policy():
    from mat_cuda.benchmarks.train.cli import parse_policy_options

    opts = parse_policy_options("mode=budget,budget=0.25,hysteresis=0,temporal=off,"
                                "relative_to_history=none")
    assert opts == {"mode": "budget", "budget": 0.25, "hysteresis": 0, "temporal": False,
                    "relative_to_history": None}
    task_cfg = _tiny("mlm")
    from mat_cuda.benchmarks.train.tasks import build_task

    task = build_task("mlm", task_cfg, 0, "cpu")
    method = build_method("mat", task.model, lr=1e-3, warmup=3, probe_every=2, seed=0,
                          policy_options=opts)
    policy = method.mat.policy
    assert policy.temporal is None and (policy.warmup, policy.probe_every) == (3, 2)
    assert (policy.modular.mode, policy.modular.budget, policy.modular.hysteresis) == \
        ("budget", 0.25, 0.0)
    assert list(policy.kinds) == method.kinds


def _train_json(out, method, seeds, extra=()):
    rc = main(["train", "--size", "tiny", "--task", "mlm", "--method", method, "--seeds", seeds,
               "--steps", "4", "--eval-every", "2", "--warmup", "2", "--probe-every", "1",
               "--no-progress", "--out", str(out), *extra])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def test_report_merges_separate_invocations(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    together = _train_json(tmp_path / "together", "baseline,mat", "0,1")
    _train_json(tmp_path / "a", "baseline", "0,1")
    _train_json(tmp_path / "b", "mat", "0")
    _train_json(tmp_path / "c", "mat", "1")
    rc = main(["report", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c" / "results.json"),
               "--out", str(tmp_path / "m")])
    assert rc == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert merged["config"]["seeds"] == [0, 1]
    # CPU runs are deterministic, so the merged summary is the one-invocation summary.
    for method in ("baseline", "mat"):
        a = together["summary"]["mlm"]["methods"][method]
        b = merged["summary"]["mlm"]["methods"][method]
        assert a["final_loss"] == b["final_loss"] and a["total_flops"] == b["total_flops"]
    assert (tmp_path / "m" / "summary.md").stat().st_size > 0
    assert "mlm_loss_vs_flops.png" in merged["plots"]


def test_report_refuses_what_does_not_compare(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _train_json(tmp_path / "a", "baseline", "0")
    _train_json(tmp_path / "longer", "baseline", "1", extra=("--steps", "6"))
    _train_json(tmp_path / "m1", "mat", "1")
    _train_json(tmp_path / "m2", "mat", "2", extra=("--mat-policy", "mode=budget"))
    _train_json(tmp_path / "m3", "mat", "3", extra=("--mat-kernel", "logit_sum"))
    for argv, message in (([tmp_path / "a", tmp_path / "a"], "also in"),
                          ([tmp_path / "a", tmp_path / "longer"], "other settings (['steps'])"),
                          ([tmp_path / "m1", tmp_path / "m2"], "different policies"),
                          ([tmp_path / "m1", tmp_path / "m3"], "different MAT kernels"),
                          ([tmp_path / "nothing"], "cannot read")):
        capsys.readouterr()
        rc = main(["report", *map(str, argv), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err


# ------------------------------------------------------------------ --mat-kernel (output kernels)
@pytest.mark.parametrize("task_name", ["mlm", "cnn"])
def test_output_kernel_probe_passes_are_charged_at_probes(task_name):
    """The output kernels' own passes on the fixed probe batch are counted at each probe step
    (not at other steps), once per probe and the same each time; they cost at least one
    forward of the probe batch, and k = 4 projections cost more than logit_sum's one backward."""
    _needs_task_deps(task_name)
    from mat_cuda.benchmarks.train.tasks import build_task
    from mat_cuda.flops import FlopMeter

    cfg = _tiny(task_name)
    charged = {}
    for kernel in ("logit_sum", "output"):
        task = build_task(task_name, cfg, 0, "cpu")
        inputs, forward = task.probe_batch
        assert inputs.shape[0] == cfg["batch_size"]
        method = build_method("mat", task.model, lr=1e-3, warmup=1, probe_every=2, seed=0,
                              mat_kernel=kernel, probe_batch=task.probe_batch)
        assert method.mat.kernel == kernel
        batches = task.train_batches()
        extras, probes = [], []
        for step in range(5):
            before = len(method.mat.probe_steps)
            task.loss_fn(task.model, next(batches)).backward()
            method.step(step)
            method.zero_grad()
            extras.append(method.extra_flops())
            probes.append(len(method.mat.probe_steps) > before)
        assert sum(probes) >= 2
        assert all((e > 0) == p for e, p in zip(extras, probes)), (extras, probes)
        assert len({e for e, p in zip(extras, probes) if p}) == 1
        with torch.no_grad(), FlopMeter(task.model) as meter:
            forward(task.model, inputs)
        charged[kernel] = max(extras)
        assert charged[kernel] > meter.summary()["total"] > 0
    assert charged["output"] > charged["logit_sum"]


def test_unknown_mat_kernel_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse choices
        main(["train", "--size", "tiny", "--mat-kernel", "hessian", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--mat-kernel" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_output_kernel_run_records_its_kernel(tmp_path):
    pytest.importorskip("matplotlib")
    res = _train_json(tmp_path / "o", "mat", "0", extra=("--mat-kernel", "output"))
    assert res["config"]["mat_kernel"] == "output"
    (run,) = res["runs"]
    assert run["mat_kernel"] == "output" and run["probe_steps"]
    loss_run = _train_json(tmp_path / "l", "mat", "0")["runs"][0]
    assert loss_run["mat_kernel"] == "loss"
    # Same masks would give the same training FLOPs; the output kernel adds its probe passes
    # and skips the loss kernel's all-active probe steps, so the totals differ.
    assert run["total_flops"] != loss_run["total_flops"]


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_bars_only_on_a_terminal(monkeypatch):
    """A log file or a pipe gets no tqdm refreshes (cli.py prints one line per finished run);
    a terminal gets a bar."""
    pytest.importorskip("tqdm")
    from mat_cuda.benchmarks.train.runner import _progress

    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert _progress(10, "x", enabled=True) is None
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    bar = _progress(10, "x", enabled=True)
    assert bar is not None
    bar.close()
    assert _progress(10, "x", enabled=False) is None
