"""GRPO-Guard: regulated clipping for GRPO on flow matching (Wang et al. 2025, arXiv 2510.22319).

The SDE step's importance ratio of Flow-GRPO is biased and its spread depends on the
timestep: for the Gaussian step ``x' ~ N(μ, s²)`` (``s`` the step's std, ``σ_t·sqrt(-dt)``)
and a policy whose mean moved by ``d = μ_θ − μ_old``, the per-dimension log-ratio is
``(e·d)/s² − ‖d‖²/(2s²)`` with ``e = x' − μ_old = s·ε``: its mean is negative
(``−‖d‖²/(2s²)``) and its spread is ``‖d‖/s``, so the same clip range is loose at low-noise
steps and tight at high-noise ones, and over-optimisation slips through the loose ones.

* **RatioNorm** (`ratio_norm_log_ratio`): add the bias back and scale by ``s``:
  ``ℓ = (log p − log p_old + mean_dims(μ − μ_old)²/(2s²))·s``, whose mean is 0 and whose
  spread is ``‖d‖`` at every timestep; the ratio is ``exp(ℓ)``.
* **Gradient reweighting** (`timestep_weight`): the step's PPO loss is divided by ``−dt =
  σ_t − σ_{t+1}`` so that the gradients of the denoising steps are of one size.

The released GRPO-Guard training script of Flow-GRPO and VeRL-Omni's ``grpo_guard`` compute
exactly these two terms (the std averaged over a batch of one timestep; refrl's steps share
one sigma per minibatch step, so it is the same value); Flow-Factory's ``grpo-guard`` keeps
RatioNorm. The paper derives it for Flow-GRPO's SDE (``sampling.sde_kind=flow-sde``);
refrl applies the same algebra to the other SDE kinds, whose steps are Gaussian too.
On-policy (``θ = θ_old``) the ratio is 1 and the loss value is the plain PPO loss times the
weight; the gradient is the plain one times ``s / (−dt)`` (the bias term's gradient vanishes at d = 0).
"""

from __future__ import annotations

import torch


def ratio_norm_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                         old_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio (RatioNorm, arXiv 2510.22319), per sample (B,):

    ``ℓ = (log p − log p_old + mean_dims (μ − μ_old)² / (2 s²)) · s``

    ``log_prob``/``old_log_prob`` (B,) are per-dimension means (`refrl.sampling.sde.gaussian_log_prob`);
    ``mean``/``old_mean`` the step's Gaussian means (B, ...); ``std`` its std, broadcastable to (B, 1, ..., 1)
    or (B,). Float32; gradients flow through ``log_prob`` and ``mean``.
    """
    if mean.shape != old_mean.shape:
        raise ValueError(f"mean shape {tuple(mean.shape)} != old_mean shape {tuple(old_mean.shape)}")
    b = log_prob.shape[0]
    s = std.float().reshape(b, -1)[:, 0]
    bias = (mean.float() - old_mean.float()).pow(2).reshape(b, -1).mean(dim=1) / (2.0 * s**2)
    return (log_prob.float() - old_log_prob.float() + bias) * s


def timestep_weight(sigma: float, sigma_next: float) -> float:
    """GRPO-Guard's gradient reweighting across timesteps: ``1 / (−dt) = 1 / (σ_t − σ_{t+1})``."""
    dt = float(sigma) - float(sigma_next)
    if dt <= 0:
        raise ValueError(f"a denoising step needs sigma > sigma_next, got {sigma} -> {sigma_next}")
    return 1.0 / dt


def guarded_ppo_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float, weight: float = 1.0,
                     sample_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PPO clip on the ratio ``ρ = exp(log_ratio)``, times ``weight``:
    ``weight · mean_i w_i · max(−A_i ρ_i, −A_i clip(ρ_i, 1 − ε, 1 + ε))``.

    Returns (loss, ρ detached, clip fraction ``mean |ρ − 1| > ε``)."""
    ratio = torch.exp(log_ratio)
    per_sample = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    r = ratio.detach()
    return weight * per_sample.mean(), r, float(((r - 1.0).abs() > clip_range).float().mean())
