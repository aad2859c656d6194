"""`EvalConfig`: what ``refrl eval`` runs, typed and validated like the training configs.

``refrl eval --config configs/eval-refworld.yaml ckpt=runs/grpo sampling.steps=40`` reads a
YAML preset and ``key=value`` overrides; the command's flags (``--ckpt``, ``--sampling-steps``,
...) are overrides too. `evaluate` is the entry point: load the checkpoint, build the suite
and its metrics, run `refrl.eval.runner.run_eval`; `eval_command` is the same from Python,
where a reward may also be a `Reward` object or a plain function.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from refrl.config import StrictModel, apply_overrides, read_yaml, validate_config
from refrl.errors import ConfigError, RefrlError
from refrl.eval.metrics import build_metrics, parse_metric_specs
from refrl.eval.processes import Processes
from refrl.eval.runner import (
    DEFAULT_BATCH_SIZE,
    SUITE_NAMES,
    build_suite,
    checkpoint_stamp,
    policy_image_size,
    run_eval,
)
from refrl.limits import MAX_BATCH, MAX_EVAL_SAMPLES, MAX_IMAGE_SIZE, SEED_MAX
from refrl.rewards.base import Reward
from refrl.rewards.function import FunctionReward, RewardFunction
from refrl.runfolder.lock import lock_run_folder
from refrl.sampling.settings import SamplerConfig, reject_renamed_keys

# A metric as `eval_command` takes it: a spec "NAME" / "METRIC=NAME", a `Reward`, or a plain
# function (images, samples) -> list[float | None] (`refrl.rewards.function.FunctionReward`).
MetricLike = str | Reward | RewardFunction


class EvalConfig(StrictModel):
    """One evaluation: which policy, which suite, how to sample, which metrics."""

    ckpt: str = Field(description="tiny-sft, a run folder or a checkpoint folder")
    suite: str = Field(description=f"one of {', '.join(SUITE_NAMES)}")
    n: int | None = Field(None, ge=1, le=MAX_EVAL_SAMPLES, description="refworld/refine: number of samples (default 96 / 48)")
    limit: int | None = Field(None, ge=1, le=MAX_EVAL_SAMPLES, description="only the first N samples")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seed of the samples (refworld) and of the noise")
    sampling: SamplerConfig = Field(
        default_factory=SamplerConfig, description="the ODE sampler: steps, cfg_scale, shift (unset: the model's)"
    )
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, le=MAX_BATCH, description="images per generation / scoring batch")
    size: int | None = Field(None, ge=1, le=MAX_IMAGE_SIZE, description="image size (default: the policy's, Policy.image_size)")
    data: str | None = Field(
        None, description="manifest: the JSONL manifest; omniref: metadata JSON; dreambench: the DreamBench folder"
    )
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

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        if isinstance(values, dict):  # raised as is: one line naming the new key
            reject_renamed_keys(values, "eval")
        return values

    @field_validator("suite")
    @classmethod
    def _known_suite(cls, name: str) -> str:
        if name not in SUITE_NAMES:  # raised as is (not a ValueError): the message pydantic would wrap is already one line
            raise ConfigError(f"unknown suite {name!r}; allowed: {', '.join(SUITE_NAMES)}")
        return name


def evaluate(cfg: EvalConfig, out: str | os.PathLike, *, metrics: Mapping[str, Reward] | None = None,
             processes: Processes | None = None) -> dict[str, Any]:
    """``refrl eval``: load the checkpoint, build the suite and its metrics, run the eval into ``out``.

    ``metrics`` are reward objects scored beside the named ones (``cfg.rewards``; without
    either, the suite's default metrics); ``processes``: the launched processes sharing the work
    (`refrl.eval.processes.current`; default this process alone)."""
    from refrl.models.build import load_policy

    procs = processes or Processes()
    stamp = checkpoint_stamp(cfg.ckpt)
    custom = dict(metrics or {})
    with ExitStack() as held:
        # the lock before loading: a busy --out is refused at once, not after minutes of loading
        procs.run(lambda: held.enter_context(lock_run_folder(out)), main_only=True)

        def prepare():
            policy = load_policy(cfg.ckpt)
            if hasattr(policy, "eval"):  # nn.Module policies: no train-mode randomness while sampling
                policy.eval()
            suite = build_suite(cfg.suite, seed=cfg.seed, n=cfg.n, limit=cfg.limit,
                                size=cfg.size or policy_image_size(policy), data=cfg.data, root=cfg.root,
                                split=cfg.split, level=cfg.level)
            names = parse_metric_specs(cfg.rewards) if cfg.rewards else ({} if custom else dict(suite.metrics))
            clash = sorted(set(names) & set(custom))
            if clash:
                raise RefrlError(f"metric {clash[0]!r} is given twice (a name and a reward object)")
            options = {m: dict(o) for m, o in suite.reward_options.items() if m in names}
            for metric, opts in cfg.reward_options.items():
                if metric not in names:
                    raise RefrlError(f"reward option for metric {metric!r}, which is not measured; "
                                     f"metrics: {', '.join([*names, *custom])}")
                options.setdefault(metric, {}).update(opts)
            built = {**build_metrics(names, options), **custom}
            reward_names = {**names, **{m: f"python:{type(r).__name__}" for m, r in custom.items()}}
            return policy, suite, built, reward_names, options

        policy, suite, built, reward_names, options = procs.run(prepare)
        s = cfg.sampling
        return run_eval(policy, suite, out, metrics=built, ckpt=cfg.ckpt, ckpt_stamp=stamp, seed=cfg.seed,
                        steps=s.steps, cfg_scale=s.cfg_scale, shift=s.shift, batch_size=cfg.batch_size,
                        force=cfg.force, reward_names=reward_names, reward_options=options, processes=procs)


def metric_objects(rewards: Sequence[MetricLike]) -> tuple[list[str], dict[str, Reward]]:
    """Split ``rewards`` into metric specs (strings) and reward objects by metric name (plain
    functions wrapped in `refrl.rewards.function.FunctionReward`)."""
    specs: list[str] = []
    objects: dict[str, Reward] = {}
    for item in rewards:
        if isinstance(item, str):
            specs.append(item)
            continue
        reward = item if isinstance(item, Reward) else FunctionReward(item)
        if reward.name in objects:
            raise RefrlError(f"metric {reward.name!r} is given twice")
        objects[reward.name] = reward
    return specs, objects


def eval_command(ckpt: str, suite: str, out: str | os.PathLike, *,
                 rewards: str | Sequence[MetricLike] | None = None, **options: Any) -> dict[str, Any]:
    """`evaluate` with the config given as keywords (``n=48, seed=1, sampling={"steps": 10}``;
    `EvalConfig`'s keys). ``rewards`` may mix metric specs (``"identity"``, ``"subject=dino_seg"``),
    `Reward` objects and plain functions ``(images, samples) -> list[float | None]``."""
    specs, objects = metric_objects([rewards] if isinstance(rewards, str) else list(rewards or []))
    values = {"ckpt": str(ckpt), "suite": suite, **options, **({"rewards": specs} if specs else {})}
    return evaluate(validate_config(EvalConfig, values, source="eval"), out, metrics=objects)


def load_eval_config(path: str | os.PathLike | None, overrides: Sequence[str], flags: Mapping[str, Any],
                     reward_options: Sequence[str] = ()) -> EvalConfig:
    """What ``refrl eval`` runs: the preset at ``path`` (or the defaults), then ``key=value``
    ``overrides``, then the command's flags (None: not given) and ``METRIC.KEY=VALUE`` reward options."""
    values = read_yaml(path) if path is not None else {}
    apply_overrides(values, list(overrides))
    reject_renamed_keys(values, str(path) if path is not None else "eval")
    for key, value in flags.items():  # a dotted key (sampling.steps) sets a key of a section
        if value is None:
            continue
        *parents, last = key.split(".")
        node = values
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = str(value) if isinstance(value, os.PathLike) else value
    for text in reward_options:
        key = text.partition("=")[0]
        if "=" not in text or key.count(".") != 1 or not all(key.split(".")):
            raise ConfigError(f"--reward-option {text!r} must be METRIC.KEY=VALUE")
        apply_overrides(values, [f"reward_options.{text}"])
    for name in ("ckpt", "suite"):  # required, from a flag or the config
        if values.get(name) is None:
            raise ConfigError(f"Missing option '--{name}' (or {name}= in the config)")
    from refrl.twin import apply_tiny_twin  # tiny_twin=true: tiny stand-ins of the zoo rewards

    return validate_config(EvalConfig, apply_tiny_twin(values), source=str(path) if path is not None else "eval")
