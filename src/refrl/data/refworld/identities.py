"""Subject identities of RefWorld and their train / val / test split.

An identity is (shape, fill pattern, primary colour, secondary colour), packed in
one integer. A solid fill has no secondary colour; its identity stores
``secondary == primary`` so that two solids that look the same are the same
identity (and therefore fall in the same split).

Split: ``blake2b(identity) % 10`` in {0, 5} (that is, ``% 5 == 0``) -> test,
== 1 -> val, else train (70 / 10 / 20 %). Test identities are never drawn for
train or val, so test measures generalisation to unseen subjects; val holds its
own unseen slice too, so it can be used for early stopping without touching test.
The split is taken over whole identity tuples, not over shapes, so every level
(including level 0, solids only) keeps identities of every shape in every split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import numpy as np

from refrl.data.refworld.vocab import SUBJECT_COLOURS
from refrl.errors import RefrlError

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "diamond", "ring", "cross", "star", "hexagon")
PATTERNS: tuple[str, ...] = ("solid", "stripes_h", "stripes_v", "stripes_d", "checker", "dots")
COLOUR_NAMES: tuple[str, ...] = tuple(SUBJECT_COLOURS)
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Which fills each curriculum level may draw (level 0: solid colours only).
LEVEL_PATTERNS: dict[int, tuple[str, ...]] = {0: ("solid",), 1: PATTERNS, 2: PATTERNS}
LEVELS: tuple[int, ...] = tuple(LEVEL_PATTERNS)

_N_COLOURS = len(COLOUR_NAMES)
_TEST_BUCKETS = (0, 5)
_VAL_BUCKETS = (1,)
_SPLIT_BUCKETS = 10


@dataclass(frozen=True)
class Identity:
    """The attributes of one subject identity (indices into SHAPES, PATTERNS, COLOUR_NAMES)."""

    shape: int
    pattern: int
    primary: int
    secondary: int

    @property
    def id(self) -> int:
        return encode_identity(self.shape, self.pattern, self.primary, self.secondary)

    def describe(self) -> str:
        fill = PATTERNS[self.pattern]
        colours = COLOUR_NAMES[self.primary]
        if fill != "solid":
            colours += f"/{COLOUR_NAMES[self.secondary]}"
        return f"{colours} {fill} {SHAPES[self.shape]}"


def encode_identity(shape: int, pattern: int, primary: int, secondary: int) -> int:
    """Pack attribute indices into an identity id: ((shape*P + pattern)*C + primary)*C + secondary."""
    if PATTERNS[pattern] == "solid":
        secondary = primary
    elif secondary == primary:
        raise ValueError(f"a patterned identity needs two different colours, got {COLOUR_NAMES[primary]!r} twice")
    return ((shape * len(PATTERNS) + pattern) * _N_COLOURS + primary) * _N_COLOURS + secondary


def decode_identity(identity: int) -> Identity:
    """Inverse of ``encode_identity``; raises ValueError for ids outside the world."""
    n_total = len(SHAPES) * len(PATTERNS) * _N_COLOURS * _N_COLOURS
    if not 0 <= identity < n_total:
        raise ValueError(f"identity {identity} out of range [0, {n_total})")
    rest, secondary = divmod(identity, _N_COLOURS)
    rest, primary = divmod(rest, _N_COLOURS)
    shape, pattern = divmod(rest, len(PATTERNS))
    return Identity(shape, pattern, primary, secondary)


def identity_split(identity: int) -> str:
    """The split an identity belongs to (stable hash of its id, see module docstring)."""
    digest = hashlib.blake2b(str(identity).encode(), digest_size=4).digest()
    bucket = int.from_bytes(digest, "little") % _SPLIT_BUCKETS
    if bucket in _TEST_BUCKETS:
        return "test"
    if bucket in _VAL_BUCKETS:
        return "val"
    return "train"


def all_identities() -> list[int]:
    """Every canonical identity id (solids once per (shape, colour); patterns with two colours)."""
    ids = []
    for shape in range(len(SHAPES)):
        for pattern, name in enumerate(PATTERNS):
            for primary in range(_N_COLOURS):
                if name == "solid":
                    ids.append(encode_identity(shape, pattern, primary, primary))
                    continue
                for secondary in range(_N_COLOURS):
                    if secondary != primary:
                        ids.append(encode_identity(shape, pattern, primary, secondary))
    return ids


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise RefrlError(f"unknown RefWorld split {split!r}; allowed: {', '.join(SPLITS)}")
    return split


@cache
def identity_pools(split: str) -> dict[str, np.ndarray]:
    """Identity ids of one split, grouped by fill pattern name (sorted, int64)."""
    check_split(split)
    pools: dict[str, list[int]] = {name: [] for name in PATTERNS}
    for identity in all_identities():
        if identity_split(identity) == split:
            pools[PATTERNS[decode_identity(identity).pattern]].append(identity)
    return {name: np.asarray(ids, dtype=np.int64) for name, ids in pools.items()}


def draw_identities(rng: np.random.Generator, split: str, level: int, n: int) -> list[int]:
    """``n`` distinct identities of ``split``: a fill allowed at ``level`` uniformly, then an identity."""
    pools = identity_pools(split)
    patterns = LEVEL_PATTERNS[level]
    chosen: list[int] = []
    while len(chosen) < n:
        pool = pools[patterns[int(rng.integers(len(patterns)))]]
        identity = int(pool[int(rng.integers(len(pool)))])
        if identity not in chosen:
            chosen.append(identity)
    return chosen
