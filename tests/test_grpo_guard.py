"""GRPO-Guard (arXiv 2510.22319): RatioNorm and timestep reweighting, by hand and in a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from refrl.config import load_config
from refrl.errors import ConfigError
from refrl.sampling.sde import gaussian_log_prob
from refrl.train.grpo import train_grpo
from refrl.train.grpo_config import GRPOConfig
from refrl.train.losses import ppo_clip_loss
from refrl.train.objectives.grpo_guard import (
    guarded_ppo_loss,
    ratio_norm_log_ratio,
    timestep_weight,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_ratio_norm_by_hand():
    mean = torch.tensor([[0.3, -0.1], [0.0, 0.0]])
    old_mean = torch.tensor([[0.1, 0.1], [0.0, 0.0]])
    std = torch.tensor([0.5, 0.2]).view(2, 1)
    logp, old = torch.tensor([-1.0, -2.0]), torch.tensor([-1.2, -2.0])
    # sample 0: bias = mean(0.2^2, 0.2^2) / (2 * 0.5^2) = 0.08; (0.2 + 0.08) * 0.5 = 0.14; sample 1: 0
    out = ratio_norm_log_ratio(logp, old, mean, old_mean, std)
    torch.testing.assert_close(out, torch.tensor([0.14, 0.0]))


def test_ratio_norm_is_noise_times_mean_shift():
    # x' = mu_old + s*eps: the normalised log-ratio is mean(eps * (mu - mu_old)), free of s and of the bias
    g = torch.Generator().manual_seed(0)
    old_mean, shift, eps = (torch.randn(3, 8, generator=g) for _ in range(3))
    for s in (0.05, 0.5):
        std = torch.full((3, 1), s)
        x_next = old_mean + std * eps
        mean = old_mean + 0.01 * shift
        out = ratio_norm_log_ratio(gaussian_log_prob(x_next, mean, std), gaussian_log_prob(x_next, old_mean, std),
                                   mean, old_mean, std)
        torch.testing.assert_close(out, (eps * 0.01 * shift).mean(dim=1), rtol=1e-4, atol=1e-6)


def test_timestep_weight_and_guarded_loss_by_hand():
    assert timestep_weight(0.7, 0.6) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="sigma > sigma_next"):
        timestep_weight(0.5, 0.5)
    # rho = [1.5, 0.5], A = 1, eps = 0.2: max(-1.5, -1.2) = -1.2, max(-0.5, -0.8) = -0.5; mean -0.85; x 2
    loss, ratio, clipfrac = guarded_ppo_loss(torch.log(torch.tensor([1.5, 0.5])), torch.ones(2), 0.2, weight=2.0)
    assert loss.item() == pytest.approx(-1.7) and clipfrac == 1.0
    torch.testing.assert_close(ratio, torch.tensor([1.5, 0.5]))


def test_on_policy_gives_the_plain_loss_and_a_std_scaled_gradient():
    g = torch.Generator().manual_seed(1)
    x, x_next = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    adv, s = torch.tensor([1.0, -0.5, 0.3, -1.2]), 0.3
    std = torch.full((4, 1), s)
    grads, losses = [], []
    for guard in (False, True):
        v = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
        mean = x + 0.1 * v
        logp = gaussian_log_prob(x_next, mean, std)
        old = logp.detach()
        if guard:
            loss, ratio, _ = guarded_ppo_loss(ratio_norm_log_ratio(logp, old, mean, mean.detach(), std), adv, 1e-3)
            assert torch.equal(ratio, torch.ones(4))
        else:
            loss, _ = ppo_clip_loss(logp, old, adv, 1e-3)
        loss.backward()
        grads.append(v.grad.clone())
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1])  # ratio 1: the plain loss, -mean(A)
    torch.testing.assert_close(grads[1], s * grads[0])


def cfg_of(policy_dir: Path, *extra: str) -> GRPOConfig:
    base = [f"model.init={policy_dir}", "iterations=6", "groups_per_iteration=4", "group_size=4", "minibatch_size=16",
            "gradient_accumulation=1", "model.frozen=[]", "sampling.steps=4", "sampling.sde_steps=all",
            "checkpoint_every=50", "clip_range=0.2", "optim.lr=1e-2", "data.max_refs=1", "advantage.kind=weighted",
            "rewards=[{name: brightness}]", "grpo_guard.enabled=true", "validation.every=0"]
    return load_config(GRPOConfig, str(CONFIGS / "tiny-cpu-grpo.yaml"), base + list(extra))


def test_grpo_guard_run_is_on_policy_and_climbs(tmp_path, tiny_policy_dir, brightness_reward):
    run = tmp_path / "run"
    train_grpo(cfg_of(tiny_policy_dir), run)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ratio_first"] <= 1e-5 and math.isfinite(r["loss"]) for r in records)
    means = [r["reward/brightness"] for r in records]
    assert means[-1] - means[0] > 0.05, means


def test_grpo_guard_needs_objective_grpo(tiny_policy_dir):
    with pytest.raises(ConfigError, match="grpo_guard.enabled=true regulates the clip of objective=grpo, not nft"):
        cfg_of(tiny_policy_dir, "objective=nft", "sampling.sde_steps=none", "sampling.same_noise_in_group=false")
