"""`EvalConfig`: what ``refrl eval`` runs, typed and validated like the training configs.

``refrl eval --config configs/eval-refworld.yaml ckpt=runs/grpo steps=40`` reads a YAML
preset and ``key=value`` overrides; the command's flags (``--ckpt``, ``--steps``, ...) are
overrides too. `evaluate` is the entry point: load the checkpoint, build the suite and
its metrics, run `refrl.eval.runner.run_eval`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from refrl.config import StrictModel, apply_overrides, read_yaml, validate_config
from refrl.errors import ConfigError, RefrlError
from refrl.eval.metrics import build_metrics, parse_metric_specs
from refrl.eval.runner import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CFG,
    DEFAULT_STEPS,
    SUITE_NAMES,
    build_suite,
    checkpoint_stamp,
    policy_image_size,
    run_eval,
)
from refrl.runfolder.lock import lock_run_folder


class EvalConfig(StrictModel):
    """One evaluation: which policy, which suite, how to sample, which metrics."""

    ckpt: str = Field(description="tiny-sft, a run folder or a checkpoint folder")
    suite: str = Field(description=f"one of {', '.join(SUITE_NAMES)}")
    n: int | None = Field(None, ge=1, description="refworld/refine: number of samples (default 96 / 48)")
    limit: int | None = Field(None, ge=1, description="only the first N samples")
    seed: int = Field(0, description="seed of the samples (refworld) and of the noise")
    steps: int = Field(DEFAULT_STEPS, ge=1, description="ODE steps")
    cfg: float = Field(DEFAULT_CFG, ge=0, description="classifier-free guidance scale (1 = off)")
    shift: float = Field(1.0, gt=0, description="time shift of the sigma schedule")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="images per generation / scoring batch")
    size: int | None = Field(None, ge=1, description="image size (default: the policy's, Policy.image_size)")
    data: str | None = Field(None, description="omniref: metadata JSON; dreambench: the DreamBench folder")
    root: str | None = Field(None, description="omniref: folder the image paths are relative to")
    rewards: str | list[str] | None = Field(
        None, description="metrics: NAME or METRIC=REWARD, comma-separated or a list (default: the suite's)"
    )
    reward_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per metric, options of its reward, e.g. {dino: {checkpoint: /models/dino}}"
    )
    split: Literal["train", "val", "test"] | None = Field(None, description="refworld: default test (unseen identities)")
    level: int | None = Field(None, ge=0, le=2, description="refworld: difficulty 0-2 (default 2)")
    force: bool = Field(False, description="delete images generated with other settings and start over")

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, name: str) -> str:
        if name not in SUITE_NAMES:  # raised as is (not a ValueError): the message pydantic would wrap is already one line
            raise ConfigError(f"unknown suite {name!r}; allowed: {', '.join(SUITE_NAMES)}")
        return name


def evaluate(cfg: EvalConfig, out: str | os.PathLike) -> dict[str, Any]:
    """``refrl eval``: load the checkpoint, build the suite and its metrics, run the eval into ``out``."""
    from refrl.models.build import load_policy

    stamp = checkpoint_stamp(cfg.ckpt)
    # the lock before loading: a busy --out is refused at once, not after minutes of loading
    with lock_run_folder(out):
        policy = load_policy(cfg.ckpt)
        if hasattr(policy, "eval"):  # nn.Module policies: no train-mode randomness while sampling
            policy.eval()
        suite = build_suite(cfg.suite, seed=cfg.seed, n=cfg.n, limit=cfg.limit, size=cfg.size or policy_image_size(policy),
                            data=cfg.data, root=cfg.root, split=cfg.split, level=cfg.level)
        names = parse_metric_specs(cfg.rewards) if cfg.rewards else dict(suite.metrics)
        options = {m: dict(o) for m, o in suite.reward_options.items() if m in names}
        for metric, opts in cfg.reward_options.items():
            if metric not in names:
                raise RefrlError(f"reward option for metric {metric!r}, which is not measured; metrics: {', '.join(names)}")
            options.setdefault(metric, {}).update(opts)
        metrics = build_metrics(names, options)
        return run_eval(policy, suite, out, metrics=metrics, ckpt=cfg.ckpt, ckpt_stamp=stamp, seed=cfg.seed,
                        steps=cfg.steps, cfg=cfg.cfg, shift=cfg.shift, batch_size=cfg.batch_size, force=cfg.force,
                        reward_names=names, reward_options=options)


def eval_command(ckpt: str, suite: str, out: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """`evaluate` with the config given as keywords (``n=48, seed=1``; `EvalConfig`'s keys)."""
    return evaluate(validate_config(EvalConfig, {"ckpt": str(ckpt), "suite": suite, **options}, source="eval"), out)


def load_eval_config(path: str | os.PathLike | None, overrides: Sequence[str], flags: Mapping[str, Any],
                     reward_options: Sequence[str] = ()) -> EvalConfig:
    """What ``refrl eval`` runs: the preset at ``path`` (or the defaults), then ``key=value``
    ``overrides``, then the command's flags (None: not given) and ``METRIC.KEY=VALUE`` reward options."""
    values = read_yaml(path) if path is not None else {}
    apply_overrides(values, list(overrides))
    values.update({k: str(v) if isinstance(v, os.PathLike) else v for k, v in flags.items() if v is not None})
    for text in reward_options:
        key = text.partition("=")[0]
        if "=" not in text or key.count(".") != 1 or not all(key.split(".")):
            raise ConfigError(f"--reward-option {text!r} must be METRIC.KEY=VALUE")
        apply_overrides(values, [f"reward_options.{text}"])
    for name in ("ckpt", "suite"):  # required, from a flag or the config
        if values.get(name) is None:
            raise ConfigError(f"Missing option '--{name}' (or {name}= in the config)")
    return validate_config(EvalConfig, values, source=str(path) if path is not None else "eval")
