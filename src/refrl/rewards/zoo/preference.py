"""Human-preference rewards scored with the published checkpoints on current libraries.

Their PyPI packages pin old libraries (``hpsv2`` pins protobuf<4 and pytest 7.2;
``image-reward`` pins timm 0.6.13; ``hpsv3`` pins transformers 4.45.2), so refrl
re-creates each architecture with transformers and loads the original weights:

* ``hpsv2`` — HPSv2 / v2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on
  human preferences. ``HPS_v2.1_compressed.pt`` (open_clip names) is converted to a
  ``CLIPModel`` of the LAION CLIP-H config. Score: ``cosine(image, prompt)`` as
  the package reports it (about 0.2-0.35).
* ``image_reward`` — ImageReward (Xu et al. 2023): BLIP ViT-L image encoder, BERT
  text encoder cross-attending to it, MLP head on the [CLS] feature, then
  ``(r - 0.16717362830052426) / 1.0333394966054072`` (the package's constants).
* ``hpsv3`` — see ``hpsv3.py`` (Qwen2-VL backbone + reward head).

Packages left out can still run behind ``refrl serve-reward`` in their own
environment (``remote:NAME``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import RewardOutput
from refrl.rewards.zoo.base import (
    CLIP_MEAN,
    CLIP_STD,
    ZooReward,
    normalize,
    resize_center_crop,
)
from refrl.rewards.zoo.convert import blip_to_hf, openai_clip_to_hf, strip_prefix
from refrl.rewards.zoo.loading import load_pretrained, load_tokenizer, resolve_file
from refrl.rewards.zoo.vision_encoders import PromptReward
from refrl.runfolder.files import atomic_write_text, save_safetensors

HPSV2_FILE = "HPS_v2.1_compressed.pt"
LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def load_torch_state(path: Path, reward: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt``/``.pth``/``.safetensors`` file, unwrapping ``state_dict``/``model`` and ``module.``."""
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise RefrlError(f"reward {reward!r}: cannot read weights {path}: {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return strip_prefix(state, "module.")


def check_missing(reward: str, missing: list[str], unexpected: list[str], ignore: tuple[str, ...] = ()) -> None:
    missing = [k for k in missing if not any(k.endswith(i) for i in ignore)]
    if missing or unexpected:
        raise RefrlError(f"reward {reward!r}: weights do not fit the architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


class Hpsv2Reward(PromptReward):
    """HPSv2.1: ``cosine(image, prompt)`` of the preference-tuned CLIP ViT-H-14."""

    name = "hpsv2"
    default_checkpoint = "xswu/HPSv2"

    def __init__(self, checkpoint: str | None = None, processor: str | None = None, checkpoint_file: str = HPSV2_FILE,
                 **options: Any):
        self.checkpoint_file = checkpoint_file
        super().__init__(checkpoint=checkpoint, processor=processor or LAION_CLIP_H, **options)

    def load_model(self) -> Any:
        """A converted ``CLIPModel`` folder as is; else the original open_clip file on the processor's CLIP config."""
        from transformers import CLIPConfig, CLIPModel

        folder = Path(self.checkpoint)
        if (folder / "config.json").is_file():
            return super().load_model()
        path = resolve_file(self.checkpoint, self.checkpoint_file, self.name)
        config = load_pretrained(CLIPConfig.from_pretrained, self.processor, self.name, "processor")
        state = openai_clip_to_hf(load_torch_state(path, self.name))
        model = CLIPModel(config)
        result = model.load_state_dict(state, strict=False)
        check_missing(self.name, result.missing_keys, result.unexpected_keys, ignore=("position_ids",))
        return model.to(self.device, self.dtype).eval()


# ImageReward's BLIP (ViT-L/16 at 224 px, BERT-base with cross-attention; its med_config.json).
IMAGE_REWARD_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=16, layer_norm_eps=1e-6)
IMAGE_REWARD_TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, encoder_hidden_size=1024, max_position_embeddings=512)
IMAGE_REWARD_MEAN = 0.16717362830052426  # ImageReward.py
IMAGE_REWARD_STD = 1.0333394966054072
IMAGE_REWARD_FILE = "ImageReward.pt"
IMAGE_REWARD_TEXT_LENGTH = 35  # the package pads prompts to 35 tokens
MLP_HIDDEN = (1024, 128, 64, 16)
MLP_DROPOUT = (0.2, 0.2, 0.1)


class ImageRewardModel(nn.Module):
    """BLIP image encoder + BERT text encoder with cross-attention + MLP head (module names: ImageReward's
    ``mlp.layers.*``; transformers' ``vision_model.*`` and ``text_encoder.*``)."""

    def __init__(self, vision: dict[str, Any], text: dict[str, Any]):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.vision, self.text = dict(vision), dict(text)
        self.vision_model = BlipVisionModel(BlipVisionConfig(**vision))
        self.text_encoder = BlipTextModel(BlipTextConfig(**text), add_pooling_layer=False)
        dims = (text["hidden_size"], *MLP_HIDDEN)
        layers: list[nn.Module] = []
        for i in range(len(MLP_HIDDEN)):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(MLP_DROPOUT):
                layers.append(nn.Dropout(MLP_DROPOUT[i]))
        layers.append(nn.Linear(MLP_HIDDEN[-1], 1))
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised ImageReward score per row: ``(mlp(text_cls) - mean) / std``."""
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                 encoder_attention_mask=image_mask).last_hidden_state[:, 0].float()
        return ((self.mlp.layers.float()(text) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).squeeze(-1)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        atomic_write_text(folder / "config.json", json.dumps({"kind": "refrl.image_reward", "vision": self.vision,
                                                              "text": self.text}, indent=2))


class ImageRewardReward(ZooReward):
    """ImageReward score of (image, prompt), in the package's normalised units (about -2 .. 2)."""

    name = "image_reward"
    needs = ("prompt",)
    default_checkpoint = "THUDM/ImageReward"
    default_tokenizer = "google-bert/bert-base-uncased"

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None,
                 max_length: int = IMAGE_REWARD_TEXT_LENGTH, architecture: dict[str, dict[str, Any]] | None = None,
                 **common: Any):
        super().__init__(**common)
        self.checkpoint = checkpoint or self.default_checkpoint
        folder = Path(self.checkpoint)
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            cfg = json.loads((folder / "config.json").read_text())
            self.model = ImageRewardModel(cfg["vision"], cfg["text"])
            state = load_file(folder / "model.safetensors")
        else:
            path = resolve_file(self.checkpoint, IMAGE_REWARD_FILE, self.name)
            raw = load_torch_state(path, self.name)
            arch = architecture or {}  # overrides of the published sizes, e.g. for a smaller BLIP
            self.model = ImageRewardModel({**IMAGE_REWARD_VISION, **arch.get("vision", {})},
                                          {**IMAGE_REWARD_TEXT, **arch.get("text", {})})
            state = {**blip_to_hf(raw), **{k: v for k, v in raw.items() if k.startswith("mlp.")}}
        result = self.model.load_state_dict(state, strict=False)
        check_missing(self.name, result.missing_keys, result.unexpected_keys, ignore=("position_ids",))
        self.model.to(self.device, self.dtype).eval()
        source = tokenizer or (self.checkpoint if (folder / "tokenizer_config.json").is_file() else self.default_tokenizer)
        self.tokenizer = load_tokenizer(source, self.name, "tokenizer")
        self.max_length = max_length
        self.size = self.model.vision["image_size"]

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        scores = []
        for i in range(0, images.shape[0], self.batch_size):
            chunk, prompts = images[i : i + self.batch_size], [s.prompt for s in samples[i : i + self.batch_size]]
            x = normalize(resize_center_crop(chunk, self.size), CLIP_MEAN, CLIP_STD).to(self.device, self.dtype)
            tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            scores.append(self.model(x, tokens["input_ids"], tokens["attention_mask"]).float().cpu())
        return RewardOutput(scores=torch.cat(scores))
