"""The `Reward` protocol.

A reward scores a batch of generated images against their samples: one float per
sample (NaN where the reward does not apply, e.g. a style reward for a sample
with no style reference) plus named per-sample extras for logging and shaping
(e.g. the raw pre-DRS similarity, per-subject scores).

Rewards measure the generated pixels. Ground truth in the sample (target, masks,
instructed boxes) is only what pixels are compared against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from refrl.data.schema import LoadedSample

ROLES = ("identity", "prompt", "style", "background", "fidelity", "quality", "judge", "patch")


@dataclass
class RewardOutput:
    scores: torch.Tensor  # (B,) float32, NaN where not applicable
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # each (B,)


@runtime_checkable
class Reward(Protocol):
    name: str
    role: str

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        """``images``: (B, 3, H, W) float in [0, 1]; ``samples``: the B samples they were generated for."""
        ...
