"""The held-out protocol of `mat-bench train` (issue 16): runs to convergence on the validation
split, test losses recorded for reporting only, best-valid checkpoints, paired statistics on
test (95% CI, wins), compute to the baseline's best and comparisons at equal FLOPs."""
import json
import math

import pytest

from mat_cuda.benchmarks.__main__ import main
from mat_cuda.benchmarks.train.heldout import paired, summarize_heldout, t95
from mat_cuda.benchmarks.train.runner import run_one
from mat_cuda.benchmarks.train.tasks import SIZES, build_task, size_config


def _tiny(task="mlm", **kw):
    cfg = size_config(task, "tiny")
    cfg.update(steps=8, eval_every=2, warmup=2, probe_every=1, eval_test=True)
    cfg.update(kw)
    return cfg


# ------------------------------------------------------------------------------ statistics
def test_paired_ci_and_wins_by_hand():
    p = paired([1.0, 2.0, 3.0])
    assert p["n"] == 3 and p["mean"] == 2.0 and p["std"] == 1.0 and p["wins"] == 0
    half = 4.303 / math.sqrt(3)  # t(0.975, 2 d.o.f.) · std / √n
    assert p["ci"] == pytest.approx((2.0 - half, 2.0 + half), rel=1e-12)
    q = paired([-0.5, 0.25, -0.1, -0.2, 0.0])
    assert q["wins"] == 3 and q["ci"][0] < q["mean"] < q["ci"][1]
    assert paired([0.3])["ci"] is None and paired([])["n"] == 0


def test_t95_table():
    assert t95(1) == 12.706 and t95(4) == 2.776 and t95(20) == 2.086
    assert t95(22) == 2.086 and t95(100) == 2.042  # errs wide between tabulated values
    with pytest.raises(ValueError, match="at least 2"):
        t95(0)


def _run(method, seed, evals):
    """A synthetic held-out run record: evals = [(step, flops, wall, valid, test), ...]."""
    ev = [{"step": s, "flops": f, "wall_s": w, "loss": v, "test_loss": t, "test_perplexity": 0.0}
          for s, f, w, v, t in evals]
    best = min(ev, key=lambda e: e["loss"])
    return {"task": "mlm", "method": method, "seed": seed, "evals": ev, "best_valid": best,
            "steps_run": ev[-1]["step"], "stop_reason": "patience"}


def test_summary_reads_test_at_best_valid_and_compute_to_the_baseline_best():
    runs = [
        # baseline: best valid at step 20 (test 2.0 there); its lowest test (1.9, step 30) is
        # NOT its result: test never picks the checkpoint.
        _run("baseline", 0, [(0, 0, 0, 5, 5), (10, 100, 1, 3, 3), (20, 200, 2, 2.5, 2.0),
                             (30, 300, 3, 2.6, 1.9)]),
        # mat reaches the baseline's test 2.0 at step 10 (60 FLOPs, 0.9 s), best valid at 20
        _run("mat", 0, [(0, 0, 0, 5, 5), (10, 60, 0.9, 2.4, 1.95), (20, 120, 1.5, 2.3, 1.9),
                        (30, 180, 2.2, 2.35, 1.8)]),
        # random never reaches 2.0; within mat's budget (120 FLOPs) its best-valid eval is step 10
        _run("random", 0, [(0, 0, 0, 5, 5), (10, 60, 1, 2.9, 2.5), (20, 120, 2, 3.0, 2.4),
                           (30, 180, 3, 2.1, 2.05)]),
    ]
    s = summarize_heldout(runs, "perplexity")
    base, mat, rnd = (s["methods"][m] for m in ("baseline", "mat", "random"))
    assert base["test_loss"] == [2.0] and mat["test_loss"] == [1.9] and rnd["test_loss"] == [2.05]
    assert mat["vs_baseline"]["mean"] == pytest.approx(-0.1) and mat["vs_baseline"]["wins"] == 1
    tb = mat["to_baseline_best"]
    assert tb["reached"] == 1 and tb["flops_ratio"] == [60 / 200] and tb["wall_ratio"] == [0.9 / 2]
    assert tb["best_flops_ratio"] == [120 / 200]
    assert rnd["to_baseline_best"]["reached"] == 0
    eq = s["vs_mat_at_equal_flops"]["random"]
    assert eq["mean"] == pytest.approx(1.9 - 2.5)  # random read at step 10, not at its later best
    assert eq["other_flops_over_budget"] == [60 / 120]
    assert s["vs_mat_at_equal_flops"]["baseline"]["mean"] == pytest.approx(1.9 - 3.0)


# ------------------------------------------------------------------------------ the runner
def test_every_task_has_a_disjoint_test_split():
    for task in ("mlm", "cnn"):
        if task == "cnn":
            pytest.importorskip("sklearn", reason="the embedded image data needs scikit-learn")
        t = build_task(task, size_config(task, "tiny"), 0, "cpu")
        valid, test = t.evaluate(t.model), t.evaluate_test(t.model)
        assert math.isfinite(valid["loss"]) and math.isfinite(test["loss"])
        assert valid["loss"] != test["loss"]  # different data, same model


def test_patience_stops_a_run_that_does_not_improve():
    # lr 0: the validation loss never improves after step 0, so patience 2 stops at the 2nd
    # evaluation after it; the best-valid checkpoint is step 0.
    rec = run_one("mlm", "baseline", 0, _tiny(lr=0.0, steps=100, patience=2), progress=False)
    assert rec["stop_reason"] == "patience" and rec["steps_run"] == 4
    assert [e["step"] for e in rec["evals"]] == [0, 2, 4]
    assert rec["best_valid"]["step"] == 0
    assert all("test_loss" in e and "test_perplexity" in e for e in rec["evals"])


def test_run_to_the_cap_and_best_valid_is_the_lowest_validation_loss():
    rec = run_one("mlm", "mat", 0, _tiny(steps=12, patience=50), progress=False)
    assert rec["stop_reason"] in ("steps", "method")
    assert rec["best_valid"] == min(rec["evals"], key=lambda e: e["loss"])


def test_a_task_without_a_test_split_refuses_eval_test():
    pytest.importorskip("transformers")
    from mat_cuda.benchmarks.train.robust import robust_config
    cfg = {**robust_config("short"), "steps": 2, "eval_test": True}
    with pytest.raises(ValueError, match="no test split"):
        run_one("hf-bert", "baseline", 0, cfg, progress=False)


def test_heldout_size_exists_for_every_task():
    assert "heldout" in SIZES
    for task in ("mlm", "cnn", "moe"):
        cfg = size_config(task, "heldout")
        assert cfg["patience"] >= 1 and cfg["eval_test"] is True
        assert cfg["steps"] > cfg["warmup"] + 8 * cfg["probe_every"]


# ------------------------------------------------------------------------------------- CLI
def test_cli_heldout_table(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["train", "--size", "tiny", "--patience", "2", "--steps", "8", "--eval-every", "2",
               "--method", "baseline,mat,random", "--seeds", "0,1", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    held = res["summary"]["mlm"]["heldout"]
    assert set(held["methods"]) == {"baseline", "mat", "random"}
    assert held["methods"]["mat"]["vs_baseline"]["n"] == 2
    md = (out / "summary.md").read_text()
    assert "held-out protocol (best-valid checkpoint, on test)" in md
    assert "MAT against each method at equal FLOPs" in md
    capsys.readouterr()
    rc = main(["train", "--size", "tiny", "--patience", "0", "--out", str(tmp_path / "p")])
    assert rc == 2 and "--patience" in capsys.readouterr().err


def test_extract_keeps_what_the_tables_are_computed_from(tmp_path):
    """scripts/heldout_extract.py: the compact record committed to docs/results gives the same
    held-out statistics as the full results.json, and the plot draws from it."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "heldout_extract.py")
    spec = importlib.util.spec_from_file_location("heldout_extract", path)
    extract_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract_mod)
    out = tmp_path / "o"
    assert main(["train", "--size", "tiny", "--patience", "2", "--steps", "6", "--eval-every", "2",
                 "--method", "baseline,mat,random", "--seeds", "0,1", "--out", str(out),
                 "--no-progress"]) == 0
    full = json.loads((out / "results.json").read_text())
    assert extract_mod.main([str(out / "results.json"), str(tmp_path / "x.json")]) == 0
    small = json.loads((tmp_path / "x.json").read_text())
    assert summarize_heldout(small["runs"], "perplexity") == summarize_heldout(full["runs"], "perplexity")
    pytest.importorskip("matplotlib")
    assert extract_mod.main(["--plot", str(tmp_path / "x.json"), str(tmp_path / "p.png")]) == 0
    # several records of different tasks: one figure of all their runs
    other = json.loads((tmp_path / "x.json").read_text())
    for r in other["runs"]:
        r["task"] = "moe"
    (tmp_path / "z.json").write_text(json.dumps(other))
    assert extract_mod.main(["--plot", str(tmp_path / "x.json"), str(tmp_path / "z.json"),
                             str(tmp_path / "p4.png")]) == 0
    assert (tmp_path / "p4.png").stat().st_size > (tmp_path / "p.png").stat().st_size
    # one record given twice would draw every seed twice: refused
    assert extract_mod.main(["--plot", str(tmp_path / "x.json"), str(tmp_path / "x.json"),
                             str(tmp_path / "p2.png")]) == 2
    assert not (tmp_path / "p2.png").exists()
    # two records holding the same task would mix their seeds: refused unless one is filtered
    (tmp_path / "y.json").write_text((tmp_path / "x.json").read_text())
    assert extract_mod.main(["--plot", str(tmp_path / "x.json"), str(tmp_path / "y.json"),
                             str(tmp_path / "p3.png")]) == 2
    assert not (tmp_path / "p3.png").exists()
    assert extract_mod.main(["--plot", str(tmp_path / "x.json") + ":mlm",
                             str(tmp_path / "y.json") + ":cnn", str(tmp_path / "p3.png")]) == 0
    assert (tmp_path / "p3.png").stat().st_size > 1000
    assert (tmp_path / "p.png").stat().st_size > 1000
