"""Aggregation, summary table and plots of `mat-bench train` runs.

Statistics (the issue's rules):
  - every method runs the same seeds; results are seed mean ± sample std (std 0 for one seed)
    and paired differences to the baseline (method − baseline, same seed);
  - a method's *curve* is the seed mean of its validation loss at each evaluation, against the
    seed-mean FLOPs and wall time at that evaluation (evaluations aligned by index);
  - the baseline's best is the minimum of its curve; the *target* is that best plus the
    baseline's seed std at that evaluation; a method *reaches* it at the first evaluation where
    its curve is ≤ the target. "Compute to target" is the FLOPs (wall time) there, and the
    headline ratio divides it by the baseline's own compute to the same target.
"""
from __future__ import annotations

import math
import os
import statistics

from .heldout import first_at_or_below, is_heldout, markdown_heldout, summarize_heldout

SCHEMA_VERSION = 1


def mean_std(xs) -> tuple:
    xs = [float(x) for x in xs]
    if not xs or any(math.isnan(x) for x in xs):   # statistics.stdev raises on NaN
        return (math.nan, math.nan)
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(ms, digits=4) -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def curve(runs: list) -> list:
    """Seed-mean curve: [{"step", "flops", "wall_s", "loss", "loss_std", <metric>}] aligned by
    evaluation index over the runs' common length."""
    n = min(len(r["evals"]) for r in runs)
    out = []
    for i in range(n):
        pts = [r["evals"][i] for r in runs]
        point = {"step": pts[0]["step"],
                 "flops": statistics.fmean(p["flops"] for p in pts),
                 "wall_s": statistics.fmean(p["wall_s"] for p in pts)}
        point["loss"], point["loss_std"] = mean_std(p["loss"] for p in pts)
        for key in ("perplexity", "accuracy"):
            if key in pts[0]:
                point[key] = statistics.fmean(p[key] for p in pts)
        out.append(point)
    return out


def summarize_task(runs: list, ceiling: dict | None) -> dict:
    """Per-method statistics, paired differences and the headline rows of one task."""
    by_method: dict = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    methods = {}
    for name, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        kinds = rs[0]["mean_active_fraction_after_warmup"].keys()
        methods[name] = {
            "seeds": [r["seed"] for r in rs],
            "final_loss": mean_std(r["final_loss"] for r in rs),
            "best_loss": mean_std(r["best_loss"] for r in rs),
            "total_flops": mean_std(r["total_flops"] for r in rs),
            "wall_s": mean_std(r["wall_s"] for r in rs),
            "active_fraction": {k: statistics.fmean(r["mean_active_fraction_after_warmup"][k]
                                                    for r in rs) for k in kinds},
            "curve": curve(rs),
        }
    result = {"methods": methods, "ceiling": ceiling, "headline": None}
    if all(is_heldout(r) for r in runs):
        result["heldout"] = summarize_heldout(
            runs, "accuracy" if runs[0]["task"] == "cnn" else "perplexity")
    base = by_method.get("baseline")
    if not base:
        return result
    base_seed = {r["seed"]: r for r in base}
    for name, rs in by_method.items():
        pairs = [(r, base_seed[r["seed"]]) for r in rs if r["seed"] in base_seed]
        methods[name]["paired_diff_final_loss"] = mean_std(
            r["final_loss"] - b["final_loss"] for r, b in pairs)
        methods[name]["paired_diff_best_loss"] = mean_std(
            r["best_loss"] - b["best_loss"] for r, b in pairs)
        methods[name]["paired_flops_ratio"] = mean_std(
            r["total_flops"] / b["total_flops"] for r, b in pairs)
        methods[name]["paired_wall_ratio"] = mean_std(
            r["wall_s"] / b["wall_s"] for r, b in pairs if b["wall_s"] > 0)
    bc = methods["baseline"]["curve"]
    best = min(bc, key=lambda p: p["loss"])
    target = best["loss"] + best["loss_std"]
    base_reach = first_at_or_below(bc, target)
    rows = {}
    for name, m in methods.items():
        reach = first_at_or_below(m["curve"], target)
        best_point = min(m["curve"], key=lambda p: p["loss"])
        row = {"best_loss_of_curve": best_point["loss"], "reached": reach is not None,
               "gap_to_target": None if reach else best_point["loss"] - target}
        if reach is not None:
            row.update(step=reach["step"], flops=reach["flops"], wall_s=reach["wall_s"],
                       flops_fraction=reach["flops"] / base_reach["flops"]
                       if base_reach["flops"] else math.nan,
                       wall_fraction=reach["wall_s"] / base_reach["wall_s"]
                       if base_reach["wall_s"] else math.nan)
        rows[name] = row
    result["headline"] = {"baseline_best": best["loss"], "baseline_best_std": best["loss_std"],
                          "target": target, "rows": rows}
    return result


def markdown_summary(results: dict) -> str:
    """The summary.md text for ``results`` (the dict written to results.json)."""
    env = results.get("environment", {})
    lines = ["# mat-bench train results", "",
             f"machine: {env.get('cpu')}, {env.get('gpu', 'no GPU')}; torch {env.get('torch')}; "
             f"device {results['config'].get('device')}; size {results['config'].get('size')}; "
             f"seeds {results['config'].get('seeds')}", ""]
    for task, summ in results["summary"].items():
        metric = "perplexity" if task != "cnn" else "accuracy"
        lines += [f"## {task}", ""]
        if summ.get("heldout"):
            lines += markdown_heldout(task, summ["heldout"])
            lines += ["### validation split (the curves every method was stopped and "
                      "checkpointed on)", ""]
        lines += ["| method | seeds | final val loss | best val loss | Δ final vs baseline "
                  "(paired) | FLOPs (×1e9) | FLOPs / baseline | wall s | wall / baseline | "
                  f"final {metric} | active fraction (after warm-up) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in summ["methods"].items():
            fl = m["total_flops"]
            frac = ", ".join(f"{k} {v:.2f}" for k, v in m["active_fraction"].items())
            final_metric = m["curve"][-1].get(metric, math.nan)
            lines.append(
                f"| {name} | {len(m['seeds'])} | {_fmt(m['final_loss'])} | {_fmt(m['best_loss'])} | "
                f"{_fmt(m.get('paired_diff_final_loss', (math.nan, 0)))} | "
                f"{fl[0] / 1e9:.2f} | {_fmt(m.get('paired_flops_ratio', (math.nan, 0)), 3)} | "
                f"{m['wall_s'][0]:.1f} | {_fmt(m.get('paired_wall_ratio', (math.nan, 0)), 3)} | "
                f"{final_metric:.4g} | {frac} |")
        head = summ.get("headline")
        if head:
            lines += ["", f"Baseline best (seed-mean curve): {head['baseline_best']:.4f} "
                      f"(seed std {head['baseline_best_std']:.4f}); target = best + std = "
                      f"{head['target']:.4f}.", "",
                      "| method | reaches target | at step | FLOPs to target / baseline's | "
                      "wall to target / baseline's | best of seed-mean curve |",
                      "|---|---|---|---|---|---|"]
            for name, row in head["rows"].items():
                if row["reached"]:
                    lines.append(f"| {name} | yes | {row['step']} | {row['flops_fraction']:.3f} | "
                                 f"{row['wall_fraction']:.3f} | {row['best_loss_of_curve']:.4f} |")
                else:
                    lines.append(f"| {name} | no (short by {row['gap_to_target']:.4f} nats) | – | "
                                 f"– | – | {row['best_loss_of_curve']:.4f} |")
        ceil = summ.get("ceiling")
        if ceil:
            lines += ["", "Savings ceiling (share of a step's FLOPs removed by freezing every "
                      "module of a kind, measured):", ""]
            lines += [f"- {k}: {v['ceiling']:.1%}" for k, v in ceil["per_kind"].items()]
        lines.append("")
    lines += ["FLOPs: measured with mat_cuda.flops.FlopMeter once per distinct mask state "
              "(see benchmarks/train/runner.py); wall time excludes evaluation and metering.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plots

def write_plots(results: dict, runs: list, out: str) -> list:
    """Write the PNG plots; return their paths. Needs matplotlib (Agg backend)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("mat-bench train writes PNG plots with matplotlib: pip install "
                           "matplotlib (or 'mat_cuda[bench]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, summ in results["summary"].items():
        for xkey, xlabel, fname in (("flops", "training FLOPs executed", "loss_vs_flops"),
                                    ("wall_s", "training wall time (s)", "loss_vs_wall")):
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for name, m in summ["methods"].items():
                c = m["curve"]
                x = [p[xkey] for p in c]
                y = [p["loss"] for p in c]
                s = [p["loss_std"] for p in c]
                ax.plot(x, y, label=name, marker=".")
                ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)],
                                alpha=0.15)
            head = summ.get("headline")
            if head:
                ax.axhline(head["target"], color="grey", ls="--", lw=0.8, label="baseline best + std")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation loss (nats)")
            ax.set_title(f"{task}: validation loss (seed mean ± std)")
            ax.legend(fontsize=7)
            paths.append(_save(fig, out, f"{task}_{fname}.png"))
        paths += _fraction_plot(plt, task, [r for r in runs if r["task"] == task], out)
        paths += _lambda_heatmap(plt, task, [r for r in runs if r["task"] == task], out)
    return paths


def _save(fig, out, name) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _fraction_plot(plt, task, runs, out) -> list:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    seen = set()
    for r in runs:
        if r["method"] in seen or r["method"] == "baseline":
            continue
        seen.add(r["method"])
        hist = r["active_fraction"]
        steps = [h["step"] for h in hist]
        for kind in [k for k in hist[0] if k != "step"]:
            ax.plot(steps, [h[kind] for h in hist], label=f"{r['method']} {kind}")
    ax.set_xlabel("step")
    ax.set_ylabel("active fraction of modules")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{task}: active fraction per kind (first seed of each method)")
    if seen:
        ax.legend(fontsize=6, ncol=2)
    return [_save(fig, out, f"{task}_active_fraction.png")]


def _lambda_heatmap(plt, task, runs, out) -> list:
    """λ per head over training from the first MAT run of the task (nothing without one)."""
    mat_runs = [r for r in runs if r["method"] == "mat" and r.get("lambda_history")]
    if not mat_runs:
        return []
    r = mat_runs[0]
    hist = r["lambda_history"]
    kinds = r["modules"]["kinds"]
    cols = [i for i, k in enumerate(kinds) if k == "head"] or list(range(len(kinds)))
    import numpy as np
    lam = np.array([[row[i] for i in cols] for row in hist["lam"]], dtype=float)
    from matplotlib.colors import LogNorm

    # λ spans orders of magnitude over training (it grows as the model learns): log colours.
    positive = lam[lam > 0]
    norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-4), vmax=positive.max()) \
        if positive.size else None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    im = ax.imshow(lam.T, aspect="auto", origin="lower", interpolation="nearest", norm=norm,
                   extent=(hist["step"][0], hist["step"][-1], -0.5, len(cols) - 0.5)
                   if len(hist["step"]) > 1 else None)
    fig.colorbar(im, ax=ax, label="λ_max (log scale)")
    ax.set_xlabel("step")
    ax.set_ylabel("head (module order)")
    ax.set_title(f"{task}: λ per head (MAT, seed {r['seed']})")
    return [_save(fig, out, f"{task}_lambda_heatmap.png")]
