"""The reference side of the subject detector: cut a subject out of its reference, render it at every size.

The subject is the reference's foreground: pixels that differ from the canvas
colour (RefWorld's neutral 0.5 grey for subject references; for a scene such as an
edit source, the local background around a given region). It is resampled so its
longest side takes each candidate size ``s`` (``n_sizes`` sizes spanning
``size_range`` x the canvas, geometric steps), with ``margin`` pixels of canvas
around it (the outline's edge energy lies just outside the subject) and described
in the feature space of ``features.py``. One `SubjectTemplate` is what a reward
caches per reference; ``detect.py`` matches templates against images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refrl.rewards.embedded.features import N_STRUCTURE, STRUCTURE, local_features
from refrl.rewards.embedded.stylemap import StyleMap

SIZE_RANGE = (0.18, 0.5)  # subject's longest side / canvas: RefWorld uses 0.25 (small) .. 0.44 (large)
N_SIZES = 14  # geometric steps of about 8 %: 6..16 px at 32, one candidate per pixel
WINDOW_MARGIN = 1 / 32  # of the canvas, each side
CONTEXT_PX = 4  # reach of a feature: derivative at distance 2, blur, pooling
SUPERSAMPLE = 2  # box antialiasing when a template is resampled
FOREGROUND_THRESHOLD = 0.06  # max |pixel − canvas| over channels that counts as foreground
CONTRAST_FLOOR = 0.25
COLOUR_WEIGHT = 0.5
CHROMA_SIGMA = 0.08
LUMA_SIGMA = 0.25
MASS_EPS = 1e-8


@dataclass(frozen=True)
class DetectorConfig:
    """Options of the subject detector (formulas in ``detect.py``)."""

    size_range: tuple[float, float] = SIZE_RANGE
    n_sizes: int = N_SIZES
    margin: float = WINDOW_MARGIN
    contrast_floor: float = CONTRAST_FLOOR
    colour_weight: float = COLOUR_WEIGHT
    chroma_sigma: float = CHROMA_SIGMA
    luma_sigma: float = LUMA_SIGMA
    foreground_threshold: float = FOREGROUND_THRESHOLD

    def sizes(self, canvas: int) -> tuple[int, ...]:
        """Candidate sizes (longest side of the subject, px) for a ``canvas``-px image."""
        lo, hi = (f * canvas for f in self.size_range)
        steps = [lo * (hi / lo) ** (i / max(self.n_sizes - 1, 1)) for i in range(self.n_sizes)]
        return tuple(sorted({min(canvas, max(2, round(s))) for s in steps}))

    def margin_px(self, canvas: int) -> int:
        return max(1, round(self.margin * canvas))


FIELDS = ("structure", "masks", "colour")


def _field_shapes(sizes: tuple[int, ...], margin: int) -> dict[str, list[tuple[int, ...]]]:
    shapes: dict[str, list[tuple[int, ...]]] = {f: [] for f in FIELDS}
    for s in sizes:
        k = s + 2 * margin
        shapes["structure"].append((N_STRUCTURE, k, k))
        shapes["masks"].append((k, k))
        shapes["colour"].append((3,))
    return shapes


@dataclass
class SubjectTemplate:
    """A reference subject rendered at every candidate size (a reward's cache entry).

    Per size ``s`` (window side ``k = s + 2·margin``): ``structure`` (8, k, k) the
    structure features, ``masks`` (k, k) the foreground coverage (sums to 1) and
    ``colour`` (3,) the mean RGB under it. All are packed in one flat ``packed``
    tensor so a batch of templates stacks in one operation (``unpack``).
    """

    canvas: int
    sizes: tuple[int, ...]
    margin: int
    packed: torch.Tensor
    aspect: tuple[float, float]  # foreground box (width, height) / its longest side

    def field(self, name: str, i: int) -> torch.Tensor:
        """One field at size index ``i`` (e.g. ``field("structure", 0)``)."""
        return unpack(self.packed[None], self.sizes, self.margin)[name][i][0]


def unpack(packed: torch.Tensor, sizes: tuple[int, ...], margin: int) -> dict[str, list[torch.Tensor]]:
    """(Q, total) stacked ``packed`` tensors -> field name -> per-size views (Q, *shape)."""
    out: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for name, shapes in _field_shapes(sizes, margin).items():
        out[name] = []
        for shape in shapes:
            n = math.prod(shape)
            out[name].append(packed[:, offset : offset + n].view(packed.shape[0], *shape))
            offset += n
    return out


def foreground_box(image: torch.Tensor, canvas: torch.Tensor, threshold: float) -> tuple[int, int, int, int] | None:
    """Bounding box (x1/y1 exclusive) of pixels of a (3, H, W) image differing from ``canvas`` (3,) by > threshold."""
    fg = (image - canvas.view(3, 1, 1)).abs().amax(dim=0) > threshold
    if not bool(fg.any()):
        return None
    ys, xs = torch.nonzero(fg, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def border_colour(image: torch.Tensor, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Median colour (3,) of the 1-px ring just outside ``box`` (of the image's own border when None)."""
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
    """(C, H, W) -> (n_sizes, C, n, n), n = the largest window + 2·CONTEXT_PX, in one grid_sample.

    Entry j shows the image scaled so ``longest`` px become ``sizes[j]`` px, ``centre``
    at the centre of the entry's own window plus context (side ``sizes[j] + 2·margin +
    2·CONTEXT_PX``, top-left at pixel (0, 0)); box-antialiased by ``SUPERSAMPLE``; zeros
    outside the image.
    """
    _, h, w = image.shape
    n = max(sizes) + 2 * margin + 2 * CONTEXT_PX
    sub = (torch.arange(n * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # output px coordinate
    size_t = torch.tensor(sizes, dtype=torch.float32)
    scale = longest / size_t  # image px per output px
    half = (size_t + 2 * margin + 2 * CONTEXT_PX) / 2.0
    xs = centre[0] + (sub[None, :] - half[:, None]) * scale[:, None]  # (S, n·SS)
    ys = centre[1] + (sub[None, :] - half[:, None]) * scale[:, None]
    gx = (xs * 2.0 / w - 1.0)[:, None, :].expand(-1, xs.shape[1], -1)
    gy = (ys * 2.0 / h - 1.0)[:, :, None].expand(-1, -1, ys.shape[1])
    batch = image[None].float().expand(len(sizes), -1, -1, -1)
    sampled = F.grid_sample(batch, torch.stack([gx, gy], dim=-1), mode="bilinear", align_corners=False)
    return F.avg_pool2d(sampled, SUPERSAMPLE)


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
    the median colour around ``region``, or of the image border without one), found
    inside ``region`` when given. ``style_map`` renders the reference in a style
    first. Returns None when there is no foreground.
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
    margin, sizes = config.margin_px(canvas), config.sizes(canvas)
    # Resampled relative to the canvas colour, so that outside the reference is canvas too.
    centre = ((fx0 + fx1) / 2.0, (fy0 + fy1) / 2.0)
    rendered = _render_sizes(torch.cat([styled - styled_canvas, fg]), centre, longest, sizes, margin)
    rgb = (rendered[:, :3] + styled_canvas).clamp(0, 1)
    feats = local_features(rgb)
    c = CONTEXT_PX
    fields: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
    for j, s in enumerate(sizes):
        k = s + 2 * margin
        cover = rendered[j, 3, c : c + k, c : c + k]
        mask = cover / cover.sum().clamp(min=MASS_EPS)
        fields["structure"].append(feats[j, STRUCTURE, c : c + k, c : c + k])
        fields["masks"].append(mask)
        fields["colour"].append((rgb[j, :, c : c + k, c : c + k] * mask).sum(dim=(1, 2)))
    parts = [t for name in FIELDS for t in fields[name]]
    packed = torch.cat([p.flatten() for p in parts])
    return SubjectTemplate(canvas, sizes, margin, packed, ((fx1 - fx0) / longest, (fy1 - fy0) / longest))
