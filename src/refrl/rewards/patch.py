"""OmniRefiner's patch-wise reward, composed from pure parts (docs/reference/methods.md#omnirefiner-patch-reward-and-refinement).

OmniRefiner rewards perceptual similarity to the ground truth per patch and over the
whole image (DreamSim embeddings) plus masked pixel accuracy. The paper does not
publish the patch size, the weights nor the exact pixel mapping; the defaults below
are refrl's choices, all options:

* weights 0.4 (patches) / 0.3 (global) / 0.3 (pixels): detail is what refinement
  restores, so patches weigh most; the global term keeps the draft's layout.
* pixel accuracy ``1 − MSE`` on images in [0, 1] (``linear``), or ``exp(−MSE/τ)``
  with τ = 0.05 (``exp``, sharper near a perfect match).
* patches reduced by their mean (``min`` rewards the worst patch instead).

The formula is independent of the feature space; the embedded ``patch`` reward
(``rewards/embedded/patch.py``) feeds it RefWorld features in place of DreamSim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PIXEL_MAPPINGS = ("linear", "exp")
PATCH_REDUCES = ("mean", "min")
PIXEL_TAU = 0.05
W_PATCH, W_GLOBAL, W_PIXEL = 0.4, 0.3, 0.3
COSINE_EPS = 1e-8


def patch_cosine(feat_a: torch.Tensor, feat_b: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-patch cosine similarity of two feature maps (B, C, H, W) -> (B, H/patch, W/patch).

    Each map is average-pooled over non-overlapping ``patch × patch`` windows, then
    ``cos = <a, b> / max(‖a‖·‖b‖, 1e-8)`` over channels. H and W must be multiples of ``patch``.
    """
    if feat_a.shape != feat_b.shape or feat_a.dim() != 4:
        raise ValueError(
            f"feature maps must both be (B, C, H, W), got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}"
        )
    h, w = feat_a.shape[-2:]
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"patch={patch} must be >= 1 and divide the feature map size {h}x{w}")
    pa = F.avg_pool2d(feat_a.float(), patch)
    pb = F.avg_pool2d(feat_b.float(), patch)
    return F.cosine_similarity(pa, pb, dim=1, eps=COSINE_EPS)


def masked_pixel_accuracy(
    image: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    mapping: str = "linear",
    tau: float = PIXEL_TAU,
) -> torch.Tensor:
    """Pixel accuracy inside a mask (OmniRefiner), images (B, C, H, W) in [0, 1], mask (B, 1, H, W).

    ``MSE = Σ m·(x − y)² / (C·Σ m)`` (a soft mask weighs pixels); ``linear``: ``1 − MSE``;
    ``exp``: ``exp(−MSE/τ)``. A sample with an empty mask gets NaN (missing reward).
    Returns float32 (B,).
    """
    if mapping not in PIXEL_MAPPINGS:
        raise ValueError(f"unknown pixel mapping {mapping!r}; allowed: {', '.join(PIXEL_MAPPINGS)}")
    if image.shape != target.shape or image.dim() != 4:
        raise ValueError(
            f"image and target must both be (B, C, H, W), got {tuple(image.shape)} and {tuple(target.shape)}"
        )
    b, c, h, w = image.shape
    if mask.shape != (b, 1, h, w):
        raise ValueError(f"mask must have shape {(b, 1, h, w)}, got {tuple(mask.shape)}")
    m = mask.float()
    area = m.sum(dim=(1, 2, 3))
    sq_err = (m * (image.float() - target.float()) ** 2).sum(dim=(1, 2, 3))
    mse = torch.where(area > 0, sq_err / (c * area), torch.full_like(area, float("nan")))
    return 1.0 - mse if mapping == "linear" else torch.exp(-mse / tau)


def patch_reward_compose(
    patch_sims: torch.Tensor,
    global_sim: torch.Tensor,
    pixel_acc: torch.Tensor | None,
    w_patch: float = W_PATCH,
    w_global: float = W_GLOBAL,
    w_pixel: float = W_PIXEL,
    patch_reduce: str = "mean",
) -> torch.Tensor:
    """OmniRefiner reward ``R = Σ_i w_i·x_i / Σ_i w_i`` over the present components, (B,).

    Components: the patch similarities (B, nH, nW) reduced by ``patch_reduce``, the
    global similarity (B,), the pixel accuracy (B,). Where ``pixel_acc`` is NaN (no mask)
    or None, the remaining weights are renormalized: ``(w_patch·P + w_global·G) / (w_patch + w_global)``.
    With the default weights (summing to 1) and all parts present, ``R = Σ w_i·x_i``.
    """
    if patch_reduce not in PATCH_REDUCES:
        raise ValueError(
            f"unknown patch_reduce {patch_reduce!r}; allowed: {', '.join(PATCH_REDUCES)}"
        )
    if min(w_patch, w_global, w_pixel) < 0 or w_patch + w_global <= 0:
        raise ValueError(
            f"patch reward weights must be >= 0 with w_patch + w_global > 0, got "
            f"w_patch={w_patch}, w_global={w_global}, w_pixel={w_pixel}"
        )
    flat = patch_sims.float().flatten(1)
    p = flat.mean(dim=1) if patch_reduce == "mean" else flat.min(dim=1).values
    g = global_sim.float()
    if pixel_acc is None:
        pixel_acc = torch.full_like(g, float("nan"))
    x = pixel_acc.float()
    present = ~torch.isnan(x)
    num = w_patch * p + w_global * g + torch.where(present, w_pixel * x, 0.0)
    den = (w_patch + w_global) + present.float() * w_pixel
    return num / den
