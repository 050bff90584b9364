"""Draw docs/mat_savings.png, the README's headline plot, from recorded results (no new runs).

Reads the tables of docs/results/mlm-default-2026-11-27.md (freeze_all controls, α = 2) and
docs/results/mlm-policy-sweep-2026-11-27.md (MAT's shipped default, random and gradnorm at its
active fraction): final validation loss minus the baseline's (paired by seed) against FLOPs
relative to the baseline, mean ± std over 3 seeds. Usage: python scripts/plot_headline.py
"""
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
DEFAULT = os.path.join(RESULTS, "mlm-default-2026-11-27.md")
SWEEP = os.path.join(RESULTS, "mlm-policy-sweep-2026-11-27.md")


def _mean_std(cell: str) -> tuple[float, float]:
    nums = re.findall(r"[+\-−]?\d+\.\d+", cell.replace("−", "-"))
    return float(nums[0]), float(nums[1])


def _rows(path: str, section: str | None = None) -> list[dict]:
    """Rows of the first markdown table (under the first heading starting with ``section``)."""
    lines = open(path, encoding="utf-8").read().split("\n")
    if section is not None:
        lines = lines[next(i for i, l in enumerate(lines) if l.startswith("## " + section)):]
    start = next(i for i, l in enumerate(lines) if l.startswith("| "))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def _pick(rows, key, name):
    return next(r for r in rows if r[key].startswith(name))


def points() -> list[tuple[str, tuple, tuple, str]]:
    """(label, (FLOPs mean, std), (Δ loss mean, std), colour)."""
    sweep = _rows(SWEEP)
    old = _rows(DEFAULT, "Baseline, MAT with the temporal policy counted from step 0")
    alpha2 = _rows(DEFAULT, "Baseline and MAT with `--mat-policy alpha=2`")
    pts = []
    for label, name, colour in (("MAT (shipped default)", "mat, shipped default", "C3"),
                                ("random, same fraction", "random at the default's", "C7"),
                                ("gradnorm, same fraction", "gradnorm at the default's", "C0")):
        r = _pick(sweep, "variant", name)
        pts.append((label, _mean_std(r["FLOPs / baseline"]),
                    _mean_std(r["Δ final loss vs baseline (paired)"]), colour))
    r = _pick(alpha2, "method", "mat")
    pts.append(("MAT α=2", _mean_std(r["FLOPs / baseline"]),
                _mean_std(r["Δ final vs baseline (paired)"]), "C1"))
    for kind in ("ffn", "head"):
        r = _pick(old, "method", f"freeze_all:{kind}")
        pts.append((f"freeze every {kind} after warm-up", _mean_std(r["FLOPs / baseline"]),
                    _mean_std(r["Δ final vs baseline (paired)"]), "C2" if kind == "ffn" else "C4"))
    return pts


def main() -> None:
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.errorbar([1.0], [0.0], fmt="ks", label="baseline (all modules train)")
    for label, (x, sx), (y, sy), colour in points():
        ax.errorbar([x], [y], xerr=[sx], yerr=[sy], fmt="o", color=colour, capsize=3, label=label)
    ax.set_xlabel("training FLOPs / baseline's (measured)")
    ax.set_ylabel("final val. loss − baseline's (nats, paired; better ↑)")
    ax.set_title("mlm, 5.9M-param BERT encoder, 1000 steps, 3 seeds (mean ± std), CPU",
                 fontsize=9)
    ax.invert_yaxis()  # better (lower) loss up
    ax.legend(fontsize=7.5, loc="lower left")
    fig.tight_layout()
    out = os.path.join(ROOT, "docs", "mat_savings.png")
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
