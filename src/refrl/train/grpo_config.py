"""Typed config of the GRPO trainer (defaults: METHODS.md sections 1-2)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from refrl.config import StrictModel
from refrl.models.build import ModelConfig
from refrl.train.advantages import AdvantageConfig
from refrl.train.data import DataConfig
from refrl.train.optim import OptimConfig


class RewardSpec(StrictModel):
    name: str
    weight: float = 1.0
    options: dict[str, Any] = {}


class SamplingConfig(StrictModel):
    steps: int = Field(10, ge=2, description="denoising steps of a training rollout")
    shift: float = Field(1.0, gt=0)
    cfg_scale: float = Field(1.0, description="classifier-free guidance in rollouts and training (1 = off)")
    sde_kind: Literal["flow-sde", "dance-sde", "cps"] = "flow-sde"
    noise_level: float = Field(0.7, gt=0, description="a (flow-sde, cps) or eta (dance-sde)")
    sde_steps: Literal["all", "window", "random_one"] = "all"
    window: int = Field(2, ge=1, description="sde_steps=window: number of consecutive SDE steps")
    window_start: Literal["random", "scheduled"] = "random"
    first_m: int = Field(4, ge=1, description="sde_steps=random_one: pick among the first m steps (DyRef)")
    same_noise_in_group: bool = False


class GRPOConfig(StrictModel):
    seed: int = 0
    iterations: int = Field(40, ge=1)
    groups_per_iteration: int = Field(8, ge=1, description="prompts per iteration (global, all processes)")
    group_size: int = Field(8, ge=2, description="G samples per prompt")
    minibatch_size: int = Field(32, ge=1, description="samples per optimizer step (global)")
    inner_epochs: int = Field(1, ge=1)
    clip_range: float = Field(1e-4, gt=0, description="PPO epsilon")
    beta_kl: float = Field(0.0, ge=0)
    kl_reference: Literal["auto", "adapter", "copy"] = Field(
        "auto", description="KL reference: the LoRA policy with its adapter off, or a frozen copy; auto picks adapter for LoRA"
    )
    ema_decay: float = Field(0.9, ge=0, lt=1, description="EMA of weights used for evaluation")
    on_policy_check: bool = True
    on_policy_tol: float = Field(1e-5, ge=0)
    checkpoint_every: int = Field(10, ge=1, description="iterations between checkpoints")
    keep_last: int = Field(2, ge=0, description="checkpoints kept (0 = all)")
    trackers: list[Literal["tensorboard", "wandb"]] = []
    save_rollouts: bool = Field(False, description="write rewards and advantages of every iteration to rollouts/")
    model: ModelConfig = ModelConfig(init="tiny-sft")
    data: DataConfig = DataConfig(curriculum=[(0.0, 2)])
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=1e-4)
    sampling: SamplingConfig = SamplingConfig()
    rewards: list[RewardSpec] = [RewardSpec(name="identity"), RewardSpec(name="layout")]
    advantage: AdvantageConfig = AdvantageConfig()

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        n = self.groups_per_iteration * self.group_size
        if n % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide groups_per_iteration*group_size ({n})"
            )
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: each reward once, got {names}")
        return self
