"""A plain function as a reward, as TRL's trainers take one.

``f(images, samples) -> list[float | None]``: ``images`` (B, 3, H, W) float in [0, 1],
``samples`` the B `LoadedSample` they were generated for, one score per sample and
``None`` (or NaN) where the reward does not apply. `FunctionReward` turns it into a
`Reward` that returns a `RewardOutput`; the RL trainer wraps every plain callable it is
given this way, beside rewards named from the registry.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
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
        return RewardOutput(score_list(self.fn(images, samples), len(samples), f"reward {self.name!r}"))

    def __repr__(self) -> str:
        return f"FunctionReward({self.name!r})"


_REPR = reprlib.Repr()  # short reprs of what a function returned: 4 items, 40-character strings
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple = 40, 60, 4, 4


def _shown(value: Any) -> str:
    """``type repr`` of a returned value, its repr shortened (`reprlib`) and on one line."""
    return f"{type(value).__name__} {' '.join(_REPR.repr(value).split())}"


def score_list(out: Any, n: int, who: str) -> torch.Tensor:
    """``n`` float32 scores from what a reward function returned; one-line `RefrlError` naming ``who`` otherwise.

    Accepted: a list or tuple of ``n`` numbers or None (None and NaN: the reward does
    not apply), or a 1-D tensor / array of length ``n``. A string is refused even
    though it is a sequence: ``"1111"`` is not four scores of 1.0; so are bools.
    """
    expected = f"expected one score per sample: a list of {n} floats or None, or a 1-D tensor/array of length {n}"
    if isinstance(out, (torch.Tensor, np.ndarray)):
        if isinstance(out, torch.Tensor):
            numeric = not (out.dtype.is_complex or out.dtype == torch.bool)
        else:
            numeric = out.dtype.kind in "fiu"
        if out.ndim != 1 or out.shape[0] != n or not numeric:
            shape = "x".join(str(d) for d in out.shape) or "scalar"
            raise RefrlError(f"{who} returned a {type(out).__name__} of shape {shape} and dtype {out.dtype}; {expected}")
        values = out.detach().cpu().tolist() if isinstance(out, torch.Tensor) else out.tolist()
    elif isinstance(out, (list, tuple)):
        values = list(out)
    else:
        raise RefrlError(f"{who} returned {_shown(out)}; {expected}")
    if len(values) != n:
        raise RefrlError(f"{who} returned {len(values)} scores for {n} samples; {expected}")
    scores = []
    for v in values:
        if v is None:
            scores.append(math.nan)
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            scores.append(float(v))
        else:
            raise RefrlError(f"{who} returned a score {_shown(v)} in {_shown(out)}; expected a float or None")
    return torch.tensor(scores, dtype=torch.float32)
