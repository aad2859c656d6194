"""A plain function as a reward, as TRL's trainers take one.

``f(images, samples) -> list[float | None]``: ``images`` (B, 3, H, W) float in [0, 1],
``samples`` the B `LoadedSample` they were generated for, one score per sample and
``None`` (or NaN) where the reward does not apply. `FunctionReward` turns it into a
`Reward` that returns a `RewardOutput`; the RL trainer wraps every plain callable it is
given this way, beside rewards named from the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import BaseReward, RewardOutput

RewardFunction = Callable[[torch.Tensor, Sequence[LoadedSample]], Any]


class FunctionReward(BaseReward):
    """Wraps ``fn(images, samples) -> list[float | None]`` (a list, tuple, array or (B,) tensor);
    `BaseReward` checks the batch and runs it without autograd."""

    def __init__(self, fn: RewardFunction, name: str | None = None):
        if not callable(fn):
            raise RefrlError(f"a reward function must be callable, got {type(fn).__name__}")
        name = name or getattr(fn, "__name__", None) or type(fn).__name__
        if name == "<lambda>":  # metrics keys are reward/<name>: a lambda needs one given
            raise RefrlError("a lambda reward needs a name: FunctionReward(fn, name='...')")
        super().__init__()
        self.fn, self.name = fn, name

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        out = self.fn(images, samples)
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().reshape(-1).tolist()
        try:
            values = list(out)
        except TypeError:
            raise RefrlError(f"reward {self.name!r} returned {type(out).__name__}; "
                             "expected one score per sample (a list of float or None)") from None
        if len(values) != len(samples):
            raise RefrlError(f"reward {self.name!r} returned {len(values)} scores for {len(samples)} samples")
        scores = []
        for v in values:
            try:
                scores.append(math.nan if v is None else float(v))
            except (TypeError, ValueError):
                raise RefrlError(f"reward {self.name!r} returned a score {v!r}; expected a float or None") from None
        return RewardOutput(torch.tensor(scores, dtype=torch.float32))

    def __repr__(self) -> str:
        return f"FunctionReward({self.name!r})"
