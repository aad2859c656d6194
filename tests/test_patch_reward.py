"""OmniRefiner's patch reward formula (refrl.rewards.patch) against hand values."""

import math

import pytest
import torch

from refrl.rewards.patch import masked_pixel_accuracy, patch_cosine, patch_reward_compose


def approx(values, rel=1e-6, abs=1e-9):
    return pytest.approx(values, rel=rel, abs=abs)


def test_patch_cosine():
    a = torch.zeros(1, 2, 2, 4)
    a[:, 0] = 1.0
    b = torch.zeros(1, 2, 2, 4)
    b[:, 0] = 1.0
    b[0, 1, :, :2] = 1.0  # left window: (1, 1) vs (1, 0) -> 1/sqrt(2)
    b[0, 1, :, 2:] = torch.tensor([[0.0, 2.0], [-2.0, 0.0]])  # right window pools to (1, 0) -> 1
    out = patch_cosine(a, b, 2)
    assert out.shape == (1, 1, 2)
    assert out.flatten().tolist() == approx([1 / math.sqrt(2), 1.0])
    with pytest.raises(ValueError, match="divide"):
        patch_cosine(a, b, 3)


def test_masked_pixel_accuracy():
    image = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[0.5, 1.0], [0.2, 0.0]]).expand(2, 1, 2, 2)
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0] = 1.0  # top row of sample 0; sample 1 has an empty mask
    lin = masked_pixel_accuracy(image, target, mask)
    mse = (0.25 + 1.0) / 2
    assert lin[0].item() == pytest.approx(1 - mse) and math.isnan(lin[1].item())
    assert masked_pixel_accuracy(image, target, mask, "exp")[0].item() == pytest.approx(
        math.exp(-mse / 0.05)
    )
    two_ch = masked_pixel_accuracy(
        torch.zeros(1, 2, 1, 2),
        torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]]),
        torch.ones(1, 1, 1, 2),
    )
    assert two_ch.item() == pytest.approx(1 - 1 / 4)
    with pytest.raises(ValueError, match="allowed: linear, exp"):
        masked_pixel_accuracy(image, target, mask, "log")


def test_patch_reward_compose():
    patches = torch.tensor([[[0.2, 0.6]], [[0.5, 0.5]]])
    glob = torch.tensor([0.8, 0.4])
    pix = torch.tensor([0.9, float("nan")])
    out = patch_reward_compose(patches, glob, pix)
    assert out.tolist() == approx(
        [0.4 * 0.4 + 0.3 * 0.8 + 0.3 * 0.9, (0.4 * 0.5 + 0.3 * 0.4) / 0.7]
    )
    out_min = patch_reward_compose(patches, glob, pix, patch_reduce="min")
    assert out_min[0].item() == pytest.approx(0.4 * 0.2 + 0.3 * 0.8 + 0.3 * 0.9)
    no_pix = patch_reward_compose(patches, glob, None)
    assert no_pix.tolist() == approx([(0.4 * 0.4 + 0.3 * 0.8) / 0.7, (0.4 * 0.5 + 0.3 * 0.4) / 0.7])
