"""Image grids: one row per sample, labelled cells (references -> outputs -> target)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

LABEL_HEIGHT = 11
PAD = 2
# Longest side of a cell in pixels: a larger image (e.g. a 50 M-pixel reference) is shrunk to it, so that a grid
# costs memory of the order of its cells' count, not of its largest input.
MAX_CELL = 512


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def sample_row(
    sample, outputs: Sequence[tuple[str, torch.Tensor]], target: torch.Tensor | None
) -> list[tuple[str, torch.Tensor]]:
    """One grid row: the sample's references (``"1:subject"``, ...), then ``outputs``, then the target when known."""
    row = [(f"{i + 1}:{t}", r) for i, (r, t) in enumerate(zip(sample.ref_images, sample.ref_types, strict=True))]
    row += list(outputs)
    if target is not None:
        row.append(("target", target))
    return row


def _cell(image: torch.Tensor, scale: int) -> torch.Tensor:
    """``image`` as shown: unchanged when ``scale`` x its size fits `MAX_CELL`, else shrunk to fit (antialiased)."""
    h, w = image.shape[-2:]
    if max(h, w) * scale <= MAX_CELL:
        return image
    f = MAX_CELL / (max(h, w) * scale)
    size = (max(1, round(h * f)), max(1, round(w * f)))
    return torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True,
                                           align_corners=False)[0]


def make_grid(rows: Sequence[Sequence[tuple[str, torch.Tensor]]], scale: int = 3) -> Image.Image:
    """Rows of (label, image) cells, each image upscaled ``scale``x nearest-neighbour (cells of at most
    `MAX_CELL` pixels a side: larger images are shrunk first)."""
    rows = [[(label, _cell(im, scale)) for label, im in row] for row in rows]
    cells = [c for row in rows for c in row]
    if not cells:
        raise ValueError("make_grid: no images")
    cell_h = max(im.shape[-2] for _, im in cells) * scale
    cell_w = max(im.shape[-1] for _, im in cells) * scale
    ncols = max(len(r) for r in rows)
    width = ncols * (cell_w + PAD) + PAD
    height = len(rows) * (cell_h + LABEL_HEIGHT + PAD) + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = PAD + r * (cell_h + LABEL_HEIGHT + PAD)
        for c, (label, im) in enumerate(row):
            x = PAD + c * (cell_w + PAD)
            tile = Image.fromarray(to_uint8(im)).resize((im.shape[-1] * scale, im.shape[-2] * scale), Image.NEAREST)
            canvas.paste(tile, (x, y + LABEL_HEIGHT))
            draw.text((x + 1, y), label[: max(4, cell_w // 6)], fill=(0, 0, 0))
    return canvas


def save_grid(rows: Sequence[Sequence[tuple[str, torch.Tensor]]], path: str | Path, scale: int = 3) -> Path:
    from refrl.data.images import save_pil_png

    return save_pil_png(make_grid(rows, scale), path)
