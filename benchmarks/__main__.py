"""mat-bench: the package's benchmark suite (`mat-bench ...`, `python -m mat_cuda.benchmarks ...`,
or `python -m benchmarks ...` from the repository root).

The repository's benchmarks/ folder installs as the package ``mat_cuda.benchmarks``; every
import inside it is relative, so it works under both names.

Subcommands:
  kernels   kernel micro-benchmarks against their PyTorch baselines, on every available device
  train     end-to-end training: baseline vs MAT vs random / gradnorm selection vs freeze_all
            controls, on mlm / cnn / moe tasks (see benchmarks/train/)
  all       every kernel benchmark and every task and method (`--quick`: the small sizes CI and
            the quick start use, under 5 minutes on 2 CPU cores)
  report    merge the results of several `train` invocations (e.g. seeds or methods run in
            parallel) into one summary and one set of plots
  robust    MAT's default policy vs plain AdamW on Hugging Face BERT, GPT-2, RoBERTa and ViT
            (tiny configs, random init), short and long runs, 10 seeds: the robustness table
            (benchmarks/train/robust.py); `--merge DIR...` tables earlier invocations

Each kernel benchmark is a module ``benchmarks/bench_<name>.py`` with
``run(devices: list[str], quick: bool) -> dict`` returning
``{"title": str, "columns": [str], "rows": [dict], "notes": [str]}``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import sys

# Module names relative to this package (benchmarks, or mat_cuda.benchmarks when installed).
KERNEL_BENCHES = {
    "optim": ".bench_optim",
    "lanczos": ".bench_lanczos",
    "gram": ".bench_gram",
    "gram_embedding": ".bench_gram_embedding",
    "probe": ".bench_probe",
    "skip": ".bench_skip",
    "mat": ".bench_mat",
}
_PACKAGE = __package__


def _available_kernel_benches() -> dict:
    found = {}
    for name, mod in KERNEL_BENCHES.items():
        try:
            found[name] = importlib.import_module(mod, _PACKAGE)
        except ModuleNotFoundError as exc:
            if exc.name != _PACKAGE + mod:
                raise
    return found


def _out_dir(path: str | None) -> str:
    if path is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join("mat-bench-results", stamp)
    os.makedirs(path, exist_ok=True)
    return path


def _check_kernel_names(names: list[str] | None) -> dict:
    """The kernel benchmark modules to run (all built ones when ``names`` is None)."""
    from .train.cli import UsageError

    benches = _available_kernel_benches()
    if names:
        unknown = [n for n in names if n not in KERNEL_BENCHES]
        if unknown:
            raise UsageError(f"unknown kernel benchmark(s) {unknown}; choose from "
                             f"{sorted(KERNEL_BENCHES)}")
        missing = [n for n in names if n not in benches]
        if missing:
            raise UsageError(f"kernel benchmark(s) {missing} are not built in this version")
        benches = {n: benches[n] for n in names}
    return benches


def run_kernels(names: list[str] | None, quick: bool, devices: list[str] | None) -> list[dict]:
    from .timing import devices as available_devices, markdown_table

    benches = _check_kernel_names(names)
    devs = devices or available_devices()
    results = []
    for name, mod in benches.items():
        print(f"== {name} ({', '.join(devs)}) ==", flush=True)
        res = mod.run(devices=devs, quick=quick)
        res["name"] = name
        print(markdown_table(res["rows"], res["columns"]))
        for note in res.get("notes", []):
            print(f"  {note}")
        print(flush=True)
        results.append(res)
    return results


def _kernels_markdown(kernels: list[dict], env: dict) -> str:
    from .timing import markdown_table

    text = (f"# mat-bench kernel results\n\nmachine: {env.get('cpu')}, "
            f"{env.get('gpu', 'no GPU')}; torch {env['torch']}; commit {env['commit']}\n\n")
    for res in kernels:
        text += f"## {res['title']}\n\n{markdown_table(res['rows'], res['columns'])}\n\n"
        text += "".join(f"- {note}\n" for note in res.get("notes", [])) + "\n"
    return text


def _write(out: str, kernels: list[dict], quick: bool) -> None:
    from .timing import environment

    env = environment()
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"environment": env, "quick": quick, "kernels": kernels}, f, indent=2,
                  default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(_kernels_markdown(kernels, env))
    print(f"mat-bench: wrote {out}/results.json and {out}/summary.md")


def _train_device(devices: list[str] | None) -> str:
    import torch

    if devices:
        return "cuda" if "cuda" in devices else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(args, parser) -> int:
    from mat_cuda.data import DataError

    from .train.cli import UsageError, merge_results, parse_plan, run_train, write_report
    from .train.methods import MethodError

    try:
        if args.command == "robust":
            return _run_robust(args)
        if args.command == "report":
            merged = merge_results(args.results)  # checked before anything is written
            write_report(merged, _out_dir(args.out))
            return 0
        plan = parse_plan(args, args.quick) if args.command in ("train", "all") else None
        names = args.only.split(",") if getattr(args, "only", None) else None
        _check_kernel_names(names)
        out = _out_dir(args.out)
        kernels = []
        if args.command in ("kernels", "all"):
            kernels = run_kernels(names, args.quick, args.device)
        if args.command == "kernels":
            _write(out, kernels, args.quick)
            return 0
        from .timing import environment

        env = environment()
        run_train(plan, _train_device(args.device), out, env, kernels=kernels)
        if kernels:
            with open(os.path.join(out, "summary.md"), "a") as f:
                f.write("\n" + _kernels_markdown(kernels, env))
        return 0
    except (UsageError, DataError, MethodError) as exc:
        print(f"mat-bench {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run_robust(args) -> int:
    from .train.cli import UsageError, parse_policy_options, parse_seeds, split_choices
    from .train import robust

    if args.merge:
        try:
            merged = robust.merge(args.merge)
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        robust.finish(merged, _out_dir(args.out))
        return 0
    models = split_choices(args.model, robust.MODELS, "--model")
    lengths = split_choices(args.length, robust.LENGTHS, "--length")
    seeds = parse_seeds(args.seeds)
    from .timing import environment

    policy = parse_policy_options(args.mat_policy)
    methods = split_choices(args.method, robust.METHODS, "--method")
    try:
        robust.check_methods(methods)
    except ValueError as exc:
        raise UsageError(f"--method: {exc}") from None
    robust.run_robust(models, lengths, seeds, _out_dir(args.out), environment(),
                      device=_train_device(args.device), progress=not args.no_progress,
                      policy_options=policy, methods=methods)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mat-bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from .train.cli import add_train_args

    for cmd in ("kernels", "train", "all"):
        p = sub.add_parser(cmd)
        p.add_argument("--quick", action="store_true", help="small sizes (minutes on 2 CPU cores)")
        p.add_argument("--out", default=None, help="output folder (default: a fresh timestamped "
                                                   "folder under ./mat-bench-results)")
        p.add_argument("--device", action="append", choices=["cpu", "cuda"], default=None,
                       help="restrict to this device (repeatable); default: every available one")
        if cmd == "kernels":
            p.add_argument("--only", default=None,
                           help=f"comma-separated subset of {','.join(KERNEL_BENCHES)}")
        else:
            add_train_args(p, quick_defaults=cmd == "all")
    p = sub.add_parser("robust", help="MAT's default vs plain AdamW on HF models, short and "
                                      "long runs (the robustness table)")
    p.add_argument("--model", default="bert,gpt2,roberta,vit",
                   help="comma-separated models among bert,gpt2,roberta,vit")
    p.add_argument("--length", default="short,long", help="comma-separated among short,long")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9",
                   help="comma-separated seeds (paired; default: the ten of the table of record)")
    p.add_argument("--mat-policy", default=None,
                   help="MAT's default policy with key=value,... changed (as in `train`)")
    p.add_argument("--method", default="baseline,mat",
                   help="comma-separated among baseline,mat,random,gradnorm (e.g. mat alone, "
                        "to pair with baseline runs of an earlier invocation through --merge; "
                        "random and gradnorm run at MAT's measured fraction, so need mat)")
    p.add_argument("--merge", nargs="+", default=None,
                   help="table the results folders of earlier `robust` invocations instead of "
                        "running")
    p.add_argument("--out", default=None, help="output folder (default: a fresh timestamped "
                                               "folder under ./mat-bench-results)")
    p.add_argument("--device", action="append", choices=["cpu", "cuda"], default=None,
                   help="train on this device (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser("report", help="merge several `train` results into one summary")
    p.add_argument("results", nargs="+",
                   help="results folders (or results.json files) of `mat-bench train` runs")
    p.add_argument("--out", default=None, help="output folder (default: a fresh timestamped "
                                               "folder under ./mat-bench-results)")
    args = parser.parse_args(argv)

    if getattr(args, "device", None) and "cuda" in args.device:
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda given but no CUDA device is available")
    return _run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
