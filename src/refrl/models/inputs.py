"""Input checks and preparation shared by every Policy (tiny DiT and diffusers adapters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refrl.errors import RefrlError


def drop_flags(drop: torch.Tensor | None, batch: int, name: str) -> list[bool]:
    """A per-sample CFG drop mask (``drop_text`` / ``drop_refs``) as Python bools; ``None`` = keep all."""
    if drop is None:
        return [False] * batch
    if tuple(drop.shape) != (batch,):
        raise ValueError(f"{name} must be a bool tensor of shape ({batch},), got shape {tuple(drop.shape)}")
    return [bool(d) for d in drop.tolist()]


def resize_square(image: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, size, size), bilinear with antialiasing."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise RefrlError(f"{where}: expected a float tensor (3, H, W) in [0, 1], got {shape}")
    image = image.float()
    if tuple(image.shape[1:]) != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return image.clamp(0, 1)
