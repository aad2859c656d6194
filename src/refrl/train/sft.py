"""Stage 1: supervised fine-tuning with the rectified-flow loss.

For a target latent ``x0``, noise ``n`` and ``sigma``: ``x = (1 - sigma) x0 + sigma n``
and the loss is ``|| v_theta(x, sigma, c) - (n - x0) ||^2``. For OmniRefiner's
``refine`` task the loss can be focused on the edited region (masked MSE).

Each condition (prompt + references) is encoded once and reused for
``noise_per_condition`` noise draws: reference tokens are the expensive part of
a multi-reference model and they do not depend on the noise, so several noise
levels per condition buy more flow-matching targets per second.

Batches are a pure function of ``(seed, step)``, so the data position is the
step and a resumed run sees exactly the batches an uninterrupted run would. Under
``accelerate launch`` each process takes an equal share of every batch
(`refrl.train.loop` runs the loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from refrl.config import StrictModel
from refrl.data.schema import LoadedSample
from refrl.limits import MAX_BATCH, MAX_REPEATS, MAX_STEPS, SEED_MAX
from refrl.models.build import ModelConfig
from refrl.models.policy import Policy
from refrl.runfolder.rng import seeded_generator
from refrl.train.data import DataConfig, SampleSource
from refrl.train.loop import Dataset, LoopSpec, TrainLoop, main_process_lock
from refrl.train.optim import OptimConfig
from refrl.train.run import Timer
from refrl.train.sharding import DistributedConfig
from refrl.train.validation import ValidationConfig


class SFTConfig(StrictModel):
    seed: int = Field(0, ge=0, le=SEED_MAX, description="fixes data, noise and initialization")
    steps: int = Field(3000, ge=1, le=MAX_STEPS, description="optimizer steps")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="conditions per step")
    noise_per_condition: int = Field(4, ge=1, le=MAX_REPEATS, description="noise draws per encoded condition")
    sigma_sampling: Literal["uniform", "logit_normal"] = Field(
        "logit_normal", description="training noise levels: U(0, 1) or sigmoid(N(logit_mean, logit_std)) (SD3)"
    )
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal (JiT: 0.8)")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: std of the normal (JiT: 0.8)")
    drop_text_prob: float = Field(0.1, ge=0, le=1, description="CFG training: empty prompt")
    drop_refs_prob: float = Field(0.1, ge=0, le=1, description="CFG training: no references")
    drop_both_prob: float = Field(0.0, ge=0, le=1, description="CFG training: fully unconditional")
    loss_weighting: Literal["velocity", "x0"] = Field(
        "velocity", description="velocity: plain MSE on v; x0: the same error times sigma^2, i.e. MSE on the clean image"
    )
    x0_weight_floor: float = Field(0.05, gt=0, le=1, description="x0 weighting uses max(sigma, floor)^2")
    mask_loss: Literal["none", "weighted", "only"] = Field(
        "weighted", description="samples with a mask: none, extra weight inside it (mask_weight), or the inside only"
    )
    mask_weight: float = Field(4.0, ge=0, description="extra loss weight inside the mask (OmniRefiner)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the weights; checkpoints export the EMA")
    checkpoint_every: int = Field(500, ge=1, le=MAX_STEPS, description="steps between checkpoints")
    keep_last: int = Field(2, ge=0, le=MAX_STEPS, description="checkpoints kept (0 = all)")
    log_every: int = Field(10, ge=1, le=MAX_STEPS, description="steps between metrics.jsonl lines")
    trackers: list[Literal["tensorboard", "wandb"]] = Field([], description="accelerate trackers (docs/guides/logging.md)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    validation: ValidationConfig = ValidationConfig()
    distributed: DistributedConfig = DistributedConfig()


def sample_sigmas(cfg: SFTConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels: uniform, or logit-normal (SD3) ``sigmoid(N(m, s))``."""
    if cfg.sigma_sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))


def flow_matching_loss(
    pred: torch.Tensor, target_v: torch.Tensor, mask: torch.Tensor | None, mode: str, mask_weight: float,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared velocity error; with a mask, ``weighted`` scales the error inside the
    mask by ``1 + mask_weight`` and ``only`` keeps the masked region alone (OmniRefiner's
    masked MSE). Samples without a mask use the plain MSE. ``sample_weight`` (B,) scales
    each sample's error (see :func:`x0_loss_weight`)."""
    err = (pred.float() - target_v.float()).pow(2).mean(dim=1, keepdim=True)  # (B,1,H,W)
    if sample_weight is not None:
        err = err * sample_weight.view(-1, 1, 1, 1)
    if mask is None or mode == "none":
        return err.mean()
    if mode == "weighted":
        w = 1.0 + mask_weight * mask
        return ((err * w).flatten(1).sum(1) / w.flatten(1).sum(1)).mean()
    has = mask.flatten(1).sum(1) > 0
    w = torch.where(has[:, None, None, None], mask, torch.ones_like(mask))
    return ((err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-6)).mean()


def x0_loss_weight(sigma: torch.Tensor, floor: float) -> torch.Tensor:
    """``max(sigma, floor)^2``: since ``v = (x_t - x0) / sigma``, the velocity error times
    sigma^2 is the error on the clean image. The plain velocity loss weights low-noise
    steps by 1/sigma^2 relative to that, so a small pixel-space model spends its first
    thousand steps on local denoising; the x0 weighting puts the weight back on the
    high-noise steps where the composition is decided."""
    return sigma.clamp_min(floor).pow(2)


def _stack_masks(samples: list[LoadedSample], shape: tuple[int, ...]) -> torch.Tensor | None:
    """Masks of samples that have one (refine); zeros elsewhere (plain MSE there)."""
    if not any(s.mask is not None and s.category == "refine" for s in samples):
        return None
    out = torch.zeros(len(samples), 1, *shape[-2:])
    for i, s in enumerate(samples):
        if s.mask is not None and s.category == "refine":
            # latent policies (VAE) have a smaller grid than the image: average the mask onto it
            out[i] = F.interpolate(s.mask[None].float(), size=tuple(shape[-2:]), mode="area")[0]
    return out


class SFTTrainer(TrainLoop):
    """Stage 1 as a step of `refrl.train.loop.TrainLoop`: one flow-matching step per step.

    Each process encodes an equal, contiguous share of the step's conditions; the random
    draws of the whole batch are the same on every process (`sft_step`), so N processes
    take the step one process takes.
    """

    cfg: SFTConfig

    def __init__(self, cfg: SFTConfig, out_dir: str | Path, resume: bool = False, *, policy: Policy | str | None = None,
                 dataset: Dataset | None = None):
        super().__init__(cfg, out_dir, resume, policy=policy, dataset=dataset)

    def loop_spec(self) -> LoopSpec:
        cfg = self.cfg
        return LoopSpec(kind="sft", total=cfg.steps, checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last,
                        ema_decay=cfg.ema_decay, ema_warmup=True, train_mode=True, log_every=cfg.log_every,
                        trackers=list(cfg.trackers), per_process={"batch_size": cfg.batch_size})

    def setup(self) -> None:
        self.source = self.sample_source(need_target="SFT trains on the targets")
        self.timer = Timer()
        self.running: float | None = None

    def step(self, i: int) -> dict[str, Any]:
        loss, stats = sft_step(self.policy, self.source, self.cfg, i, self.dist.rank, self.dist.world)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.optimizer_step(loss=float(loss.detach()))
        lv = self.dist.mean_across(float(loss.detach()))
        self.running = lv if self.running is None else 0.98 * self.running + 0.02 * lv
        record = {"loss": lv, "grad_norm": grad_norm}
        if self.logs_at(i + 1):
            record["seconds"] = self.timer.lap()
        return {**record, **stats}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{self.running:.4f}", "lr": f"{record['lr']:.1e}"}


def train_sft(cfg: SFTConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Run SFT into ``out_dir`` (config.yaml, metrics.jsonl, checkpoints/). Returns the final checkpoint.

    The run folder's lock is taken first, so a busy folder is refused before anything else."""
    with main_process_lock(out_dir):
        return SFTTrainer(cfg, out_dir, resume=resume).train()


def sft_step(policy: Policy, source: SampleSource, cfg: SFTConfig, step: int, rank: int = 0,
             world: int = 1) -> tuple[torch.Tensor, dict]:
    """The loss of one step (batch, condition dropout and noise all from (seed, step)).

    With ``world`` processes, process ``rank`` computes the loss of its contiguous share of
    the batch; every draw is made for the whole batch first, so the shares' mean loss is
    the one-process loss.
    """
    samples = source.batch(step, cfg.batch_size)
    g = seeded_generator(cfg.seed, step, 1)
    b = len(samples)
    drop_both = torch.rand(b, generator=g) < cfg.drop_both_prob
    drop_text = (torch.rand(b, generator=g) < cfg.drop_text_prob) | drop_both
    drop_refs = (torch.rand(b, generator=g) < cfg.drop_refs_prob) | drop_both
    per = b // world
    lo, hi = rank * per, (rank + 1) * per
    local = samples[lo:hi]
    cond = policy.encode_condition(local, drop_text=drop_text[lo:hi], drop_refs=drop_refs[lo:hi])
    x0 = policy.encode_images(torch.stack([s.target for s in local]))
    k = cfg.noise_per_condition
    index = torch.arange(per).repeat_interleave(k)
    cond_k = policy.select_condition(cond, index) if k > 1 else cond
    x0 = x0[index]
    sigma = sample_sigmas(cfg, b * k, g)[lo * k : hi * k]
    noise = torch.randn((b * k, *x0.shape[1:]), generator=g)[lo * k : hi * k]
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - s) * x0 + s * noise
    pred = policy.velocity(x_t, sigma, cond_k)
    masks = _stack_masks(local, x0.shape)
    weight = x0_loss_weight(sigma, cfg.x0_weight_floor) if cfg.loss_weighting == "x0" else None
    loss = flow_matching_loss(pred, noise - x0, None if masks is None else masks[index], cfg.mask_loss, cfg.mask_weight,
                              sample_weight=weight)
    return loss, {"level": source.level_at(step), "mean_refs": float(np.mean([s.n_refs for s in samples]))}
