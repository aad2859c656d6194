"""Policy losses: PPO clipped surrogate (GRPO, AWM) and KL terms to a reference policy."""

from __future__ import annotations

import torch


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate as used by Flow-GRPO / DanceGRPO (docs/reference/methods.md#flow-grpo-sde-sampling-and-ppo-clip).

    ``ρ = exp(log_prob − old_log_prob)``,
    ``ℓ_i = max(−A_i·ρ_i, −A_i·clip(ρ_i, 1 − ε, 1 + ε))``, optionally ``ℓ_i ← w_i·ℓ_i``
    (DyRef's DAR weights, :func:`refrl.shaping.dar_group_weights`), ``loss = mean_i ℓ_i``.

    All inputs are (B,). Returns the loss and float stats: ``ratio_mean``, ``ratio_max``,
    ``ratio_min`` and ``clipfrac`` (share of samples with ``|ρ − 1| > ε``). On the first
    minibatch after a rollout ρ must be 1 (the on-policy check).
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    shape = log_prob.shape
    named = {"old_log_prob": old_log_prob, "advantages": advantages}
    if weights is not None:
        named["weights"] = weights
    if log_prob.dim() != 1:
        raise ValueError(f"log_prob must have shape (B,), got {tuple(shape)}")
    for name, t in named.items():
        if t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != log_prob shape {tuple(shape)}")
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_sample = per_sample * weights
    loss = per_sample.mean()
    with torch.no_grad():
        r = ratio.detach().float()
        clipfrac = ((r - 1.0).abs() > clip_range).float().mean()
        values = torch.stack([r.mean(), r.max(), r.min(), clipfrac]).tolist()  # one device sync
    stats = dict(zip(("ratio_mean", "ratio_max", "ratio_min", "clipfrac"), values, strict=True))
    return loss, stats


def gaussian_mean_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, std²) ‖ N(μ_ref, std²)) per sample, averaged over the non-batch dims: (B,).

    Closed form for equal-variance Gaussians: ``‖μ − μ_ref‖² / (2·std²)`` (Flow-GRPO's
    KL term; ``std`` from :func:`refrl.sampling.sde_step`, broadcastable to ``mean``).
    Computed in float32.
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(
            f"mean shape {tuple(mean.shape)} != mean_ref shape {tuple(mean_ref.shape)}"
        )
    kl = (mean.float() - mean_ref.float()) ** 2 / (2.0 * std.float() ** 2)
    return kl.expand_as(mean).reshape(mean.shape[0], -1).mean(dim=1)


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """Velocity-space KL surrogate to a reference policy, per sample: ``mean_dims (v − v_ref)²`` (B,).

    The log-prob-free objectives have no SDE step whose std would turn this into
    Flow-GRPO's ``‖v − v_ref‖²/(2σ²)`` (docs/reference/methods.md#flow-grpo-sde-sampling-and-ppo-clip, velocity form); the released
    AWM / DiffusionNFT code (Flow-Factory ``kl_type='v-based'``) uses this plain mean. Float32.
    """
    if v.shape != v_ref.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != v_ref shape {tuple(v_ref.shape)}")
    return ((v.float() - v_ref.float()) ** 2).reshape(v.shape[0], -1).mean(dim=1)
