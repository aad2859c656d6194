"""Standard error of a change between two `refrl eval` results on the same samples and noise.

    python scripts/paired_se.py BEFORE_DIR AFTER_DIR [--metrics identity,layout,...]

For each metric: the mean change over the samples both score, and its standard error
``std(after_i - before_i) / sqrt(n)``; how small a fall a validation of that size can see.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def per_sample(eval_dir: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (eval_dir / "samples.jsonl").read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--metrics", default="identity,layout,fidelity,style,background,patch,patch_grid")
    args = ap.parse_args()
    a, b = per_sample(args.before), per_sample(args.after)
    for m in args.metrics.split(","):
        d = [b[k][m] - a[k][m] for k in a if k in b and a[k].get(m) is not None and b[k].get(m) is not None]
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"{m:12s} n={len(d):4d}  change {statistics.mean(d):+.4f}  se {se:.4f}")


if __name__ == "__main__":
    main()
