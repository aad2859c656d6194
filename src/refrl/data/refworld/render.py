"""Drawing subjects: shape masks and fill patterns on coordinate grids (pure numpy).

Images are float32 arrays (H, W, 3) in [0, 1]. A subject is drawn inside a
square box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) in box-local coordinates
``u, v`` in [-1, 1] (u right, v down, sampled at pixel centres), so shapes and
patterns scale with the box: the same identity looks the same at every size.
Masks are hard (no anti-aliasing) so the ground-truth masks are exact.
"""

from __future__ import annotations

import numpy as np

from refrl.data.refworld.identities import COLOUR_NAMES, PATTERNS, SHAPES, decode_identity
from refrl.data.refworld.vocab import SUBJECT_COLOURS

Box = tuple[int, int, int, int]

# Shape proportions, in units of the box half-side.
SQUARE_HALF = 0.9
RING_INNER = 0.45
CROSS_ARM = 0.34
CROSS_HALF = 0.95
STAR_INNER = 0.45
STAR_POINTS = 5
TRIANGLE_TOP, TRIANGLE_BOTTOM, TRIANGLE_HALF_BASE = -0.95, 0.85, 0.95
HEXAGON_RADIUS = 1.0
# Pattern scales, in the same units: 4 stripe periods / 4x4 checks / 3x3 dots per box.
STRIPE_PERIOD = 0.5
CHECK_SIDE = 0.5
DOT_PITCH = 2.0 / 3.0
DOT_RADIUS = 0.22

_PALETTE = np.asarray([SUBJECT_COLOURS[name] for name in COLOUR_NAMES], dtype=np.float32)


def box_coords(box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Box-local pixel-centre coordinates: u (1, w) and v (h, 1), both spanning [-1, 1]."""
    x0, y0, x1, y1 = box
    half_w, half_h = (x1 - x0) / 2.0, (y1 - y0) / 2.0
    u = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - x0) / half_w - 1.0)[None, :]
    v = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - y0) / half_h - 1.0)[:, None]
    return u, v


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in box-local coordinates (broadcast of u and v)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= SQUARE_HALF) & (av <= SQUARE_HALF)
    if shape == "triangle":
        # Apex up: the half-width grows linearly from 0 at the top to the half-base at the bottom.
        frac = (v - TRIANGLE_TOP) / (TRIANGLE_BOTTOM - TRIANGLE_TOP)
        return (v >= TRIANGLE_TOP) & (v <= TRIANGLE_BOTTOM) & (au <= frac * TRIANGLE_HALF_BASE)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= RING_INNER**2)
    if shape == "cross":
        return ((au <= CROSS_ARM) & (av <= CROSS_HALF)) | ((av <= CROSS_ARM) & (au <= CROSS_HALF))
    if shape == "star":
        # Radius limit goes linearly from STAR_INNER (between points) to 1 (at a point); a point faces up.
        theta = np.arctan2(u, -v)
        phase = np.mod(theta * STAR_POINTS / (2 * np.pi), 1.0)
        limit = STAR_INNER + (1.0 - STAR_INNER) * np.abs(phase - 0.5) * 2.0
        return np.sqrt(u * u + v * v) <= limit
    if shape == "hexagon":
        # Flat top and bottom, corners left and right: |v| <= sqrt(3)/2 R and sqrt(3)/2|u| + |v|/2 <= sqrt(3)/2 R.
        apothem = np.sqrt(3.0) / 2.0 * HEXAGON_RADIUS
        return (av <= apothem) & (np.sqrt(3.0) / 2.0 * au + 0.5 * av <= apothem)
    raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where a fill pattern takes the secondary colour (True) in box-local coordinates."""
    if pattern == "solid":
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    if pattern == "stripes_h":
        return np.broadcast_to(np.floor((v + 1.0) * 2.0 / STRIPE_PERIOD) % 2 == 1, (v.shape[0], u.shape[1]))
    if pattern == "stripes_v":
        return np.broadcast_to(np.floor((u + 1.0) * 2.0 / STRIPE_PERIOD) % 2 == 1, (v.shape[0], u.shape[1]))
    if pattern == "stripes_d":
        return np.floor((u + v + 2.0) * 2.0 / (STRIPE_PERIOD * np.sqrt(2.0))) % 2 == 1
    if pattern == "checker":
        return (np.floor((u + 1.0) / CHECK_SIDE) + np.floor((v + 1.0) / CHECK_SIDE)) % 2 == 1
    if pattern == "dots":
        du = np.mod(u + 1.0, DOT_PITCH) - DOT_PITCH / 2.0
        dv = np.mod(v + 1.0, DOT_PITCH) - DOT_PITCH / 2.0
        return du * du + dv * dv <= DOT_RADIUS**2
    raise ValueError(f"unknown pattern {pattern!r}; allowed: {', '.join(PATTERNS)}")


def paint_subject(canvas: np.ndarray, identity: int, box: Box, flatten: bool = False) -> np.ndarray:
    """Draw subject ``identity`` into ``canvas`` (H, W, 3) in place inside ``box``.

    ``flatten`` replaces the fill pattern by its mean colour over the shape (the
    OmniRefiner-style "lost detail" of a draft). Returns the subject's full-canvas
    boolean mask (H, W).
    """
    ident = decode_identity(identity)
    x0, y0, x1, y1 = box
    u, v = box_coords(box)
    inside = shape_mask(SHAPES[ident.shape], u, v)
    secondary = pattern_mask(PATTERNS[ident.pattern], u, v) & inside
    primary_rgb, secondary_rgb = _PALETTE[ident.primary], _PALETTE[ident.secondary]
    region = canvas[y0:y1, x0:x1]
    if flatten:
        frac = secondary.sum() / max(int(inside.sum()), 1)
        region[inside] = (1.0 - frac) * primary_rgb + frac * secondary_rgb
    else:
        region[inside] = primary_rgb
        region[secondary] = secondary_rgb
    full = np.zeros(canvas.shape[:2], dtype=bool)
    full[y0:y1, x0:x1] = inside
    return full


def subject_colours(identity: int) -> tuple[np.ndarray, np.ndarray]:
    """Primary and secondary RGB of an identity (equal for solid fills)."""
    ident = decode_identity(identity)
    return _PALETTE[ident.primary].copy(), _PALETTE[ident.secondary].copy()
