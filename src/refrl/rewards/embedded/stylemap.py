"""Read a RefWorld style reference as a colour transform, so rewards can compare styled pixels.

A RefWorld style reference is one fixed exemplar (``refworld.effects.style_chart``:
a hue x brightness sweep, the subject palette and a grey ramp) with the style's
colour transform applied. Comparing the reference pixel by pixel with the
un-styled chart recovers the transform from the reference's pixels alone (never
from the style's name), the way a style encoder (CSD) knows what a style does.
Two base models are fitted on the chart and the one with the lower residual is kept:

* ``affine``: ``B(c) = A·[c, 1]``, least squares (warm, cool, grayscale, invert,
  sepia, channel swap; exact up to clipping);
* ``curves``: ``B(c)_o = f_o(c_o)``, one piecewise-constant curve per channel
  (``CURVE_BINS`` bins, each the mean reference value of its chart pixels):
  per-channel transforms that are not affine (posterize, clipped gains).

Then ``T(c) = B(c) + Σ_k w_k·(S_k − B(C_k))`` adds the residual of the ``k`` chart
colours ``C_k`` nearest to ``c`` (reference colours ``S_k``, inverse-distance weights),
which makes T exact on every chart colour.

Rewards use T to render the un-styled reference side (subject crops, background
references, palettes) in the reference's style before comparing pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from refrl.errors import RefrlError

NEAREST_CHART_COLOURS = 4  # k in the residual correction
INVERSE_DISTANCE_EPS = 1e-3
CURVE_BINS = 64
BASE_MODELS = ("affine", "curves")


def exemplar_chart(size: int) -> torch.Tensor:
    """The un-styled RefWorld style exemplar as (3, size, size) float32 in [0, 1]."""
    from refrl.data.refworld.effects import style_chart

    chart = torch.from_numpy(style_chart(size).copy()).permute(2, 0, 1)
    # RefWorld quantises every image to 1/255 steps; do the same so the fit is exact.
    return torch.round(chart.clamp(0, 1) * 255.0) / 255.0


def _curve_bins(colours: torch.Tensor) -> torch.Tensor:
    return (colours.clamp(0, 1) * CURVE_BINS).long().clamp(max=CURVE_BINS - 1)


@dataclass
class StyleMap:
    """A colour transform T fitted from a style reference (see module docstring)."""

    base: str  # "affine" | "curves"
    affine: torch.Tensor  # (4, 3): B(c) = [c, 1] @ affine (used when base == "affine")
    curves: torch.Tensor  # (3, CURVE_BINS): B(c)_o = curves[o, bin(c_o)] (when base == "curves")
    chart_colours: torch.Tensor  # (N, 3) distinct un-styled chart colours C
    residuals: torch.Tensor  # (N, 3) S - B(C)
    base_rmse: float  # RMSE of the base model alone over the chart

    def base_map(self, flat: torch.Tensor) -> torch.Tensor:
        if self.base == "affine":
            return torch.cat([flat, torch.ones(flat.shape[0], 1)], dim=1) @ self.affine
        return torch.gather(self.curves.T, 0, _curve_bins(flat))

    def __call__(self, colours: torch.Tensor) -> torch.Tensor:
        """Apply T to colours (..., 3) in [0, 1]; returns the same shape, clipped to [0, 1]."""
        flat = colours.reshape(-1, 3).float()
        near, idx = torch.cdist(flat, self.chart_colours).topk(
            min(NEAREST_CHART_COLOURS, self.chart_colours.shape[0]), dim=1, largest=False
        )
        weights = 1.0 / (near + INVERSE_DISTANCE_EPS)
        weights = weights / weights.sum(dim=1, keepdim=True)
        out = self.base_map(flat) + (weights[..., None] * self.residuals[idx]).sum(dim=1)
        return out.clamp(0.0, 1.0).reshape(colours.shape)

    def apply_image(self, image: torch.Tensor) -> torch.Tensor:
        """Apply T to a (3, H, W) image."""
        return self(image.permute(1, 2, 0)).permute(2, 0, 1).contiguous()


def _fit_curves(chart: torch.Tensor, styled: torch.Tensor) -> torch.Tensor:
    """(3, CURVE_BINS) bin means of each styled channel given the same chart channel.

    Bins no chart pixel falls in are linearly interpolated from the filled ones.
    """
    bins = _curve_bins(chart)
    centres = ((torch.arange(CURVE_BINS) + 0.5) / CURVE_BINS).numpy()
    curves = torch.zeros(3, CURVE_BINS)
    for o in range(3):
        sums = torch.zeros(CURVE_BINS).index_add_(0, bins[:, o], styled[:, o])
        counts = torch.zeros(CURVE_BINS).index_add_(0, bins[:, o], torch.ones(bins.shape[0]))
        filled = (counts > 0).numpy()
        means = (sums / counts.clamp(min=1)).numpy()
        curves[o] = torch.from_numpy(np.interp(centres, centres[filled], means[filled])).float()
    return curves


def fit_style_map(style_reference: torch.Tensor) -> StyleMap:
    """Fit T from a (3, H, W) style reference showing the RefWorld exemplar chart (H == W)."""
    shape = tuple(style_reference.shape)
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise RefrlError(
            f"a style reference must be a square (3, H, H) image of the RefWorld exemplar chart; got shape {shape}"
        )
    chart = exemplar_chart(shape[-1]).reshape(3, -1).T
    styled = style_reference.float().reshape(3, -1).T
    affine = torch.linalg.lstsq(torch.cat([chart, torch.ones(chart.shape[0], 1)], dim=1), styled).solution
    curves = _fit_curves(chart, styled)
    colours, inverse = torch.unique(chart, dim=0, return_inverse=True)
    counts = torch.zeros(colours.shape[0]).index_add_(0, inverse, torch.ones(inverse.shape[0]))
    best: StyleMap | None = None
    for base in BASE_MODELS:
        candidate = StyleMap(base, affine, curves, colours, torch.zeros(colours.shape[0], 3), 0.0)
        residual = styled - candidate.base_map(chart)
        candidate.base_rmse = float(residual.pow(2).mean().sqrt())
        # One residual per distinct chart colour: the mean over its pixels.
        candidate.residuals = torch.zeros(colours.shape[0], 3).index_add_(0, inverse, residual) / counts[:, None]
        if best is None or candidate.base_rmse < best.base_rmse:
            best = candidate
    assert best is not None
    return best
