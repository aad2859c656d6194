"""Pick a run's best checkpoint again from a re-validation of its saved checkpoints, with the run's own
guard and keep_best criterion (refrl.train.guard): what RUN:best would have been with another validation set.

First score every checkpoint (and the starting policy as step 0) on the validation split, e.g.

    refrl eval --ckpt tiny-sft --suite refworld split=val --n 96 --seed 0 --out VAL/step-0 \
        --rewards identity,layout,style,background,fidelity,patch,patch_grid
    refrl eval --ckpt RUN/checkpoints/step-N ... --out VAL/step-N        (for every N)

then

    python scripts/reselect_best.py RUN VAL

prints one line per validation (trained_mean, the rules that fired) and the chosen step. The
trained_mean weights, guard rules and criterion are read from RUN/config.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from refrl.train.guard import Criterion, GuardRule, evaluate_rules, passes
from refrl.train.validation import TRAINED_MEAN, trained_mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the run folder (its config.yaml)")
    ap.add_argument("val", type=Path, help="folder of step-N/eval.json re-validations")
    args = ap.parse_args()
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    weights = {r["name"]: float(r.get("weight", 1.0)) for r in cfg["rewards"]}
    rules = [GuardRule(**r) for r in cfg["validation"]["guard"]]
    criterion = Criterion.parse(cfg["validation"]["keep_best"])

    steps = sorted(int(p.name[len("step-"):]) for p in args.val.glob("step-*") if (p / "eval.json").exists())
    history: list[dict[str, float | None]] = []
    best: tuple[int, float] | None = None
    for step in steps:
        overall = json.loads((args.val / f"step-{step}" / "eval.json").read_text())["metrics"]["overall"]
        values = {m: v["mean"] for m, v in overall.items() if isinstance(v, dict)}
        values[TRAINED_MEAN] = trained_mean(values, list(weights), weights)
        history.append(values)
        verdicts = evaluate_rules(rules, history)
        ok = passes(verdicts)
        if ok and criterion.better(values.get(criterion.metric), None if best is None else best[1]):
            best = (step, values[criterion.metric])
        fired = "; ".join(v.rule.describe() for v in verdicts)
        print(f"step {step:4d}  {TRAINED_MEAN} {values[TRAINED_MEAN]:.4f}  {'pass' if ok else 'FAIL'}  {fired}")
    print(f"best: step {best[0]} ({criterion.describe()} {best[1]:.4f})" if best else "best: none passed the guard")


if __name__ == "__main__":
    main()
