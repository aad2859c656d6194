"""A preview grid: one row per sample, its references (labelled "k: type") -> target, then the prompt."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from refrl.data.schema import LoadedSample

PREVIEW_SCALE = 3  # nearest-neighbour upscaling so 32 px images are readable
MAX_TILE_PX = 192
GAP_PX = 6
ARROW_PX = 22
LABEL_PX = 12
PROMPT_LINE_PX = 11
BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (20, 20, 20)
TARGET_LABEL = "target"


def _tile(image: torch.Tensor, side: int) -> Image.Image:
    array = np.round(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return Image.fromarray(array[..., :3]).resize((side, side), Image.Resampling.NEAREST)


def write_preview_grid(samples: Sequence[LoadedSample], path: str | os.PathLike, max_rows: int = 8) -> Path:
    """Write a PNG with one row per sample (at most ``max_rows``): references, an arrow, the target.

    Images are upscaled x PREVIEW_SCALE (nearest) to a common tile size; each is
    labelled with its 1-based prompt index and type; "[category] prompt" is written below.
    """
    rows = list(samples)[:max_rows]
    if not rows:
        raise ValueError("write_preview_grid needs at least one sample")
    largest = max(max(im.shape[-1] for im in [*s.ref_images, *([s.target] if s.target is not None else [])])
                  for s in rows)  # fmt: skip
    side = min(largest * PREVIEW_SCALE, MAX_TILE_PX)
    max_refs = max(s.n_refs for s in rows)
    width = GAP_PX + max_refs * (side + GAP_PX) + ARROW_PX + side + GAP_PX
    chars_per_line = max(20, width // 6)
    prompts = [textwrap.wrap(f"[{s.category}] {s.prompt}" if s.category else s.prompt, chars_per_line) for s in rows]
    row_heights = [LABEL_PX + side + GAP_PX + len(lines) * PROMPT_LINE_PX + GAP_PX for lines in prompts]
    canvas = Image.new("RGB", (width, GAP_PX + sum(row_heights)), BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    y = GAP_PX
    for sample, lines, height in zip(rows, prompts, row_heights, strict=True):
        x = GAP_PX
        for k, (image, ref_type) in enumerate(zip(sample.ref_images, sample.ref_types, strict=True)):
            draw.text((x, y), f"{k + 1}: {ref_type}", fill=TEXT_RGB, font=font)
            canvas.paste(_tile(image, side), (x, y + LABEL_PX))
            x += side + GAP_PX
        x = GAP_PX + max_refs * (side + GAP_PX)
        draw.text((x + 4, y + LABEL_PX + side // 2 - 6), "->", fill=TEXT_RGB, font=font)
        x += ARROW_PX
        draw.text((x, y), TARGET_LABEL, fill=TEXT_RGB, font=font)
        if sample.target is not None:
            canvas.paste(_tile(sample.target, side), (x, y + LABEL_PX))
        text_y = y + LABEL_PX + side + GAP_PX // 2
        for line in lines:
            draw.text((GAP_PX, text_y), line, fill=TEXT_RGB, font=font)
            text_y += PROMPT_LINE_PX
        y += height
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out
