"""RefWorld in memory: draw LoadedSamples on the fly (the SFT trainer's data source).

Determinism: a sample is a pure function of the generator state it is drawn
from. ``generate(n, seed)`` draws sample i from ``sample_rng(seed, i, split)``,
which is ``numpy.random.default_rng([seed, i])`` for train and
``default_rng([seed, i, SPLIT_SALT[split]])`` for val / test, so any sample can be
regenerated alone, generation order does not matter, and val / test samples
never replay train's draws when the same seed is used.

Images are quantised to multiples of 1/255, so a sample written as PNG and read
back is bit-identical to the in-memory one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from refrl.data.refworld.identities import LEVELS, check_split
from refrl.data.refworld.tasks import CATEGORIES, Task, WorldSpec, make_task, min_references
from refrl.data.refworld.vocab import MAX_REFERENCES
from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError

DEFAULT_SIZE = 32
DEFAULT_LEVEL = 2
MIN_SIZE = 24  # below this the small subjects (1/4 of the canvas) lose their shapes
SPLIT_SALT: dict[str, int] = {"val": 1, "test": 2}


def sample_rng(seed: int, index: int, split: str = "train") -> np.random.Generator:
    """The generator sample ``index`` of a ``split`` is drawn from (see module docstring)."""
    if split == "train":
        return np.random.default_rng([seed, index])
    return np.random.default_rng([seed, index, SPLIT_SALT[check_split(split)]])


def resolve_categories(categories: Sequence[str] | None, max_refs: int) -> tuple[str, ...]:
    """Validate ``categories`` against ``max_refs``; None means every category that fits."""
    if not 1 <= max_refs <= MAX_REFERENCES:
        raise RefrlError(f"max_refs must be in 1..{MAX_REFERENCES}, got {max_refs}")
    if categories is None:
        return tuple(c for c in CATEGORIES if min_references(c) <= max_refs)
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    if not categories:
        raise RefrlError(f"no RefWorld categories given; allowed: {', '.join(CATEGORIES)}")
    for c in categories:
        if c not in CATEGORIES:
            raise RefrlError(f"unknown RefWorld category {c!r}; allowed: {', '.join(CATEGORIES)}")
        if min_references(c) > max_refs:
            raise RefrlError(f"category {c!r} needs at least {min_references(c)} references but max_refs={max_refs}")
    return tuple(dict.fromkeys(categories))


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (3, H, W) float32 tensor quantised to 1/255 steps."""
    quantised = np.round(np.clip(image, 0.0, 1.0) * 255.0) / 255.0
    return torch.from_numpy(np.ascontiguousarray(quantised.transpose(2, 0, 1), dtype=np.float32))


def task_to_sample(task: Task, sample_id: str, category: str) -> LoadedSample:
    extra = dict(task.extra)
    extra["subject_masks"] = torch.from_numpy(task.subject_masks.copy())
    return LoadedSample(
        id=sample_id,
        prompt=task.prompt,
        ref_images=[_to_tensor(im) for im in task.ref_images],
        ref_types=list(task.ref_types),
        target=_to_tensor(task.target),
        mask=torch.from_numpy(task.mask.astype(np.float32))[None],
        category=category,
        extra=extra,
    )


class RefWorld:
    """The embedded world of multi-reference composition tasks (see docs/research/refworld.md#refworld).

    ``level`` is the curriculum: 0 = solid subjects, medium/large sizes, plain
    backgrounds; 1 = + fill patterns (stripes, checker, dots) and small sizes;
    2 = + textured / photo background references.
    """

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        split: str = "train",
        categories: Sequence[str] | None = None,
        max_refs: int = MAX_REFERENCES,
        level: int = DEFAULT_LEVEL,
    ):
        if not isinstance(size, int) or size < MIN_SIZE:
            raise RefrlError(f"RefWorld size must be an integer >= {MIN_SIZE} (32 or 64 recommended), got {size!r}")
        if level not in LEVELS:
            raise RefrlError(f"unknown RefWorld level {level!r}; allowed: {', '.join(map(str, LEVELS))}")
        self.spec = WorldSpec(size=size, split=check_split(split), level=level, max_refs=max_refs)
        self.categories = resolve_categories(categories, max_refs)

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def split(self) -> str:
        return self.spec.split

    @property
    def level(self) -> int:
        return self.spec.level

    def sample(self, rng: np.random.Generator, index: int | None = None, category: str | None = None) -> LoadedSample:
        """One sample drawn from ``rng``; its id is ``<split>-<index>`` (or a drawn number when index is None)."""
        if category is None:
            category = self.categories[int(rng.integers(len(self.categories)))]
        elif category not in self.categories:
            raise RefrlError(f"category {category!r} is not enabled; enabled: {', '.join(self.categories)}")
        task = make_task(rng, self.spec, category)
        suffix = f"{index:06d}" if index is not None else f"u{int(rng.integers(2**31)):010d}"
        return task_to_sample(task, f"{self.split}-{suffix}", category)

    def batch(self, rng: np.random.Generator, n: int) -> list[LoadedSample]:
        """``n`` samples drawn one after the other from ``rng``."""
        return [self.sample(rng) for _ in range(n)]

    def generate(self, n: int, seed: int, start: int = 0) -> list[LoadedSample]:
        """Samples ``start .. start+n-1``; sample i is drawn from ``sample_rng(seed, i, split)``."""
        return [self.sample(sample_rng(seed, i, self.split), index=i) for i in range(start, start + n)]


def generate(
    n: int,
    seed: int,
    split: str = "train",
    size: int = DEFAULT_SIZE,
    categories: Sequence[str] | None = None,
    max_refs: int = MAX_REFERENCES,
    level: int = DEFAULT_LEVEL,
) -> list[LoadedSample]:
    """``n`` samples of a fresh ``RefWorld``; sample i depends only on (seed, i, split)."""
    return RefWorld(size=size, split=split, categories=categories, max_refs=max_refs, level=level).generate(n, seed)
