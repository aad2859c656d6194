"""``csd``: Contrastive Style Descriptors (Somepalli et al. 2024), DyRef's style reward.

CSD is a CLIP ViT-L/14 image tower fine-tuned for style, with a style projection
``last_layer_style`` (1024 -> 768) applied to the post-layer-norm CLS feature:
``style(x) = normalize(ln_post(cls(x)) @ W_style)``. Score: cosine between the
output's and the style reference's descriptors (DyRef, weight 0.8; NaN when the
sample has no style reference).

The authors publish ``checkpoint.pth`` (OpenAI CLIP names under
``module.backbone.``) outside the Hugging Face hub; the hub repo `CSD_HUB` holds the same
weights as ``model.safetensors`` (names under ``backbone.``), the default. Pass either file
as ``checkpoint=`` (converted here to a transformers ``CLIPVisionModel``), a hub id holding
``model.safetensors``, or a folder written by ``CsdReward.save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from refrl.errors import RefrlError
from refrl.rewards.zoo.base import (
    CLIP_MEAN,
    CLIP_STD,
    SimilarityReward,
    normalize,
    resize_center_crop,
)
from refrl.rewards.zoo.convert import openai_clip_to_hf, strip_prefix
from refrl.rewards.zoo.loading import (
    load_pretrained,
    load_transformers,
    looks_like_path,
    resolve_file,
)
from refrl.rewards.zoo.preference import check_missing, load_torch_state
from refrl.runfolder.files import save_safetensors

CSD_BASE = "openai/clip-vit-large-patch14"  # the architecture (config only) of CSD's backbone
HEAD_FILE = "csd_head.safetensors"
STYLE_KEY = "last_layer_style"
CSD_SOURCE = "github.com/learn2phoenix/CSD (checkpoint.pth)"
# The default weights: the authors' checkpoint re-packaged as safetensors on the hub.
CSD_HUB = "yuxi-liu-wired/CSD"
CSD_HUB_FILE = "model.safetensors"


class CsdReward(SimilarityReward):
    """CSD style-descriptor cosine between the output and the style references."""

    name = "csd"

    def __init__(self, checkpoint: str | None = None, base: str = CSD_BASE,
                 against: Literal["references", "target"] = "references", ref_type: str = "style", **common: Any):
        super().__init__(against=against, ref_type=ref_type, **common)
        checkpoint = checkpoint or CSD_HUB
        self.checkpoint = checkpoint
        folder = Path(checkpoint).expanduser()
        if not folder.exists() and not looks_like_path(checkpoint):  # a hub id: its model.safetensors (cache first)
            folder = resolve_file(checkpoint, CSD_HUB_FILE, self.name)
        if folder.is_dir() and (folder / HEAD_FILE).is_file():
            self.vision = load_transformers("CLIPVisionModel", str(folder), self.name, self.device, self.dtype)
            self.style_proj = load_file(folder / HEAD_FILE)[STYLE_KEY]
        elif folder.is_file():
            self.vision, self.style_proj = self._from_original(folder, base)
        else:
            raise RefrlError(f"reward 'csd': checkpoint={checkpoint} is neither a checkpoint.pth file nor a folder "
                             f"with {HEAD_FILE} (CSD weights: {CSD_SOURCE})")
        self.style_proj = self.style_proj.to(self.device, self.dtype)
        self.size = int(self.vision.config.image_size)

    def _from_original(self, path: Path, base: str) -> tuple[Any, torch.Tensor]:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        raw = load_torch_state(path, self.name)
        if STYLE_KEY not in raw:
            raise RefrlError(f"reward 'csd': {path} has no {STYLE_KEY!r} (is it a CSD checkpoint?)")
        config = load_pretrained(CLIPVisionConfig.from_pretrained, base, self.name, "base")
        model = CLIPVisionModel(config)
        state = openai_clip_to_hf(raw, vision_prefix="backbone.", with_text=False)
        state.pop("visual_projection.weight", None)  # CSD drops CLIP's projection
        if not any(k.startswith("vision_model.") for k in model.state_dict()):
            state = strip_prefix(state, "vision_model.")  # transformers 5 names CLIPVisionModel's weights flat
        result = model.load_state_dict(state, strict=False)
        check_missing(self.name, result.missing_keys, result.unexpected_keys, ignore=("position_ids",))
        return model.to(self.device, self.dtype).eval(), raw[STYLE_KEY]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(resize_center_crop(images, self.size), CLIP_MEAN, CLIP_STD)
        feature = self.vision(pixel_values=x).pooler_output  # ln_post(CLS), CSD's ``feature``
        return F.normalize(feature @ self.style_proj, dim=-1)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the backbone (transformers layout) and the style head; reload with checkpoint=folder."""
        folder = Path(folder)
        self.vision.save_pretrained(folder)
        save_safetensors({STYLE_KEY: self.style_proj.detach().cpu().contiguous()}, folder / HEAD_FILE)
