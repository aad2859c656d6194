"""Tabulate `refrl eval` results over seeds: mean ± std per row, and the change against a baseline.

    python scripts/eval_table.py --base EVAL_DIR [--metrics identity,layout,...] \
        "LABEL=EVAL_DIR,EVAL_DIR,EVAL_DIR" ["LABEL=..." ...]

Each EVAL_DIR holds the eval.json of `refrl eval`; every row's dirs are its seeds. The baseline
(tiny-sft, say) must have been scored on the same samples and noise (same suite, n and --seed).
Prints two markdown tables: the metrics (mean ± std over seeds), and per row the change of the
mean of identity, layout and fidelity per seed, every metric's change, and "worst": the
largest fall of any reward (not patch_grid, where lower is better) in any single seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

MEAN_OF_3 = ("identity", "layout", "fidelity")
LOWER_IS_BETTER = ("patch_grid",)


def overall(eval_dir: str) -> dict[str, float]:
    """Overall mean of every metric in ``eval_dir/eval.json``, plus ``mean3``."""
    data = json.loads((Path(eval_dir) / "eval.json").read_text())
    means = {k: v["mean"] for k, v in data["metrics"]["overall"].items() if isinstance(v, dict)}
    means["mean3"] = sum(means[m] for m in MEAN_OF_3) / len(MEAN_OF_3)
    return means


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the baseline's eval folder")
    ap.add_argument("--metrics", default="identity,layout,fidelity,mean3,style,background,patch,patch_grid")
    ap.add_argument("rows", nargs="+", help="LABEL=DIR,DIR,...")
    args = ap.parse_args(argv)
    metrics = args.metrics.split(",")
    base = overall(args.base)
    rows = []
    for spec in args.rows:
        label, _, dirs = spec.partition("=")
        rows.append((label, [overall(d) for d in dirs.split(",") if d]))

    head = "| model | " + " | ".join("mean of 3" if m == "mean3" else m for m in metrics) + " |"
    rule = "|---" * (len(metrics) + 1) + "|"
    print(head, rule, "| baseline | " + " | ".join(f"{base[m]:.3f}" for m in metrics) + " |", sep="\n")
    for label, seeds in rows:
        print(f"| {label} | " + " | ".join(mean_std([s[m] for s in seeds]) for m in metrics) + " |")
    print()
    changes = [m for m in metrics if m != "mean3"]
    print("| model | mean of 3, per seed | mean of 3 | " + " | ".join(changes) + " | worst |")
    print("|---" * (len(changes) + 4) + "|")
    for label, seeds in rows:
        per_seed = ", ".join(f"{s['mean3'] - base['mean3']:+.3f}" for s in seeds)
        delta = [f"{statistics.mean(s[m] for s in seeds) - base[m]:+.3f}" for m in changes]
        worst = min(s[m] - base[m] for s in seeds for m in changes if m not in LOWER_IS_BETTER)
        gain = statistics.mean(s["mean3"] for s in seeds) - base["mean3"]
        print(f"| {label} | {per_seed} | **{gain:+.3f}** | " + " | ".join(delta) + f" | {worst:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
