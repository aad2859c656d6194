"""PPO clipped loss and the closed-form Gaussian KL against hand-computed values."""

import math

import pytest
import torch

from refrl.train.losses import gaussian_mean_kl, ppo_clip_loss


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    lp = torch.tensor([-1.3, 0.2, 5.0])
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = ppo_clip_loss(lp, lp.clone(), adv, clip_range=1e-4)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert stats == {"ratio_mean": 1.0, "ratio_max": 1.0, "ratio_min": 1.0, "clipfrac": 0.0}


def _four_cases():
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +1, +1, -1, -1 and eps = 0.2
    old = torch.zeros(4)
    lp = torch.tensor(
        [math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)], requires_grad=True
    )
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    return lp, old, adv


def test_clipping_cases_by_hand():
    lp, old, adv = _four_cases()
    loss, stats = ppo_clip_loss(lp, old, adv, clip_range=0.2)
    # max(-A r, -A clip(r)): A=+1,r=1.5 -> max(-1.5,-1.2)=-1.2; A=+1,r=0.5 -> max(-0.5,-0.8)=-0.5
    #                        A=-1,r=1.5 -> max(1.5,1.2)=1.5;    A=-1,r=0.5 -> max(0.5,0.8)=0.8
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clipfrac"] == 1.0
    assert stats["ratio_max"] == pytest.approx(1.5) and stats["ratio_min"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    # clipped branches carry no gradient; unclipped: d(-A r)/dlp = -A r, divided by B = 4
    assert lp.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 1.5 / 4, 0.0])


def test_weights_multiply_per_sample_loss():
    lp, old, adv = _four_cases()
    loss, _ = ppo_clip_loss(
        lp, old, adv, clip_range=0.2, weights=torch.tensor([2.0, 1.0, 1.0, 0.0])
    )
    assert loss.item() == pytest.approx((-2.4 - 0.5 + 1.5 + 0.0) / 4)


def test_clipfrac_counts_only_outside_the_range():
    old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.0, 1.05, 0.9, 1.3]))
    _, stats = ppo_clip_loss(lp, old, torch.ones(4), clip_range=0.2)
    assert stats["clipfrac"] == pytest.approx(0.25)


def test_ppo_errors():
    with pytest.raises(ValueError, match="advantages shape"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0)


def test_gaussian_mean_kl():
    mean = torch.tensor([[1.0, 2.0], [0.5, 0.5]])
    assert torch.equal(gaussian_mean_kl(mean, mean.clone(), torch.tensor(0.3)), torch.zeros(2))
    ref = torch.zeros(2, 2)
    std = torch.tensor([[0.5], [1.0]])  # per-sample std as returned by sde_step
    # sample 0: (1/(2*0.25) + 4/(2*0.25)) / 2 = (2 + 8) / 2; sample 1: (0.25/2 + 0.25/2) / 2
    assert gaussian_mean_kl(mean, ref, std).tolist() == pytest.approx([5.0, 0.125])
