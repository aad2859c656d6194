"""Qwen-Image-Edit-Plus (2509 / 2511) behind the `Policy` protocol (`QwenImageEditPlusPipeline` components).

Several references enter twice, as the pipeline feeds them:

* to the Qwen2.5-VL text encoder, each resized to ``vlm_image_area`` pixels, with the
  "Picture i" prompt convention (``Picture 1: <|vision_start|><|image_pad|><|vision_end|>
  Picture 2: ...`` before the instruction), through the pipeline's own
  ``_get_qwen_prompt_embeds``;
* to the MMDiT as VAE latents packed into 2x2 tokens appended after the noisy tokens;
  ``img_shapes`` gives each image its own RoPE frame index.

Text lengths differ between samples (image tokens, prompt): they are zero-padded and
masked (``encoder_hidden_states_mask``), so a sample's velocity does not depend on
its batch. The pipeline's true CFG also rescales the guided prediction to the norm of
the conditional one; the trainers' CFG is the plain ``v_u + w (v_c - v_u)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from refrl.models.diffusers.common import DiffusersCondition, DiffusersPolicy
from refrl.models.diffusers.options import DiffusersModelConfig, DiffusersOptions
from refrl.models.diffusers.text_cache import text_key


def image_only_processor(image_processor: Any, tokenizer: Any) -> Any:
    """A `Qwen2VLProcessor` for images only.

    transformers cannot build a Qwen2-VL processor without torchvision (its video slot's
    class check fails); the pipeline never sends videos, so the slot stays empty.
    """
    from transformers import Qwen2VLProcessor

    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.chat_template = None
    proc.image_processor, proc.tokenizer, proc.video_processor = image_processor, tokenizer, None
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tokenizer.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tokenizer.convert_tokens_to_ids(proc.video_token)
    return proc


def load_qwen_processor(location: str) -> Any:
    """The pipeline's ``processor``: the full `Qwen2VLProcessor` when transformers can build
    it, else the image-only one from the same files."""
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = Path(location)
    where = {"pretrained_model_name_or_path": str(folder / "processor")} if folder.is_dir() else \
        {"pretrained_model_name_or_path": location, "subfolder": "processor"}
    try:
        return Qwen2VLProcessor.from_pretrained(**where)
    except (ImportError, AttributeError, TypeError, ValueError):
        tok_where = {"pretrained_model_name_or_path": str(folder / "tokenizer")} if folder.is_dir() else \
            {"pretrained_model_name_or_path": location, "subfolder": "tokenizer"}
        return image_only_processor(Qwen2VLImageProcessorPil.from_pretrained(**where),
                                    Qwen2Tokenizer.from_pretrained(**tok_where))


def to_pil(image: torch.Tensor):
    """(3, H, W) in [0, 1] -> an RGB PIL image (what the pipeline's processors take)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


class QwenEditPlusOptions(DiffusersOptions):
    """``model.diffusers`` of kind ``qwen-edit-plus``."""

    vlm_image_area: int = Field(384 * 384, ge=64, description="pixels of each reference shown to the Qwen2.5-VL encoder")


class QwenEditPlusConfig(DiffusersModelConfig):
    """``model:`` of kind ``qwen-edit-plus`` (Qwen-Image-Edit-Plus 2509/2511, DyRef)."""

    kind: Literal["qwen-edit-plus"] = "qwen-edit-plus"
    diffusers: QwenEditPlusOptions = QwenEditPlusOptions()


class QwenEditPlusPolicy(DiffusersPolicy):
    config_class = QwenEditPlusConfig
    pipeline_class_name = "QwenImageEditPlusPipeline"
    text_components = ("text_encoder", "tokenizer", "processor")
    transformer_class_name = "QwenImageTransformer2DModel"
    cfg_argument = "true_cfg_scale"  # the pipeline's true CFG (guidance_scale: embedded guidance, unused by 2509)
    # Attention projections of both streams of every MMDiT block.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @classmethod
    def _ready_made_components(cls, location: str, text: list[str]) -> dict[str, Any]:
        return {"processor": load_qwen_processor(location)} if "processor" in text else {}

    @property
    def vae_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.pipe.latent_channels

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipe._encode_vae_image(images.unsqueeze(2), generator=None)[:, :, 0]  # (z - mean) / std

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return self.vae.decode(latents.unsqueeze(2) * std + mean, return_dict=False)[0][:, :, 0]

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        f = self.vae_factor
        return self.pipe._unpack_latents(tokens, h * f, w * f, f)[:, :, 0]

    def vlm_images(self, refs: list[torch.Tensor]) -> list:
        """References as the text encoder sees them: PIL images of ``vlm_image_area`` pixels
        (the pipeline's ``calculate_dimensions`` + ``image_processor.resize``)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

        out = []
        for im in refs:
            pil = to_pil(im)
            width, height = calculate_dimensions(self.opts.vlm_image_area, pil.width / pil.height)
            out.append(self.pipe.image_processor.resize(pil, height, width))
        return out

    def _text_key(self, prompt: str, refs: list[torch.Tensor]) -> str:
        images = [np.asarray(p).tobytes() + str(p.size).encode() for p in self.vlm_images(refs)]
        return text_key(self.kind, str(self.opts.vlm_image_area), prompt, *images)

    def _encode_text(self, prompts: list[str], refs: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for prompt, kept in zip(prompts, refs, strict=True):  # the pipeline encodes one sample at a time
            images = self.vlm_images(kept) or None
            embeds, _ = self.pipe._get_qwen_prompt_embeds([prompt], image=images, device=self.device_)
            out.append({"embeds": embeds[0]})
        return out

    def _collate_text(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(it["embeds"].shape[0] for it in items)
        dim = items[0]["embeds"].shape[1]
        embeds = torch.zeros(len(items), length, dim, device=self.device_, dtype=self.dtype)
        mask = torch.zeros(len(items), length, device=self.device_, dtype=torch.bool)
        for i, it in enumerate(items):
            n = it["embeds"].shape[0]
            embeds[i, :n] = it["embeds"].to(self.device_, self.dtype)
            mask[i, :n] = True
        return {"embeds": embeds, "mask": mask}

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, grid: tuple[int, int], cond: DiffusersCondition,
                 rows: torch.Tensor, n_refs: int) -> torch.Tensor:
        b, rows = x.shape[0], rows.to(self.device_)
        hidden = self._in_context(x, cond, rows, n_refs)
        mask = cond.text["mask"][rows]
        length = int(mask.sum(1).max())  # drop padding no row of this call uses
        text, mask = cond.text["embeds"][rows, :length], mask[:, :length]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), 1.0 if self.opts.guidance is None else self.opts.guidance,
                                  device=self.device_, dtype=torch.float32)
        shapes = [[(1, *grid)] + [(1, *cond.ref_grid)] * n_refs] * b
        out = self.transformer(
            hidden_states=hidden, timestep=sigma, guidance=guidance, encoder_hidden_states=text,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask, img_shapes=shapes, return_dict=False,
        )[0]
        return out[:, : x.shape[1]]
