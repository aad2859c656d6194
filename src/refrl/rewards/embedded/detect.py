"""Find a reference subject in a generated image: template matching in the feature space.

A template (``template.py``: the subject cut out of its reference and rendered at
each candidate size ``s``) is matched against every window of the image: the
``s x s`` square around the subject plus a margin. Similarity of a window X with
a template T (both ``features.local_features``):

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
(depthwise convolutions, one group per query and channel; one mean over all
structure channels; these are the returned similarity maps), then the exact
similarity above is evaluated at the 3x3 positions around the coarse best of each
query's ``REFINE_SIZES`` best sizes and their neighbouring sizes (a sharp-edged
subject may score best at a neighbouring size on the coarse grid); the best of
those is the detection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from refrl.rewards.embedded.features import STRUCTURE, local_features
from refrl.rewards.embedded.template import FIELDS, DetectorConfig, SubjectTemplate, unpack

CHROMA_EPS = 0.1
NCC_EPS = 1e-8
REFINE_RADIUS = 1  # full-resolution positions tried on each side of a coarse best
REFINE_SIZES = 2  # per query, these best coarse sizes and their neighbours are refined


@dataclass
class Detection:
    """Best window per query and the coarse similarity maps it was found from."""

    similarity: torch.Tensor  # (Q,) best sim
    box: torch.Tensor  # (Q, 4) detected foreground box x0, y0, x1, y1 (image px, x1/y1 exclusive)
    size: torch.Tensor  # (Q,) the candidate size of the best window
    structure: torch.Tensor  # (Q,) its structure term max(ncc, 0): how object-like the window is, colour aside
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # size -> (Q, h, w): window top-left (2i, 2j)


def colour_similarity(a: torch.Tensor, b: torch.Tensor, config: DetectorConfig) -> torch.Tensor:
    """``exp(−½(‖χ(a)−χ(b)‖²/σ_χ² + (ℓ(a)−ℓ(b))²/σ_ℓ²))`` over the last dim (RGB); χ chromaticity, ℓ luminance."""
    chroma_a = a / (a.sum(-1, keepdim=True) + CHROMA_EPS)
    chroma_b = b / (b.sum(-1, keepdim=True) + CHROMA_EPS)
    d2 = (chroma_a - chroma_b).pow(2).sum(-1) / config.chroma_sigma**2
    d2 = d2 + (a.mean(-1) - b.mean(-1)).pow(2) / config.luma_sigma**2
    return torch.exp(-0.5 * d2)


def _coarse_maps(
    struct: torch.Tensor, struct_q: torch.Tensor, rgb_q: torch.Tensor, valid: torch.Tensor, index: torch.Tensor,
    t: dict[str, torch.Tensor], s: int, canvas: int, config: DetectorConfig,
) -> torch.Tensor:
    """(Q, h, w) sim at every second window position for one size ``s``: entry (a, b) is the window at (2a, 2b).

    As the fine stage but with one mean over all structure channels (so the in-image
    corrections need single-channel convolutions only). ``t`` holds the stacked
    template tensors of that size (``template.unpack`` fields, (Q, ...)); ``struct_q`` (1, Q·8, Hp, Wp)
    and ``rgb_q`` (1, Q·3, Hp, Wp) are the padded maps of each query's image.
    """
    n_pos = (canvas - s) // 2 + 1
    kernels = t["structure"]  # (Q, 8, k, k)
    n_q, n_struct, k = kernels.shape[0], kernels.shape[1], kernels.shape[-1]

    def window_sum(maps: torch.Tensor, kernel: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return F.conv2d(maps, kernel, stride=2, groups=groups)[..., :n_pos, :n_pos]

    # Zero padding: sums over a window that involve X are over its in-image pixels already.
    n = window_sum(valid, torch.ones(1, 1, k, k))[0] * n_struct  # (1, h, w)
    sum_x = window_sum(struct.sum(1, keepdim=True), torch.ones(1, 1, k, k))[:, 0][index]
    sum_xx = window_sum((struct * struct).sum(1, keepdim=True), torch.ones(1, 1, k, k))[:, 0][index]
    sum_t = window_sum(valid, kernels.sum(1, keepdim=True))[0]  # (Q, h, w)
    sum_tt = window_sum(valid, (kernels * kernels).sum(1, keepdim=True))[0]
    # Depthwise convolution then a channel sum: much faster on CPU than a grouped one with 8 channels per group.
    sum_xt = window_sum(struct_q, kernels.reshape(-1, 1, k, k), n_q * n_struct)
    sum_xt = sum_xt.reshape(n_q, n_struct, n_pos, n_pos).sum(1)
    cov = sum_xt - sum_x * sum_t / n
    var_x = (sum_xx - sum_x * sum_x / n).clamp(min=0)
    var_t = (sum_tt - sum_t * sum_t / n).clamp(min=0)
    ncc = cov / (torch.maximum(var_x, config.contrast_floor * var_t) * var_t).sqrt().clamp(min=NCC_EPS)
    masks = t["masks"][:, None]
    mask_in = window_sum(valid, masks)[0].clamp(min=NCC_EPS)  # (Q, h, w)
    rgb_sum = window_sum(rgb_q, masks.repeat_interleave(3, dim=0), n_q * 3)[0]
    mean_rgb = rgb_sum.reshape(n_q, 3, n_pos, n_pos) / mask_in[:, None]
    csim = colour_similarity(mean_rgb.movedim(1, -1), t["colour"][:, None, None, :], config)
    return ncc.clamp(min=0) * (1.0 - config.colour_weight + config.colour_weight * csim)


def _fine_similarity(
    struct: torch.Tensor, rgb: torch.Tensor, valid: torch.Tensor,
    t: dict[str, torch.Tensor], tops: torch.Tensor, lefts: torch.Tensor, config: DetectorConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, P) exact sim and its structure term max(ncc, 0), windows of one size at (tops, lefts) (padded coords).

    ``t`` holds the stacked template tensors of that size (``template.unpack`` fields, (Q, ...)),
    ``struct`` (Q, 8, Hp, Wp) and ``rgb`` (Q, 3, Hp, Wp) the padded maps of each query's
    image, ``valid`` (1, 1, Hp, Wp) the in-image map.
    """
    n_q, n_p = tops.shape
    k = t["structure"].shape[-1]
    wp = struct.shape[-1]
    offs = torch.arange(k)
    flat_idx = (tops[..., None, None] + offs[:, None]) * wp + (lefts[..., None, None] + offs[None, :])  # (Q, P, k, k)

    def windows(maps: torch.Tensor) -> torch.Tensor:
        """(Q or 1, C, Hp, Wp) maps (one per query, or one shared) -> (Q, P, C, k, k) windows."""
        per_q = maps.expand(n_q, -1, -1, -1)
        c = per_q.shape[1]
        got = per_q.flatten(2).gather(2, flat_idx.reshape(n_q, 1, -1).expand(-1, c, -1))
        return got.reshape(n_q, c, n_p, k, k).transpose(1, 2)

    # Sums over each window's in-image pixels (v = 1 inside the image), expanded so that
    # no centred copy of the windows is materialised: Σv(x−x̄)(t−t̄) = Σvxt − ΣvxΣvt/Σv, etc.
    x = windows(struct).flatten(-2)  # (Q, P, 8, k²)
    v = windows(valid)[:, :, 0].flatten(-2)  # (Q, P, k²)
    tt = t["structure"].flatten(-2)  # (Q, 8, k²)
    n = v.sum(-1, keepdim=True).clamp(min=1)  # (Q, P, 1)
    sum_x = torch.einsum("qpcn,qpn->qpc", x, v)
    sum_t = torch.einsum("qcn,qpn->qpc", tt, v)
    sum_xt = torch.einsum("qpcn,qcn->qpc", x * v[:, :, None], tt)
    sum_xx = torch.einsum("qpcn,qpcn->qpc", x, x * v[:, :, None])
    sum_tt = torch.einsum("qcn,qpn->qpc", tt * tt, v)
    cov = (sum_xt - sum_x * sum_t / n).sum(-1)
    var_x = (sum_xx - sum_x * sum_x / n).sum(-1).clamp(min=0)
    var_t = (sum_tt - sum_t * sum_t / n).sum(-1).clamp(min=0)
    ncc = cov / (torch.maximum(var_x, config.contrast_floor * var_t) * var_t).sqrt().clamp(min=NCC_EPS)
    m = t["masks"].flatten(-2)[:, None] * v  # (Q, P, k²)
    rgb_w = windows(rgb).flatten(-2)  # (Q, P, 3, k²)
    mean_rgb = torch.einsum("qpcn,qpn->qpc", rgb_w, m) / m.sum(-1, keepdim=True).clamp(min=NCC_EPS)
    csim = colour_similarity(mean_rgb, t["colour"][:, None], config)
    ncc = ncc.clamp(min=0)
    return ncc * (1.0 - config.colour_weight + config.colour_weight * csim), ncc


def detect(
    images: torch.Tensor,
    queries: list[tuple[int, SubjectTemplate]],
    config: DetectorConfig,
    keep_maps: bool = False,
) -> Detection:
    """Best window of each query ``(image index, template)`` in ``images`` (B, 3, H, W) (see module docstring)."""
    _, _, h, w = images.shape
    n_q = len(queries)
    if n_q == 0:
        return Detection(torch.zeros(0), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
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
    aspect = torch.tensor([t.aspect for t in templates])
    best = torch.full((n_q,), -math.inf)
    best_box = torch.zeros(n_q, 4)
    best_size = torch.zeros(n_q, dtype=torch.long)
    best_ncc = torch.zeros(n_q)
    maps = {}
    span = torch.arange(-REFINE_RADIUS, REFINE_RADIUS + 1)
    struct_q, rgb_q = struct[index], rgb[index]  # per query, gathered once
    flat_struct_q, flat_rgb_q = struct_q.reshape(1, -1, *struct.shape[-2:]), rgb_q.reshape(1, -1, *rgb.shape[-2:])
    stacked = unpack(torch.stack([t.packed for t in templates]), sizes, margin)
    per_size = [{name: stacked[name][i] for name in FIELDS} for i in range(len(sizes))]
    coarse_best, coarse_at = [], []
    for i, s in enumerate(sizes):
        coarse = _coarse_maps(struct, flat_struct_q, flat_rgb_q, valid, index, per_size[i], s, h, config)
        if keep_maps:
            maps[s] = coarse
        value, flat = coarse.flatten(1).max(dim=1)
        coarse_best.append(value)
        coarse_at.append(torch.stack([torch.div(flat, coarse.shape[-1], rounding_mode="floor"), flat % coarse.shape[-1]]))
    # The fine stage costs more per window: refine each query's best sizes and their neighbours only.
    top = torch.stack(coarse_best).topk(min(REFINE_SIZES, len(sizes)), dim=0).indices  # (R, Q)
    neighbours = torch.cat([top - 1, top, top + 1]).clamp(0, len(sizes) - 1)
    refine = torch.zeros(len(sizes), n_q, dtype=torch.bool)
    refine.scatter_(0, neighbours, True)
    for i, s in enumerate(sizes):
        sel = torch.nonzero(refine[i]).flatten()
        if sel.numel() == 0:
            continue
        cy, cx = coarse_at[i][0, sel] * 2, coarse_at[i][1, sel] * 2
        n_s = sel.numel()
        tops = (cy[:, None, None] + span[None, :, None]).clamp(0, h - s).expand(-1, -1, len(span)).reshape(n_s, -1)
        lefts = (cx[:, None, None] + span[None, None, :]).clamp(0, w - s).expand(-1, len(span), -1).reshape(n_s, -1)
        sub = {name: value[sel] for name, value in per_size[i].items()}
        fine, fine_ncc = _fine_similarity(struct_q[sel], rgb_q[sel], valid, sub, tops, lefts, config)
        value, pick = fine.max(dim=1)
        y = tops.gather(1, pick[:, None])[:, 0].float()
        x = lefts.gather(1, pick[:, None])[:, 0].float()
        bw, bh = s * aspect[sel, 0], s * aspect[sel, 1]
        box = torch.stack([x + (s - bw) / 2, y + (s - bh) / 2, x + (s + bw) / 2, y + (s + bh) / 2], dim=1)
        better = value > best[sel]
        best[sel] = torch.where(better, value, best[sel])
        best_box[sel] = torch.where(better[:, None], box, best_box[sel])
        best_size[sel] = torch.where(better, torch.full_like(value, s, dtype=torch.long), best_size[sel])
        best_ncc[sel] = torch.where(better, fine_ncc.gather(1, pick[:, None])[:, 0], best_ncc[sel])
    return Detection(best, best_box, best_size, best_ncc, maps)
