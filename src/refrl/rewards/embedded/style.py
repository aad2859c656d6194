"""``style``: does the image show the style of the style reference? (the CSD role, DyRef's style reward).

A RefWorld style reference shows a fixed exemplar chart, the output a different
scene, so their colour statistics differ whatever the style. The default
(``against="reference"``) therefore reads the *transform* off the reference
(``stylemap.py``: chart -> reference) and asks whether the output's colours are the
scene's colours under that transform:

    palette  E = T({colours of the subject references' foregrounds} ∪ {background
                 reference pixels, or the instructed plain colour}) (x lighting gains
                 when the sample has a lighting reference)
    style    = mean over output pixels y of exp(−min_e ‖y − e‖² / (2σ²))

so a correctly styled output scores ~1, an un-styled or wrongly styled one lower.
When the style reference is not a RefWorld chart (no transform can be read), it
falls back to comparing colour signatures of the output and the reference.

``against="target"`` compares Gram-like colour signatures of the output and the
ground-truth target (channel means, standard deviations and correlations, mean
saturation, luminance histogram): ``exp(−‖sig_out − sig_target‖² / (2σ_sig²))``.
NaN when the sample has no style reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput, nan_scores
from refrl.rewards.cache import DEFAULT_MAX_ENTRIES
from refrl.rewards.embedded.base import EmbeddedReward, has_lighting_reference, style_ref_index
from refrl.rewards.embedded.template import FOREGROUND_THRESHOLD, border_colour

AGAINST = ("reference", "target")
PALETTE_SIGMA = 0.06  # colour distance (RGB, [0, 1]) at which a pixel's match has dropped to exp(-1/2)
SIGNATURE_SIGMA = 0.15
LIGHTING_GAINS = tuple(0.5 + 0.1 * i for i in range(9))  # 0.5 .. 1.3: brightness a light ramp can apply
BACKGROUND_POOL = 2  # background references are 2x2-mean-pooled before their colours join the palette
MAX_PALETTE = 1024
HISTOGRAM_BINS = 8
CORRELATION_EPS = 1e-4


def colour_signature(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 18) Gram-like colour signature.

    Channel means (3) and standard deviations (3), channel correlations r-g, r-b, g-b
    (3), mean saturation ``max − min`` (1), soft luminance histogram (8 bins, sums to 1).
    """
    flat = images.float().flatten(2)
    mean = flat.mean(-1)
    centred = flat - mean[..., None]
    std = centred.pow(2).mean(-1).sqrt()
    cov = torch.einsum("bcn,bdn->bcd", centred, centred) / flat.shape[-1]
    corr = cov / (std[:, :, None] * std[:, None, :] + CORRELATION_EPS)
    pairs = torch.stack([corr[:, 0, 1], corr[:, 0, 2], corr[:, 1, 2]], dim=1)
    saturation = (flat.amax(1) - flat.amin(1)).mean(-1, keepdim=True)
    luma = flat.mean(1)  # (B, N)
    centres = (torch.arange(HISTOGRAM_BINS, dtype=torch.float32) + 0.5) / HISTOGRAM_BINS
    weights = (1 - (luma[..., None] - centres).abs() * HISTOGRAM_BINS).clamp(min=0)  # triangular soft bins
    hist = weights.sum(1) / weights.sum((1, 2))[:, None].clamp(min=1e-8)
    return torch.cat([mean, std, pairs, saturation, hist], dim=1)


def signature_similarity(a: torch.Tensor, b: torch.Tensor, sigma: float = SIGNATURE_SIGMA) -> torch.Tensor:
    """``exp(−‖a − b‖² / (2σ²))`` per row."""
    return torch.exp(-(a - b).pow(2).sum(-1) / (2 * sigma**2))


def palette_match(images: torch.Tensor, palettes: list[torch.Tensor], sigma: float = PALETTE_SIGMA) -> torch.Tensor:
    """(B,) mean over pixels of ``exp(−min_e ‖y − e‖² / (2σ²))`` with e over each image's palette (N_b, 3)."""
    out = []
    for image, palette in zip(images, palettes, strict=True):
        d2 = torch.cdist(image.flatten(1).T, palette).amin(dim=1).pow(2)
        out.append(torch.exp(-d2 / (2 * sigma**2)).mean())
    return torch.stack(out) if out else torch.zeros(0)


def _unique_colours(colours: torch.Tensor) -> torch.Tensor:
    return torch.unique(torch.round(colours.reshape(-1, 3) * 255.0) / 255.0, dim=0)


class StyleReward(EmbeddedReward):
    """Style of the output vs the style reference (or the target); see module docstring."""

    name = "style"

    def __init__(
        self,
        against: str = "reference",
        palette_sigma: float = PALETTE_SIGMA,
        signature_sigma: float = SIGNATURE_SIGMA,
        cache_size: int = DEFAULT_MAX_ENTRIES,
    ):
        super().__init__(cache_size)
        if against not in AGAINST:
            raise ValueError(f"unknown style against={against!r}; allowed: {', '.join(AGAINST)}")
        if palette_sigma <= 0 or signature_sigma <= 0:
            raise ValueError(f"palette_sigma and signature_sigma must be > 0, got {palette_sigma}, {signature_sigma}")
        self.against, self.palette_sigma, self.signature_sigma = against, palette_sigma, signature_sigma

    def palette(self, sample: LoadedSample) -> torch.Tensor | None:
        """The expected colours of the styled scene (see module docstring), or None if no style map."""
        style_map = self.style_map(sample)
        if style_map is None:
            return None
        refs = tuple(i for i, t in enumerate(sample.ref_types) if t in ("subject", "background"))
        refs = refs + (style_ref_index(sample),)

        def build() -> torch.Tensor:
            parts = []
            for _, image in sample.refs_of_type("subject"):
                canvas = border_colour(image)
                fg = (image - canvas.view(3, 1, 1)).abs().amax(0) > FOREGROUND_THRESHOLD
                parts.append(image[:, fg].T)
            background = sample.extra.get("background") or {}
            backgrounds = sample.refs_of_type("background")
            if backgrounds:
                pooled = F.avg_pool2d(backgrounds[0][1][None], BACKGROUND_POOL)[0]
                parts.append(pooled.flatten(1).T)
            elif background.get("color") is not None:
                parts.append(torch.tensor([background["color"]], dtype=torch.float32))
            source = _unique_colours(torch.cat(parts)) if parts else torch.zeros(0, 3)
            if has_lighting_reference(sample):
                gains = torch.tensor(LIGHTING_GAINS).view(-1, 1, 1)
                source = _unique_colours((source[None] * gains).clamp(0, 1))
            if source.shape[0] > MAX_PALETTE:
                source = source[torch.linspace(0, source.shape[0] - 1, MAX_PALETTE).long()]
            return _unique_colours(style_map(source))

        colour = (sample.extra.get("background") or {}).get("color")
        variant = ("palette", tuple(colour) if colour is not None else None, has_lighting_reference(sample))
        return self.cached(sample, refs, variant, build)

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        scores = nan_scores(len(samples))
        method = torch.full((len(samples),), float("nan"))  # 1 palette, 0 signature (for logging)
        rows, palettes, sig_rows, sig_refs = [], [], [], []
        for b, sample in enumerate(samples):
            ref = style_ref_index(sample)
            if ref is None:
                continue
            if self.against == "target":
                if sample.target is None:
                    continue
                sig_rows.append(b)
                sig_refs.append(sample.target)
                continue
            palette = self.palette(sample)
            if palette is not None and palette.shape[0] > 0:
                rows.append(b)
                palettes.append(palette)
            else:
                sig_rows.append(b)
                sig_refs.append(sample.ref_images[ref])
        if rows:
            scores[rows] = palette_match(images[rows], palettes, self.palette_sigma)
            method[rows] = 1.0
        if sig_rows:
            refs = torch.stack([r.float() for r in sig_refs])
            scores[sig_rows] = signature_similarity(
                colour_signature(images[sig_rows]), colour_signature(refs), self.signature_sigma
            )
            method[sig_rows] = 0.0
        return RewardOutput(scores, {"palette_method": method})
