"""Typed config of the RL trainer (defaults and sources: docs/reference/methods.md).

One config runs every objective over the same rollout, reward and advantage path:
``objective: grpo`` (PPO-clip on stored SDE steps), ``nft`` (DiffusionNFT) or ``awm``
(advantage-weighted matching); the last two train on the rollouts' clean images
(sections ``matching``, ``nft``, ``awm``) and need no SDE step.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from refrl.config import StrictModel
from refrl.errors import ConfigError
from refrl.limits import MAX_BATCH, MAX_REPEATS, MAX_SAMPLING_STEPS, MAX_STEPS, SEED_MAX
from refrl.models.build import ModelConfig
from refrl.sampling.schedules import sigma_schedule
from refrl.sampling.settings import SamplerConfig, resolve_config
from refrl.train.advantages import AdvantageConfig
from refrl.train.data import DataConfig
from refrl.train.optim import OptimConfig
from refrl.train.sharding import DistributedConfig
from refrl.train.validation import ValidationConfig

# The signal recipe of configs/tiny-cpu-grpo.yaml (docs/research/grpo.md#a-gradient-that-is-signal-not-noise, "A gradient that is
# signal, not noise"): one trained SDE step among the first three, one starting noise per
# group, lr 1e-4, from tiny-sft on level-2 training data, its output head frozen ("The dot
# grid"). The quickstart and every ablation variant start from it and add their own budget,
# rewards and shaping.
SIGNAL_RECIPE: dict[str, Any] = {
    "clip_range": 1.0e-3,
    "model": {"init": "tiny-sft", "frozen": ["head"]},
    "data": {"source": "refworld", "split": "train", "curriculum": [[0.0, 2]]},
    "optim": {"lr": 1.0e-4, "warmup_steps": 0, "schedule": "constant", "weight_decay": 1.0e-4},
    "sampling": {"steps": 10, "cfg_scale": 1.0, "sde_kind": "flow-sde", "noise_level": 0.7, "sde_steps": "random_one", "first_m": 3,
                 "same_noise_in_group": True},
}


class RewardSpec(StrictModel):
    name: str = Field(description="a registered reward: embedded, zoo, remote:NAME or your own")
    weight: float = Field(1.0, ge=-1e6, le=1e6, description="its weight in the advantage")
    options: dict[str, Any] = Field({}, description="keyword options of the reward (checkpoint, device, url, ...)")


class SamplingConfig(SamplerConfig):
    """``sampling:`` of RL: the shared sampler keys (steps, cfg_scale, shift; unset = the model's
    rollout defaults, `refrl.models.sampler.SamplerDefaults`) plus the rollout's SDE."""

    steps: int | None = Field(None, ge=2, le=MAX_SAMPLING_STEPS, description="denoising steps of a training rollout (None: the model's)")
    cfg_scale: float | None = Field(
        None, ge=0, description="classifier-free guidance in rollouts and training, 1 = off (None: the model's)"
    )
    sde_kind: Literal["flow-sde", "dance-sde", "cps"] = Field("flow-sde", description="the stochastic step (docs/reference/methods.md)")
    noise_level: float = Field(0.7, gt=0, description="a (flow-sde, cps) or eta (dance-sde)")
    sde_steps: Literal["all", "window", "random_one", "none"] = Field(
        "all", description="stochastic (trained) steps of a GRPO rollout; none = a plain ODE rollout (nft, awm only)"
    )
    window: int = Field(2, ge=1, le=MAX_SAMPLING_STEPS, description="sde_steps=window: number of consecutive SDE steps")
    window_start: Literal["random", "scheduled"] = Field("random", description="sde_steps=window: where the window starts")
    window_max_start: int | None = Field(
        None, ge=0, description="sde_steps=window: the window starts at step <= this (early, high-noise steps); "
        "None = anywhere in the trajectory",
    )
    first_m: int = Field(4, ge=1, le=MAX_SAMPLING_STEPS, description="sde_steps=random_one: pick among the first m steps (DyRef)")
    same_noise_in_group: bool = Field(
        False, description="one starting noise per group, so reward differences within a group come from the trained SDE steps"
    )

    @model_validator(mode="after")
    def _check_steps(self) -> SamplingConfig:
        if self.steps is not None and self.window_max_start is not None and self.window_max_start > self.steps - 2:
            raise ValueError(
                f"sampling.window_max_start ({self.window_max_start}) must be in [0, steps - 2] = [0, {self.steps - 2}]: "
                "the last step is never stochastic"
            )
        return self


class MatchingConfig(StrictModel):
    """Training times of the log-prob-free objectives (nft, awm), docs/reference/methods.md#log-prob-free-objectives-diffusionnft-and-awm.

    Each rollout sample gets ``k`` times ``t`` (sigma) and noises, drawn once per iteration
    and reused by every inner epoch, as GRPO reuses its SDE steps.
    """

    k: int = Field(4, ge=1, le=MAX_REPEATS, description="training times per rollout sample (Flow-Factory default: 0.9 x steps)")
    time_sampling: Literal["schedule", "uniform", "logit_normal"] = Field(
        "schedule", description="schedule: a sigma of the rollout's schedule within [t_min, t_max] (the released "
        "code's 'discrete'); uniform: U(t_min, t_max); logit_normal: sigmoid(N(logit_mean, logit_std)) clamped to the range",
    )
    t_min: float = Field(0.1, ge=0, lt=1, description="lowest training time (Flow-Factory: timestep_range 0.9)")
    t_max: float = Field(1.0, gt=0, le=1, description="highest training time")
    logit_mean: float = Field(0.0, description="time_sampling=logit_normal: mean")
    logit_std: float = Field(1.0, gt=0, description="time_sampling=logit_normal: std")
    old_policy: Literal["rollout", "ema"] = Field(
        "rollout", description="v_old: the weights that made the rollouts (on-policy), or an EMA of the trained "
        "weights that also samples the rollouts (DiffusionNFT's off-policy variant)",
    )
    old_ema_decay: float = Field(0.5, ge=0, lt=1, description="old_policy=ema: largest decay (DiffusionNFT's 0.5)")
    old_ema_ramp: float = Field(
        0.001, ge=0, description="old_policy=ema: decay = min(ramp * iteration, old_ema_decay) (DiffusionNFT's 0.001)"
    )

    @model_validator(mode="after")
    def _check_range(self) -> MatchingConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"matching.t_min ({self.t_min}) must be < matching.t_max ({self.t_max})")
        return self


class NFTConfig(StrictModel):
    """DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117); defaults of the released code."""

    beta: float = Field(1.0, gt=0, description="nft_beta: v+ = b v + (1-b) v_old; smaller is more conservative")
    adv_max: float = Field(5.0, gt=0, description="A_max of the optimality weight r = clip(A/A_max, -1, 1)/2 + 1/2")
    error_floor: float = Field(1e-5, gt=0, description="floor of the per-sample error scale")


class AWMConfig(StrictModel):
    """Advantage-weighted matching (Xue et al. 2025, arXiv 2509.25050); PPO clip range is ``clip_range``."""

    time_weighting: Literal["uniform", "t", "t2"] = Field(
        "uniform", description="weight of the matching log-likelihood l at time t: 1, t or t^2"
    )


def check_sampling(cfg: GRPOConfig, steps: int, shift: float) -> None:
    """The checks that need the rollout's steps and shift: ValueError naming the keys."""
    window = cfg.sampling.window_max_start
    if window is not None and window > steps - 2:
        raise ValueError(f"sampling.window_max_start ({window}) must be in [0, steps - 2] = [0, {steps - 2}]: "
                         "the last step is never stochastic")
    if cfg.objective != "grpo" and cfg.matching.time_sampling == "schedule":
        sigmas = sigma_schedule(steps, shift=shift)[:-1]
        if not ((sigmas >= cfg.matching.t_min) & (sigmas <= cfg.matching.t_max)).any():
            raise ValueError(
                f"matching.time_sampling=schedule: no sigma of the {steps}-step schedule lies in "
                f"[matching.t_min, matching.t_max] = [{cfg.matching.t_min}, {cfg.matching.t_max}]"
            )


def with_model_sampler(cfg: GRPOConfig, policy: Any) -> GRPOConfig:
    """``cfg`` with every unset ``sampling.steps`` / ``cfg_scale`` / ``shift`` set to the policy's
    rollout defaults (`refrl.sampling.settings.resolve_sampler`), checked as a given value is."""
    settings = resolve_config(policy, cfg.sampling, rollout=True)
    try:
        check_sampling(cfg, settings.steps, settings.shift)
    except ValueError as e:
        raise ConfigError(f"config: {e} (sampling resolved from the model: {settings.as_dict()})") from None
    return cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update=settings.as_dict())})


class GRPOGuardConfig(StrictModel):
    """GRPO-Guard (Wang et al. 2025, arXiv 2510.22319), regulated clipping of ``objective: grpo``:
    the formulas are in `refrl.train.objectives.grpo_guard`."""

    enabled: bool = Field(False, description="regulated clipping instead of the plain PPO clip (objective=grpo)")
    ratio_norm: bool = Field(True, description="RatioNorm: the log-ratio's bias added back, scaled by the step's std")
    reweight: bool = Field(True, description="each SDE step's loss divided by -dt, so steps get gradients of one size")


class GRPOConfig(StrictModel):
    seed: int = Field(0, ge=0, le=SEED_MAX, description="fixes prompts, noise and training times")
    objective: Literal["grpo", "nft", "awm"] = Field(
        "grpo", description="grpo: PPO-clip on stored SDE steps; nft: DiffusionNFT; awm: advantage-weighted matching"
    )
    iterations: int = Field(40, ge=1, le=MAX_STEPS, description="rollout-and-train iterations")
    groups_per_iteration: int = Field(8, ge=1, le=MAX_BATCH, description="prompts per iteration (global, all processes)")
    group_size: int = Field(8, ge=2, le=MAX_REPEATS, description="G samples per prompt")
    minibatch_size: int = Field(32, ge=1, le=MAX_BATCH, description="samples per forward/backward pass (global)")
    gradient_accumulation: int | Literal["iteration"] = Field(
        1, description="minibatches whose gradients are summed into one optimizer step; 'iteration' = all of an "
        "inner epoch, so one step sees every rollout of the iteration",
    )
    inner_epochs: int = Field(1, ge=1, le=MAX_REPEATS, description="passes over each iteration's rollouts")
    clip_range: float = Field(1e-4, gt=0, description="PPO epsilon (grpo, awm)")
    beta_kl: float = Field(0.0, ge=0, description="KL to the reference; nft/awm: beta * mean (v - v_ref)^2")
    kl_reference: Literal["auto", "adapter", "copy"] = Field(
        "auto", description="KL reference: the LoRA policy with its adapter off, or a frozen copy; auto picks adapter for LoRA"
    )
    ema_decay: float = Field(0.9, ge=0, lt=1, description="EMA of weights used for evaluation")
    on_policy_check: bool = Field(
        True, description="ratio must be 1 on the first minibatch after a rollout (not enforced with matching.old_policy=ema)"
    )
    on_policy_tol: float = Field(1e-5, ge=0, description="largest |ratio - 1| the on-policy check accepts (bf16: 1e-3)")
    checkpoint_every: int = Field(10, ge=1, le=MAX_STEPS, description="iterations between checkpoints")
    keep_last: int = Field(2, ge=0, le=MAX_STEPS, description="checkpoints kept (0 = all)")
    trackers: list[Literal["tensorboard", "wandb"]] = Field([], description="accelerate trackers (docs/guides/logging.md)")
    save_rollouts: bool = Field(False, description="write rewards and advantages of every iteration to rollouts/")
    model: ModelConfig = ModelConfig(init="tiny-sft")
    data: DataConfig = DataConfig(curriculum=[(0.0, 2)])
    optim: OptimConfig = OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=1e-4)
    distributed: DistributedConfig = DistributedConfig()
    sampling: SamplingConfig = SamplingConfig()
    rewards: list[RewardSpec] = Field(default=[RewardSpec(name="identity"), RewardSpec(name="layout")], max_length=64,
                                      description="the rewards and their weights (docs/guides/rewards.md)")
    advantage: AdvantageConfig = AdvantageConfig()
    matching: MatchingConfig = MatchingConfig()
    nft: NFTConfig = NFTConfig()
    awm: AWMConfig = AWMConfig()
    grpo_guard: GRPOGuardConfig = GRPOGuardConfig()
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _check(self) -> GRPOConfig:
        n = self.groups_per_iteration * self.group_size
        if n % self.minibatch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must divide groups_per_iteration*group_size ({n})"
            )
        if isinstance(self.gradient_accumulation, int):
            n_mb = n // self.minibatch_size
            if self.gradient_accumulation < 1 or n_mb % self.gradient_accumulation:
                raise ValueError(
                    f"gradient_accumulation ({self.gradient_accumulation}) must be 'iteration' or a positive divisor "
                    f"of the minibatches per epoch ({n_mb})"
                )
        if self.objective == "grpo" and self.sampling.sde_steps == "none":
            raise ValueError(
                "sampling.sde_steps=none leaves objective=grpo no SDE step to train: choose all, window or random_one, "
                "or objective=nft/awm"
            )
        if self.sampling.sde_steps == "none" and self.sampling.same_noise_in_group:
            raise ValueError(
                "sampling.same_noise_in_group=true with sampling.sde_steps=none makes every sample of a group the same "
                "image (one start, a deterministic ODE): no advantage is left; set one of them differently"
            )
        if self.sampling.steps is not None and self.sampling.shift is not None:  # else checked once resolved
            check_sampling(self, self.sampling.steps, self.sampling.shift)
        if self.grpo_guard.enabled and self.objective != "grpo":
            raise ValueError(f"grpo_guard.enabled=true regulates the clip of objective=grpo, not {self.objective}")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: each reward once, got {names}")
        return self
