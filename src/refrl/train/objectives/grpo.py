"""GRPO for flow matching (Flow-GRPO, docs/reference/methods.md#flow-grpo-sde-sampling-and-ppo-clip): PPO-clip on the stored SDE steps.

For each stored step ``x -> x'`` of a rollout the log-prob is recomputed under the
current policy, ``ρ = exp(log p − log p_old)``, and the loss is
``mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))) + β·KL`` averaged over the steps
(`refrl.train.losses.ppo_clip_loss`, `gaussian_mean_kl`). With ``grpo_guard.enabled`` the clip is
GRPO-Guard's regulated one (`refrl.train.objectives.grpo_guard`, arXiv 2510.22319).
"""

from __future__ import annotations

import torch

from refrl.sampling.rollout import Rollout
from refrl.sampling.sde import sde_step
from refrl.train.losses import gaussian_mean_kl, ppo_clip_loss
from refrl.train.objectives.base import MinibatchLoss, Objective
from refrl.train.objectives.grpo_guard import (
    guarded_ppo_loss,
    ratio_norm_log_ratio,
    timestep_weight,
)


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
            if cfg.grpo_guard.enabled:  # regulated clipping (refrl.train.objectives.grpo_guard)
                loss, r, clipfrac = self._guarded(ro, idx, j, logp, mean, std, adv, loss_weights, s, s_next)
                st = {"clipfrac": clipfrac}
                ratios.append(r)
            else:
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

    def _guarded(self, ro: Rollout, idx: torch.Tensor, j: int, logp: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, adv: torch.Tensor, loss_weights: torch.Tensor, s: float, s_next: float
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """GRPO-Guard's loss of SDE step ``j``: PPO clip on the RatioNorm ratio, times 1/(-dt)."""
        guard = self.cfg.grpo_guard
        old_logp = ro.log_probs[idx, j]
        if guard.ratio_norm:
            log_ratio = ratio_norm_log_ratio(logp, old_logp, mean, ro.step_means[idx, j], std)
        else:
            log_ratio = logp - old_logp
        weight = timestep_weight(s, s_next) if guard.reweight else 1.0
        return guarded_ppo_loss(log_ratio, adv[idx, j], self.cfg.clip_range, weight, loss_weights[idx])
