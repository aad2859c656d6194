"""``background``: is the background the one asked for? (OmniRef-Bench's background metric role).

Compares the output's pixels outside every instructed subject box (grown by
``dilate`` px, so subject edges and the comparison blur stay out) with a
prediction of the background there:

* the background reference's pixels (texture / photo), or for RefWorld ``refine``
  the draft's (the draft keeps the true background away from the subject), or the
  instructed plain colour (``extra["background"]["color"]``) when there is no image;
* rendered in the sample's style when it has a style reference (``stylemap.py``);
* times a brightness ramp ``g(x, y) = a + b·x + c·y`` fitted to the output by least
  squares when the sample has a lighting reference (the reference shows a light
  direction; the ramp it implies is read from the output itself, not from a name).

Both images get a 3x3 binomial blur (a one-pixel shift of a texture is not an error), then

    background = exp(−MSE / τ)      MSE over the compared pixels and channels

NaN when there is no background to compare with (no reference, draft or plain
colour, or a background image of another size than the output) or no pixel
outside the boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput, nan_scores
from refrl.rewards.cache import DEFAULT_MAX_ENTRIES
from refrl.rewards.embedded.base import EmbeddedReward, has_lighting_reference, style_ref_index
from refrl.rewards.embedded.features import binomial_blur
from refrl.rewards.embedded.stylemap import StyleMap

TAU = 0.01  # MSE at which the score is exp(-1): an RMSE of 0.1
DILATE_PX = 2  # 1 px beyond the subject box + the blur's radius
GAIN_RANGE = (0.3, 1.6)  # a fitted light ramp is clipped to this
RIDGE = 1e-6


def background_region(boxes: list[list[float]], size: int, dilate: int = DILATE_PX) -> torch.Tensor:
    """(H, W) bool: pixels outside every box (x0, y0, x1, y1, x1/y1 exclusive) grown by ``dilate`` px."""
    region = torch.ones(size, size, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        region[max(int(y0) - dilate, 0) : int(y1) + dilate, max(int(x0) - dilate, 0) : int(x1) + dilate] = False
    return region


def fit_light_ramp(output: torch.Tensor, base: torch.Tensor, offset: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(H, W) ramp g = a + b·x + c·y minimising Σ_region ‖output − offset − g·base‖² (x, y in [0, 1]).

    ``base``/``offset`` (3, H, W): the affine part of the style, ``T(g·r) ≈ g·M·r + t``.
    """
    _, h, w = output.shape
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    basis = torch.stack([torch.ones(h, w), xs, ys])  # (3, H, W)
    design = (basis[:, None] * base[None])[:, :, region].reshape(3, -1).T  # (3·N, 3 params)
    target = (output - offset)[:, region].reshape(-1)
    # float64 normal equations: reproducible bit for bit, unlike float32 LAPACK least squares.
    design, target = design.double(), target.double()
    normal = design.T @ design + RIDGE * torch.eye(3, dtype=torch.float64)  # a black background has no gain to fit
    coef = torch.linalg.solve(normal, design.T @ target).float()
    return (coef.view(3, 1, 1) * basis).sum(0).clamp(*GAIN_RANGE)


class BackgroundReward(EmbeddedReward):
    """Output background vs the predicted background (see module docstring)."""

    name = "background"

    def __init__(
        self, tau: float = TAU, dilate: int = DILATE_PX, blur: bool = True, cache_size: int = DEFAULT_MAX_ENTRIES
    ):
        super().__init__(cache_size)
        if tau <= 0 or dilate < 0:
            raise ValueError(f"background needs tau > 0 and dilate >= 0, got tau={tau}, dilate={dilate}")
        self.tau, self.dilate, self.blur = tau, dilate, blur

    def source(self, sample: LoadedSample, size: int) -> tuple[int | None, torch.Tensor] | None:
        """(reference index or None, (3, size, size) un-styled background), or None if nothing to compare with."""
        background = sample.extra.get("background") or {}
        ref = background.get("ref")
        if ref is None and sample.extra.get("draft_ref") is not None:
            ref = sample.extra["draft_ref"]
        if ref is None:
            refs = sample.refs_of_type("background")
            ref = refs[0][0] if refs else None
        if ref is not None:
            image = sample.ref_images[int(ref)].float()
            return (int(ref), image) if image.shape[-2:] == (size, size) else None
        if background.get("color") is not None:
            colour = torch.tensor(background["color"], dtype=torch.float32).view(3, 1, 1)
            return None, colour.expand(3, size, size)
        return None

    def predicted(self, sample: LoadedSample, size: int) -> tuple[torch.Tensor, StyleMap | None] | None:
        """The background rendered in the sample's style (cached per reference), and the style map."""
        found = self.source(sample, size)
        if found is None:
            return None
        ref, image = found
        style_map = self.style_map(sample)
        if style_map is None:
            return image, None
        key_refs = tuple(r for r in (ref, style_ref_index(sample)) if r is not None)
        colour = None if ref is not None else tuple(image[:, 0, 0].tolist())
        styled = self.cached(sample, key_refs, ("styled_background", size, colour), lambda: style_map.apply_image(image))
        return styled, style_map

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        n, _, h, w = images.shape
        if h != w:
            raise ValueError(f"reward {self.name!r} needs square images, got {h}x{w}")
        scores, mse_out = nan_scores(n), nan_scores(n)
        out_blur = binomial_blur(images) if self.blur else images
        for b, sample in enumerate(samples):
            got = self.predicted(sample, h)
            if got is None:
                continue
            prediction, style_map = got
            boxes = [s["box"] for s in sample.extra.get("subjects") or [] if s.get("box") is not None]
            region = background_region(boxes, h, self.dilate)
            if not bool(region.any()):
                continue
            if has_lighting_reference(sample):
                unstyled = self.source(sample, h)[1]
                prediction = lit_prediction(images[b], unstyled, style_map, region)
            if self.blur:
                prediction = binomial_blur(prediction[None])[0]
            mse = (out_blur[b][:, region] - prediction[:, region]).pow(2).mean()
            mse_out[b] = mse
            scores[b] = torch.exp(-mse / self.tau)
        return RewardOutput(scores, {"background_mse": mse_out})


def lit_prediction(
    output: torch.Tensor, unstyled: torch.Tensor, style_map: StyleMap | None, region: torch.Tensor
) -> torch.Tensor:
    """``T(g·background)`` with the ramp g read from the output (RefWorld lights a scene, then styles it).

    The ramp is fitted through the style's affine part ``T(g·r) ≈ g·M·r + t``; the full T renders the result.
    """
    if style_map is None:
        gain = fit_light_ramp(output, unstyled, torch.zeros_like(unstyled), region)
        return (unstyled * gain).clamp(0, 1)
    matrix, shift = style_map.affine[:3], style_map.affine[3]
    base = torch.einsum("chw,cd->dhw", unstyled, matrix)
    gain = fit_light_ramp(output, base, shift.view(3, 1, 1).expand_as(base), region)
    return style_map.apply_image((unstyled * gain).clamp(0, 1))
