"""Validation curves of several runs in one figure: one panel per metric, one line per run, each
run's RUN:best marked with a star (the picture in docs/research/validation.md).

    python scripts/plot_validation.py runs/g400-s1 runs/g400-s2 runs/g400-s3 \
        --metrics trained_mean,identity,style,background,patch_grid --out docs/images/validation-grpo400.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from refrl.runfolder.layout import METRICS_FILE
from refrl.train.run import read_metrics
from refrl.train.validation import LINE_KIND


def validation_lines(run: Path) -> list[dict]:
    """The ``kind: validation`` lines of ``run/metrics.jsonl``."""
    return [r for r in read_metrics(run / METRICS_FILE) if r.get("kind") == LINE_KIND]


def best_step(run: Path) -> int | None:
    path = run / "best.json"
    return json.loads(path.read_text()).get("step") if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--metrics", default="trained_mean,identity,layout,fidelity,style,background,patch,patch_grid")
    ap.add_argument("--labels", default=None, help="comma-separated, one per run (default: the folder names)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    metrics = args.metrics.split(",")
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]

    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.4 * cols, 2.5 * rows), dpi=100)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for run, label in zip(args.runs, labels, strict=True):
            recs = validation_lines(run)
            pts = [(r["step"], r[f"val/{metric}"]) for r in recs if r.get(f"val/{metric}") is not None]
            if not pts:
                continue
            (line,) = ax.plot(*zip(*pts, strict=True), lw=1.2, label=label)
            best = best_step(run)
            at = [y for x, y in pts if x == best]
            if at:
                ax.plot([best], at, marker="*", ms=10, color=line.get_color())
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
