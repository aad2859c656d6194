"""Seeded randomness: generators whose state depends only on given integers."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed the global RNGs a run may draw from: torch, Python's ``random`` and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def seeded_generator(*seeds: int) -> torch.Generator:
    """A torch generator whose state depends only on the given integers."""
    g = torch.Generator()
    acc = 0
    for s in seeds:
        acc = (acc * 1_000_003 + int(s) + 1) % (2**63 - 1)
    g.manual_seed(acc)
    return g
