"""Qwen2-VL / Qwen2.5-VL inputs built in torch: image patches, the chat prompt, image-token expansion.

Shared by ``hpsv3`` (Qwen2-VL backbone) and ``vlm_judge`` (Qwen2.5-VL). The
transformers ``Qwen2VLProcessor`` needs torchvision for its video half; these
rewards need images only, so the image half is written here from the image
processor's documented steps (the same as ``Qwen2VLImageProcessor``):

1. ``smart_resize``: both sides multiples of ``patch_size * merge_size``, the
   pixel count within [min_pixels, max_pixels], aspect ratio kept; bicubic resize;
2. normalise with the checkpoint's mean/std (OpenAI CLIP's by default);
3. patchify: (C, H, W) -> (gh*gw, C*T*p*p) in merge-window order, the frame
   repeated ``temporal_patch_size`` times; ``image_grid_thw = (1, gh, gw)``.

The prompt is Qwen's chat format with its default system message; each image
placeholder becomes ``<|vision_start|>`` + ``gh*gw/merge²`` ``<|image_pad|>`` + ``<|vision_end|>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from refrl.rewards.zoo.base import CLIP_MEAN, CLIP_STD, normalize

IMAGE = object()  # placeholder for an image inside a chat message
DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>")
MAX_ASPECT = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of ``factor``, pixel count in [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"aspect ratio must be below {MAX_ASPECT}, got {max(height, width) / min(height, width):.1f}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class QwenImagePrep:
    """The image processor settings of a checkpoint (``preprocessor_config.json``)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, **overrides: Any) -> QwenImagePrep:
        config = config or {}
        size = config.get("size") or {}
        values = {
            "patch_size": config.get("patch_size", cls.patch_size),
            "merge_size": config.get("merge_size", cls.merge_size),
            "temporal_patch_size": config.get("temporal_patch_size", cls.temporal_patch_size),
            "min_pixels": config.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            "max_pixels": config.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
            "mean": tuple(config.get("image_mean", CLIP_MEAN)),
            "std": tuple(config.get("image_std", CLIP_STD)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def patchify(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One (3, H, W) image in [0, 1] -> (patches (gh*gw, C*T*p*p), grid (1, gh, gw))."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        h, w = smart_resize(image.shape[-2], image.shape[-1], p * m, self.min_pixels, self.max_pixels)
        x = image.unsqueeze(0).float()
        if (h, w) != tuple(image.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = normalize(x, self.mean, self.std)[0]
        c, gh, gw = x.shape[0], h // p, w // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
        x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)
        return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)

    def tokens_per_image(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // (self.merge_size**2)


def chat_prompt(content: list[Any], system: str | None = DEFAULT_SYSTEM) -> str:
    """Qwen's chat format for one user turn (strings and `IMAGE` placeholders) plus the assistant cue."""
    parts = [] if system is None else [f"{IM_START}system\n{system}{IM_END}\n"]
    body = "".join(f"{VISION_START}{IMAGE_PAD}{VISION_END}" if c is IMAGE else str(c) for c in content)
    parts.append(f"{IM_START}user\n{body}{IM_END}\n{IM_START}assistant\n")
    return "".join(parts)


def encode_conversations(tokenizer: Any, prep: QwenImagePrep, prompts: list[str], images: list[list[torch.Tensor]],
                         padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Tokenise chat prompts whose ``<|image_pad|>`` placeholders stand for ``images[i]`` (in order):
    input_ids, attention_mask (padded), mm_token_type_ids, pixel_values, image_grid_thw."""
    texts, patches, grids = [], [], []
    for prompt, imgs in zip(prompts, images, strict=True):
        pieces = prompt.split(IMAGE_PAD)
        if len(pieces) - 1 != len(imgs):
            raise ValueError(f"prompt has {len(pieces) - 1} image placeholders but {len(imgs)} images")
        text = pieces[0]
        for img, rest in zip(imgs, pieces[1:], strict=True):
            flat, grid = prep.patchify(img)
            patches.append(flat)
            grids.append(grid)
            text += IMAGE_PAD * prep.tokens_per_image(grid) + rest
        texts.append(text)
    tokenizer.padding_side = padding_side
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    # transformers 5 needs the modality of each token (0 text, 1 image) to place M-RoPE positions.
    out["mm_token_type_ids"] = (enc["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).int()
    if patches:
        out["pixel_values"] = torch.cat(patches)
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return out
