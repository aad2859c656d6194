"""``dino_seg``: Customized-GRPO's identity reward — DINO/DINOv2 CLS cosine against the *segmented* reference.

The subject reference is cut out of its background first (background pixels
replaced by ``fill``, white by default), so the reward measures the subject and
not the reference photo's backdrop. Segmenters:

* ``clipseg`` — transformers' CLIPSeg (text-prompted segmentation; default
  ``CIDAS/clipseg-rd64-refined``, prompt ``segment_prompt``), mask = sigmoid(logits) > threshold;
* ``rembg`` — the ``rembg`` package (U^2-Net; downloads its ONNX file into
  ``U2NET_HOME``, default ``~/.u2net``, on first use);
* ``mask`` — masks supplied with the sample: ``sample.extra[mask_key][i]`` for
  reference ``i`` ((H, W) or (1, H, W) in [0, 1]);
* ``none`` — no segmentation (plain DINO/DINOv2 against the reference).

Customized-GRPO reports the cosine x100; here it stays a cosine (the unit of the
other similarity rewards). ``segment_output=True`` also segments the generated image.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
import torch.nn.functional as F

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import RefIndex
from refrl.rewards.zoo.base import (
    CLIP_MEAN,
    CLIP_STD,
    SimilarityReward,
    check_choice,
    normalize,
    resize_center_crop,
)
from refrl.rewards.zoo.loading import is_offline, load_tokenizer, load_transformers, read_json
from refrl.rewards.zoo.vision_encoders import DinoReward, Dinov2Reward

SEGMENTERS = ("clipseg", "rembg", "mask", "none")
ENCODERS = {"dino": DinoReward, "dinov2": Dinov2Reward}
DEFAULT_SEGMENTER_CHECKPOINT = "CIDAS/clipseg-rd64-refined"
DEFAULT_SEGMENT_PROMPT = "the main object"
DEFAULT_THRESHOLD = 0.4
DEFAULT_FILL = 1.0  # white, as background-removed product/subject photos are shown
DEFAULT_MASK_KEY = "reference_masks"
REMBG_MODEL = "u2net"


class ClipSegSegmenter:
    """Foreground masks from CLIPSeg for a text prompt."""

    def __init__(self, checkpoint: str, prompt: str, threshold: float, device: torch.device, dtype: torch.dtype):
        self.model = load_transformers("CLIPSegForImageSegmentation", checkpoint, "dino_seg", device, dtype,
                                       option="segmenter_checkpoint")
        self.tokenizer = load_tokenizer(checkpoint, "dino_seg", "segmenter_checkpoint")
        config = read_json(checkpoint, "preprocessor_config.json", "dino_seg") or {}
        size = config.get("size", self.model.config.vision_config.image_size)
        self.size = int(size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size)
        self.mean, self.std = config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)
        self.prompt, self.threshold = prompt, threshold

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,1,H,W) masks in {0,1}."""
        x = normalize(resize_center_crop(images, self.size, crop=False), self.mean, self.std)
        tokens = self.tokenizer([self.prompt] * x.shape[0], padding=True, return_tensors="pt").to(x.device)
        logits = self.model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"),
                            pixel_values=x.to(self.model.dtype)).logits
        logits = logits.reshape(x.shape[0], 1, *logits.shape[-2:]).float()  # CLIPSeg squeezes a batch of one
        probs = F.interpolate(torch.sigmoid(logits), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return (probs > self.threshold).to(images.dtype)


class RembgSegmenter:
    """Foreground masks from the ``rembg`` package (alpha matte, thresholded at 0.5)."""

    def __init__(self, model_name: str = REMBG_MODEL):
        try:
            from rembg import new_session
        except ImportError:
            raise RefrlError("reward 'dino_seg': segmenter=rembg needs the rembg package (pip install rembg); "
                             "or use segmenter=clipseg or segmenter=mask") from None
        home = os.path.expanduser(os.environ.get("U2NET_HOME", os.path.join("~", ".u2net")))
        if is_offline() and not os.path.isfile(os.path.join(home, f"{model_name}.onnx")):
            raise RefrlError(f"reward 'dino_seg': rembg model {model_name}.onnx is not in U2NET_HOME={home} and "
                             "HF_HUB_OFFLINE is set; copy the file there or set U2NET_HOME to its folder")
        self.session = new_session(model_name)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np
        from PIL import Image
        from rembg import remove

        masks = []
        for im in images:
            arr = (im.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            alpha = remove(Image.fromarray(arr), session=self.session, only_mask=True)
            masks.append(torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0))
        return (torch.stack(masks)[:, None] > 0.5).to(images)


def remove_background(images: torch.Tensor, masks: torch.Tensor, fill: float = DEFAULT_FILL) -> torch.Tensor:
    """``image * mask + fill * (1 - mask)``: the subject on a plain background."""
    return images * masks + fill * (1 - masks)


class DinoSegReward(SimilarityReward):
    """DINO-Seg: CLS cosine between the output and the background-removed subject references."""

    name = "dino_seg"

    def __init__(self, encoder: Literal["dino", "dinov2"] = "dinov2", checkpoint: str | None = None,
                 segmenter: Literal["clipseg", "rembg", "mask", "none"] = "clipseg",
                 segmenter_checkpoint: str = DEFAULT_SEGMENTER_CHECKPOINT, segment_prompt: str = DEFAULT_SEGMENT_PROMPT,
                 threshold: float = DEFAULT_THRESHOLD, fill: float = DEFAULT_FILL, mask_key: str = DEFAULT_MASK_KEY,
                 segment_output: bool = False, rembg_model: str = REMBG_MODEL, ref_type: str = "subject",
                 **common: Any):
        check_choice(self.name, "encoder", encoder, tuple(ENCODERS))
        check_choice(self.name, "segmenter", segmenter, SEGMENTERS)
        if segment_output and segmenter in ("mask", "none"):
            raise RefrlError(f"reward 'dino_seg': segment_output=true needs segmenter=clipseg or rembg, not {segmenter}")
        super().__init__(against="references", ref_type=ref_type, **common)
        self.encoder = ENCODERS[encoder](checkpoint=checkpoint, ref_type=ref_type, **common)
        self.segmenter_kind, self.fill, self.mask_key, self.segment_output = segmenter, float(fill), mask_key, segment_output
        self.segmenter: Any = None
        if segmenter == "clipseg":
            self.segmenter = ClipSegSegmenter(segmenter_checkpoint, segment_prompt, threshold, self.device, self.dtype)
        elif segmenter == "rembg":
            self.segmenter = RembgSegmenter(rembg_model)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.segment_output:
            images = remove_background(images, self.segmenter(images), self.fill)
        return self.encoder.embed(images)

    def embed_reference(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.embed(images)  # references arrive already cut out (``reference_embedding``)

    def supplied_mask(self, sample: LoadedSample, index: int, image: torch.Tensor) -> torch.Tensor:
        masks = sample.extra.get(self.mask_key)
        try:
            mask = masks[index]
        except (TypeError, KeyError, IndexError):
            raise ValueError(f"reward 'dino_seg' (segmenter=mask): sample {sample.id!r} has no "
                             f"extra[{self.mask_key!r}][{index}] for its reference {index}") from None
        return torch.as_tensor(mask, dtype=torch.float32).reshape(1, 1, *image.shape[-2:])

    def reference_embedding(self, sample: LoadedSample, index: RefIndex, image: torch.Tensor) -> torch.Tensor:
        """The embedding of the subject reference with its background removed; the reward's cache keeps it,
        so a reference is cut out once."""
        if self.segmenter_kind != "none":
            image = self.cut_out(sample, int(index), image)
        return super().reference_embedding(sample, index, image)

    def cut_out(self, sample: LoadedSample, index: int, image: torch.Tensor) -> torch.Tensor:
        if self.segmenter_kind == "mask":
            mask = self.supplied_mask(sample, index, image)
        else:
            mask = self.segmenter(image.unsqueeze(0).to(self.device, self.dtype)).float().cpu()
        return remove_background(image.unsqueeze(0), mask, self.fill)[0]
