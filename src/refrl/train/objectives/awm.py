"""Advantage-weighted matching (AWM; Xue et al. 2025, arXiv 2509.25050), docs/reference/methods.md#log-prob-free-objectives-diffusionnft-and-awm.

AWM treats the flow-matching loss as a log-likelihood: ``l = −mean_dims (v − u)²``
(optionally weighted by the time), and applies the PPO clipped surrogate to
``ρ = exp(l − l_old)`` with the group advantage. Since ``l_old`` is computed under the
rollout weights at the same ``x_t``, ``ρ = 1`` on the first minibatch of an iteration,
exactly as GRPO's ratio, and the trainer's on-policy guard checks it.
"""

from __future__ import annotations

import torch

from refrl.train.losses import ppo_clip_loss
from refrl.train.objectives.matching import MatchingObjective

TIME_WEIGHTINGS = ("uniform", "t", "t2")


def time_weight(t: torch.Tensor, weighting: str) -> torch.Tensor:
    """AWM's weight of the log-likelihood at time ``t`` (B,): ``1``, ``t`` or ``t²`` (released code:
    ``Uniform``, ``t``, ``t**2``)."""
    if weighting == "uniform":
        return torch.ones_like(t, dtype=torch.float32)
    if weighting == "t":
        return t.float()
    if weighting == "t2":
        return t.float() ** 2
    raise ValueError(f"unknown time weighting {weighting!r}; allowed: {', '.join(TIME_WEIGHTINGS)}")


def matching_log_likelihood(v: torch.Tensor, u: torch.Tensor, t: torch.Tensor,
                            weighting: str = "uniform") -> torch.Tensor:
    """AWM's matching "log-likelihood" per sample: ``l = −w(t)·mean_dims (v − u)²`` (B,), float32.

    ``v`` the policy's velocity at ``x_t``, ``u = e − x0`` the target, ``w`` from :func:`time_weight`.
    """
    if v.shape != u.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != u shape {tuple(u.shape)}")
    mse = ((v.float() - u.float()) ** 2).reshape(v.shape[0], -1).mean(dim=1)
    return -time_weight(t, weighting) * mse


def awm_loss(log_lik: torch.Tensor, old_log_lik: torch.Tensor, advantages: torch.Tensor, clip_range: float,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """AWM's policy loss: PPO clip on ``ρ = exp(l − l_old)``,
    ``mean_i w_i·max(−A_i·ρ_i, −A_i·clip(ρ_i, 1 − ε, 1 + ε))`` (:func:`refrl.train.losses.ppo_clip_loss`).

    Returns the loss, the detached ratios (B,) and stats (``clipfrac``, ...).
    """
    loss, stats = ppo_clip_loss(log_lik, old_log_lik, advantages, clip_range, weights=weights)
    return loss, torch.exp(log_lik.detach() - old_log_lik), stats


class AWMObjective(MatchingObjective):
    name = "awm"

    def old_output(self, v_old: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # only l_old is needed: one number per sample and time instead of a latent
        return matching_log_likelihood(v_old, u, t, self.cfg.awm.time_weighting)

    def time_loss(self, v, old, x0, x_t, u, t, adv, weights):
        log_lik = matching_log_likelihood(v, u, t, self.cfg.awm.time_weighting)
        loss, ratio, st = awm_loss(log_lik, old, adv, self.cfg.clip_range, weights=weights)
        return loss, ratio, {"clipfrac": st["clipfrac"]}
