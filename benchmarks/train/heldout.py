"""The held-out protocol's statistics (`mat-bench train --size heldout`, then `mat-bench report`).

Runs (runner.py) train until their validation loss has not improved for ``patience``
evaluations and record, at every evaluation, the validation and the test loss. Here:
  - every method is judged at its own **best-valid checkpoint** (the evaluation with its lowest
    validation loss), on **test**; the test numbers are never used to choose anything;
  - paired by seed: mean difference, 95% CI (Student's t, n − 1 d.o.f.) and win counts (seeds
    where the method's test loss is lower);
  - **compute to the baseline's best**: per seed, the target is the baseline's test loss at its
    best-valid checkpoint (its converged result); a method reaches it at its first evaluation
    whose test loss is ≤ the target, and the FLOPs (wall time) there are divided by the
    baseline's FLOPs (wall time) to its best-valid checkpoint;
  - **at equal FLOPs**: per seed, MAT's FLOPs to its best-valid checkpoint are the budget; every
    other method is read at its lowest-validation-loss evaluation among those within that budget
    (so a longer run gains nothing from its extra compute), and MAT − method is paired on test.
"""
from __future__ import annotations

import math
import statistics

# Student's t, two-sided 95%, by degrees of freedom (n − 1 paired seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(dof: int) -> float:
    """Two-sided 95% Student's t quantile for ``dof`` ≥ 1 degrees of freedom (the next smaller
    tabulated d.o.f. above 20, so the interval errs wide)."""
    if dof < 1:
        raise ValueError(f"a confidence interval needs at least 2 paired values, got dof={dof}")
    return _T95[max(d for d in _T95 if d <= dof)]


def paired(diffs) -> dict:
    """{"n", "mean", "std", "ci": (lo, hi) or None for n < 2, "wins": how many diffs < 0}."""
    diffs = [float(d) for d in diffs]
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci": None, "wins": 0}
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else 0.0
    ci = None
    if n > 1:
        half = t95(n - 1) * std / math.sqrt(n)
        ci = (mean - half, mean + half)
    return {"n": n, "mean": mean, "std": std, "ci": ci, "wins": sum(d < 0 for d in diffs)}


def is_heldout(run: dict) -> bool:
    """Whether a run recorded test losses and a best-valid checkpoint (the held-out protocol)."""
    return "test_loss" in run.get("best_valid", {})


def first_at_or_below(points: list, target: float, key: str = "loss"):
    """The first of ``points`` (evaluations or curve points, in order) whose ``key`` is ≤
    ``target``; None when none is."""
    for p in points:
        if p[key] <= target:
            return p
    return None


def _best_within(evals: list, budget: float) -> dict:
    """The lowest-validation-loss evaluation among those with FLOPs ≤ budget (the step-0
    evaluation always qualifies)."""
    return min((e for e in evals if e["flops"] <= budget), key=lambda e: e["loss"])


def summarize_heldout(runs: list, metric: str) -> dict:
    """Held-out statistics of one task's runs (all methods, paired by seed)."""
    by = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    base = by.get("baseline", {})
    mat = by.get("mat", {})
    out = {"methods": {}, "vs_mat_at_equal_flops": {}, "metric": metric}
    for name, seeds in by.items():
        rs = [seeds[s] for s in sorted(seeds)]
        bv = [r["best_valid"] for r in rs]
        row = {
            "seeds": sorted(seeds),
            "test_loss": [b["test_loss"] for b in bv],
            "test_metric": [b.get(f"test_{metric}", math.nan) for b in bv],
            "valid_loss": [b["loss"] for b in bv],
            "steps_to_best": [b["step"] for b in bv],
            "steps_run": [r["steps_run"] for r in rs],
            "stop_reasons": [r["stop_reason"] for r in rs],
            "flops_to_best": [b["flops"] for b in bv],
            "wall_to_best": [b["wall_s"] for b in bv],
        }
        common = [s for s in sorted(seeds) if s in base]
        if common and name != "baseline":
            row["vs_baseline"] = paired(seeds[s]["best_valid"]["test_loss"]
                                        - base[s]["best_valid"]["test_loss"] for s in common)
        if common:
            flops_ratio, wall_ratio, reached = [], [], []
            for s in common:
                b = base[s]["best_valid"]
                hit = first_at_or_below(seeds[s]["evals"], b["test_loss"], key="test_loss")
                reached.append(hit is not None)
                if hit is not None:
                    flops_ratio.append(hit["flops"] / b["flops"] if b["flops"] else math.nan)
                    wall_ratio.append(hit["wall_s"] / b["wall_s"] if b["wall_s"] else math.nan)
            row["to_baseline_best"] = {
                "reached": sum(reached), "of": len(common),
                "flops_ratio": flops_ratio, "wall_ratio": wall_ratio,
                "best_flops_ratio": [seeds[s]["best_valid"]["flops"] / base[s]["best_valid"]["flops"]
                                     for s in common if base[s]["best_valid"]["flops"]],
                "best_wall_ratio": [seeds[s]["best_valid"]["wall_s"] / base[s]["best_valid"]["wall_s"]
                                    for s in common if base[s]["best_valid"]["wall_s"]],
            }
        out["methods"][name] = row
        if name != "mat" and mat:
            shared = [s for s in sorted(seeds) if s in mat]
            if shared:
                diffs, within = [], []
                for s in shared:
                    budget = mat[s]["best_valid"]["flops"]
                    other = _best_within(seeds[s]["evals"], budget)
                    diffs.append(mat[s]["best_valid"]["test_loss"] - other["test_loss"])
                    within.append(other["flops"] / budget if budget else math.nan)
                out["vs_mat_at_equal_flops"][name] = {**paired(diffs),
                                                      "other_flops_over_budget": within}
    return out


def _ms(xs, digits=4) -> str:
    xs = list(xs)
    if not xs:
        return "n/a"
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.{digits}f} ± {s:.{digits}f}"


def _pd(p: dict, digits=4) -> str:
    if not p or p["n"] == 0:
        return "n/a"
    ci = (f"[{p['ci'][0]:+.{digits}f}, {p['ci'][1]:+.{digits}f}]" if p["ci"] else "(one seed)")
    return f"{p['mean']:+.{digits}f} {ci}, {p['wins']}/{p['n']} wins"


def markdown_heldout(task: str, summary: dict) -> list:
    """Markdown lines: the held-out table of one task."""
    metric = summary["metric"]
    lines = [f"### {task}: held-out protocol (best-valid checkpoint, on test)", "",
             "| method | seeds | test loss | test " + metric + " | method − baseline, test "
             "(mean [95% CI], wins) | FLOPs to best-valid / baseline's | wall to best-valid / "
             "baseline's | reaches baseline's test loss | FLOPs there / baseline's | wall there / "
             "baseline's | steps to best-valid | stopped by |", "|" + "---|" * 12]
    for name, row in summary["methods"].items():
        tb = row.get("to_baseline_best", {})
        stops = ", ".join(f"{k} {row['stop_reasons'].count(k)}" for k in
                          dict.fromkeys(row["stop_reasons"]))
        lines.append(
            f"| {name} | {len(row['seeds'])} | {_ms(row['test_loss'])} | "
            f"{_ms(row['test_metric'], 3)} | {_pd(row.get('vs_baseline'))} | "
            f"{_ms(tb.get('best_flops_ratio', []), 3)} | {_ms(tb.get('best_wall_ratio', []), 3)} | "
            f"{tb.get('reached', 0)}/{tb.get('of', 0)} | {_ms(tb.get('flops_ratio', []), 3)} | "
            f"{_ms(tb.get('wall_ratio', []), 3)} | {_ms(row['steps_to_best'], 0)} | {stops} |")
    eq = summary["vs_mat_at_equal_flops"]
    if eq:
        lines += ["", "MAT against each method at equal FLOPs (the other method read at its "
                  "best-valid evaluation within MAT's FLOPs to its best-valid checkpoint), on test:",
                  "", "| method | MAT − method (mean [95% CI], MAT wins) | the method's FLOPs used "
                  "/ MAT's budget |", "|---|---|---|"]
        for name, p in eq.items():
            lines.append(f"| {name} | {_pd(p)} | {_ms(p['other_flops_over_budget'], 3)} |")
    return lines + [""]
