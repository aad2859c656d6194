"""Where subjects go in a target: a 3x3 grid of cells, a size word, a pixel box.

A subject of size word w is a square box of side ``round(SIZE_FRACTIONS[w] * size)``
(8 / 11 / 14 px at 32 px), centred in its cell, shifted by at most ``jitter`` px,
then moved inside the canvas if it would cross the border (corner cells with large
subjects). Boxes of one target never overlap: placements are redrawn until they
do not, with a fallback that always fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refrl.data.refworld.render import Box
from refrl.data.refworld.vocab import SIZE_WORDS, cell_name

SIZE_FRACTIONS: dict[str, float] = {"small": 0.25, "medium": 0.34, "large": 0.44}
# Curriculum: level 0 has only the easier, bigger sizes and no jitter.
LEVEL_SIZE_WORDS: dict[int, tuple[str, ...]] = {0: ("medium", "large"), 1: SIZE_WORDS, 2: SIZE_WORDS}
LEVEL_JITTER_PER_32PX: dict[int, int] = {0: 0, 1: 1, 2: 1}
MAX_PLACEMENT_TRIES = 64
# Used when random draws keep overlapping: mutually distant cells.
FALLBACK_CELLS = ((0, 0), (2, 2), (0, 2), (2, 0), (1, 1))


@dataclass(frozen=True)
class Placement:
    cell: tuple[int, int]
    size_word: str
    box: Box

    @property
    def cell_words(self) -> str:
        return cell_name(*self.cell)


def box_side(size_word: str, size: int) -> int:
    """Side in pixels of a subject box of ``size_word`` on a ``size`` canvas."""
    if size_word not in SIZE_FRACTIONS:
        raise ValueError(f"unknown size word {size_word!r}; allowed: {', '.join(SIZE_FRACTIONS)}")
    return int(round(SIZE_FRACTIONS[size_word] * size))


def cell_box(cell: tuple[int, int], side: int, size: int, shift: tuple[int, int] = (0, 0)) -> Box:
    """Box of ``side`` centred in ``cell`` (row, col), shifted by (dx, dy), kept inside the canvas."""
    row, col = cell
    cx, cy = (col + 0.5) * size / 3.0, (row + 0.5) * size / 3.0
    x0 = math.floor(cx - side / 2.0 + 0.5) + shift[0]
    y0 = math.floor(cy - side / 2.0 + 0.5) + shift[1]
    x0 = min(max(x0, 0), size - side)
    y0 = min(max(y0, 0), size - side)
    return (x0, y0, x0 + side, y0 + side)


def boxes_overlap(a: Box, b: Box) -> bool:
    """True when two boxes (x1, y1 exclusive) share at least one pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def jitter_px(size: int, level: int) -> int:
    return LEVEL_JITTER_PER_32PX[level] * max(1, size // 32)


def place_one(rng: np.random.Generator, cell: tuple[int, int], size_word: str, size: int, level: int) -> Placement:
    jitter = jitter_px(size, level)
    shift = tuple(int(s) for s in rng.integers(-jitter, jitter + 1, size=2)) if jitter else (0, 0)
    return Placement(cell, size_word, cell_box(cell, box_side(size_word, size), size, shift))


def place_subjects(rng: np.random.Generator, n: int, size: int, level: int) -> list[Placement]:
    """``n`` (<= 5) placements in distinct cells whose boxes do not overlap."""
    words = LEVEL_SIZE_WORDS[level]
    jitter = jitter_px(size, level)
    for _ in range(MAX_PLACEMENT_TRIES):
        cells = rng.permutation(9)[:n].tolist()
        word_ids = rng.integers(len(words), size=n).tolist()
        shifts = rng.integers(-jitter, jitter + 1, size=(n, 2)).tolist() if jitter else [(0, 0)] * n
        placed = [
            Placement((c // 3, c % 3), words[w], cell_box((c // 3, c % 3), box_side(words[w], size), size, tuple(d)))
            for c, w, d in zip(cells, word_ids, shifts, strict=True)
        ]
        if not any(boxes_overlap(a.box, b.box) for i, a in enumerate(placed) for b in placed[i + 1 :]):
            return placed
    smallest = words[0]
    side = box_side(smallest, size)
    return [Placement(cell, smallest, cell_box(cell, side, size)) for cell in FALLBACK_CELLS[:n]]
