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

_BINOMIAL = torch.tensor([1.0, 2.0, 1.0]) / 4.0


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")


def opponent_colour(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB in [0,1] -> (B,3,H,W) opponent colour ``M·(rgb) - (0.5, 0, 0)``."""
    _check_images(images)
    opp = torch.einsum("oc,bchw->bohw", OPPONENT_MATRIX.to(images), images)
    return opp - torch.tensor([GREY, 0.0, 0.0], dtype=images.dtype).view(1, 3, 1, 1)


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """Separable [1,2,1]/4 blur per channel with replicate padding; shape preserved."""
    b, c, h, w = x.shape
    k = _BINOMIAL.to(x)
    kernel = (k[:, None] * k[None, :]).expand(c, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)


def _oriented_kernels(distance: int, dtype: torch.dtype) -> torch.Tensor:
    """(4,1,k,k) central-difference kernels ``(x[p+d·u] - x[p-d·u]) / (2d·|u|)`` for the 4 orientations."""
    size = 2 * distance + 1
    kernels = torch.zeros(len(ORIENTATIONS_DEG), 1, size, size, dtype=dtype)
    c = distance
    for i, deg in enumerate(ORIENTATIONS_DEG):
        dy, dx = {0: (0, 1), 45: (-1, 1), 90: (1, 0), 135: (1, 1)}[deg]
        norm = 2 * distance * math.hypot(dx, dy)
        kernels[i, 0, c + dy * distance, c + dx * distance] = 1 / norm
        kernels[i, 0, c - dy * distance, c - dx * distance] = -1 / norm
    return kernels


def oriented_energy(opp: torch.Tensor, distance: int) -> torch.Tensor:
    """(B,3,H,W) opponent colour -> (B,4,H,W): ``Σ_channels |∂_θ channel|`` at one scale."""
    b, c, h, w = opp.shape
    x = opp.reshape(b * c, 1, h, w)
    if distance > 1:
        x = binomial_blur(x)
    kernels = _oriented_kernels(distance, opp.dtype)
    grad = F.conv2d(F.pad(x, (distance,) * 4, mode="replicate"), kernels)
    return grad.abs().reshape(b, c, len(ORIENTATIONS_DEG), h, w).sum(1)


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
