"""Find a reference subject in a generated image: template matching in the feature space.

The reference subject is cut out by its foreground (pixels that differ from the
canvas colour: RefWorld's neutral 0.5 grey for subject references), resized so its
longest side takes each candidate size ``s`` (``n_sizes`` sizes spanning
``size_range`` x the canvas, geometric steps), and matched against every window of
the image. A window is the ``s x s`` square around the subject plus ``margin`` on
each side (the outline's edge energy lies just outside the subject).

Similarity of a window X with a template T (both ``features.local_features``):

    ncc    = <X̃, T̃> / sqrt(max(‖X̃‖², floor·‖T̃‖²) · ‖T̃‖²)
    colour = exp(−½ (‖χ(μ_X) − χ(μ_T)‖² / σ_χ² + (ℓ(μ_X) − ℓ(μ_T))² / σ_ℓ²))
    sim    = max(ncc, 0) · (1 − w_colour + w_colour · colour)

``X̃``/``T̃`` are the structure channels (oriented gradient energies) minus their
per-channel means over the window's in-image pixels (pixels outside the image are
left out, so a subject touching the border is compared on what exists); ``μ`` is
the mean RGB under the template's foreground mask, ``χ`` the chromaticity
``rgb / (r + g + b + ε)``, ``ℓ`` the luminance. The structure term is shape and
pattern, independent of the background behind the subject; the contrast ``floor``
means a window must hold at least ``floor`` of the template's structure energy to
score high, so plain background never beats a foreground object; the colour term
compares chromaticity tightly and luminance loosely (lighting changes brightness,
not hue).

Search is coarse to fine, for speed: every size is scored at every second position
on 2x2-pooled maps (one grouped convolution per size, one group per query; these
are the returned similarity maps), then the exact similarity above is evaluated at
the 3x3 full-resolution positions around each size's coarse best, and the best of
those is the detection.
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
WINDOW_MARGIN = 1 / 32  # of the canvas, each side
CONTEXT_PX = 4  # reach of a feature: derivative at distance 2, blur, pooling
SUPERSAMPLE = 4  # antialiasing when a template is resampled
FOREGROUND_THRESHOLD = 0.06  # max |pixel − canvas| over channels that counts as foreground
CONTRAST_FLOOR = 0.25
COLOUR_WEIGHT = 0.5
CHROMA_SIGMA = 0.08
LUMA_SIGMA = 0.25
CHROMA_EPS = 0.1
NCC_EPS = 1e-8
REFINE_RADIUS = 1  # full-resolution positions tried on each side of a coarse best

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
        return tuple(sorted({min(canvas, max(2, round(s))) for s in steps}))

    def margin_px(self, canvas: int) -> int:
        return max(1, round(self.margin * canvas))


@dataclass
class SubjectTemplate:
    """A reference subject rendered at every candidate size (the reference-side cache entry).

    Per size ``s`` (window side ``k = s + 2·margin``): ``structure`` (8, k, k) raw
    structure features; ``masks`` (k, k) foreground coverage summing to 1; ``colour``
    the RGB mean under it; ``coarse`` (8, k', k') the 2x2-pooled structure with its
    joint mean removed (k' = ceil(k/2)) and ``coarse_masks`` (k', k') likewise pooled.
    """

    canvas: int
    sizes: tuple[int, ...]
    margin: int
    structure: list[torch.Tensor]
    masks: list[torch.Tensor]
    colour: torch.Tensor  # (n_sizes, 3)
    coarse: list[torch.Tensor]
    coarse_norm2: torch.Tensor  # (n_sizes,)
    coarse_masks: list[torch.Tensor]
    aspect: tuple[float, float]  # foreground box (width, height) / its longest side


@dataclass
class Detection:
    """Best window per query and the coarse similarity maps it was found from."""

    similarity: torch.Tensor  # (Q,) best sim
    box: torch.Tensor  # (Q, 4) detected foreground box x0, y0, x1, y1 (image px, x1/y1 exclusive)
    size: torch.Tensor  # (Q,) the candidate size of the best window
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # size -> (Q, h, w): window top-left (2i, 2j)


def foreground_box(image: torch.Tensor, canvas: torch.Tensor, threshold: float) -> tuple[int, int, int, int] | None:
    """Bounding box (x1/y1 exclusive) of pixels of a (3, H, W) image differing from ``canvas`` (3,) by > threshold."""
    fg = (image - canvas.view(3, 1, 1)).abs().amax(dim=0) > threshold
    if not bool(fg.any()):
        return None
    ys, xs = torch.nonzero(fg, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def border_colour(image: torch.Tensor, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Median colour (3,) of the 1-px ring just outside ``box`` (the image's own border when None)."""
    _, h, w = image.shape
    ring = torch.zeros(h, w, dtype=torch.bool)
    if box is None:
        ring[:, :] = True
        ring[1:-1, 1:-1] = False
    else:
        x0, y0, x1, y1 = box
        ring[max(y0 - 1, 0) : min(y1 + 1, h), max(x0 - 1, 0) : min(x1 + 1, w)] = True
        ring[y0:y1, x0:x1] = False
        if not bool(ring.any()):
            ring[:, :] = True
    return image[:, ring].median(dim=1).values


def _render_sizes(
    image: torch.Tensor, centre: tuple[float, float], longest: float, sizes: tuple[int, ...], margin: int
) -> torch.Tensor:
    """(C, H, W) -> (n_sizes, C, n, n), n = max window + 2·CONTEXT_PX.

    Entry j shows the reference scaled so ``longest`` ref px become ``sizes[j]`` px, with
    the subject's centre at the centre of the entry's own window (side ``sizes[j] + 2·margin``
    plus context) whose top-left is pixel (0, 0); box-antialiased by ``SUPERSAMPLE``,
    zeros outside the reference.
    """
    _, h, w = image.shape
    n = max(sizes) + 2 * margin + 2 * CONTEXT_PX
    sub = (torch.arange(n * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # output px coordinate
    size_t = torch.tensor(sizes, dtype=torch.float32)
    scale = longest / size_t  # reference px per output px
    half_window = (size_t + 2 * margin + 2 * CONTEXT_PX) / 2.0
    xs = centre[0] + (sub[None, :] - half_window[:, None]) * scale[:, None]  # (S, n·SS)
    ys = centre[1] + (sub[None, :] - half_window[:, None]) * scale[:, None]
    gx = (xs * 2.0 / w - 1.0)[:, None, :].expand(-1, xs.shape[1], -1)
    gy = (ys * 2.0 / h - 1.0)[:, :, None].expand(-1, -1, ys.shape[1])
    grid = torch.stack([gx, gy], dim=-1)
    batch = image[None].float().expand(len(sizes), -1, -1, -1)
    sampled = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(sampled, SUPERSAMPLE)


def _pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 mean pooling of (..., H, W) with zero padding to even sizes."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, w % 2, 0, h % 2))
    return F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), 2).reshape(*x.shape[:-2], (h + 1) // 2, (w + 1) // 2)


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
    x0, y0, x1, y1 = region if region is not None else (0, 0, w, h)
    if canvas_colour is None:
        canvas_colour = border_colour(reference, region)
    local = foreground_box(reference[:, y0:y1, x0:x1], canvas_colour, config.foreground_threshold)
    if local is None:
        return None
    fx0, fy0, fx1, fy1 = local[0] + x0, local[1] + y0, local[2] + x0, local[3] + y0
    fg = torch.zeros(1, h, w)
    diff = (reference[:, fy0:fy1, fx0:fx1] - canvas_colour.view(3, 1, 1)).abs().amax(0)
    fg[0, fy0:fy1, fx0:fx1] = (diff > config.foreground_threshold).float()
    styled = style_map.apply_image(reference) if style_map is not None else reference
    styled_canvas = (style_map(canvas_colour) if style_map is not None else canvas_colour).view(3, 1, 1)
    longest = float(max(fx1 - fx0, fy1 - fy0))
    centre = ((fx0 + fx1) / 2.0, (fy0 + fy1) / 2.0)
    margin = config.margin_px(canvas)
    sizes = config.sizes(canvas)
    rendered = _render_sizes(torch.cat([styled - styled_canvas, fg]), centre, longest, sizes, margin)
    rgb = (rendered[:, :3] + styled_canvas).clamp(0, 1)
    feats = local_features(rgb)
    c = CONTEXT_PX
    structure, masks, colours, coarse, coarse_norm2, coarse_masks = [], [], [], [], [], []
    for j, s in enumerate(sizes):
        k = s + 2 * margin
        struct = feats[j, STRUCTURE, c : c + k, c : c + k]
        cover = rendered[j, 3, c : c + k, c : c + k]
        mask = cover / cover.sum().clamp(min=NCC_EPS)
        structure.append(struct)
        masks.append(mask)
        colours.append((rgb[j, :, c : c + k, c : c + k] * mask).sum(dim=(1, 2)))
        pooled = _pool2(struct)
        pooled = pooled - pooled.mean()
        coarse.append(pooled)
        coarse_norm2.append(pooled.pow(2).sum())
        pooled_mask = _pool2(mask)
        coarse_masks.append(pooled_mask / pooled_mask.sum().clamp(min=NCC_EPS))
    return SubjectTemplate(
        canvas=canvas,
        sizes=sizes,
        margin=margin,
        structure=structure,
        masks=masks,
        colour=torch.stack(colours),
        coarse=coarse,
        coarse_norm2=torch.stack(coarse_norm2),
        coarse_masks=coarse_masks,
        aspect=((fx1 - fx0) / longest, (fy1 - fy0) / longest),
    )


def colour_similarity(a: torch.Tensor, b: torch.Tensor, config: DetectorConfig) -> torch.Tensor:
    """``exp(−½(‖χ(a)−χ(b)‖²/σ_χ² + (ℓ(a)−ℓ(b))²/σ_ℓ²))`` over the last dim (RGB); χ chromaticity, ℓ luminance."""
    chroma_a = a / (a.sum(-1, keepdim=True) + CHROMA_EPS)
    chroma_b = b / (b.sum(-1, keepdim=True) + CHROMA_EPS)
    d2 = (chroma_a - chroma_b).pow(2).sum(-1) / config.chroma_sigma**2
    d2 = d2 + (a.mean(-1) - b.mean(-1)).pow(2) / config.luma_sigma**2
    return torch.exp(-0.5 * d2)


def _coarse_maps(
    struct: torch.Tensor, rgb: torch.Tensor, index: torch.Tensor, templates: list[SubjectTemplate], i: int, s: int,
    config: DetectorConfig,
) -> torch.Tensor:
    """(Q, h, w) sim on 2x2-pooled padded maps for size index i: entry (a, b) is the window with top-left (2a, 2b)."""
    n_q = len(templates)
    canvas = templates[0].canvas
    n_pos = (canvas - s) // 2 + 1
    kernels = torch.stack([t.coarse[i] for t in templates])  # (Q, 8, k', k')
    kc = kernels.shape[-1]
    b, n_struct, hp, wp = struct.shape
    ones = torch.ones(1, 1, kc, kc)
    n = float(n_struct * kc * kc)
    sum_x = F.conv2d(struct.sum(1, keepdim=True), ones)[:, 0, :n_pos, :n_pos]
    sum_xx = F.conv2d((struct * struct).sum(1, keepdim=True), ones)[:, 0, :n_pos, :n_pos]
    var_x = (sum_xx - sum_x * sum_x / n).clamp(min=0)[index]
    # Depthwise convolution then a channel sum: much faster on CPU than a grouped one with 8 channels per group.
    cov = F.conv2d(struct[index].reshape(1, n_q * n_struct, hp, wp), kernels.reshape(-1, 1, kc, kc), groups=n_q * n_struct)
    cov = cov.reshape(n_q, n_struct, *cov.shape[-2:]).sum(1)[:, :n_pos, :n_pos]
    t2 = torch.stack([t.coarse_norm2[i] for t in templates]).view(n_q, 1, 1)
    ncc = cov / (torch.maximum(var_x, config.contrast_floor * t2) * t2).sqrt().clamp(min=NCC_EPS)
    masks = torch.stack([t.coarse_masks[i] for t in templates])[:, None].repeat_interleave(3, dim=0)
    mean_rgb = F.conv2d(rgb[index].reshape(1, n_q * 3, hp, wp), masks, groups=n_q * 3)[0, :, :n_pos, :n_pos]
    colour_t = torch.stack([t.colour[i] for t in templates])[:, None, None, :]
    csim = colour_similarity(mean_rgb.reshape(n_q, 3, n_pos, n_pos).movedim(1, -1), colour_t, config)
    return ncc.clamp(min=0) * (1.0 - config.colour_weight + config.colour_weight * csim)


def _fine_similarity(
    struct: torch.Tensor, rgb: torch.Tensor, valid: torch.Tensor, index: torch.Tensor,
    templates: list[SubjectTemplate], i: int, tops: torch.Tensor, lefts: torch.Tensor, config: DetectorConfig,
) -> torch.Tensor:
    """(Q, P) exact sim of the windows of size index i with top-left (tops[q, p], lefts[q, p]) (padded coordinates)."""
    n_q, n_p = tops.shape
    k = templates[0].structure[i].shape[-1]
    wp = struct.shape[-1]
    offs = torch.arange(k)
    flat_idx = (tops[..., None, None] + offs[:, None]) * wp + (lefts[..., None, None] + offs[None, :])  # (Q, P, k, k)

    def windows(maps: torch.Tensor) -> torch.Tensor:
        """(N, C, Hp, Wp) maps (one per image, or one shared) -> (Q, P, C, k, k) windows."""
        per_q = maps[index] if maps.shape[0] > 1 else maps.expand(n_q, -1, -1, -1)
        c = per_q.shape[1]
        got = per_q.flatten(2).gather(2, flat_idx.reshape(n_q, 1, -1).expand(-1, c, -1))
        return got.reshape(n_q, c, n_p, k, k).transpose(1, 2)

    # Sums over each window's in-image pixels (v = 1 inside the image), expanded so that
    # no centred copy of the windows is materialised: Σv(x−x̄)(t−t̄) = Σvxt − ΣvxΣvt/Σv, etc.
    x = windows(struct).flatten(-2)  # (Q, P, 8, k²)
    v = windows(valid)[:, :, 0].flatten(-2)  # (Q, P, k²)
    t = torch.stack([tp.structure[i] for tp in templates]).flatten(-2)  # (Q, 8, k²)
    n = v.sum(-1, keepdim=True).clamp(min=1)  # (Q, P, 1)
    sum_x = torch.einsum("qpcn,qpn->qpc", x, v)
    sum_t = torch.einsum("qcn,qpn->qpc", t, v)
    sum_xt = torch.einsum("qpcn,qcn->qpc", x * v[:, :, None], t)
    sum_xx = torch.einsum("qpcn,qpcn->qpc", x, x * v[:, :, None])
    sum_tt = torch.einsum("qcn,qpn->qpc", t * t, v)
    cov = (sum_xt - sum_x * sum_t / n).sum(-1)
    var_x = (sum_xx - sum_x * sum_x / n).sum(-1).clamp(min=0)
    var_t = (sum_tt - sum_t * sum_t / n).sum(-1).clamp(min=0)
    ncc = cov / (torch.maximum(var_x, config.contrast_floor * var_t) * var_t).sqrt().clamp(min=NCC_EPS)
    m = torch.stack([tp.masks[i] for tp in templates]).flatten(-2)[:, None] * v  # (Q, P, k²)
    rgb_w = windows(rgb).flatten(-2)  # (Q, P, 3, k²)
    mean_rgb = torch.einsum("qpcn,qpn->qpc", rgb_w, m) / m.sum(-1, keepdim=True).clamp(min=NCC_EPS)
    colour_t = torch.stack([tp.colour[i] for tp in templates])[:, None]
    csim = colour_similarity(mean_rgb, colour_t, config)
    return ncc.clamp(min=0) * (1.0 - config.colour_weight + config.colour_weight * csim)


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
    t0 = templates[0]
    if h != w or any(t.canvas != h or t.sizes != t0.sizes or t.margin != t0.margin for t in templates):
        raise ValueError(
            f"templates were built for a {t0.canvas}px canvas (all must share sizes and margin); images are {h}x{w}"
        )
    sizes, margin = t0.sizes, t0.margin
    index = torch.tensor([i for i, _ in queries], dtype=torch.long)
    pad = (margin,) * 4
    struct = F.pad(local_features(images.float())[:, STRUCTURE], pad)
    rgb = F.pad(images.float(), pad)
    valid = F.pad(torch.ones(1, 1, h, w), pad)
    struct_c, rgb_c = _pool2(struct), _pool2(rgb)
    aspect = torch.tensor([t.aspect for t in templates])
    best = torch.full((n_q,), -math.inf)
    best_box = torch.zeros(n_q, 4)
    best_size = torch.zeros(n_q, dtype=torch.long)
    maps = {}
    span = torch.arange(-REFINE_RADIUS, REFINE_RADIUS + 1)
    for i, s in enumerate(sizes):
        coarse = _coarse_maps(struct_c, rgb_c, index, templates, i, s, config)
        if keep_maps:
            maps[s] = coarse
        flat = coarse.flatten(1).argmax(dim=1)
        cy = torch.div(flat, coarse.shape[-1], rounding_mode="floor") * 2
        cx = (flat % coarse.shape[-1]) * 2
        tops = (cy[:, None, None] + span[None, :, None]).clamp(0, h - s).expand(-1, -1, len(span)).reshape(n_q, -1)
        lefts = (cx[:, None, None] + span[None, None, :]).clamp(0, w - s).expand(-1, len(span), -1).reshape(n_q, -1)
        fine = _fine_similarity(struct, rgb, valid, index, templates, i, tops, lefts, config)
        value, pick = fine.max(dim=1)
        y = tops.gather(1, pick[:, None])[:, 0].float()
        x = lefts.gather(1, pick[:, None])[:, 0].float()
        bw, bh = s * aspect[:, 0], s * aspect[:, 1]
        box = torch.stack([x + (s - bw) / 2, y + (s - bh) / 2, x + (s + bw) / 2, y + (s + bh) / 2], dim=1)
        better = value > best
        best = torch.where(better, value, best)
        best_box = torch.where(better[:, None], box, best_box)
        best_size = torch.where(better, torch.full_like(best_size, s), best_size)
    return Detection(best, best_box, best_size, maps)
