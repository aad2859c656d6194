"""GRPO for flow matching (Flow-GRPO, METHODS.md section 1): PPO-clip on the stored SDE steps.

For each stored step ``x -> x'`` of a rollout the log-prob is recomputed under the
current policy, ``ρ = exp(log p − log p_old)``, and the loss is
``mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))) + β·KL`` averaged over the steps
(`refrl.train.losses.ppo_clip_loss`, `gaussian_mean_kl`).
"""

from __future__ import annotations

import torch

from refrl.sampling.rollout import Rollout
from refrl.sampling.sde import sde_step
from refrl.train.losses import gaussian_mean_kl, ppo_clip_loss
from refrl.train.objectives.base import MinibatchLoss, Objective


class GRPOObjective(Objective):
    name = "grpo"

    def _log_prob(self, velocity: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor, sigma: float,
                  sigma_next: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log-prob (and Gaussian mean/std) of the stored step ``x -> x_next`` given the step's velocity."""
        sc = self.cfg.sampling
        _, logp, mean, std = sde_step(sc.sde_kind, x, velocity, sigma, sigma_next, sc.noise_level, prev_sample=x_next)
        return logp, mean, std

    def minibatch_loss(self, ro: Rollout, idx: torch.Tensor, mb_samples: list, adv: torch.Tensor,
                       loss_weights: torch.Tensor) -> MinibatchLoss:
        """PPO-clip loss (+ beta * KL) of the rollout samples ``idx``, averaged over their SDE steps.

        Returns the loss (with gradients), the PPO ratios (detached) and per-step stats.
        """
        cfg = self.cfg
        sde_steps, sigmas = ro.sde_steps, ro.sigmas
        stats: dict[str, list[float]] = {"kl": [], "clipfrac": []}
        total = torch.zeros(())
        ratios = []
        # the condition is encoded once per minibatch (with gradients) and shared by its steps
        conds, ref_conds = self.conditions(mb_samples)
        for j, t in enumerate(sde_steps):
            s, s_next = float(sigmas[t]), float(sigmas[t + 1])
            x, x_next = ro.latents[idx, j], ro.next_latents[idx, j]
            sigma = torch.full((x.shape[0],), s)
            logp, mean, std = self._log_prob(self.velocity(conds, x, sigma), x, x_next, s, s_next)
            loss, st = ppo_clip_loss(logp, ro.log_probs[idx, j], adv[idx, j], cfg.clip_range,
                                     weights=loss_weights[idx])
            ratios.append(torch.exp(logp.detach() - ro.log_probs[idx, j]))
            if ref_conds is not None:
                _, mean_ref, _ = self._log_prob(self.reference_velocity(ref_conds, x, sigma), x, x_next, s, s_next)
                kl = gaussian_mean_kl(mean, mean_ref, std).mean()
                loss = loss + cfg.beta_kl * kl
                stats["kl"].append(float(kl.detach()))
            total = total + loss / len(sde_steps)
            stats["clipfrac"].append(float(st["clipfrac"]))
        return total, torch.cat(ratios), stats
