"""Extract the compact record of a held-out protocol run set (docs/results/heldout-*.json) from
a merged `mat-bench report` results.json, and draw docs/heldout_savings.png from it.

The full results.json (per-step active fractions and mask histories, ~10 MB) stays out of the
repository; the extract keeps, per run, what the held-out tables and the plot are computed from:
task, method, seed, every evaluation (step, FLOPs, wall time, valid and test loss and metric),
the best-valid checkpoint, the stop reason and the mean active fraction after warm-up.

Usage:
    python scripts/heldout_extract.py MERGED_RESULTS.json docs/results/heldout-DATE.json
    python scripts/heldout_extract.py --plot RECORD.json[:TASK,...] [MORE.json[:TASK,...] ...] docs/heldout_savings.png

With several records the plot has one panel per task of all of them (records of different
tasks, e.g. runs made in different sessions). ``:TASK,...`` after a record keeps only those
tasks of it (e.g. ``heldout-2026-12-01.json:cnn`` when a later record holds that session's
other task); a task given by two records (or one record given twice) is refused, since its
seeds would be mixed or drawn twice.
"""
import json
import statistics
import sys

KEEP = ("task", "method", "seed", "steps_run", "stop_reason", "patience", "best_valid",
        "total_flops", "wall_s", "mean_active_fraction_after_warmup")
EVAL_KEYS = ("step", "flops", "wall_s", "loss", "test_loss", "perplexity", "test_perplexity",
             "accuracy", "test_accuracy")


def extract(results: dict) -> dict:
    runs = []
    for r in results["runs"]:
        run = {k: r[k] for k in KEEP if k in r}
        run["evals"] = [{k: e[k] for k in EVAL_KEYS if k in e} for e in r["evals"]]
        runs.append(run)
    return {"environment": results["environment"], "task_configs": results["task_configs"],
            "config": {k: results["config"].get(k) for k in ("device", "size", "seeds",
                                                              "mat_policy", "mat_kernel")},
            "runs": runs}


def plot(record: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in record["runs"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6))
    axes = [axes] if len(tasks) == 1 else list(axes)
    colours = {"baseline": "black", "mat": "tab:red", "random": "tab:blue",
               "gradnorm": "tab:green"}
    for ax, task in zip(axes, tasks):
        runs = [r for r in record["runs"] if r["task"] == task]
        base = {r["seed"]: r for r in runs if r["method"] == "baseline"}
        for method in dict.fromkeys(r["method"] for r in runs):
            xs, ys = [], []
            for r in (r for r in runs if r["method"] == method and r["seed"] in base):
                b = base[r["seed"]]["best_valid"]
                xs.append(r["best_valid"]["flops"] / b["flops"])
                ys.append(r["best_valid"]["test_loss"] - b["test_loss"])
            ax.scatter(xs, ys, s=14, alpha=0.5, color=colours.get(method, "grey"))
            ax.errorbar(statistics.fmean(xs), statistics.fmean(ys),
                        xerr=statistics.stdev(xs) if len(xs) > 1 else 0,
                        yerr=statistics.stdev(ys) if len(ys) > 1 else 0, fmt="o", ms=7,
                        capsize=3, color=colours.get(method, "grey"), label=method)
        ax.axhline(0, color="grey", lw=0.6)
        ax.axvline(1, color="grey", lw=0.6)
        ax.set_title(task)
        ax.set_xlabel("FLOPs to best-valid / baseline's")
        ax.set_ylabel("test loss − baseline's (nats)")
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out protocol: each method at its best-valid checkpoint, on test "
                 "(dots: seeds; bars: mean ± std)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv) -> int:
    if len(argv) >= 3 and argv[0] == "--plot":
        runs, source = [], {}
        for spec in argv[1:-1]:
            path, _, wanted = spec.partition(":")
            with open(path) as f:
                kept = [r for r in json.load(f)["runs"]
                        if not wanted or r["task"] in wanted.split(",")]
            for task in {r["task"] for r in kept}:
                # a task from two records (or one record given twice) would mix or repeat seeds
                if task in source:
                    print(f"task {task!r} is in {source[task]} and in {path}: keep it from one "
                          "(RECORD.json:TASK,...)", file=sys.stderr)
                    return 2
                source[task] = path
            runs += kept
        plot({"runs": runs}, argv[-1])
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        record = extract(json.load(f))
    with open(argv[1], "w") as f:
        json.dump(record, f, indent=0, separators=(",", ":"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
