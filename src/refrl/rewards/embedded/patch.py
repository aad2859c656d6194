"""``patch``: OmniRefiner's patch-wise reward against the ground truth.

Composed from the pure functions of ``refrl.rewards.patch`` with this package's
feature space standing in for DreamSim (see docs/reference/methods.md#omnirefiner-patch-reward-and-refinement):

* per-patch perceptual similarity: ``patch_cosine`` of the output's and the target's
  features (``fidelity.encode``) over ``patch x patch`` patches, clipped to [0, 1];
* whole-image similarity: the fidelity token cosine, clipped to [0, 1];
* masked pixel accuracy inside ``sample.mask`` (the region that matters: the
  subjects, or the refined region of RefWorld ``refine``): ``masked_pixel_accuracy``
  with ``mapping`` ``exp`` by default (``exp(−MSE/τ)``: noise inside the mask scores
  ~0 rather than the ~0.8 of ``1 − MSE``);
* ``patch_reward_compose`` weighs them (``w_patch``, ``w_global``, ``w_pixel``); a
  sample without a mask is scored on the two similarities alone.

Applies to every sample with a target; extras ``masked_accuracy``,
``patch_similarity``, ``global_similarity``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput, nan_scores
from refrl.rewards.embedded.base import EmbeddedReward
from refrl.rewards.embedded.fidelity import TOKEN_PATCH, encode, targets_of, token_cosine
from refrl.rewards.patch import (
    PATCH_REDUCES,
    PIXEL_MAPPINGS,
    PIXEL_TAU,
    W_GLOBAL,
    W_PATCH,
    W_PIXEL,
    masked_pixel_accuracy,
    patch_cosine,
    patch_reward_compose,
)

PATCH_SIZE = 8  # 4x4 patches at 32 px
PIXEL_MAPPING = "exp"


class PatchReward(EmbeddedReward):
    """OmniRefiner's patch reward (see module docstring)."""

    name = "patch"

    def __init__(
        self,
        patch: int = PATCH_SIZE,
        mapping: str = PIXEL_MAPPING,
        tau: float = PIXEL_TAU,
        w_patch: float = W_PATCH,
        w_global: float = W_GLOBAL,
        w_pixel: float = W_PIXEL,
        patch_reduce: str = "mean",
    ):
        super().__init__()
        if mapping not in PIXEL_MAPPINGS:
            raise ValueError(f"unknown pixel mapping {mapping!r}; allowed: {', '.join(PIXEL_MAPPINGS)}")
        if patch_reduce not in PATCH_REDUCES:
            raise ValueError(f"unknown patch_reduce {patch_reduce!r}; allowed: {', '.join(PATCH_REDUCES)}")
        if patch < 1 or tau <= 0:
            raise ValueError(f"patch must be >= 1 and tau > 0, got patch={patch}, tau={tau}")
        self.patch, self.mapping, self.tau = patch, mapping, tau
        self.w_patch, self.w_global, self.w_pixel, self.patch_reduce = w_patch, w_global, w_pixel, patch_reduce

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        n, _, h, w = images.shape
        scores, accuracy, patch_mean, global_out = nan_scores(n), nan_scores(n), nan_scores(n), nan_scores(n)
        rows, targets = targets_of(samples, (h, w))
        if rows:
            out = images[rows]
            feat_out, feat_target = encode(out), encode(targets)
            patches = patch_cosine(feat_out, feat_target, self.patch).clamp(0.0, 1.0)
            global_sim = token_cosine(feat_out, feat_target, TOKEN_PATCH).clamp(0.0, 1.0)
            masks = [samples[i].mask for i in rows]
            has_mask = torch.tensor([m is not None for m in masks])
            mask = torch.stack([m.float() if m is not None else torch.zeros(1, h, w) for m in masks])
            pixel = masked_pixel_accuracy(out, targets, mask, self.mapping, self.tau)
            pixel = torch.where(has_mask, pixel, torch.full_like(pixel, float("nan")))
            scores[rows] = patch_reward_compose(
                patches, global_sim, pixel, self.w_patch, self.w_global, self.w_pixel, self.patch_reduce
            )
            accuracy[rows], global_out[rows] = pixel, global_sim
            patch_mean[rows] = patches.flatten(1).mean(1)
        extras = {"masked_accuracy": accuracy, "patch_similarity": patch_mean, "global_similarity": global_out}
        return RewardOutput(scores, extras)
