"""Find a reference subject in a generated image: template matching in the feature space.

The reference subject is cut out by its foreground (pixels that differ from the
canvas colour: RefWorld's neutral 0.5 grey for subject references), resized so its
longest side takes each candidate size ``s`` (``n_sizes`` sizes spanning
``size_range`` x the canvas, geometric steps), and slid over the image at stride 1.
A window is the ``s x s`` square around the subject plus ``margin`` on each side.

Similarity of a window X with a template T (both ``features.local_features``):

    ncc    = <X_s − mean X_s, T_s − mean T_s> / sqrt(max(‖X_s − mean X_s‖², floor·‖T_s − mean T_s‖²) · ‖T_s − mean T_s‖²)
    colour = exp(−½ (‖χ(μ_X) − χ(μ_T)‖² / σ_χ² + (ℓ(μ_X) − ℓ(μ_T))² / σ_ℓ²))
    sim    = max(ncc, 0) · (1 − w_colour + w_colour · colour)

``X_s``/``T_s`` are the structure channels (oriented gradient energies; per-channel
means removed), ``μ`` the mean RGB under the template's foreground mask, ``χ`` the
chromaticity ``rgb / (r + g + b + ε)`` and ``ℓ`` the luminance. The structure term is
shape and pattern, independent of the background behind the subject; the contrast
``floor`` means a window must hold at least ``floor`` of the template's structure
energy to score high, so plain background never wins over a foreground object;
the colour term compares chromaticity tightly and luminance loosely (lighting
changes brightness, not hue). All windows of all sizes are scored with one grouped
convolution per size (one group per query).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from refrl.rewards.embedded.features import STRUCTURE, local_features
from refrl.rewards.embedded.stylemap import StyleMap

SIZE_RANGE = (0.18, 0.5)  # subject's longest side / canvas: RefWorld uses 0.25 (small) .. 0.44 (large)
N_SIZES = 14  # geometric steps of about 8 %: 6..16 px at 32, one candidate per pixel
WINDOW_MARGIN = 1 / 16  # of the canvas, each side: the subject's outline edges lie just outside its box
CONTEXT_PX = 4  # reach of a feature: derivative at distance 2, blur, pooling
SUPERSAMPLE = 4  # antialiasing when a template is resampled
FOREGROUND_THRESHOLD = 0.06  # max |pixel − canvas| over channels that counts as foreground
CONTRAST_FLOOR = 0.25
COLOUR_WEIGHT = 0.4
CHROMA_SIGMA = 0.08
LUMA_SIGMA = 0.25
CHROMA_EPS = 0.1
NCC_EPS = 1e-8

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class DetectorConfig:
    """Options of the subject detector (see module docstring for the formula)."""

    size_range: tuple[float, float] = SIZE_RANGE
    n_sizes: int = N_SIZES
    margin: float = WINDOW_MARGIN
    contrast_floor: float = CONTRAST_FLOOR
    colour_weight: float = COLOUR_WEIGHT
    chroma_sigma: float = CHROMA_SIGMA
    luma_sigma: float = LUMA_SIGMA
    foreground_threshold: float = FOREGROUND_THRESHOLD

    def sizes(self, canvas: int) -> tuple[int, ...]:
        lo, hi = (f * canvas for f in self.size_range)
        steps = [lo * (hi / lo) ** (i / max(self.n_sizes - 1, 1)) for i in range(self.n_sizes)]
        return tuple(sorted({max(2, round(s)) for s in steps}))

    def margin_px(self, canvas: int) -> int:
        return max(1, round(self.margin * canvas))


@dataclass
class SubjectTemplate:
    """A reference subject rendered at every candidate size, ready to match (reference-side cache entry)."""

    sizes: tuple[int, ...]
    margin: int
    structure: list[torch.Tensor]  # per size: (8, k, k) with per-channel mean removed, k = s + 2·margin
    structure_norm2: torch.Tensor  # (n_sizes,)
    masks: list[torch.Tensor]  # per size: (k, k) foreground coverage, sums to 1
    colour: torch.Tensor  # (n_sizes, 3) mean RGB under the foreground mask
    aspect: tuple[float, float]  # foreground box (width, height) / its longest side


@dataclass
class Detection:
    """Best window per query and the similarity maps it was chosen from."""

    similarity: torch.Tensor  # (Q,) best sim
    box: torch.Tensor  # (Q, 4) detected foreground box x0, y0, x1, y1 (image px, x1/y1 exclusive)
    size: torch.Tensor  # (Q,) the candidate size of the best window
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # size -> (Q, H-s+1, W-s+1), by top-left


def foreground_box(image: torch.Tensor, canvas: torch.Tensor, threshold: float) -> tuple[int, int, int, int] | None:
    """Bounding box (x1/y1 exclusive) of pixels of a (3, H, W) image differing from ``canvas`` (3,) by > threshold."""
    fg = (image - canvas.view(3, 1, 1)).abs().amax(dim=0) > threshold
    if not bool(fg.any()):
        return None
    ys, xs = torch.nonzero(fg, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def border_colour(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Median colour (3,) of the 1-px ring just outside ``box`` (inside the image): the local background."""
    _, h, w = image.shape
    x0, y0, x1, y1 = box
    ring = torch.zeros(h, w, dtype=torch.bool)
    ring[max(y0 - 1, 0) : min(y1 + 1, h), max(x0 - 1, 0) : min(x1 + 1, w)] = True
    ring[y0:y1, x0:x1] = False
    if not bool(ring.any()):
        ring[:, :] = True
    return image[:, ring].median(dim=1).values


def _resample(image: torch.Tensor, centre: tuple[float, float], span: float, out: int) -> torch.Tensor:
    """(C, H, W) -> (C, out, out): the square of side ``span`` px centred at ``centre``, box-antialiased; zeros outside."""
    _, h, w = image.shape
    n = out * SUPERSAMPLE
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n - 0.5
    xs = (centre[0] + t * span) * 2.0 / w - 1.0
    ys = (centre[1] + t * span) * 2.0 / h - 1.0
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None]
    sampled = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(sampled, SUPERSAMPLE)[0]


def build_template(
    reference: torch.Tensor,
    canvas: int,
    config: DetectorConfig,
    canvas_colour: torch.Tensor | None = None,
    region: tuple[int, int, int, int] | None = None,
    style_map: StyleMap | None = None,
) -> SubjectTemplate | None:
    """Cut the subject out of a (3, H, W) reference and render it at every candidate size for a ``canvas``-px image.

    The subject is the foreground: pixels differing from ``canvas_colour`` (default:
    the median of the image border, i.e. RefWorld's neutral grey), searched inside
    ``region`` when given (e.g. the subject's box in an edit source scene, whose
    local background then gives the canvas colour). ``style_map`` renders the
    reference in a style first. Returns None when there is no foreground.
    """
    reference = reference.float()
    _, h, w = reference.shape
    search = region if region is not None else (0, 0, w, h)
    if canvas_colour is None:
        canvas_colour = border_colour(reference, search) if region is not None else _image_border_median(reference)
    x0, y0, x1, y1 = search
    local = foreground_box(reference[:, y0:y1, x0:x1], canvas_colour, config.foreground_threshold)
    if local is None:
        return None
    fx0, fy0, fx1, fy1 = local[0] + x0, local[1] + y0, local[2] + x0, local[3] + y0
    fg = torch.zeros(1, h, w)
    inside = (reference[:, fy0:fy1, fx0:fx1] - canvas_colour.view(3, 1, 1)).abs().amax(0) > config.foreground_threshold
    fg[0, fy0:fy1, fx0:fx1] = inside.float()
    styled = style_map.apply_image(reference) if style_map is not None else reference
    styled_canvas = style_map(canvas_colour) if style_map is not None else canvas_colour
    longest = float(max(fx1 - fx0, fy1 - fy0))
    centre = ((fx0 + fx1) / 2.0, (fy0 + fy1) / 2.0)
    margin = config.margin_px(canvas)
    sizes = config.sizes(canvas)
    structure, norms, masks, colours = [], [], [], []
    for s in sizes:
        k = s + 2 * margin
        out = k + 2 * CONTEXT_PX
        span = longest * out / s
        rendered = _resample(styled - styled_canvas.view(3, 1, 1), centre, span, out) + styled_canvas.view(3, 1, 1)
        cover = _resample(fg, centre, span, out)[0, CONTEXT_PX:-CONTEXT_PX, CONTEXT_PX:-CONTEXT_PX]
        feats = local_features(rendered[None].clamp(0, 1))[0, :, CONTEXT_PX:-CONTEXT_PX, CONTEXT_PX:-CONTEXT_PX]
        struct = feats[STRUCTURE]
        struct = struct - struct.mean(dim=(1, 2), keepdim=True)
        mask = cover / cover.sum().clamp(min=NCC_EPS)
        rgb = rendered[:, CONTEXT_PX:-CONTEXT_PX, CONTEXT_PX:-CONTEXT_PX]
        structure.append(struct)
        norms.append(struct.pow(2).sum())
        masks.append(mask)
        colours.append((rgb * mask).sum(dim=(1, 2)))
    return SubjectTemplate(
        sizes=sizes,
        margin=margin,
        structure=structure,
        structure_norm2=torch.stack(norms),
        masks=masks,
        colour=torch.stack(colours),
        aspect=((fx1 - fx0) / longest, (fy1 - fy0) / longest),
    )


def _image_border_median(image: torch.Tensor) -> torch.Tensor:
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    return border.median(dim=1).values


def colour_similarity(a: torch.Tensor, b: torch.Tensor, config: DetectorConfig) -> torch.Tensor:
    """``exp(−½(‖χ(a)−χ(b)‖²/σ_χ² + (ℓ(a)−ℓ(b))²/σ_ℓ²))`` over the last dim (RGB); χ chromaticity, ℓ luminance."""
    chroma_a = a / (a.sum(-1, keepdim=True) + CHROMA_EPS)
    chroma_b = b / (b.sum(-1, keepdim=True) + CHROMA_EPS)
    d2 = (chroma_a - chroma_b).pow(2).sum(-1) / config.chroma_sigma**2
    d2 = d2 + (a.mean(-1) - b.mean(-1)).pow(2) / config.luma_sigma**2
    return torch.exp(-0.5 * d2)


def detect(
    images: torch.Tensor,
    queries: list[tuple[int, SubjectTemplate]],
    config: DetectorConfig,
    keep_maps: bool = False,
) -> Detection:
    """Best window of each query ``(image index, template)`` in ``images`` (B, 3, H, W) (see module docstring)."""
    b, _, h, w = images.shape
    n_q = len(queries)
    if n_q == 0:
        return Detection(torch.zeros(0), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    templates = [t for _, t in queries]
    sizes, margin = templates[0].sizes, templates[0].margin
    if any(t.sizes != sizes or t.margin != margin for t in templates):
        raise ValueError("all templates of one detect() call must share the candidate sizes and margin")
    index = torch.tensor([i for i, _ in queries], dtype=torch.long)
    padded = F.pad(images.float(), (margin,) * 4, mode="replicate")
    struct = local_features(padded)[:, STRUCTURE]
    hp, wp = padded.shape[-2:]
    n_struct = struct.shape[1]
    struct_q = struct[index].reshape(1, n_q * n_struct, hp, wp)
    rgb_q = padded[index].reshape(1, n_q * 3, hp, wp)
    aspect = torch.tensor([t.aspect for t in templates])
    best = torch.full((n_q,), -math.inf)
    best_box = torch.zeros(n_q, 4)
    best_size = torch.zeros(n_q, dtype=torch.long)
    maps = {}
    for i, s in enumerate(sizes):
        k = s + 2 * margin
        mean = F.avg_pool2d(struct, k, stride=1)
        var_x = (k * k) * (F.avg_pool2d(struct * struct, k, stride=1) - mean * mean).clamp(min=0).sum(1)
        kernels = torch.stack([t.structure[i] for t in templates])
        cov = F.conv2d(struct_q, kernels, groups=n_q)[0]
        t2 = torch.stack([t.structure_norm2[i] for t in templates]).view(n_q, 1, 1)
        denom = (torch.maximum(var_x[index], config.contrast_floor * t2) * t2).sqrt().clamp(min=NCC_EPS)
        ncc = cov / denom
        masks = torch.stack([t.masks[i] for t in templates])[:, None].repeat_interleave(3, dim=0)
        mean_rgb = F.conv2d(rgb_q, masks, groups=n_q * 3)[0].reshape(n_q, 3, *ncc.shape[-2:])
        colour_t = torch.stack([t.colour[i] for t in templates]).view(n_q, 3, 1, 1)
        csim = colour_similarity(mean_rgb.movedim(1, -1), colour_t.movedim(1, -1), config)
        sim = ncc.clamp(min=0) * (1.0 - config.colour_weight + config.colour_weight * csim)
        if keep_maps:
            maps[s] = sim
        value, flat = sim.flatten(1).max(dim=1)
        better = value > best
        y = torch.div(flat, sim.shape[-1], rounding_mode="floor").float()
        x = (flat % sim.shape[-1]).float()
        bw, bh = s * aspect[:, 0], s * aspect[:, 1]
        box = torch.stack([x + (s - bw) / 2, y + (s - bh) / 2, x + (s + bw) / 2, y + (s + bh) / 2], dim=1)
        best = torch.where(better, value, best)
        best_box = torch.where(better[:, None], box, best_box)
        best_size = torch.where(better, torch.full_like(best_size, s), best_size)
    return Detection(best, best_box, best_size, maps)
