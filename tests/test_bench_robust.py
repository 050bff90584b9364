"""`mat-bench robust`: the HF tasks train, the table's statistics and criterion, λ histories,
merging, CLI errors. Tiny schedules (the real lengths are in benchmarks/train/robust.py)."""
import json
import math
import os

import pytest

pytest.importorskip("transformers")

from mat_cuda.benchmarks.__main__ import main  # noqa: E402
from mat_cuda.benchmarks.train import robust  # noqa: E402


@pytest.fixture
def tiny_lengths(monkeypatch):
    monkeypatch.setattr(robust, "LENGTHS", {"short": dict(steps=4, warmup=2, probe_every=1,
                                                          eval_every=2)})
    monkeypatch.setattr(robust, "HF_MODEL", dict(robust.HF_MODEL, hidden=16, ffn=32, eval_tokens=1024))


def test_robust_runs_tables_and_merges(tiny_lengths, tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the embedded image data needs scikit-learn")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["robust", "--model", "gpt2,vit", "--length", "short", "--seeds", "0",
                 "--out", str(a), "--no-progress"]) == 0
    assert main(["robust", "--model", "gpt2,vit", "--length", "short", "--seeds", "1",
                 "--out", str(b), "--no-progress"]) == 0
    res = json.load(open(a / "results.json"))
    assert {(r["model"], r["method"]) for r in res["runs"]} == {
        ("gpt2", "baseline"), ("gpt2", "mat"), ("vit", "baseline"), ("vit", "mat")}
    for r in res["runs"]:
        assert r["steps_run"] == 4 and math.isfinite(r["final_loss"])
    hist = json.load(open(a / "lambda_histories.json"))
    assert {h["model"] for h in hist} == {"gpt2", "vit"}
    assert all(len(h["lam"]) == len(h["mask"]) == len(h["step"]) > 0 for h in hist)

    out = tmp_path / "merged"
    assert main(["robust", "--merge", str(a), str(b), "--out", str(out)]) == 0
    merged = json.load(open(out / "results.json"))
    rows = robust.rows(merged["runs"])
    assert {(r["model"], r["length"]) for r in rows} == {("gpt2", "short"), ("vit", "short")}
    for r in rows:
        assert r["seeds"] == [0, 1]
        by = {(x["method"], x["seed"]): x for x in merged["runs"] if x["model"] == r["model"]}
        diffs = [by[("mat", s)]["final_loss"] - by[("baseline", s)]["final_loss"] for s in (0, 1)]
        assert r["per_seed_diff"] == pytest.approx(diffs)
        base = [by[("baseline", s)]["final_loss"] for s in (0, 1)]
        mat = [by[("mat", s)]["final_loss"] for s in (0, 1)]
        std = abs(base[0] - base[1]) / math.sqrt(2)
        assert r["passes"] == (sum(mat) / 2 <= sum(base) / 2 + std)
        saved = [1 - by[("mat", s)]["total_flops"] / by[("baseline", s)]["total_flops"] for s in (0, 1)]
        assert r["flops_saved"][0] == pytest.approx(sum(saved) / 2)
    table = open(out / "robust.md").read()
    assert "| gpt2 | short (4 steps) | 2 |" in table and "within baseline + 1 std" in table

    # The same run twice is refused, named.
    rc = main(["robust", "--merge", str(a), str(a), "--out", str(tmp_path / "dup")])
    assert rc == 2 and "also in" in capsys.readouterr().err


def test_robust_controls_run_at_mats_fraction_and_are_tabled(tiny_lengths, tmp_path):
    out = tmp_path / "c"
    assert main(["robust", "--model", "gpt2", "--length", "short", "--seeds", "0,1",
                 "--method", "gradnorm,random,mat", "--out", str(out), "--no-progress"]) == 0
    res = json.load(open(out / "results.json"))
    # mat runs first on each seed; the controls train its measured fraction per kind.
    assert [r["method"] for r in res["runs"]] == ["mat", "random", "gradnorm"] * 2
    by = {(r["method"], r["seed"]): r for r in res["runs"]}
    for s in (0, 1):
        want = by[("mat", s)]["mean_active_fraction_after_warmup"]
        for control in ("random", "gradnorm"):
            got = by[(control, s)]["mean_active_fraction_after_warmup"]
            assert got.keys() == want.keys()
            for k in want:   # whole modules: within one module of the kind's count
                assert abs(got[k] - want[k]) <= 0.5, (control, k, got[k], want[k])
    rows = robust.selection_rows(res["runs"])
    assert [(r["control"], r["seeds"]) for r in rows] == [("random", [0, 1]), ("gradnorm", [0, 1])]
    for r in rows:
        diff = [by[("mat", s)]["final_loss"] - by[(r["control"], s)]["final_loss"] for s in (0, 1)]
        assert r["diff"][0] == pytest.approx(sum(diff) / 2)
        assert r["wins"] == sum(d < 0 for d in diff)
        lo, hi = r["diff_ci95"]
        assert lo <= r["diff"][0] <= hi
    assert robust.rows(res["runs"]) == []    # no baseline: no MAT − baseline row
    table = open(out / "robust.md").read()
    assert "| gpt2 | short | gradnorm | 2 |" in table and "MAT against equal-compute controls" in table
    assert "within baseline + 1 std" not in table   # no baseline ran: no empty baseline table


def test_robust_controls_without_mat_are_refused(tmp_path):
    with pytest.raises(ValueError, match="add mat"):
        robust.run_robust(["gpt2"], ["short"], [0], str(tmp_path), {}, methods=("random",))
    assert not os.path.exists(tmp_path / "results.json")


@pytest.mark.parametrize("argv, message", [
    (["--method", "baseline,gradnorm"], "add mat"),
    (["--model", "t5"], "unknown --model"),
    (["--length", "medium"], "unknown --length"),
    (["--seeds", "0,0"], "distinct"),
    (["--merge", "/nonexistent/run"], "No such file"),
])
def test_robust_cli_errors(argv, message, tmp_path, capsys):
    rc = main(["robust", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o" / "results.json")


def test_relative_to_layer_option_reaches_the_policy():
    """`--mat-policy relative_to_layer=same_kind` builds a policy that normalises heads per layer
    of an HF model's discovery names (FFN blocks, one per layer, keep λ); a bad value is a usage
    error naming the allowed ones."""
    from mat_cuda.benchmarks.train.cli import UsageError, parse_policy_options
    from mat_cuda.benchmarks.train.methods import mat_policy_factory

    opts = parse_policy_options("relative_to_layer=same_kind")
    assert opts == {"relative_to_layer": "same_kind"}
    names = [f"bert.encoder.layer.{l}.{m}" for l in (0, 1)
             for m in ("ffn", "attention.head0", "attention.head1")]
    kinds = ["ffn" if n.endswith("ffn") else "head" for n in names]
    policy = mat_policy_factory(opts, warmup=0, probe_every=1)(kinds, names)
    assert policy.modular.relative_to_layer == "same_kind"
    assert policy.modular.normalised_kinds == ["head"]
    with pytest.raises(UsageError, match="relative_to_layer must be None, 'all_kinds' or 'same_kind'"):
        parse_policy_options("relative_to_layer=depth")


def test_min_active_per_layer_option_reaches_the_policy():
    """`--mat-policy min_active_per_layer=1` builds a policy with a minimum per (kind, layer)
    group of heads (FFN blocks, one per layer, get none); a bad value is a usage error."""
    from mat_cuda.benchmarks.train.cli import UsageError, parse_policy_options
    from mat_cuda.benchmarks.train.methods import mat_policy_factory

    opts = parse_policy_options("min_active_per_layer=1")
    assert opts == {"min_active_per_layer": 1}
    names = [f"bert.encoder.layer.{l}.{m}" for l in (0, 1)
             for m in ("ffn", "attention.head0", "attention.head1")]
    kinds = ["ffn" if n.endswith("ffn") else "head" for n in names]
    policy = mat_policy_factory(opts, warmup=0, probe_every=1)(kinds, names)
    assert policy.modular.min_active_per_layer == 1
    assert policy.modular.per_layer_groups == [[1, 2], [4, 5]]
    with pytest.raises(UsageError, match="min_active_per_layer must be an integer ≥ 0"):
        parse_policy_options("min_active_per_layer=-1")
