"""The `Reward` protocol and `BaseReward`, the one base class of the embedded and zoo rewards.

A reward scores a batch of generated images against their samples: one float per
sample (NaN where the reward does not apply, e.g. a style reward for a sample
with no style reference) plus named per-sample extras for logging and shaping
(e.g. the raw pre-DRS similarity, per-subject scores).

Rewards measure the generated pixels. Ground truth in the sample (target, masks,
instructed boxes) is only what pixels are compared against.

Anything with a ``name`` and ``__call__(images, samples) -> RewardOutput`` is a
reward. `BaseReward` adds what the embedded and the zoo rewards share: the batch
checks, no autograd, and one bounded cache of reference-side work keyed by the
references' pixels, whose misses ``encoder_calls`` counts.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.cache import DEFAULT_MAX_ENTRIES, ReferenceCache, image_fingerprint

T = TypeVar("T")
# A reference of a sample: its index in ``sample.ref_images``, or "target".
RefIndex = int | str
TARGET = "target"


@dataclass
class RewardOutput:
    scores: torch.Tensor  # (B,) float32, NaN where not applicable
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # each (B,)


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        """``images``: (B, 3, H, W) float in [0, 1]; ``samples``: the B samples they were generated for."""
        ...


class BaseReward:
    """Base class of the embedded and zoo rewards: subclasses set ``name`` and implement ``score``.

    ``__call__`` checks the batch, turns autograd off and calls
    ``score(self.pixels(images), samples)``. Reference-side work goes through
    `cached`, so a GRPO group (one sample repeated G times) costs one computation
    per reference; ``encoder_calls`` counts the computations that really ran.
    """

    name: str = ""

    def __init__(self, cache_size: int = DEFAULT_MAX_ENTRIES):
        self.cache = ReferenceCache(cache_size)

    @property
    def encoder_calls(self) -> int:
        """How many reference-side computations ran (cache misses)."""
        return self.cache.calls

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        check_batch(images, samples, self.name)
        with torch.no_grad():
            return self.score(self.pixels(images), samples)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The checked images as `score` receives them (here: as given)."""
        return images

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        raise NotImplementedError

    def cached(self, sample: LoadedSample, refs: RefIndex | tuple[RefIndex, ...], variant: Hashable,
               compute: Callable[[], T]) -> T:
        """``compute()`` once per (sample id, references ``refs``, ``variant``, those references' pixels).

        ``refs`` is a reference index of ``sample``, ``"target"``, or a tuple of them:
        every reference the computed value depends on."""
        refs = refs if isinstance(refs, tuple) else (refs,)
        key = (sample.id, refs, variant, tuple(image_fingerprint(reference_image(sample, r)) for r in refs))
        return self.cache.get(key, compute)


def reference_image(sample: LoadedSample, ref: RefIndex) -> torch.Tensor:
    """Reference ``ref`` of ``sample`` (an index into ``ref_images``), or its target for ``"target"``."""
    if ref == TARGET:
        if sample.target is None:
            raise ValueError(f"sample {sample.id!r} has no target")
        return sample.target
    return sample.ref_images[int(ref)]


def check_batch(images: torch.Tensor, samples: Sequence[LoadedSample], name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {name!r}: images must be a (B, 3, H, W) tensor in [0, 1], got {shape}")
    if images.shape[0] != len(samples):
        raise ValueError(f"reward {name!r}: {images.shape[0]} images but {len(samples)} samples")


def nan_scores(n: int) -> torch.Tensor:
    """``n`` NaN scores: the reward does not apply (a missing reward, never 0)."""
    return torch.full((n,), float("nan"))
