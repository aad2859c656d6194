"""Stage 1: supervised fine-tuning with the rectified-flow loss.

For a target latent ``x0``, noise ``n`` and ``sigma``: ``x = (1 - sigma) x0 + sigma n``
and the loss is ``|| v_theta(x, sigma, c) - (n - x0) ||^2``. For OmniRefiner's
``refine`` task the loss can be focused on the edited region (masked MSE).

Each condition (prompt + references) is encoded once and reused for
``noise_per_condition`` noise draws: reference tokens are the expensive part of
a multi-reference model and they do not depend on the noise, so several noise
levels per condition buy more flow-matching targets per second.

Batches are a pure function of ``(seed, step)``, so the data position is the
step and a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from refrl.config import StrictModel, dump_config
from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.models.build import ModelConfig, build_policy, check_image_size
from refrl.runfolder.layout import latest_checkpoint
from refrl.runfolder.lock import lock_run_folder
from refrl.runfolder.rng import seed_everything, seeded_generator
from refrl.train.checkpoint import (
    init_fingerprint,
    resume_training,
    rng_state,
    save_checkpoint,
)
from refrl.train.data import DataConfig, SampleSource
from refrl.train.ema import EMA
from refrl.train.optim import OptimConfig, build_optimizer
from refrl.train.run import MetricsWriter, Timer


class SFTConfig(StrictModel):
    seed: int = 0
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(32, ge=1, description="conditions per step")
    noise_per_condition: int = Field(4, ge=1, description="noise draws per encoded condition")
    sigma_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    drop_text_prob: float = Field(0.1, ge=0, le=1, description="CFG training: empty prompt")
    drop_refs_prob: float = Field(0.1, ge=0, le=1, description="CFG training: no references")
    drop_both_prob: float = Field(0.0, ge=0, le=1, description="CFG training: fully unconditional")
    loss_weighting: Literal["velocity", "x0"] = Field(
        "velocity", description="velocity: plain MSE on v; x0: the same error times sigma^2, i.e. MSE on the clean image"
    )
    x0_weight_floor: float = Field(0.05, gt=0, le=1, description="x0 weighting uses max(sigma, floor)^2")
    mask_loss: Literal["none", "weighted", "only"] = "weighted"
    mask_weight: float = Field(4.0, ge=0, description="extra loss weight inside the mask (OmniRefiner)")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    keep_last: int = Field(2, ge=0, description="checkpoints kept (0 = all)")
    log_every: int = Field(10, ge=1, description="steps between metrics.jsonl lines")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()


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


def train_sft(cfg: SFTConfig, out_dir: str | Path, resume: bool = False) -> Path:
    """Run SFT into ``out_dir`` (config.yaml, metrics.jsonl, checkpoints/). Returns the final checkpoint.

    Holds the run folder's lock (`refrl.runfolder.lock.lock_run_folder`) for the whole run.
    """
    with lock_run_folder(out_dir):
        return _train_sft(cfg, Path(out_dir), resume)


def _train_sft(cfg: SFTConfig, out_dir: Path, resume: bool) -> Path:
    ckpt_root = out_dir / "checkpoints"
    last = latest_checkpoint(ckpt_root)
    if last is not None and not resume:
        raise RefrlError(f"{out_dir} already holds checkpoints; pass --resume to continue or choose another --out")
    if last is None and resume:
        raise RefrlError(f"--resume: no checkpoint under {ckpt_root}")
    seed_everything(cfg.seed)
    policy = build_policy(cfg.model)
    check_image_size(policy, cfg.data.size)
    policy.train()
    named = [(f"p{i}", p) for i, p in enumerate(policy.trainable_parameters())]
    optimizer, scheduler = build_optimizer([p for _, p in named], cfg.optim, cfg.steps)
    ema = EMA(named, cfg.ema_decay)
    source = SampleSource(cfg.data, seed=cfg.seed, total_steps=cfg.steps, need_target="SFT trains on the targets")
    dump_config(cfg, out_dir / "config.yaml")  # once the model and the data are known to load

    start = 0
    init_sha = init_fingerprint(cfg.model.init)
    if resume:
        start = resume_training(ckpt_root, named, optimizer, scheduler, ema, init_sha, cfg.model.init, out_dir)
    # lines after the checkpoint (all of them in a fresh run) are redone, so every step is logged once
    metrics = MetricsWriter(out_dir / "metrics.jsonl", truncate_after_step=start)

    def checkpoint(step: int) -> Path:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}

        def export(path: Path) -> None:  # the loadable model carries the EMA weights
            with ema.swapped_in():
                policy.save_pretrained(path)

        return save_checkpoint(
            ckpt_root, step, export, state, ema.state_dict(), {"data_position": step, "kind": "sft", "init_sha256": init_sha},
            trainable=dict(named), keep_last=cfg.keep_last,
        )

    interrupted = {"flag": False}

    def on_sigint(signum, frame):  # finish the step, save, then exit
        interrupted["flag"] = True

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    timer = Timer()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="sft", dynamic_ncols=True)
    last_path: Path | None = None
    running = None
    try:
        for step in bar:
            loss, stats = sft_step(policy, source, cfg, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            ema.update()
            lv = float(loss.detach())
            running = lv if running is None else 0.98 * running + 0.02 * lv
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                metrics.write(
                    {"step": step + 1, "loss": lv, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                     "seconds": timer.lap(), **stats}
                )
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or interrupted["flag"]:
                last_path = checkpoint(step + 1)
            if interrupted["flag"]:
                bar.close()
                raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        metrics.close()
        bar.close()
    if last_path is None:
        last_path = latest_checkpoint(ckpt_root)
    return last_path


def sft_step(policy, source: SampleSource, cfg: SFTConfig, step: int) -> tuple[torch.Tensor, dict]:
    """The loss of one step (batch, condition dropout and noise all from (seed, step))."""
    samples = source.batch(step, cfg.batch_size)
    g = seeded_generator(cfg.seed, step, 1)
    b = len(samples)
    drop_both = torch.rand(b, generator=g) < cfg.drop_both_prob
    drop_text = (torch.rand(b, generator=g) < cfg.drop_text_prob) | drop_both
    drop_refs = (torch.rand(b, generator=g) < cfg.drop_refs_prob) | drop_both
    cond = policy.encode_condition(samples, drop_text=drop_text, drop_refs=drop_refs)
    x0 = policy.encode_images(torch.stack([s.target for s in samples]))
    k = cfg.noise_per_condition
    index = torch.arange(b).repeat_interleave(k)
    cond_k = policy.select_condition(cond, index) if k > 1 else cond
    x0 = x0[index]
    sigma = sample_sigmas(cfg, b * k, g)
    noise = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - s) * x0 + s * noise
    pred = policy.velocity(x_t, sigma, cond_k)
    masks = _stack_masks(samples, x0.shape)
    weight = x0_loss_weight(sigma, cfg.x0_weight_floor) if cfg.loss_weighting == "x0" else None
    loss = flow_matching_loss(pred, noise - x0, None if masks is None else masks[index], cfg.mask_loss, cfg.mask_weight,
                              sample_weight=weight)
    return loss, {"level": source.level_at(step), "mean_refs": float(np.mean([s.n_refs for s in samples]))}
