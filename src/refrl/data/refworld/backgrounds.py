"""Backgrounds: plain colours, procedural textures and crops of scikit-image's bundled photos.

Photos come from ``skimage.data`` images that ship inside the scikit-image wheel
(no download). Each is loaded once, resized so its short side is
``PHOTO_SHORT_SIDE_FACTOR`` x the canvas, and cropped at a random offset (and
random mirror) per sample. A photo that fails to load is skipped; if none
loads, photo backgrounds fall back to textures.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from refrl.data.refworld.vocab import BACKGROUND_COLOURS

# Bundled with scikit-image (checked offline with 0.26): colour photos, then grey ones.
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "brick", "grass", "gravel",
)  # fmt: skip
TEXTURE_NAMES: tuple[str, ...] = ("gradient", "stripes", "noise")
# A crop covers 1/PHOTO_SHORT_SIDE_FACTOR of the photo's short side: recognisable, yet varied.
PHOTO_SHORT_SIDE_FACTOR = 2.5
# Value noise: a coarse random grid of this many cells per side, bilinearly upsampled.
NOISE_GRID_RANGE = (3, 6)
NOISE_VALUE_RANGE = (0.05, 0.5)  # mostly darker than the subjects
STRIPE_PERIOD_RANGE = (1 / 8, 1 / 3)  # fraction of the canvas side

_BG_PALETTE = np.asarray(list(BACKGROUND_COLOURS.values()), dtype=np.float32)


@dataclass
class Background:
    """A full-canvas background image and how it was made (for the ground truth)."""

    image: np.ndarray  # (H, W, 3) float32
    kind: str  # "plain" | "texture" | "photo"
    name: str  # colour name, texture name or photo name
    color: tuple[float, float, float] | None = None


def plain_background(size: int, name: str) -> Background:
    rgb = BACKGROUND_COLOURS[name]
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = rgb
    return Background(image, "plain", name, tuple(float(c) for c in rgb))


@lru_cache(maxsize=8)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: x (1, W), y (H, 1)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return t[None, :], t[:, None]


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    i, j = rng.choice(len(_BG_PALETTE), size=2, replace=False)
    return _BG_PALETTE[i], _BG_PALETTE[j]


@lru_cache(maxsize=32)
def _bilinear_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) interpolation weights: row y holds the bilinear weights of pixel y on the grid."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - lo
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), lo] = 1.0 - frac
    weights[np.arange(size), lo + 1] = frac
    return weights


def texture_background(size: int, name: str, rng: np.random.Generator) -> Background:
    """A procedural texture: ``gradient`` / ``stripes`` between two background colours, or value ``noise``."""
    x, y = _unit_grid(size)
    if name in ("gradient", "stripes"):
        c0, c1 = _two_colours(rng)
        angle = rng.uniform(0.0, 2 * np.pi)
        proj = (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)
        if name == "gradient":
            t = (proj / np.abs(proj).max() + 1.0) / 2.0
        else:
            period = rng.uniform(*STRIPE_PERIOD_RANGE)
            t = (np.floor(proj / (period / 2.0)) % 2).astype(np.float32)
        image = c0 + (c1 - c0) * t[..., None]
    elif name == "noise":
        grid = int(rng.integers(NOISE_GRID_RANGE[0], NOISE_GRID_RANGE[1] + 1))
        lo, hi = NOISE_VALUE_RANGE
        values = (lo + (hi - lo) * rng.random((grid, grid, 3))).astype(np.float32)
        weights = _bilinear_matrix(size, grid)
        image = np.einsum("yi,ijc,xj->yxc", weights, values, weights)
    else:
        raise ValueError(f"unknown texture {name!r}; allowed: {', '.join(TEXTURE_NAMES)}")
    return Background(np.ascontiguousarray(image, dtype=np.float32), "texture", name)


def _load_photo(name: str) -> np.ndarray | None:
    """A bundled skimage photo as uint8 (H, W, 3), or None if it cannot be loaded offline."""
    import skimage.data

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = np.asarray(getattr(skimage.data, name)())
    except Exception:  # noqa: BLE001 - any failure (missing file, no network) means "skip this photo"
        return None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].astype(np.uint8)


@lru_cache(maxsize=4)
def photo_library(size: int) -> dict[str, np.ndarray]:
    """Loadable photos, resized so the short side is PHOTO_SHORT_SIDE_FACTOR x ``size`` (float32)."""
    from PIL import Image

    library = {}
    for name in PHOTO_NAMES:
        image = _load_photo(name)
        if image is None:
            continue
        h, w = image.shape[:2]
        scale = PHOTO_SHORT_SIDE_FACTOR * size / min(h, w)
        new_size = (max(size, round(w * scale)), max(size, round(h * scale)))
        resized = Image.fromarray(image).resize(new_size, Image.Resampling.BOX)
        library[name] = np.asarray(resized, dtype=np.float32) / 255.0
    return library


def photo_background(size: int, rng: np.random.Generator) -> Background:
    """A random ``size`` x ``size`` crop (randomly mirrored) of a bundled photo; a texture if none loads."""
    library = photo_library(size)
    if not library:
        return texture_background(size, TEXTURE_NAMES[int(rng.integers(len(TEXTURE_NAMES)))], rng)
    names = sorted(library)
    name = names[int(rng.integers(len(names)))]
    photo = library[name]
    top = int(rng.integers(photo.shape[0] - size + 1))
    left = int(rng.integers(photo.shape[1] - size + 1))
    crop = photo[top : top + size, left : left + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return Background(np.ascontiguousarray(crop), "photo", name)
