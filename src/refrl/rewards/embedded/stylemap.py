"""Read a RefWorld style reference as a colour transform, so rewards can compare styled pixels.

A RefWorld style reference is one fixed exemplar (``refworld.effects.style_chart``:
a hue x brightness sweep, the subject palette and a grey ramp) with the style's
colour transform applied. Comparing the reference pixel by pixel with the
un-styled chart recovers the transform from the reference's pixels alone (never
from the style's name), the way a style encoder (CSD) knows what a style does.
Two base models are fitted on the chart and the one with the lower residual is kept:

* ``affine``: ``B(c) = A·[c, 1]``, least squares (warm, cool, grayscale, invert,
  sepia, channel swap; exact up to clipping);
* ``curves``: ``B(c)_o = f_o(c_o)``, one curve per channel: ``f_o(v)`` is the median
  reference value of the chart pixels whose channel o has the chart value nearest
  to v: per-channel transforms that are not affine (posterize, clipped gains).

Then ``T(c) = B(c) + Σ_k w_k·(S_k − B(C_k))`` adds the residual of the ``k`` chart
colours ``C_k`` nearest to ``c`` (reference colours ``S_k``, inverse-distance weights),
which makes T exact on every chart colour.

Rewards use T to render the un-styled reference side (subject crops, background
references, palettes) in the reference's style before comparing pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refrl.errors import RefrlError

NEAREST_CHART_COLOURS = 4  # k in the residual correction
INVERSE_DISTANCE_EPS = 1e-3
BASE_MODELS = ("affine", "curves")


def exemplar_chart(size: int) -> torch.Tensor:
    """The un-styled RefWorld style exemplar as (3, size, size) float32 in [0, 1].

    Not quantised: RefWorld styles the exact chart and quantises the result to 1/255,
    so the exact values locate a transform's thresholds (posterize) best.
    """
    from refrl.data.refworld.effects import style_chart

    return torch.from_numpy(style_chart(size).copy()).permute(2, 0, 1).clamp(0, 1)


@dataclass
class StyleMap:
    """A colour transform T fitted from a style reference (see module docstring)."""

    base: str  # "affine" | "curves"
    affine: torch.Tensor  # (4, 3): B(c) = [c, 1] @ affine (used when base == "affine")
    curve_x: list[torch.Tensor]  # per channel: the distinct chart values (sorted)
    curve_y: list[torch.Tensor]  # per channel: the median reference value at each of them
    chart_colours: torch.Tensor  # (N, 3) distinct un-styled chart colours C
    residuals: torch.Tensor  # (N, 3) S - B(C)
    base_rmse: float  # RMSE of the base model alone over the chart

    def base_map(self, flat: torch.Tensor) -> torch.Tensor:
        if self.base == "affine":
            return torch.cat([flat, torch.ones(flat.shape[0], 1)], dim=1) @ self.affine
        return torch.stack([_nearest_lookup(self.curve_x[o], self.curve_y[o], flat[:, o]) for o in range(3)], dim=1)

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


def _nearest_lookup(xs: torch.Tensor, ys: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ys at the entry of sorted ``xs`` nearest to each value of ``v``."""
    right = torch.searchsorted(xs, v.contiguous()).clamp(max=xs.shape[0] - 1)
    left = (right - 1).clamp(min=0)
    pick = torch.where((v - xs[left]).abs() <= (xs[right] - v).abs(), left, right)
    return ys[pick]


def _fit_curves(chart: torch.Tensor, styled: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per channel o: distinct chart values and the median styled value of the pixels holding each."""
    xs, ys = [], []
    for o in range(3):
        values, inverse = torch.unique(chart[:, o], return_inverse=True)
        # Sort by (group, styled value); the median of a group is its middle element.
        order = torch.argsort(inverse.double() * 4.0 + styled[:, o].double())
        counts = torch.bincount(inverse, minlength=values.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        xs.append(values)
        ys.append(styled[order, o][starts + (counts - 1) // 2])
    return xs, ys


def fit_style_map(style_reference: torch.Tensor) -> StyleMap:
    """Fit T from a (3, H, W) style reference showing the RefWorld exemplar chart (H == W)."""
    shape = tuple(style_reference.shape)
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise RefrlError(
            f"a style reference must be a square (3, H, H) image of the RefWorld exemplar chart; got shape {shape}"
        )
    chart = exemplar_chart(shape[-1]).reshape(3, -1).T
    styled = style_reference.float().reshape(3, -1).T
    # float64 normal equations: LAPACK's float32 least squares is not bitwise reproducible
    # across calls, and a reward must be (exact resume replays rewards).
    design = torch.cat([chart, torch.ones(chart.shape[0], 1)], dim=1).double()
    affine = torch.linalg.solve(design.T @ design, design.T @ styled.double()).float()
    curve_x, curve_y = _fit_curves(chart, styled)
    colours, inverse = torch.unique(chart, dim=0, return_inverse=True)
    counts = torch.zeros(colours.shape[0]).index_add_(0, inverse, torch.ones(inverse.shape[0]))
    best: StyleMap | None = None
    for base in BASE_MODELS:
        candidate = StyleMap(base, affine, curve_x, curve_y, colours, torch.zeros(colours.shape[0], 3), 0.0)
        residual = styled - candidate.base_map(chart)
        candidate.base_rmse = float(residual.pow(2).mean().sqrt())
        # One residual per distinct chart colour: the mean over its pixels.
        candidate.residuals = torch.zeros(colours.shape[0], 3).index_add_(0, inverse, residual) / counts[:, None]
        if best is None or candidate.base_rmse < best.base_rmse:
            best = candidate
    assert best is not None
    return best
