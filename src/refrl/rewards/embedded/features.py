"""A fixed, handcrafted local feature space for the embedded (RefWorld) rewards.

It plays the part a frozen vision encoder (DINO, SigLIP, DreamSim) plays for real
images: every pixel gets an 11-dimensional descriptor, deterministic and with no
training. Channels, in order:

* 3 **colour** channels: opponent colour of the pixel centred on the neutral grey
  canvas, ``L = (R+G+B)/3 - 0.5``, ``O1 = (R-G)/sqrt 2``, ``O2 = (R+G-2B)/sqrt 6``
  (so a 0.5-grey pixel is the zero vector);
* 8 **structure** channels: oriented gradient energies at 0°, 45°, 90°, 135°, at two
  scales (central differences at distance 1, and at distance 2 after a binomial
  blur), summed over the three opponent channels (so an edge between two colours
  of equal luminance still counts), then pooled by a 3×3 binomial blur so that a
  one-pixel shift changes the descriptor little.

Energies are absolute values, so the structure channels do not change sign when
an edge's polarity flips (a subject on a dark vs a light background; an inverted
palette): they describe *shape and pattern*, the colour channels *appearance*.

``feature_tokens`` average-pools the map into patch tokens, the analogue of a ViT's
token grid (DyRef's fidelity reward flattens all SigLIP tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GREY = 0.5  # the neutral canvas of RefWorld's subject references
OPPONENT_MATRIX = torch.tensor(
    [
        [1 / 3, 1 / 3, 1 / 3],
        [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
        [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)],
    ]
)
ORIENTATIONS_DEG = (0, 45, 90, 135)
DERIVATIVE_DISTANCES = (1, 2)  # the two scales
N_COLOUR = 3
N_STRUCTURE = len(ORIENTATIONS_DEG) * len(DERIVATIVE_DISTANCES)
N_CHANNELS = N_COLOUR + N_STRUCTURE
COLOUR = slice(0, N_COLOUR)
STRUCTURE = slice(N_COLOUR, N_CHANNELS)

def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")


def opponent_colour(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> (B,3,H,W) opponent colour ``M·(rgb) - (0.5, 0, 0)``."""
    _check_images(images)
    opp = torch.einsum("oc,bchw->bohw", OPPONENT_MATRIX.to(images), images)
    return opp - torch.tensor([GREY, 0.0, 0.0], dtype=images.dtype).view(1, 3, 1, 1)


def replicate_pad(x: torch.Tensor, d: int) -> torch.Tensor:
    """Pad the last two dims of (..., H, W) by ``d`` copies of the edge (faster than F.pad's replicate mode)."""
    rows = (*x.shape[:-2], d, x.shape[-1])
    x = torch.cat([x[..., :1, :].expand(rows), x, x[..., -1:, :].expand(rows)], dim=-2)
    cols = (*x.shape[:-1], d)
    return torch.cat([x[..., :1].expand(cols), x, x[..., -1:].expand(cols)], dim=-1)


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """Separable [1,2,1]/4 blur per channel of (..., H, W) with replicate padding; shape preserved.

    Written with shifted slices rather than a depthwise convolution: several times faster on CPU.
    """
    p = replicate_pad(x, 1)
    rows = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
    return (rows[..., :-2] + 2 * rows[..., 1:-1] + rows[..., 2:]) / 16.0


# Unit steps (dy, dx) of the four orientations, in image coordinates (y down).
_STEPS = {0: (0, 1), 45: (-1, 1), 90: (1, 0), 135: (1, 1)}


def oriented_energy(opp: torch.Tensor, distance: int) -> torch.Tensor:
    """(B,3,H,W) opponent colour -> (B,4,H,W): ``Σ_channels |x[p+d·u] − x[p−d·u]| / (2d·|u|)`` per orientation u.

    At ``distance`` > 1 the channels are binomial-blurred first (the coarser scale).
    """
    x = binomial_blur(opp) if distance > 1 else opp
    h, w = x.shape[-2:]
    d = distance
    p = replicate_pad(x, d)
    energies = []
    for deg in ORIENTATIONS_DEG:
        dy, dx = _STEPS[deg]
        ahead = p[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w]
        behind = p[..., d - dy * d : d - dy * d + h, d - dx * d : d - dx * d + w]
        norm = 2 * d * math.hypot(dx, dy)
        energies.append(((ahead - behind).abs() / norm).sum(1))
    return torch.stack(energies, dim=1)


def local_features(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> (B, N_CHANNELS, H, W) local descriptors (see module docstring)."""
    opp = opponent_colour(images.float())
    energies = torch.cat([oriented_energy(opp, d) for d in DERIVATIVE_DISTANCES], dim=1)
    return torch.cat([opp, binomial_blur(energies)], dim=1)


def feature_tokens(features: torch.Tensor, patch: int) -> torch.Tensor:
    """(B,C,H,W) feature map -> (B, (H/patch)·(W/patch), C) mean-pooled patch tokens."""
    b, c, h, w = features.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch={patch} must be >= 1 and divide the feature map size {h}x{w}")
    pooled = F.avg_pool2d(features, patch)
    return pooled.flatten(2).transpose(1, 2)
