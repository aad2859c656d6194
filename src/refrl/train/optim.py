"""AdamW with linear warmup and a constant or cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, Literal

import torch
from pydantic import Field

from refrl.config import StrictModel
from refrl.limits import MAX_STEPS


class OptimConfig(StrictModel):
    lr: float = Field(5e-4, gt=0, le=1, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.99), description="AdamW betas"
    )
    eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon")
    warmup_steps: int = Field(200, ge=0, le=MAX_STEPS, description="linear warmup from 0 to lr")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="lr after the warmup")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    nonfinite_limit: int = Field(
        5, ge=1, le=MAX_STEPS, description="stop after this many optimizer steps in a row with a non-finite loss or "
        "gradient (each is skipped, never applied; docs/guides/reliability.md)",
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base lr at ``step``: linear warmup, then constant or cosine to min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
    return opt, sched
