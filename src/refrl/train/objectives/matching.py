"""What the log-prob-free objectives share (docs/reference/methods.md#log-prob-free-objectives-diffusionnft-and-awm): training on the
rollouts' clean images through the forward process.

For a rollout sample ``x0`` the objective draws ``K`` training times ``t`` (sigma) and
noises ``e``: ``x_t = (1 − t)·x0 + t·e``, target velocity ``u = e − x0``. ``v_old`` is
the velocity of the sampling policy (the rollout weights, or the off-policy EMA) at the
same ``x_t``, computed without gradients before the first update of the iteration.
Any sampler may make the rollouts (ODE, CFG, few steps): no per-step log-prob is kept.

Times and noises are keyed by (seed, iteration, sample): they do not depend on the
number of processes or on minibatching, and a resumed run draws the same ones.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from refrl.runfolder.rng import seeded_generator
from refrl.sampling.rollout import Rollout, encode_for_guidance, guided_velocity
from refrl.train.ema import EMA
from refrl.train.losses import velocity_kl
from refrl.train.objectives.base import MinibatchLoss, Objective

TIME_STREAM, NOISE_STREAM = 8, 9  # seeded_generator streams of the training times and noises


def forward_process(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified-flow forward process: ``x_t = (1 − t)·x0 + t·e`` and the target velocity ``u = e − x0``.

    ``x0`` and ``noise`` (B, *latent), ``t`` (B,); float32 out.
    """
    tt = t.float().reshape(-1, *([1] * (x0.dim() - 1)))
    x0, noise = x0.float(), noise.float()
    return (1.0 - tt) * x0 + tt * noise, noise - x0


def sample_training_times(
    k: int, mode: str, sigmas: torch.Tensor, t_min: float, t_max: float, logit_mean: float, logit_std: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``k`` training times (float32) in ``[t_min, t_max]``.

    * ``schedule``: sigmas of the rollout schedule (``sigmas`` without the final 0) inside
      the range, uniformly with replacement (the released DiffusionNFT / Flow-Factory
      ``discrete`` sampling trains at the sampler's own timesteps);
    * ``uniform``: ``U(t_min, t_max)``;
    * ``logit_normal``: ``sigmoid(N(logit_mean, logit_std))`` (SD3's training times)
      clamped to the range.
    """
    if mode == "schedule":
        grid = sigmas[:-1].float()
        grid = grid[(grid >= t_min) & (grid <= t_max)]
        if grid.numel() == 0:
            raise ValueError(f"no schedule sigma in [{t_min}, {t_max}]")
        return grid[torch.randint(0, grid.numel(), (k,), generator=generator)]
    if mode == "uniform":
        return t_min + (t_max - t_min) * torch.rand(k, generator=generator)
    if mode == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(k, generator=generator)).clamp(t_min, t_max)
    raise ValueError(f"unknown time sampling {mode!r}; allowed: schedule, uniform, logit_normal")


def schedule_position(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional denoising-step index of time ``t`` on a schedule ``sigmas`` (T + 1 values, 1 -> 0).

    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i+1]``; a time between them sits at
    ``i + (sigmas[i] − t)/(sigmas[i] − sigmas[i+1])``, so a schedule sigma gets its exact
    index. Clamped below T, the range TDW (`refrl.shaping.tdw_weights`) is defined on.
    """
    s = sigmas.double().numpy()[::-1]  # ascending, as np.interp wants
    pos = np.arange(len(sigmas), dtype=np.float64)[::-1]
    p = np.interp(t.double().numpy(), s, pos)
    return torch.from_numpy(p).clamp(0.0, len(sigmas) - 1 - 1e-6)


class MatchingObjective(Objective):
    """The shared loop of NFT and AWM: times, noises and old outputs per iteration; a loss per time.

    Subclasses give ``old_output`` (what is kept of ``v_old`` per sample and time) and
    ``time_loss`` (the loss of one training time for a minibatch).
    """

    needs_sde_steps = False

    def __init__(self, trainer: Any):
        super().__init__(trainer)
        # DiffusionNFT's off-policy variant: an EMA of the trained weights samples the
        # rollouts and serves as v_old; its decay ramps up (min(ramp * iteration, max)).
        self.old_ema = EMA(trainer.named, 0.0, warmup=False) if self.cfg.matching.old_policy == "ema" else None

    @property
    def on_policy(self) -> bool:
        return self.old_ema is None

    def sampling_context(self) -> AbstractContextManager[Any]:
        return self.old_ema.swapped_in() if self.old_ema is not None else nullcontext()

    # ------------------------------------------------------------------ per-iteration draws
    def _noise(self, it: int, index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """(len(index), K, *shape) noises of the given global sample indices."""
        k = self.cfg.matching.k
        return torch.stack([torch.randn((k, *shape), generator=seeded_generator(self.cfg.seed, it, NOISE_STREAM, int(i)))
                            for i in index])

    def prepare(self, it: int, ro: Rollout) -> None:
        """Draw every sample's training times and keep the old policy's outputs there (no grad)."""
        cfg, m, trainer = self.cfg, self.cfg.matching, self.trainer
        x0_all = ro.final
        n, shape = x0_all.shape[0], tuple(x0_all.shape[1:])
        times = torch.stack([
            sample_training_times(m.k, m.time_sampling, ro.sigmas, m.t_min, m.t_max, m.logit_mean, m.logit_std,
                                  seeded_generator(cfg.seed, it, TIME_STREAM, i))
            for i in range(n)
        ])
        samples = ro.samples
        per_rank = n // trainer.dist.world
        local = torch.arange(trainer.dist.rank * per_rank, (trainer.dist.rank + 1) * per_rank)
        outs = []
        with torch.no_grad(), self.sampling_context():
            for chunk in local.split(max(1, cfg.minibatch_size // trainer.dist.world)):
                conds = encode_for_guidance(trainer.policy, [samples[int(i)] for i in chunk], cfg.sampling.cfg_scale)
                noise = self._noise(it, chunk, shape)
                per_time = []
                for j in range(m.k):
                    t = times[chunk, j]
                    x_t, u = forward_process(x0_all[chunk], noise[:, j], t)
                    v_old = guided_velocity(trainer.policy, x_t, t, conds[0], conds[1], cfg.sampling.cfg_scale)
                    per_time.append(self.old_output(v_old.float(), u, t))
                outs.append(torch.stack(per_time, 1))
        ro.prepared.update(t=times, old=trainer.dist.gather(torch.cat(outs)))

    def advantage_steps(self, ro: Rollout) -> torch.Tensor:
        """(N, K) positions of the training times on the rollout schedule: TDW weights each time."""
        t = ro.prepared["t"]
        return schedule_position(t.reshape(-1), ro.sigmas).reshape(t.shape)

    # ------------------------------------------------------------------ loss
    def old_output(self, v_old: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def time_loss(self, v: torch.Tensor, old: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, u: torch.Tensor,
                  t: torch.Tensor, adv: torch.Tensor, weights: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Loss of one training time (scalar, with gradients), ratios (B,) for the guard, stats."""
        raise NotImplementedError

    def minibatch_loss(self, ro: Rollout, idx: torch.Tensor, mb_samples: list, adv: torch.Tensor,
                       loss_weights: torch.Tensor) -> MinibatchLoss:
        """Mean over the K training times of ``time_loss`` (+ beta * velocity KL to the reference)."""
        cfg, k = self.cfg, self.cfg.matching.k
        x0 = ro.final[idx].float()
        times, old = ro.prepared["t"][idx], ro.prepared["old"][idx]
        noise = self._noise(ro.iteration, idx, tuple(x0.shape[1:]))
        conds, ref_conds = self.conditions(mb_samples)
        stats: dict[str, list[float]] = {"kl": []}
        total = torch.zeros(())
        ratios = []
        for j in range(k):
            t = times[:, j]
            x_t, u = forward_process(x0, noise[:, j], t)
            v = self.velocity(conds, x_t, t)
            loss, ratio, st = self.time_loss(v, old[:, j], x0, x_t, u, t, adv[idx, j], loss_weights[idx])
            ratios.append(ratio)
            if ref_conds is not None:
                kl = velocity_kl(v, self.reference_velocity(ref_conds, x_t, t)).mean()
                loss = loss + cfg.beta_kl * kl
                stats["kl"].append(float(kl.detach()))
            for key, value in st.items():
                stats.setdefault(key, []).append(value)
            total = total + loss / k
        return total, torch.cat(ratios), stats

    # ------------------------------------------------------------------ off-policy sampler
    def after_iteration(self, it: int) -> None:
        if self.old_ema is not None:
            m = self.cfg.matching
            self.old_ema.decay = min(m.old_ema_ramp * it, m.old_ema_decay)
            self.old_ema.update()

    def state_dict(self) -> dict[str, Any]:
        return {"old_ema": self.old_ema.state_dict()} if self.old_ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.old_ema is not None:
            if "old_ema" not in state:
                from refrl.errors import RefrlError

                raise RefrlError("the checkpoint holds no off-policy EMA sampler (matching.old_policy=ema); "
                                 "resume with the run's own config")
            self.old_ema.load_state_dict(state["old_ema"])
