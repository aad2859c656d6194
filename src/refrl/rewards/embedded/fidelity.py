"""``fidelity``: how close is the image to the ground-truth target? (DyRef's SigLIP role).

DyRef's fidelity reward is the cosine between the output's and the target's vision
encoder tokens, all tokens flattened into one vector. Here the encoder is the fixed
feature space of ``features.py``, mean-pooled into ``patch x patch`` tokens (8x8
tokens at 32 px), with each structure channel's image mean removed (a uniform
texture carries no information, and pure noise is then orthogonal to any image):

    raw_similarity = cos(flatten(tokens(output)), flatten(tokens(target)))
    fidelity       = clip(raw_similarity, 0, 1)

The target scores 1, a blurred or one-pixel-shifted target ~0.97, the right
background without its subjects ~0.8, noise ~0. ``raw_similarity`` (the pre-DRS
similarity DyRef's DAR weighs groups by) is returned as an extra. NaN without a target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput, nan_scores
from refrl.rewards.embedded.base import EmbeddedReward
from refrl.rewards.embedded.features import STRUCTURE, feature_tokens, local_features

TOKEN_PATCH = 4  # 8x8 tokens at 32 px
COSINE_EPS = 1e-8


def encode(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, H, W) features with each structure channel's image mean removed."""
    feats = local_features(images)
    structure = feats[:, STRUCTURE]
    return torch.cat([feats[:, : STRUCTURE.start], structure - structure.mean(dim=(2, 3), keepdim=True)], dim=1)


def token_cosine(feat_a: torch.Tensor, feat_b: torch.Tensor, patch: int) -> torch.Tensor:
    """(B,) cosine of all ``patch``-pooled tokens flattened into one vector (DyRef's fidelity)."""
    a = feature_tokens(feat_a, patch).flatten(1)
    b = feature_tokens(feat_b, patch).flatten(1)
    return F.cosine_similarity(a, b, dim=1, eps=COSINE_EPS)


def targets_of(samples: Sequence[LoadedSample], size: tuple[int, int]) -> tuple[list[int], torch.Tensor | None]:
    """Indices of the samples with a target of the images' size, and those targets stacked."""
    rows = [i for i, s in enumerate(samples) if s.target is not None]
    for i in rows:
        if tuple(samples[i].target.shape[-2:]) != tuple(size):
            raise ValueError(
                f"sample {samples[i].id!r}: target is {tuple(samples[i].target.shape[-2:])} but images are {tuple(size)}"
            )
    return rows, (torch.stack([samples[i].target.float() for i in rows]) if rows else None)


class FidelityReward(EmbeddedReward):
    """Token-feature cosine between the output and the target (see module docstring)."""

    name = "fidelity"

    def __init__(self, patch: int = TOKEN_PATCH):
        super().__init__()
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.patch = patch

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        n = images.shape[0]
        scores, raw = nan_scores(n), nan_scores(n)
        rows, targets = targets_of(samples, images.shape[-2:])
        if rows:
            sim = token_cosine(encode(images[rows]), encode(targets), self.patch)
            raw[rows] = sim
            scores[rows] = sim.clamp(0.0, 1.0)
        return RewardOutput(scores, {"raw_similarity": raw})
