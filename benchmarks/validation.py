"""Cost of validation during training (``refrl.train.validation``) as a share of a run's wall time.

A short run of a preset (``--config``, default configs/tiny-cpu-grpo.yaml), validated at
step 0 and every ``VALIDATE_EVERY`` steps with the preset's own validation settings (``n``,
sampler, metrics). An RL preset runs at ``1 / SHRINK`` of its ``groups_per_iteration`` (an
iteration's work grows linearly with its rollouts; its seconds are scaled back by
``SHRINK``); an SFT preset at its own batch (its steps are short; the seconds of the steps
right after a validation, which include it, are left out). It measures the seconds of one
training step and of one validation; from them, the
share validation takes of the preset's whole run at its default period
(``validation.every``) and length (``iterations`` / ``steps``):

    share = V * t_val / (T * t_step + V * t_val),  V = T // every + at_start

The first validation (which also builds the reward models' caches) is counted once at its
own cost, the others at their median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VALIDATE_EVERY = {"rl": 2, "sft": 3}
SHORT = {"rl": {"full": 4, "quick": 2}, "sft": {"full": 10, "quick": 7}}  # training steps of the short run
SHRINK = 8  # the short run's training batch is the preset's / SHRINK
TARGET_SHARE = 0.15


def validation_section(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per training step and per validation on a short run of a preset; the share at its defaults."""
    from refrl.config import load_config
    from refrl.train.grpo import train_grpo
    from refrl.train.grpo_config import GRPOConfig
    from refrl.train.sft import SFTConfig, train_sft

    path = Path(args.config or REPO / "configs/tiny-cpu-grpo.yaml")
    sft = "sft" in path.name
    model, train = (SFTConfig, train_sft) if sft else (GRPOConfig, train_grpo)
    preset = load_config(model, path, list(args.set))
    total = preset.steps if sft else preset.iterations
    every, at_start = preset.validation.every, preset.validation.at_start
    if every <= 0:
        return {"config": str(path), "skipped": "the preset has validation off (validation.every=0)"}
    kind = "sft" if sft else "rl"
    short, every_short = SHORT[kind][args.mode], VALIDATE_EVERY[kind]
    if sft:
        length = [f"steps={short}", "log_every=1"]
    else:
        groups = max(1, preset.groups_per_iteration // SHRINK)
        length = [f"iterations={short}", f"groups_per_iteration={groups}", "gradient_accumulation=1",
                  f"minibatch_size={groups * preset.group_size}"]
    cfg = load_config(model, path, [*args.set, *length, f"checkpoint_every={10 * short}",
                                    f"validation.every={every_short}"])
    step_scale = 1.0 if sft else preset.groups_per_iteration / cfg.groups_per_iteration
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(cfg, tmp)
        wall = time.perf_counter() - start
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    val = [r["seconds/validation"] for r in recs if r.get("kind") == "validation"]
    steps = [r for r in recs if r.get("kind") != "validation"]
    if sft:
        per_step = [r["seconds"] for r in steps if (r["step"] - 1) % every_short and r.get("seconds") is not None]
    else:
        n = cfg.groups_per_iteration * cfg.group_size
        per_step = [n / r["samples_per_second"] for r in steps[1:]]  # the first step includes warm-up
    t_step, t_first, t_val = statistics.median(per_step) * step_scale, val[0], statistics.median(val[1:] or val)
    n_val = total // every + int(at_start)
    val_total = t_first + (n_val - 1) * t_val
    share = val_total / (total * t_step + val_total)
    return {
        "config": str(path), "overrides": list(args.set), "short_run_steps": short, "short_run_wall_s": round(wall, 1),
        "short_run_validations": len(val), "short_run_share": round(sum(val) / wall, 3),
        "shrink": SHRINK, "seconds_per_step": round(t_step, 3), "seconds_first_validation": round(t_first, 2),
        "seconds_per_validation": round(t_val, 2),
        "preset": {"steps": total, "validation_every": every, "validations": n_val, "n": preset.validation.n},
        "preset_share": round(share, 3), "target_share": TARGET_SHARE, "meets_target": share <= TARGET_SHARE,
    }
