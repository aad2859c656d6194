"""Is there a gradient signal? Two checks to run before spending compute on an RL config.

Both use the trainer's own rollout, reward, advantage and loss code on a few
iterations of the config, from its initial weights (nothing is trained):

* **half-batch gradient cosine**: the groups of an iteration are split in two
  halves; the cosine between the policy gradients of the two halves' losses (the
  config's objective: grpo, nft or awm).
  Independent estimates of one true gradient agree (cosine > 0) only where signal
  outweighs sampling noise; cosine ~ 0 means an optimizer step is mostly noise
  (docs/research/grpo.md#a-gradient-that-is-signal-not-noise: -0.01 on the first GRPO config).
* **trained-step variance share**: each rollout is re-run with the same starting
  noise and the same ODE steps but new noise at the trained SDE steps. For a
  sample, half the squared difference of the two rewards estimates the variance
  the trained steps cause; the share is its mean over the within-group reward
  variance that advantages normalise. A share near 1 means the advantage measures
  the consequences of the actions being trained; near 0, the luck of the start.

    share = mean_i ½(r_i − r'_i)² / mean_groups var_within(r)
"""

from __future__ import annotations

from typing import Any

import torch

from refrl.sampling.rollout import Rollout
from refrl.train.grpo import GRPOTrainer


def flat_gradient(params: list[torch.Tensor]) -> torch.Tensor:
    """All parameters' ``.grad`` concatenated into one vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b> / (|a| |b|)``; 0 when either vector is zero."""
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def within_group_variance(scores: torch.Tensor, group_size: int) -> float:
    """Mean over groups of the population variance of ``scores`` (N,) inside each group (NaN entries left out)."""
    g = scores.view(-1, group_size)
    ok = ~torch.isnan(g)
    n = ok.sum(1).clamp(min=1)
    mean = torch.where(ok, g, 0).sum(1) / n
    var = (torch.where(ok, g - mean[:, None], 0) ** 2).sum(1) / n
    keep = ok.sum(1) > 1
    return float(var[keep].mean()) if keep.any() else float("nan")


def trained_step_share(first: torch.Tensor, second: torch.Tensor, group_size: int) -> float:
    """``mean ½(r − r')² / mean_groups var_within(r)`` (see module docstring); NaN pairs left out."""
    ok = ~(torch.isnan(first) | torch.isnan(second))
    if not ok.any():
        return float("nan")
    caused = float((0.5 * (first[ok] - second[ok]) ** 2).mean())
    total = within_group_variance(first, group_size)
    return caused / total if total > 0 else float("nan")


def half_gradients(trainer: GRPOTrainer, ro: Rollout, adv: torch.Tensor, loss_weights: torch.Tensor):
    """Gradients of the objective's loss on the first and the second half of the iteration's groups."""
    cfg = trainer.cfg
    samples = ro.samples
    n = len(samples)
    cut = cfg.groups_per_iteration // 2 * cfg.group_size  # whole groups on each side
    grads = []
    for half in (torch.arange(0, cut), torch.arange(cut, n)):
        trainer.optimizer.zero_grad(set_to_none=True)
        for chunk in half.split(cfg.minibatch_size):
            loss, _, _ = trainer.minibatch_loss(ro, chunk, [samples[int(i)] for i in chunk], adv, loss_weights)
            (loss * len(chunk) / len(half)).backward()
        grads.append(flat_gradient(trainer.params))
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def measure_signal(trainer: GRPOTrainer, iterations: int = 3) -> dict[str, Any]:
    """Half-batch gradient cosine and trained-step variance share over ``iterations`` iterations (no update)."""
    cfg = trainer.cfg
    if cfg.groups_per_iteration < 2:
        raise ValueError("the half-batch check needs groups_per_iteration >= 2")
    cosines: list[float] = []
    shares: dict[str, list[float]] = {name: [] for name in trainer.rewards}
    for it in range(iterations):
        with trainer.objective.sampling_context():
            ro = trainer.rollout(it)
            # an ODE rollout (nft/awm with sampling.sde_steps=none) has no trained step to re-roll: share NaN
            again = trainer.rollout(it, step_noise_stream=102) if ro.sde_steps else None
        trainer.objective.prepare(it, ro)
        res = trainer.advantages(ro)
        first, second = half_gradients(trainer, ro, res.advantages, res.loss_weights)
        cosines.append(cosine(first, second))
        for name in trainer.rewards:
            shares[name].append(float("nan") if again is None else
                                trained_step_share(ro.scores[name], again.scores[name], cfg.group_size))
    mean = lambda v: float(torch.tensor(v).nanmean()) if v else float("nan")  # noqa: E731
    return {
        "iterations": iterations,
        "samples_per_half": cfg.groups_per_iteration // 2 * cfg.group_size,
        "gradient_cosine": mean(cosines),
        "gradient_cosine_per_iteration": cosines,
        "trained_step_variance_share": {k: mean(v) for k, v in shares.items()},
    }
