"""`mat-bench robust`: MAT's default policy against plain AdamW, off the home benchmark.

For every Hugging Face model of hf_tasks.py (tiny config, random init) and every run length
(``short`` ~150 steps, ``long`` 1000 steps), the same seeds run twice: ``baseline`` (every module
trains: plain AdamW through the shared masked harness) and ``mat`` (``mat_cuda.MAT`` with its
default policy; only warm-up and probe interval are set, to the run's length). Same initial
weights, same batches. On request (``--method``) also ``random`` and ``gradnorm``: MAT's
measured active fraction per kind (same seed) chosen at random or by gradient norm, tabled as
MAT − control (:func:`selection_rows`). Recorded per row (model, length): the final validation loss of each
method (seed mean ± sample std), the paired difference mat − baseline (mean ± std, 95% CI with
Student's t), the FLOPs saved (1 − mat's measured FLOPs / the baseline's, per seed) and MAT's
analytic estimate, the active fraction after warm-up, modules retired, converged kinds.

Criterion (issue 15): on every row, mat's mean final loss ≤ the baseline's mean + the baseline's
seed std ("no worse than the baseline plus one seed-std").

Schedule of a length: warm-up 20% of the run, a probe every ``probe_every`` steps chosen so the
policy gets ≥ 12 probes after warm-up (its default needs 8, MATPolicy.probes_needed).
"""
from __future__ import annotations

import json
import math
import os
import statistics

from .heldout import paired
from .hf_tasks import HF_MODEL, HF_TASKS
from .report import mean_std
from .runner import run_one

ROBUST_SCHEMA = 1
LENGTHS = {
    "short": dict(steps=150, warmup=30, probe_every=10, eval_every=50),
    "long": dict(steps=1000, warmup=200, probe_every=25, eval_every=250),
}
MODELS = {name[3:]: name for name in HF_TASKS}  # "bert" -> "hf-bert"
METHODS = ("baseline", "mat", "random", "gradnorm")
# random and gradnorm train, per kind, MAT's measured active fraction after warm-up (same seed,
# same invocation), chosen at random or by gradient norm: equal-compute controls for λ.
SELECTION = ("random", "gradnorm")


def robust_config(length: str) -> dict:
    """Model, data and schedule of one run length (a copy)."""
    return {**HF_MODEL, **LENGTHS[length]}


def check_methods(methods) -> None:
    """Raise ValueError when a control (random, gradnorm) is asked for without mat: they run at
    mat's measured fraction of the same seed."""
    if any(m in SELECTION for m in methods) and "mat" not in methods:
        raise ValueError("random and gradnorm run at MAT's measured active fraction (same seed): "
                         "add mat to the methods")


def run_robust(models: list, lengths: list, seeds: list, out: str, environment: dict,
               device: str = "cpu", progress: bool = True, policy_options: dict | None = None,
               methods=METHODS) -> dict:
    """Run every (length, model, seed, method); results.json is rewritten after each run (an
    interrupted invocation keeps what finished); robust.md holds the table. policy_options:
    MAT's default policy with these constants changed (``--mat-policy``; default: none).
    ``random``/``gradnorm`` need ``mat`` in ``methods`` (they run at its measured fraction, same
    seed); raises ValueError otherwise, before any run."""
    methods = list(methods)
    check_methods(methods)
    # baseline, mat, then the controls that need mat's fraction
    methods.sort(key=lambda m: METHODS.index(m))
    results = {"robust_schema": ROBUST_SCHEMA, "environment": environment,
               "config": {"device": device, "models": models, "lengths": lengths,
                          "seeds": seeds, "methods": list(methods),
                          "mat_policy": policy_options or "default"},
               "length_configs": {n: robust_config(n) for n in lengths}, "runs": []}
    for length in lengths:
        cfg = robust_config(length)
        for model in models:
            for seed in seeds:
                mat_fraction = None
                for method in methods:
                    rec = run_one(MODELS[model], method, seed, cfg, device, progress=progress,
                                  policy_options=policy_options if method == "mat" else None,
                                  fractions=mat_fraction if method in SELECTION else None)
                    if method == "mat":
                        mat_fraction = rec["mean_active_fraction_after_warmup"]
                    rec["length"], rec["model"] = length, model
                    rec["mat_policy"] = (policy_options or "default") if method == "mat" else None
                    results["runs"].append(rec)
                    print(f"  {length:<5} {model:<8} {method:<8} seed {seed}: final val loss "
                          f"{rec['final_loss']:.4f}, {rec['total_flops'] / 1e9:.2f} GFLOP, "
                          f"{rec['wall_s']:.1f} s", flush=True)
                    _write(results, out)
    finish(results, out)
    return results


def merge(paths: list) -> dict:
    """One results dict from several `mat-bench robust` results.json (e.g. lengths or models
    run in parallel). The same length must have the same settings everywhere and each (length,
    model, method, seed) appear once; raises ValueError naming what differs."""
    merged = None
    seen = {}
    for path in paths:
        file = os.path.join(path, "results.json") if os.path.isdir(path) else path
        with open(file) as f:
            res = json.load(f)
        if res.get("robust_schema") != ROBUST_SCHEMA:
            raise ValueError(f"{file} is not a `mat-bench robust` results.json (schema "
                             f"{ROBUST_SCHEMA})")
        if merged is None:
            merged = {k: v for k, v in res.items() if k != "runs"}
            merged["length_configs"], merged["runs"] = {}, []
            merged["config"] = dict(res["config"], sources=[])
        merged["config"]["sources"].append(file)
        for length, cfg in res["length_configs"].items():
            known = merged["length_configs"].setdefault(length, cfg)
            if known != cfg:
                raise ValueError(f"{file}: length {length} ran with other settings than in an "
                                 "earlier file: runs are not comparable")
        for run in res["runs"]:
            if run["method"] == "mat":
                policy = json.dumps(run.get("mat_policy", "default"), sort_keys=True)
                first = merged.setdefault("_policy", policy)
                if policy != first:
                    raise ValueError(f"{file}: mat ran with policy {policy}, an earlier file with "
                                     f"{first}: merge one policy at a time")
            key = (run["length"], run["model"], run["method"], run["seed"])
            if key in seen:
                raise ValueError(f"{file}: {key} also in {seen[key]}")
            seen[key] = file
            merged["runs"].append(run)
    if merged is None:
        raise ValueError("no results to merge")
    merged["config"]["mat_policy"] = json.loads(merged.pop("_policy", '"default"'))
    return merged


def _by_row(runs: list):
    """(model, length, {method: {seed: run}}) per (model, length), in the runs' order."""
    for model, length in dict.fromkeys((r["model"], r["length"]) for r in runs):
        yield model, length, {m: {r["seed"]: r for r in runs
                                  if (r["model"], r["length"], r["method"]) == (model, length, m)}
                              for m in METHODS}


def rows(runs: list) -> list:
    """One row per (model, length) with both methods on the same seeds (paired)."""
    out = []
    for model, length, by in _by_row(runs):
        seeds = sorted(set(by["baseline"]) & set(by["mat"]))
        if not seeds:
            continue
        base = [by["baseline"][s]["final_loss"] for s in seeds]
        mat = [by["mat"][s]["final_loss"] for s in seeds]
        diff = [m - b for m, b in zip(mat, base)]
        saved = [1 - by["mat"][s]["total_flops"] / by["baseline"][s]["total_flops"] for s in seeds]
        analytic = [math.nan if by["mat"][s].get("mat_compute_saved_analytic") is None
                    else by["mat"][s]["mat_compute_saved_analytic"] for s in seeds]
        b_mean, b_std = mean_std(base)
        m_mean, _ = mean_std(mat)
        d = paired(diff)
        fractions = [by["mat"][s]["mean_active_fraction_after_warmup"] for s in seeds]
        kinds = list(fractions[0])
        retired = [sum(by["mat"][s].get("retired") or []) for s in seeds]
        out.append({
            "model": model, "length": length, "steps": by["mat"][seeds[0]]["steps_run"],
            "seeds": seeds, "baseline": (b_mean, b_std), "mat": mean_std(mat),
            "diff": (d["mean"], d["std"]), "diff_ci95": d["ci"] or (math.nan, math.nan),
            "per_seed_diff": diff,
            "flops_saved": mean_std(saved), "flops_saved_analytic": mean_std(analytic),
            "active_fraction": {k: statistics.fmean(f[k] for f in fractions) for k in kinds},
            "retired": retired, "modules": len(by["mat"][seeds[0]]["modules"]["kinds"]),
            "converged_kinds": [by["mat"][s].get("converged_kinds") for s in seeds],
            "passes": m_mean <= b_mean + b_std,
        })
    return out


def selection_rows(runs: list) -> list:
    """One row per (model, length, control) for each control (random, gradnorm) that ran with
    mat on the same seeds: mat − control in final loss, paired by seed (mean ± std, 95% CI,
    wins = seeds where mat's loss is lower), and mat's FLOPs over the control's (≈ 1: equal
    compute)."""
    out = []
    for model, length, by in _by_row(runs):
        for control in SELECTION:
            seeds = sorted(set(by["mat"]) & set(by[control]))
            if not seeds:
                continue
            diff = [by["mat"][s]["final_loss"] - by[control][s]["final_loss"] for s in seeds]
            ratio = [by["mat"][s]["total_flops"] / by[control][s]["total_flops"] for s in seeds]
            d = paired(diff)
            out.append({"model": model, "length": length, "control": control, "seeds": seeds,
                        "mat": mean_std([by["mat"][s]["final_loss"] for s in seeds]),
                        "other": mean_std([by[control][s]["final_loss"] for s in seeds]),
                        "diff": (d["mean"], d["std"]),
                        "diff_ci95": d["ci"] or (math.nan, math.nan),
                        "wins": d["wins"], "flops_ratio": mean_std(ratio)})
    return out


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# mat-bench robust: MAT's default policy vs plain AdamW on Hugging Face models", "",
        f"machine: {env.get('cpu')}, {env.get('gpu', 'no GPU')}; torch {env.get('torch')}; "
        f"commit {env.get('commit')}; MAT policy: {results['config'].get('mat_policy', 'default')}",
        "",
    ]
    baseline_rows = rows(results["runs"])
    if baseline_rows:   # none when only mat and the controls ran
        lines += [
            "| model | length | seeds | baseline final loss | MAT final loss | MAT − baseline "
            "(paired) | 95% CI | per seed | FLOPs saved (measured) | FLOPs saved (MAT analytic) "
            "| active fraction after warm-up | retired / modules | within baseline + 1 std |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in baseline_rows:
        lo, hi = r["diff_ci95"]
        frac = ", ".join(f"{k} {v:.2f}" for k, v in r["active_fraction"].items())
        lines.append(
            f"| {r['model']} | {r['length']} ({r['steps']} steps) | {len(r['seeds'])} "
            f"| {_fmt(r['baseline'])} | {_fmt(r['mat'])} | {_fmt(r['diff'], signed=True)} "
            f"| [{lo:+.4f}, {hi:+.4f}] | {', '.join(f'{d:+.4f}' for d in r['per_seed_diff'])} "
            f"| {_fmt(r['flops_saved'], pct=True)} | {_fmt(r['flops_saved_analytic'], pct=True)} "
            f"| {frac} | {', '.join(str(x) for x in r['retired'])} / {r['modules']} "
            f"| {'yes' if r['passes'] else '**no**'} |")
    controls = selection_rows(results["runs"])
    if controls:
        lines += ["", "MAT against equal-compute controls (the same modules per kind trained, "
                  "chosen at random or by gradient norm; final validation loss, paired by seed; "
                  "wins: seeds where MAT's loss is lower):", "",
                  "| model | length | control | seeds | MAT final loss | control final loss "
                  "| MAT − control (paired) | 95% CI | MAT wins | MAT FLOPs / control's |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in controls:
            lo, hi = r["diff_ci95"]
            lines.append(
                f"| {r['model']} | {r['length']} | {r['control']} | {len(r['seeds'])} "
                f"| {_fmt(r['mat'])} | {_fmt(r['other'])} | {_fmt(r['diff'], signed=True)} "
                f"| [{lo:+.4f}, {hi:+.4f}] | {r['wins']}/{len(r['seeds'])} "
                f"| {r['flops_ratio'][0]:.3f} |")
    cfgs = results.get("length_configs", {})
    lines += ["", "Schedules: " + "; ".join(
        f"{n}: {c['steps']} steps, warm-up {c['warmup']}, a probe every {c['probe_every']}"
        for n, c in cfgs.items()) + ".", ""]
    return "\n".join(lines) + "\n"


def _fmt(ms, signed=False, pct=False) -> str:
    m, s = ms
    if isinstance(m, float) and math.isnan(m):
        return "n/a"
    if pct:
        return f"{100 * m:.1f}% ± {100 * s:.1f}"
    return f"{m:+.4f} ± {s:.4f}" if signed else f"{m:.4f} ± {s:.4f}"


def lambda_histories(results: dict) -> list:
    """The λ and mask history of every mat run: [{model, length, seed, warmup, probe_every,
    steps, kinds, names, step (P,), lam (P, M), mask (P, M), retired}]."""
    out = []
    for r in results["runs"]:
        if r["method"] != "mat":
            continue
        cfg = results["length_configs"][r["length"]]
        out.append({"model": r["model"], "length": r["length"], "seed": r["seed"],
                    "warmup": cfg["warmup"], "probe_every": cfg["probe_every"],
                    "steps": r["steps_run"], "kinds": r["modules"]["kinds"],
                    "names": r["modules"]["names"], "step": r["lambda_history"]["step"],
                    "lam": r["lambda_history"]["lam"], "mask": r["mask_history"]["mask"],
                    "retired": r.get("retired")})
    return out


def finish(results: dict, out: str) -> None:
    """Write results.json, robust.md and lambda_histories.json into ``out``."""
    _write(results, out)
    with open(os.path.join(out, "robust.md"), "w") as f:
        f.write(markdown(results))
    with open(os.path.join(out, "lambda_histories.json"), "w") as f:
        json.dump(lambda_histories(results), f)
    print(f"mat-bench robust: wrote {out}/results.json, {out}/robust.md and "
          f"{out}/lambda_histories.json")


def _write(results: dict, out: str) -> None:
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "results.json"))
