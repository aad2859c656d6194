"""Image statistics that flag over-optimisation artefacts, reported as metrics (lower is better).

``patch_grid``: RL on a patch-based DiT can drift the output head, whose weights every
patch shares, into a texture repeated at the patch period (the "dot grid" Flow-GRPO and
DanceGRPO users report). Its energy sits on the harmonics of the patch period in the
image's 2-D spectrum, which this metric measures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput


def patch_grid_share(images: torch.Tensor, period: int = 4) -> torch.Tensor:
    """Share of each image's non-DC spectral power on the harmonics of ``period``:

        share = sum_{(u, v) in H} |F(u, v)|^2 / sum_{(u, v) != (0, 0)} |F(u, v)|^2,
        H = {(u, v) != (0, 0): u, v multiples of N / period}

    with F the 2-D DFT of each channel of an N x N image (powers summed over channels).
    An image tiled from one ``period`` x ``period`` patch scores 1, white noise about
    (period^2 - 1) / (N^2 - 1), a constant image 0. ``images``: (B, C, H, W).
    """
    h, w = images.shape[-2:]
    if h % period or w % period:
        raise ValueError(f"image size {h}x{w} is not a multiple of the period {period}")
    power = torch.fft.fft2(images.double()).abs().pow(2).sum(1)  # (B, H, W)
    power[:, 0, 0] = 0.0
    harmonics = torch.zeros(h, w, dtype=torch.bool)
    harmonics[:: h // period, :: w // period] = True
    harmonics[0, 0] = False
    total = power.flatten(1).sum(1)
    on_grid = power[:, harmonics].sum(1)
    return torch.where(total > 0, on_grid / total.clamp_min(1e-300), torch.zeros_like(total)).float()


class PatchGridShare:
    """`patch_grid_share` as a metric (`refrl eval --rewards ...,patch_grid`); the tiny DiT's patch is 4."""

    name = "patch_grid"

    def __init__(self, period: int = 4):
        self.period = period

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        return RewardOutput(scores=patch_grid_share(images, self.period))
