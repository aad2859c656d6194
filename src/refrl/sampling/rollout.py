"""Sampling loops over any `Policy`: ODE sampling with classifier-free guidance, SDE
rollouts (`Trajectory`) and what an RL iteration keeps of them (`Rollout`).

The per-step math lives in `refrl.sampling.sde`; this module only loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from refrl.data.schema import LoadedSample
from refrl.models.policy import Policy
from refrl.runfolder.rng import seeded_generator
from refrl.sampling.schedules import sigma_schedule
from refrl.sampling.sde import ode_step


@dataclass
class Trajectory:
    """What `rollout_sde` returns for B samples and S stochastic steps."""

    latents: torch.Tensor  # (B, S, *latent): before each SDE step
    next_latents: torch.Tensor  # (B, S, *latent): after it
    log_probs: torch.Tensor  # (B, S) float32: log-prob of each SDE step under the rollout policy
    final: torch.Tensor  # (B, *latent): the denoised latents
    means: torch.Tensor | None = None  # (B, S, *latent): each SDE step's Gaussian mean (keep_means=True)


@dataclass
class Rollout:
    """One RL iteration's scored rollout, gathered across processes.

    Its N = ``len(groups) * group_size`` samples are group-major: sample ``i`` belongs to
    ``groups[i // group_size]``. Tensors are (N, ...) in that order.
    """

    iteration: int
    groups: list[LoadedSample]  # one condition per group
    group_size: int
    sigmas: torch.Tensor  # the rollout's sigma schedule (steps + 1 values, 1 -> 0)
    sde_steps: list[int]  # indices of the stochastic (trained) denoising steps; [] for an ODE rollout
    final: torch.Tensor  # (N, *latent) denoised latents
    images: torch.Tensor  # (N, 3, H, W) decoded images in [0, 1]
    scores: dict[str, torch.Tensor]  # reward name -> (N,), NaN where it does not apply
    extras: dict[str, dict[str, torch.Tensor]]  # reward name -> extra name -> (N,)
    reward_seconds: float = 0.0
    encoder_calls: int = 0  # reward-encoder forward calls of this iteration (cache misses)
    # per SDE step (objectives that train on them, GRPO); None when the objective keeps none
    latents: torch.Tensor | None = None  # (N, S, *latent)
    next_latents: torch.Tensor | None = None  # (N, S, *latent)
    log_probs: torch.Tensor | None = None  # (N, S)
    step_means: torch.Tensor | None = None  # (N, S, *latent): the rollout policy's step means (GRPO-Guard)
    # what the objective's `prepare` adds before any update (matching: training times `t`, old outputs `old`)
    prepared: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def samples(self) -> list[LoadedSample]:
        """The N samples, each group's condition repeated ``group_size`` times."""
        return [s for s in self.groups for _ in range(self.group_size)]


def initial_noise(shape: tuple[int, ...], seed: int, indices: Sequence[int]) -> torch.Tensor:
    """Noise for sample ``i`` depends only on ``(seed, i)``: outputs do not change with batch size."""
    return torch.stack([torch.randn(shape, generator=seeded_generator(seed, int(i))) for i in indices])


def encode_for_guidance(
    policy: Policy, samples: Sequence[LoadedSample], cfg_scale: float, uncond_drop_refs: bool = True
) -> tuple[Any, Any | None]:
    """Conditional and (when ``cfg_scale != 1``) unconditional conditions.

    The unconditional branch drops the prompt and, by default, the references
    (the way SFT dropped them, so the model knows both branches).
    """
    cond = policy.encode_condition(samples)
    if cfg_scale == 1.0:
        return cond, None
    b = len(samples)
    uncond = policy.encode_condition(
        samples, drop_text=torch.ones(b, dtype=torch.bool), drop_refs=torch.full((b,), uncond_drop_refs)
    )
    return cond, uncond


def guided_velocity(
    policy: Policy, x: torch.Tensor, sigma: torch.Tensor, cond: Any, uncond: Any | None, cfg_scale: float
) -> torch.Tensor:
    """``v = v_u + w (v_c - v_u)`` (classifier-free guidance); plain ``v_c`` when w = 1."""
    v_c = policy.velocity(x, sigma, cond)
    if uncond is None or cfg_scale == 1.0:
        return v_c
    v_u = policy.velocity(x, sigma, uncond)
    return v_u + cfg_scale * (v_c - v_u)


@torch.no_grad()
def sample_ode(
    policy: Policy,
    samples: Sequence[LoadedSample],
    steps: int = 20,
    cfg_scale: float = 2.0,
    shift: float = 1.0,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    size: tuple[int, int] | None = None,
    uncond_drop_refs: bool = True,
) -> torch.Tensor:
    """Euler ODE sampling from sigma=1 to 0; returns images (B, 3, H, W) in [0, 1].

    ``indices`` name each sample's noise stream (default 0..B-1).
    """
    if size is None:
        t = samples[0].target
        size = (t.shape[-2], t.shape[-1]) if t is not None else (32, 32)
    idx = list(range(len(samples))) if indices is None else list(indices)
    x = initial_noise(policy.latent_shape(*size), seed, idx)
    cond, uncond = encode_for_guidance(policy, samples, cfg_scale, uncond_drop_refs)
    sigmas = sigma_schedule(steps, shift=shift)
    for i in range(steps):
        sigma = torch.full((x.shape[0],), float(sigmas[i]))
        v = guided_velocity(policy, x, sigma, cond, uncond, cfg_scale)
        x = ode_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
    return policy.decode(x)


def choose_sde_steps(
    mode: str, num_steps: int, generator: torch.Generator, window: int = 2, window_start: str = "random",
    iteration: int = 0, first_m: int = 4, window_max_start: int | None = None,
) -> list[int]:
    """Indices of the denoising steps that are stochastic (and trained); ODE elsewhere.

    * ``all``: every step but the last (Flow-GRPO; the last step to sigma=0 is ODE);
    * ``window``: ``window`` consecutive steps starting at a random index or at a
      start that cycles with the iteration (MixGRPO / Flow-GRPO-Fast);
    * ``random_one``: one random step among the first ``first_m`` (DyRef);
    * ``none``: no stochastic step, a plain ODE rollout (the log-prob-free objectives).
    """
    last = num_steps - 1  # never stochastic: cps has std 0 there and its log-prob is undefined
    if mode == "all":
        return list(range(last))
    if mode == "window":
        max_start = max(0, last - window) if window_max_start is None else min(window_max_start, max(0, last - window))
        if window_start == "random":
            start = int(torch.randint(0, max_start + 1, (1,), generator=generator))
        else:
            start = iteration % (max_start + 1)
        return list(range(start, min(start + window, last)))
    if mode == "random_one":
        return [int(torch.randint(0, max(1, min(first_m, last)), (1,), generator=generator))]
    if mode == "none":
        return []
    raise ValueError(f"unknown sde_steps mode {mode!r}; allowed: all, window, random_one, none")


@torch.no_grad()
def rollout_sde(
    policy: Policy,
    cond: Any,
    uncond: Any | None,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sde_steps: Sequence[int],
    kind: str,
    noise_level: float,
    cfg_scale: float,
    step_noise: torch.Tensor,
    keep_means: bool = False,
) -> Trajectory:
    """Denoise ``x`` along ``sigmas``; stochastic at ``sde_steps``, Euler ODE elsewhere.

    ``step_noise`` (len(sde_steps), B, *latent) is the Gaussian noise of each
    stochastic step, drawn by the caller per sample so the trajectory of a sample
    does not depend on how the batch is split across processes.

    With no SDE step (S = 0) this is the Euler ODE sampler and the per-step tensors of
    the `Trajectory` are empty. ``keep_means`` also returns each SDE step's Gaussian mean.
    """
    from refrl.sampling.sde import gaussian_log_prob, sde_step

    sde_index = {s: j for j, s in enumerate(sde_steps)}
    before, after, logps, means = [], [], [], []
    b = x.shape[0]
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = guided_velocity(policy, x, torch.full((b,), s), cond, uncond, cfg_scale)
        if i in sde_index:
            _, _, mean, std = sde_step(kind, x, v, s, s_next, noise_level, prev_sample=x)
            x_next = (mean + std * step_noise[sde_index[i]].float()).to(x.dtype)
            before.append(x)
            after.append(x_next)
            logps.append(gaussian_log_prob(x_next, mean, std))
            if keep_means:
                means.append(mean)
            x = x_next
        else:
            x = ode_step(x, v, s, s_next)
    if not sde_index:
        empty = x.new_zeros((b, 0, *x.shape[1:]))
        return Trajectory(empty, empty, x.new_zeros((b, 0), dtype=torch.float32), x)
    return Trajectory(torch.stack(before, 1), torch.stack(after, 1), torch.stack(logps, 1), x,
                      torch.stack(means, 1) if keep_means else None)
