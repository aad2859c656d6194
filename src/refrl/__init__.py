"""refrl: SFT + GRPO for reference-guided image generation (DyRef, Customized-GRPO, OmniRefiner).

The Python API (README.md, "Use from Python"): trainers that take objects, as TRL's do.

* `GRPOTrainer(config, out_dir, policy=..., dataset=..., rewards=[fn, "layout"])`, `GRPOConfig`:
  RL (objective grpo, nft or awm); a reward may be a plain function
  ``(images, samples) -> list[float | None]``;
* `SFTTrainer(config, out_dir, policy=..., dataset=...)`, `SFTConfig`: supervised fine-tuning;
* `eval_command(ckpt, suite, out, rewards=[fn, "style"], data=...)`: ``refrl eval``, where a
  reward may also be a plain function (docs/guides/evaluation.md);
* `load_policy("tiny-sft" | run folder | checkpoint folder)`, `load_manifest(path)`,
  `load_config(ConfigClass, yaml_path, overrides)`, `read_metrics(path)`, `FunctionReward`.

Names are imported on first use, so ``import refrl`` (and ``refrl --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GRPOTrainer": "refrl.train.grpo",
    "GRPOConfig": "refrl.train.grpo_config",
    "SFTTrainer": "refrl.train.sft",
    "SFTConfig": "refrl.train.sft",
    "FunctionReward": "refrl.rewards.function",
    "load_policy": "refrl.models.build",
    "load_manifest": "refrl.data.manifest",
    "load_config": "refrl.config",
    "read_metrics": "refrl.train.run",
    "eval_command": "refrl.eval.config",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'refrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
