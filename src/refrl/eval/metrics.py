"""Which rewards an evaluation reports: ``--rewards`` / ``--reward-option`` specs -> `Reward`s.

A metric is a name in ``eval.json``; it is scored by a reward of the zoo
(`refrl.rewards.build`) or by a builtin metric (`BUILTIN_METRICS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from refrl.errors import RefrlError
from refrl.eval.artifacts import PatchGridShare
from refrl.eval.scoring import MaskedPSNR, TargetPSNR
from refrl.rewards.base import Reward

BUILTIN_METRICS: dict[str, Callable[[], Reward]] = {
    "psnr_inside": lambda: MaskedPSNR("inside"),
    "psnr_outside": lambda: MaskedPSNR("outside"),
    "psnr": TargetPSNR,  # whole image to the ground-truth target
    "patch_grid": PatchGridShare,  # lower is better: the dot-grid artefact of RL (refrl.eval.artifacts)
}


def parse_metric_specs(specs: str | Sequence[str]) -> dict[str, str]:
    """``"identity,subject=dino_seg"`` (or a list of such items) -> {metric: reward name}.

    ``NAME`` reports reward NAME under its own name; ``METRIC=NAME`` under ``METRIC``.
    """
    items = [s for part in ([specs] if isinstance(specs, str) else specs) for s in str(part).split(",")]
    out: dict[str, str] = {}
    for item in (s.strip() for s in items):
        if not item:
            continue
        metric, _, reward = item.partition("=")
        metric, reward = metric.strip(), (reward.strip() or metric.strip())
        if not metric or not reward:
            raise RefrlError(f"bad reward spec {item!r}; expected NAME or METRIC=NAME")
        if metric in out:
            raise RefrlError(f"metric {metric!r} given twice in the reward list")
        out[metric] = reward
    if not out:
        raise RefrlError("no rewards given; expected a comma-separated list such as identity,layout")
    return out


def parse_reward_options(texts: Sequence[str], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["csd.model_path=/m", "dino.batch_size=8"]`` -> {"csd": {...}, "dino": {...}} (values as YAML)."""
    from refrl.config import parse_override

    out: dict[str, dict[str, Any]] = {}
    for text in texts:
        keys, value = parse_override(text)
        if len(keys) != 2:
            raise RefrlError(f"reward option {text!r} must be METRIC.KEY=VALUE")
        if keys[0] not in metrics:
            raise RefrlError(f"reward option {text!r} names metric {keys[0]!r}; metrics: {', '.join(metrics)}")
        out.setdefault(keys[0], {})[keys[1]] = value
    return out


def build_metrics(metrics: Mapping[str, str], options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Reward]:
    """One `Reward` per metric: builtin metrics here, everything else through `refrl.rewards.build`."""
    options = options or {}
    out: dict[str, Reward] = {}
    for metric, reward in metrics.items():
        if reward in BUILTIN_METRICS:
            if options.get(metric):
                raise RefrlError(f"metric {metric!r} ({reward}) takes no options, got {dict(options[metric])}")
            out[metric] = BUILTIN_METRICS[reward]()
            continue
        from refrl.rewards import build

        out[metric] = build(reward, **dict(options.get(metric, {})))
    return out
