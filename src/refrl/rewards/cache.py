"""A bounded LRU cache of reference-side computations (the "reference encoder" calls).

A GRPO group scores G images generated for one sample, so the reference side
(subject templates, style maps, encoder embeddings of references or the target)
is the same G times. Each reward keeps one cache (`refrl.rewards.base.BaseReward`);
``calls`` counts how often the reference encoder really ran, so the trainer can log
how many calls the cache saved.

`BaseReward.cached` keys an entry by ``(sample.id, reference indices, variant)`` plus
a fingerprint of those references' pixels: two samples that happen to share an id
(e.g. drawn with different seeds) never share an entry.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

DEFAULT_MAX_ENTRIES = 1024


def image_fingerprint(image: torch.Tensor) -> str:
    """A short digest of an image's values (blake2b of its float32 bytes)."""
    data = image.detach().to(torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


class ReferenceCache:
    """LRU map key -> computed value, at most ``max_entries`` entries."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.calls = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value of ``key``, computing (and counting a call) on a miss."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = compute()
        self.calls += 1
        self._entries[key] = value
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()
