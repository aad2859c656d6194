"""Whole-image effects and the references that show them: style, lighting, layout.

* Style: a colour transform of the whole target. Its reference is one fixed
  exemplar (a colour chart, the same for every sample) with the transform applied,
  so the transform is identifiable from the reference alone (CSD's role).
* Lighting: the target is multiplied by a linear brightness ramp
  ``LIGHT_GAIN_RANGE`` rising towards the light; its reference is a grey sphere
  lit from that direction (Lambert shading).
* Layout: box outlines on black, one colour per subject (the pose-map analogue).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from refrl.data.refworld.render import Box
from refrl.data.refworld.vocab import BOX_COLOURS, LIGHT_DIRECTIONS, STYLE_NAMES, SUBJECT_COLOURS

# Lighting: brightness gain from the dark side to the lit side of the target.
LIGHT_GAIN_RANGE = (0.55, 1.25)
# Light sphere: radius (fraction of the canvas), elevation of the light (z of the
# un-normalised light vector), ambient term, albedo and canvas grey.
SPHERE_RADIUS = 0.42
LIGHT_ELEVATION = 0.6
SPHERE_AMBIENT = 0.12
SPHERE_ALBEDO = 0.95
SPHERE_CANVAS = 0.1
# Style transforms' constants.
WARM_GAIN, COOL_GAIN = (1.15, 1.0, 0.75), (0.75, 1.0, 1.15)
WARM_COOL_SHIFT = 0.05
POSTERIZE_LEVELS = 3
SEPIA_MATRIX = np.asarray(
    [[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32
)  # the classic sepia tone matrix (rows: output R, G, B)
LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
CHANNEL_SWAP_ORDER = [2, 0, 1]  # output RGB <- input BRG
LAYOUT_LINE_PER_32PX = 1  # outline thickness at 32 px; scales with the canvas

# Compass direction -> unit vector in image coordinates (x right, y down; north is up).
_DIAG = float(np.sqrt(0.5))
LIGHT_VECTORS: dict[str, tuple[float, float]] = {
    "north": (0.0, -1.0), "northeast": (_DIAG, -_DIAG), "east": (1.0, 0.0), "southeast": (_DIAG, _DIAG),
    "south": (0.0, 1.0), "southwest": (-_DIAG, _DIAG), "west": (-1.0, 0.0), "northwest": (-_DIAG, -_DIAG),
}  # fmt: skip
assert tuple(LIGHT_VECTORS) == LIGHT_DIRECTIONS


def apply_style(image: np.ndarray, name: str) -> np.ndarray:
    """Colour transform ``name`` of an (H, W, 3) image in [0, 1]; returns a new array in [0, 1]."""
    if name == "warm":
        out = image * np.asarray(WARM_GAIN, dtype=np.float32) + np.asarray([WARM_COOL_SHIFT, 0, 0], dtype=np.float32)
    elif name == "cool":
        out = image * np.asarray(COOL_GAIN, dtype=np.float32) + np.asarray([0, 0, WARM_COOL_SHIFT], dtype=np.float32)
    elif name == "grayscale":
        out = np.repeat((image @ LUMA)[..., None], 3, axis=2)
    elif name == "invert":
        out = 1.0 - image
    elif name == "sepia":
        out = image @ SEPIA_MATRIX.T
    elif name == "posterize":
        out = np.round(image * (POSTERIZE_LEVELS - 1)) / (POSTERIZE_LEVELS - 1)
    elif name == "channel_swap":
        out = image[..., CHANNEL_SWAP_ORDER]
    else:
        raise ValueError(f"unknown style {name!r}; allowed: {', '.join(STYLE_NAMES)}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@lru_cache(maxsize=8)
def style_chart(size: int) -> np.ndarray:
    """The fixed style exemplar: a hue x brightness sweep (top), subject palette blocks and a grey ramp.

    Read-only; identical for every sample of a given size.
    """
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    hue = t[None, :] * 6.0
    # HSV -> RGB with full saturation: each channel is a clipped triangle wave of the hue.
    rgb = np.stack([np.clip(np.abs(((hue + k) % 6.0) - 3.0) - 1.0, 0.0, 1.0) for k in (0.0, 4.0, 2.0)], axis=-1)
    value = 0.35 + 0.65 * t[:, None, None] * 2.0  # brightens downwards in the top half
    chart = np.clip(rgb * value, 0.0, 1.0)
    half = size // 2
    palette = np.asarray(list(SUBJECT_COLOURS.values()), dtype=np.float32)
    cols = np.minimum((t * 5).astype(int), 4)
    chart[half : half + size // 4] = palette[cols][None, :, :]
    chart[half + size // 4 :] = palette[5 + cols][None, :, :]
    ramp = t[None, :, None].repeat(3, axis=2)
    chart[size - max(1, size // 8) :] = ramp
    chart = chart.astype(np.float32)
    chart.setflags(write=False)
    return chart


def light_gain(size: int, direction: str) -> np.ndarray:
    """Brightness ramp (H, W, 1): LIGHT_GAIN_RANGE[0] on the far side, [1] on the side facing the light."""
    dx, dy = LIGHT_VECTORS[direction]
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    proj = t[None, :] * dx + t[:, None] * dy
    ramp = (proj / np.abs(proj).max() + 1.0) / 2.0
    lo, hi = LIGHT_GAIN_RANGE
    return (lo + (hi - lo) * ramp)[..., None].astype(np.float32)


def apply_lighting(image: np.ndarray, direction: str) -> np.ndarray:
    return np.clip(image * light_gain(image.shape[0], direction), 0.0, 1.0)


@lru_cache(maxsize=64)
def light_sphere(size: int, direction: str) -> np.ndarray:
    """Lighting reference: a Lambert-shaded grey sphere lit from ``direction`` on a dark canvas (read-only)."""
    dx, dy = LIGHT_VECTORS[direction]
    light = np.asarray([dx, dy, LIGHT_ELEVATION], dtype=np.float32)
    light /= np.linalg.norm(light)
    t = ((np.arange(size, dtype=np.float32) + 0.5) / size - 0.5) / SPHERE_RADIUS
    u, v = t[None, :], t[:, None]
    r2 = u * u + v * v
    inside = r2 <= 1.0
    nz = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    lambert = np.clip(u * light[0] + v * light[1] + nz * light[2], 0.0, 1.0)
    shade = np.where(inside, SPHERE_AMBIENT + SPHERE_ALBEDO * (1.0 - SPHERE_AMBIENT) * lambert, SPHERE_CANVAS)
    image = np.repeat(shade[..., None], 3, axis=2).astype(np.float32)
    image.setflags(write=False)
    return image


def layout_reference(size: int, boxes: list[Box], colour_names: list[str]) -> np.ndarray:
    """Box outlines on black: box i drawn in BOX_COLOURS[colour_names[i]]."""
    image = np.zeros((size, size, 3), dtype=np.float32)
    line = max(1, LAYOUT_LINE_PER_32PX * size // 32)
    for (x0, y0, x1, y1), name in zip(boxes, colour_names, strict=True):
        rgb = BOX_COLOURS[name]
        image[y0 : y0 + line, x0:x1] = rgb
        image[y1 - line : y1, x0:x1] = rgb
        image[y0:y1, x0 : x0 + line] = rgb
        image[y0:y1, x1 - line : x1] = rgb
    return image
