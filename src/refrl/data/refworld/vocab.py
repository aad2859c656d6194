"""The closed vocabulary of RefWorld: names, palettes and prompt templates.

Every word a RefWorld prompt can contain is in ``WORDS`` (lowercase), so the
embedded policy's word tokenizer can be built from it before any data exists.
Words are split the way ``refrl.models.tokenizer.split_words`` does: runs of
letters and runs of digits, lowercased ("image 2," -> ["image", "2"]).
"""

from __future__ import annotations

import re

RGB = tuple[float, float, float]

# Subject colours: saturated, mutually distinct, luma (BT.601) >= 0.38 so they stay
# visible on every plain background even after a grayscale or sepia style.
SUBJECT_COLOURS: dict[str, RGB] = {
    "red": (0.95, 0.15, 0.15),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (1.00, 0.92, 0.15),
    "lime": (0.60, 0.95, 0.10),
    "green": (0.05, 0.62, 0.25),
    "cyan": (0.10, 0.85, 0.95),
    "blue": (0.20, 0.40, 1.00),
    "purple": (0.55, 0.20, 0.90),
    "magenta": (0.95, 0.15, 0.75),
    "white": (0.97, 0.97, 0.97),
}

# Plain backgrounds: dark and muted (luma <= 0.24), so subjects stand out on every one.
BACKGROUND_COLOURS: dict[str, RGB] = {
    "black": (0.06, 0.06, 0.06),
    "navy": (0.08, 0.10, 0.32),
    "olive": (0.26, 0.26, 0.06),
    "maroon": (0.36, 0.07, 0.10),
    "teal": (0.05, 0.30, 0.30),
    "brown": (0.34, 0.19, 0.07),
}

# Neutral canvas of subject references (DESIGN: "the subject alone on a neutral canvas").
NEUTRAL_GREY = 0.5

# Outline colours of the layout reference, one per subject (the pose-map analogue).
BOX_COLOURS: dict[str, RGB] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.1, 0.4, 1.0),
}

ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")


def cell_name(row: int, col: int) -> str:
    """Words of a 3x3 grid cell: "top left", ..., "center" for the middle cell."""
    if (row, col) == (1, 1):
        return "center"
    if col == 1:
        return f"{ROW_NAMES[row]} center"
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


CELL_NAMES: tuple[str, ...] = tuple(cell_name(r, c) for r in range(3) for c in range(3))
SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")

STYLE_NAMES: tuple[str, ...] = ("warm", "cool", "grayscale", "invert", "sepia", "posterize", "channel_swap")
LIGHT_DIRECTIONS: tuple[str, ...] = (
    "north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest",
)  # fmt: skip

# Prompt templates: one sentence per reference ("image k" is 1-based, reference order).
T_SUBJECT = "Put the subject of image {k} at the {cell}, {size}."
T_SUBJECT_IN_BOX = "Put the subject of image {k} in the {box} box of image {j}."
T_PLAIN_BACKGROUND = "Use a {background} background."
T_BACKGROUND_REF = "Use the background of image {k}."
T_STYLE = "Render everything in the style of image {k}."
T_LIGHTING = "Light the scene as in image {k}."
T_REFINE = "Refine image {k}: restore the details of the subject using image {j}."
T_EDIT_MOVE = "Edit image {k}: move the subject to the {cell}."
T_EDIT_RESIZE = "Edit image {k}: make the subject {size}."
T_EDIT_BACKGROUND = "Edit image {k}: make the background {background}."
TEMPLATES: tuple[str, ...] = (
    T_SUBJECT, T_SUBJECT_IN_BOX, T_PLAIN_BACKGROUND, T_BACKGROUND_REF, T_STYLE, T_LIGHTING,
    T_REFINE, T_EDIT_MOVE, T_EDIT_RESIZE, T_EDIT_BACKGROUND,
)  # fmt: skip

MAX_REFERENCES = 7  # 3 subjects + style + background + layout + lighting

_WORD_RE = re.compile(r"[^\W\d_]+|\d+")
_PLACEHOLDER_RE = re.compile(r"\{\w+\}")


def prompt_words(text: str) -> list[str]:
    """Lowercase words of a prompt: letter runs and digit runs (as the policy's tokenizer splits)."""
    return _WORD_RE.findall(text.lower())


def _all_words() -> tuple[str, ...]:
    words: set[str] = set()
    for template in TEMPLATES:
        words.update(prompt_words(_PLACEHOLDER_RE.sub(" ", template)))
    fillers = [*CELL_NAMES, *SIZE_WORDS, *BACKGROUND_COLOURS, *BOX_COLOURS]
    fillers += [str(k) for k in range(1, MAX_REFERENCES + 1)]
    for filler in fillers:
        words.update(prompt_words(filler))
    return tuple(sorted(words))


WORDS: tuple[str, ...] = _all_words()
