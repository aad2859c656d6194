"""Embedding rewards on transformers vision(-language) encoders: dino, dinov2, clip_i, clip_t, siglip, pickscore.

Scores, in the units the field reports:

* ``dino`` — cosine of DINO ViT-S/16 CLS features (DreamBench's DINO metric);
* ``dinov2`` — cosine of DINOv2 CLS features (Customized-GRPO's identity reward
  reports it x100; here it stays a cosine);
* ``clip_i`` — cosine of CLIP image embeddings (DreamBench CLIP-I);
* ``clip_t`` — cosine of CLIP image and prompt embeddings (DreamBench CLIP-T);
* ``siglip`` — cosine of SigLIP / SigLIP2 features: the pooled embedding, or all
  patch tokens flattened into one vector (DyRef's fidelity reward, the default);
* ``pickscore`` — PickScore: ``exp(logit_scale) * cosine(image, prompt)`` of the
  PickScore CLIP-H model (about 18-24 for real images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput
from refrl.rewards.zoo.base import (
    CLIP_MEAN,
    CLIP_STD,
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimilarityReward,
    ZooReward,
    check_choice,
    cosine,
    normalize,
    preprocess_settings,
    resize_center_crop,
)
from refrl.rewards.zoo.loading import load_tokenizer, load_transformers, read_json

PREPROCESSOR_FILE = "preprocessor_config.json"
SIGLIP_TEXT_LENGTH = 64  # SigLIP was trained on text padded to 64 tokens
SIGLIP_MODES = ("tokens", "pooled")
SIGLIP2_MAX_PATCHES = 256  # naflex default of the SigLIP2 image processor


class ImageEncoderReward(SimilarityReward):
    """A `SimilarityReward` over one transformers vision model, preprocessing read from the checkpoint."""

    model_class = "AutoModel"
    default_checkpoint = ""
    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD
    model_kwargs: dict[str, Any] = {}

    def __init__(self, checkpoint: str | None = None, processor: str | None = None,
                 against: Literal["references", "target"] = "references", ref_type: str = "subject", **common: Any):
        super().__init__(against=against, ref_type=ref_type, **common)
        self.checkpoint = checkpoint or self.default_checkpoint
        self.model = load_transformers(self.model_class, self.checkpoint, self.name, self.device, self.dtype,
                                       **self.model_kwargs)
        config = read_json(processor or self.checkpoint, PREPROCESSOR_FILE, self.name)
        self.size, self.mean, self.std, self.crop = preprocess_settings(
            config, self.default_size, self.default_mean, self.default_std)

    @property
    def vision_config(self) -> Any:
        return getattr(self.model.config, "vision_config", self.model.config)

    @property
    def default_size(self) -> int:
        """The encoder's trained input size (NaFlex models have none: their patch grid times patch size)."""
        vision = self.vision_config
        if hasattr(vision, "image_size"):
            return int(vision.image_size)
        return int(vision.patch_size * math.isqrt(vision.num_patches))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> normalized pixel values at the encoder's input size."""
        return normalize(resize_center_crop(images, self.size, self.crop), self.mean, self.std)


class DinoReward(ImageEncoderReward):
    """DINO ViT-S/16 CLS-token cosine (DreamBench's DINO score)."""

    name = "dino"
    model_class = "ViTModel"
    default_checkpoint = "facebook/dino-vits16"
    model_kwargs = {"add_pooling_layer": False}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=self.prepare(images)).last_hidden_state[:, 0]


class Dinov2Reward(DinoReward):
    """DINOv2 CLS-token cosine (OmniRef-Bench subject fidelity; Customized-GRPO identity)."""

    name = "dinov2"
    model_class = "Dinov2Model"
    default_checkpoint = "facebook/dinov2-base"
    model_kwargs = {}


class ClipImageReward(ImageEncoderReward):
    """CLIP image-embedding cosine (DreamBench CLIP-I)."""

    name = "clip_i"
    model_class = "CLIPModel"
    default_checkpoint = "openai/clip-vit-base-patch32"
    default_mean, default_std = CLIP_MEAN, CLIP_STD

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=self.prepare(images)).pooler_output
        return self.model.visual_projection(pooled)


class SiglipReward(ImageEncoderReward):
    """SigLIP / SigLIP2 similarity; ``mode="tokens"`` flattens all patch tokens (DyRef's fidelity reward),
    ``mode="pooled"`` uses the attention-pooled embedding. Fixed-resolution checkpoints load as
    ``SiglipModel``, NaFlex ones as ``Siglip2Model`` (patchified here, as its image processor does)."""

    name = "siglip"
    default_checkpoint = "google/siglip2-so400m-patch14-384"
    default_mean, default_std = HALF_MEAN, HALF_STD

    def __init__(self, mode: Literal["tokens", "pooled"] = "tokens", against: Literal["references", "target"] = "target",
                 max_num_patches: int | None = None, **options: Any):
        check_choice(self.name, "mode", mode, SIGLIP_MODES)
        self.mode = mode
        super().__init__(against=against, **options)
        self.naflex = self.model.config.model_type == "siglip2"
        config = read_json(options.get("processor") or self.checkpoint, PREPROCESSOR_FILE, self.name) or {}
        self.max_num_patches = int(max_num_patches or config.get("max_num_patches", SIGLIP2_MAX_PATCHES))

    def naflex_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an image: keep the aspect ratio, at most ``max_num_patches`` patches."""
        scale = math.sqrt(self.max_num_patches / (height * width))
        rows = max(1, math.floor(height * scale))
        cols = max(1, math.floor(width * scale))
        while rows * cols > self.max_num_patches:
            rows, cols = (rows - 1, cols) if rows >= cols else (rows, cols - 1)
        return rows, cols

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        if not self.naflex:
            out = vision(pixel_values=self.prepare(images))
        else:
            p = self.vision_config.patch_size
            rows, cols = self.naflex_grid(*images.shape[-2:])
            x = normalize(resize_center_crop(images, (rows * p, cols * p), crop=False), self.mean, self.std)
            b, c = x.shape[:2]
            patches = x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, p * p * c)
            mask = torch.ones(b, rows * cols, dtype=torch.int32, device=x.device)
            shapes = torch.tensor([[rows, cols]] * b, dtype=torch.long, device=x.device)
            out = vision(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        return out.last_hidden_state if self.mode == "tokens" else out.pooler_output


class PromptReward(ZooReward):
    """A CLIP-style image-prompt score: ``scale * cosine(image_embedding, text_embedding)``.

    The prompt side is cached per (sample, prompt): a GRPO group shares its prompt."""

    needs = ("prompt",)
    default_checkpoint = ""
    use_logit_scale = False  # PickScore multiplies by exp(logit_scale); CLIP-T reports the cosine

    def __init__(self, checkpoint: str | None = None, processor: str | None = None, max_length: int | None = None,
                 **common: Any):
        super().__init__(**common)
        self.checkpoint = checkpoint or self.default_checkpoint
        self.processor = processor
        self.model = self.load_model()
        source = processor or self.checkpoint
        self.tokenizer = load_tokenizer(source, self.name, "processor" if processor else "checkpoint")
        config = read_json(source, PREPROCESSOR_FILE, self.name)
        vision = self.model.config.vision_config
        self.size, self.mean, self.std, self.crop = preprocess_settings(config, vision.image_size, CLIP_MEAN, CLIP_STD)
        self.max_length = max_length or self.model.config.text_config.max_position_embeddings

    def load_model(self) -> Any:
        """The CLIP model (a ``CLIPModel`` folder or hub id)."""
        return load_transformers("CLIPModel", self.checkpoint, self.name, self.device, self.dtype)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(resize_center_crop(images, self.size, self.crop), self.mean, self.std)
        return self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)

    def embed_prompt(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        text = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return self.model.text_projection(text.pooler_output)[0].float().cpu()

    @property
    def scale(self) -> float:
        return float(self.model.logit_scale.exp()) if self.use_logit_scale else 1.0

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        image_emb = self.batched(self.embed_images, images)
        text_emb = torch.stack([self.cache.get((s.id, "prompt", s.prompt), lambda s=s: self.embed_prompt(s.prompt))
                                for s in samples])
        cos = cosine(image_emb, text_emb)
        return RewardOutput(scores=self.scale * cos, extras={"cosine": cos})


class ClipTextReward(PromptReward):
    """CLIP image-prompt cosine (DreamBench CLIP-T)."""

    name = "clip_t"
    default_checkpoint = "openai/clip-vit-base-patch32"


class PickScoreReward(PromptReward):
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cosine`` of the PickScore_v1 CLIP-H.
    Its hub repo holds weights only; the tokenizer/processor come from the LAION CLIP-H repo."""

    name = "pickscore"
    default_checkpoint = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    use_logit_scale = True

    def __init__(self, checkpoint: str | None = None, processor: str | None = None, **options: Any):
        if processor is None and checkpoint is None:
            processor = self.default_processor
        super().__init__(checkpoint=checkpoint, processor=processor, **options)
