"""`mat-bench train` (and the train part of `mat-bench all`): arguments, the run plan, outputs."""
from __future__ import annotations

import argparse
import json
import os

from .methods import (MAT_KERNELS, METHODS, POLICY_OPTIONS, SELECTION_METHODS, MethodError,
                      mat_policy_factory)
from .report import SCHEMA_VERSION, markdown_summary, summarize_task, write_plots
from .runner import run_one, savings_ceiling
from .tasks import SIZES, TASKS, size_config


class UsageError(Exception):
    """A command-line choice that cannot run; printed without a traceback (exit status 2)."""


def add_train_args(p: argparse.ArgumentParser, quick_defaults: bool = False) -> None:
    p.add_argument("--task", default="mlm" if not quick_defaults else ",".join(TASKS),
                   help=f"comma-separated tasks among {','.join(TASKS)}")
    p.add_argument("--method", default=",".join(METHODS),
                   help=f"comma-separated methods among {','.join(METHODS)} (random and gradnorm "
                        "use MAT's measured active fraction: list mat too, or give "
                        "--active-fraction)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds, the same for every method (paired; default "
                        "0,1,2, or 0 with --quick)")
    p.add_argument("--size", default=None, choices=SIZES,
                   help="model/data/schedule preset (default: 'default'; 'quick' with --quick)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    p.add_argument("--eval-every", type=int, default=None, help="override the evaluation interval")
    p.add_argument("--warmup", type=int, default=None, help="override the warm-up steps")
    p.add_argument("--probe-every", type=int, default=None, help="override the probe interval")
    p.add_argument("--patience", type=int, default=None,
                   help="run to convergence: stop a run once its validation loss has not improved "
                        "for this many evaluations (--steps is then a cap; the 'heldout' size "
                        "sets it); every method is then reported at its best-valid checkpoint, "
                        "on the test split")
    p.add_argument("--text-data", default=None,
                   help="UTF-8 text for mlm/moe: a WikiText-style folder or one file "
                        "(default: the embedded standard-library docs)")
    p.add_argument("--image-data", default=None,
                   help="CIFAR-10 folder (torchvision format) for cnn (default: scikit-learn "
                        "digits, upsampled)")
    p.add_argument("--active-fraction", default=None,
                   help="kind=fraction,... for random/gradnorm instead of MAT's measured one")
    p.add_argument("--mat-policy", default=None,
                   help="change MAT's default policy: key=value,... with keys among "
                        f"{','.join(POLICY_OPTIONS)} (e.g. mode=budget,budget=0.5,temporal=off)")
    p.add_argument("--mat-kernel", default="loss", choices=MAT_KERNELS,
                   help="MAT's mNTK kernel: loss (default: per-sample loss gradients of the probe "
                        "step's training batch), logit_sum or output (measured on a fixed probe "
                        "batch of the training data at each probe; their passes' FLOPs are counted)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal)")


def split_choices(value: str, allowed, what: str) -> list:
    """A comma-separated option's values, each in ``allowed``, duplicates dropped (order kept);
    raises UsageError naming the unknown ones."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise UsageError(f"unknown {what} {bad or value!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_seeds(text: str) -> list:
    """``--seeds``: comma-separated distinct integers (raises UsageError)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must list distinct integers, got {text!r}")
    return seeds


def parse_plan(args, quick: bool) -> dict:
    """Validate the train arguments; return the plan (raises UsageError)."""
    tasks = split_choices(args.task, TASKS, "task(s)")
    methods = split_choices(args.method, METHODS, "method(s)")
    if args.seeds is None:
        args.seeds = "0" if quick else "0,1,2"
    seeds = parse_seeds(args.seeds)
    fractions = None
    if args.active_fraction:
        fractions = {}
        for item in args.active_fraction.split(","):
            kind, _, val = item.partition("=")
            try:
                fractions[kind.strip()] = float(val)
            except ValueError:
                raise UsageError(f"--active-fraction must be kind=fraction,..., got {item!r}") from None
            if not 0.0 <= fractions[kind.strip()] <= 1.0:
                raise UsageError(f"--active-fraction {item!r}: the fraction must be in [0, 1]")
    if any(m in SELECTION_METHODS for m in methods) and "mat" not in methods and fractions is None:
        raise UsageError("random and gradnorm run at MAT's measured active fraction: add mat to "
                         "--method (it runs first) or give --active-fraction kind=fraction,...")
    for name in ("steps", "eval_every", "warmup", "probe_every", "patience"):
        v = getattr(args, name)
        if v is not None and (v < (0 if name == "warmup" else 1)):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {v}")
    for path, what in ((args.text_data, "--text-data"), (args.image_data, "--image-data")):
        if path is not None and not os.path.exists(path):
            raise UsageError(f"{what}: {path!r} does not exist")
    policy_options = parse_policy_options(args.mat_policy)
    size = args.size or ("quick" if quick else "default")
    # MAT first: random and gradnorm need its measured fraction.
    methods = sorted(methods, key=lambda m: ["baseline", "mat"].index(m) if m in ("baseline", "mat") else 2)
    return dict(tasks=tasks, methods=methods, seeds=seeds, size=size, fractions=fractions,
                overrides={k: getattr(args, k) for k in ("steps", "eval_every", "warmup",
                                                         "probe_every", "patience")
                           if getattr(args, k) is not None},
                text_data=args.text_data, image_data=args.image_data,
                policy_options=policy_options, mat_kernel=args.mat_kernel,
                progress=not args.no_progress)


def _policy_value(text: str):
    low = text.lower()
    if low in ("on", "true"):
        return True
    if low in ("off", "false"):
        return False
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_policy_options(text: str | None) -> dict:
    """``--mat-policy`` text → {option: value} (ints, floats, on/off, none, strings), checked by
    building the policy once (raises UsageError)."""
    if not text:
        return {}
    options = {}
    for item in text.split(","):
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise UsageError(f"--mat-policy must be key=value,..., got {item!r}")
        options[key.strip()] = _policy_value(val.strip())
    try:
        mat_policy_factory(options, warmup=0, probe_every=1)
    except MethodError as exc:
        raise UsageError(str(exc)) from None
    return options


def run_train(plan: dict, device: str, out: str, environment: dict, kernels=None) -> dict:
    """Run the plan; write results.json, summary.md and the plots into ``out`` (results.json
    is rewritten after every run, so an interrupted invocation keeps what finished)."""
    runs, ceilings, configs = [], {}, {}
    mat_kernel = plan.get("mat_kernel", "loss")
    results = {"schema_version": SCHEMA_VERSION, "environment": environment,
               "config": {"device": device, "size": plan["size"], "seeds": plan["seeds"],
                          "tasks": plan["tasks"], "methods": plan["methods"],
                          "overrides": plan["overrides"], "active_fraction": plan["fractions"],
                          "mat_policy": plan.get("policy_options") or "default",
                          "mat_kernel": mat_kernel},
               "task_configs": configs, "ceilings": ceilings, "runs": runs, "summary": {},
               "kernels": kernels or [], "skipped": []}
    for task in plan["tasks"]:
        cfg = {**size_config(task, plan["size"]), **plan["overrides"]}
        configs[task] = cfg
        data = plan["image_data"] if task == "cnn" else plan["text_data"]
        ceilings[task] = savings_ceiling(task, cfg, device, data)
        kinds = [k for k in ceilings[task]["per_kind"] if k != "(all kinds)"]
        for seed in plan["seeds"]:
            mat_fraction = None
            for method in plan["methods"]:
                variants = [(method, k) for k in kinds] if method == "freeze_all" else [(method, None)]
                for name, kind in variants:
                    fractions = plan["fractions"] or mat_fraction
                    if name in SELECTION_METHODS and fractions is None:
                        results["skipped"].append({"task": task, "method": name, "seed": seed,
                                                   "why": "no MAT active fraction (mat did not run)"})
                        continue
                    try:
                        rec = run_one(task, name, seed, cfg, device, data, fractions=fractions,
                                      kind=kind, progress=plan["progress"],
                                      policy_options=plan.get("policy_options"),
                                      mat_kernel=mat_kernel)
                    except (MethodError, RuntimeError) as exc:
                        # A method that cannot run on this task (e.g. MAT's loss-mode probe on
                        # a model it cannot split per sample): recorded and reported, not hidden.
                        if isinstance(exc, RuntimeError) and name != "mat":
                            raise
                        print(f"mat-bench train: skipping {task}/{name} seed {seed}: {exc}")
                        results["skipped"].append({"task": task, "method": name, "seed": seed,
                                                   "why": str(exc)})
                        continue
                    rec["mat_policy"] = plan.get("policy_options") or "default"
                    rec["mat_kernel"] = mat_kernel
                    runs.append(rec)
                    if name == "mat":
                        mat_fraction = rec["mean_active_fraction_after_warmup"]
                    print(f"  {task} {rec['method']:<18} seed {seed}: final val loss "
                          f"{rec['final_loss']:.4f}, best {rec['best_loss']:.4f}, "
                          f"{rec['total_flops'] / 1e9:.2f} GFLOP, {rec['wall_s']:.1f} s", flush=True)
                    _write_json(results, out)
        task_runs = [r for r in runs if r["task"] == task]
        if task_runs:
            results["summary"][task] = summarize_task(task_runs, ceilings[task])
    _write_json(results, out)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown_summary(results))
    results["plots"] = [os.path.basename(p) for p in write_plots(results, runs, out)]
    _write_json(results, out)
    print(f"mat-bench train: wrote {out}/results.json, {out}/summary.md and "
          f"{len(results['plots'])} plots")
    return results


def merge_results(paths: list) -> dict:
    """One results dict from the results.json of several `mat-bench train` invocations (e.g.
    methods or seeds run in parallel processes). Every task must have been run with the same
    settings and device everywhere, and each (task, method, seed) run must appear once; raises
    UsageError naming what differs."""
    loaded = []
    for path in paths:
        file = os.path.join(path, "results.json") if os.path.isdir(path) else path
        try:
            with open(file) as f:
                loaded.append((file, json.load(f)))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {file}: {exc}") from None
    first_file, first = loaded[0]
    merged = {"schema_version": SCHEMA_VERSION, "environment": first["environment"],
              "config": dict(first["config"], sources=[f for f, _ in loaded]),
              "task_configs": {}, "ceilings": {}, "runs": [], "summary": {},
              "kernels": [], "skipped": []}
    seen = {}
    for file, res in loaded:
        if res.get("schema_version") != SCHEMA_VERSION or "runs" not in res:
            raise UsageError(f"{file} is not a mat-bench train results.json (schema "
                             f"{SCHEMA_VERSION})")
        if res["config"].get("device") != first["config"].get("device"):
            raise UsageError(f"{file} ran on {res['config'].get('device')}, {first_file} on "
                             f"{first['config'].get('device')}: runs are not comparable")
        for task, cfg in res["task_configs"].items():
            known = merged["task_configs"].setdefault(task, cfg)
            if known != cfg:
                diff = sorted(k for k in set(known) | set(cfg) if known.get(k) != cfg.get(k))
                raise UsageError(f"{file}: task {task} ran with other settings ({diff}) than in "
                                 "an earlier file: runs are not comparable")
            merged["ceilings"].setdefault(task, res["ceilings"].get(task))
        for run in res["runs"]:
            key = (run["task"], run["method"], run["seed"])
            if key in seen:
                raise UsageError(f"{file}: {key[0]}/{key[1]} seed {key[2]} also in {seen[key]}")
            seen[key] = file
            run.setdefault("mat_policy", res["config"].get("mat_policy", "default"))
            run.setdefault("mat_kernel", res["config"].get("mat_kernel", "loss"))
            merged["runs"].append(run)
        merged["skipped"] += res.get("skipped", [])
        merged["kernels"] += res.get("kernels", [])
    policies = {json.dumps(r["mat_policy"], sort_keys=True) for r in merged["runs"]
                if r["method"] == "mat"}
    if len(policies) > 1:
        raise UsageError(f"the mat runs used different policies ({sorted(policies)}): "
                         "merge one policy at a time")
    merged["config"]["mat_policy"] = json.loads(policies.pop()) if policies else "default"
    kernels = {r["mat_kernel"] for r in merged["runs"] if r["method"] == "mat"}
    if len(kernels) > 1:
        raise UsageError(f"the mat runs used different MAT kernels ({sorted(kernels)}): "
                         "merge one kernel at a time")
    merged["config"]["mat_kernel"] = kernels.pop() if kernels else "loss"
    merged["config"]["seeds"] = sorted({r["seed"] for r in merged["runs"]})
    merged["config"]["methods"] = list(dict.fromkeys(r["method"] for r in merged["runs"]))
    return merged


def write_report(results: dict, out: str) -> dict:
    """`mat-bench report`: summarise merged results (:func:`merge_results`) and write
    results.json, summary.md and the plots into ``out``."""
    for task in results["task_configs"]:
        task_runs = [r for r in results["runs"] if r["task"] == task]
        if task_runs:
            results["summary"][task] = summarize_task(task_runs, results["ceilings"].get(task))
    _write_json(results, out)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown_summary(results))
    results["plots"] = [os.path.basename(p) for p in write_plots(results, results["runs"], out)]
    _write_json(results, out)
    print(f"mat-bench report: merged {len(results['runs'])} runs from "
          f"{len(results['config']['sources'])} results; "
          f"wrote {out}/results.json, {out}/summary.md and {len(results['plots'])} plots")
    return results


def _write_json(results: dict, out: str) -> None:
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "results.json"))
