"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117), docs/reference/methods.md#log-prob-free-objectives-diffusionnft-and-awm.

Negative-aware fine-tuning on the forward process: the trained velocity ``v`` and the
sampling policy's ``v_old`` define an implicit positive policy ``v+`` and an implicit
negative one ``v−``; each sample's clean image is fitted by ``v+`` with the optimality
weight ``r`` of its advantage and by ``v−`` with ``1 − r``. Minimizing it moves ``v``
toward well-rewarded images and away from poorly rewarded ones; no likelihood is needed.
Formulas and defaults follow the released code (NVlabs/DiffusionNFT, as in Flow-Factory).
"""

from __future__ import annotations

import torch

from refrl.sampling.sde import x0_from_velocity
from refrl.train.objectives.awm import matching_log_likelihood
from refrl.train.objectives.matching import MatchingObjective


def nft_implicit_policies(v: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit positive and negative velocities: ``v+ = β·v + (1 − β)·v_old``, ``v− = (1 + β)·v_old − β·v``.

    ``v_old`` carries no gradient. ``β = 1`` gives ``v+ = v`` and ``v− = 2·v_old − v`` (v's mirror image).
    """
    v_old = v_old.detach()
    return beta * v + (1.0 - beta) * v_old, (1.0 + beta) * v_old - beta * v


def nft_optimality_weight(advantages: torch.Tensor, adv_max: float) -> torch.Tensor:
    """Optimality probability from the advantage: ``r = clip(A / A_max, −1, 1)/2 + 1/2`` in [0, 1].

    ``A = 0`` gives ½ (positive and negative fits cancel); ``A ≥ A_max`` gives 1 (fit ``v+`` only).
    """
    return (advantages.float() / adv_max).clamp(-1.0, 1.0) / 2.0 + 0.5


def scaled_x0_error(x0_hat: torch.Tensor, x0: torch.Tensor, floor: float = 1e-5) -> torch.Tensor:
    """Squared clean-image error over its own detached scale, per sample (B,):
    ``mean_dims (x̂0 − x0)² / sg(max(mean_dims |x̂0 − x0|, floor))``.

    The per-sample scale (an adaptive loss weight of the released code) makes each
    sample's gradient independent of how hard its time and image are.
    """
    diff = x0_hat.float() - x0.float()
    flat = diff.reshape(diff.shape[0], -1)
    with torch.no_grad():
        scale = flat.abs().mean(dim=1, keepdim=True).clamp_min(floor)
    return (flat**2 / scale).mean(dim=1)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             advantages: torch.Tensor, beta: float = 1.0, adv_max: float = 5.0, floor: float = 1e-5) -> torch.Tensor:
    """DiffusionNFT loss per sample (B,): ``(r·E+ + (1 − r)·E−) / β``.

    ``E± = scaled_x0_error(x_t − t·v±, x0)`` with ``v±`` from :func:`nft_implicit_policies`
    and ``r`` from :func:`nft_optimality_weight`; ``x_t = (1 − t)·x0 + t·e``.
    """
    v_pos, v_neg = nft_implicit_policies(v, v_old, beta)
    r = nft_optimality_weight(advantages, adv_max)
    e_pos = scaled_x0_error(x0_from_velocity(x_t, v_pos, t), x0, floor)
    e_neg = scaled_x0_error(x0_from_velocity(x_t, v_neg, t), x0, floor)
    return (r * e_pos + (1.0 - r) * e_neg) / beta


class NFTObjective(MatchingObjective):
    """DiffusionNFT over the shared rollout. The on-policy check uses AWM's ratio of the same
    velocities, ``exp(l(v) − l(v_old))`` with ``l = −mean (v − u)²``: it is 1 exactly when the
    training forward reproduces the sampling policy's velocity fit (NFT itself has no ratio)."""

    name = "nft"

    def old_output(self, v_old: torch.Tensor, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v_old

    def time_loss(self, v, old, x0, x_t, u, t, adv, weights):
        c = self.cfg.nft
        per_sample = nft_loss(v, old, x_t, x0, t, adv, c.beta, c.adv_max, c.error_floor) * weights
        # The released code multiplies the loss by A_max (adv_clip_max); kept so learning
        # rates and the gradient clip carry over from it.
        loss = (per_sample * c.adv_max).mean()
        with torch.no_grad():
            ratio = torch.exp(matching_log_likelihood(v, u, t) - matching_log_likelihood(old, u, t))
        return loss, ratio, {}
