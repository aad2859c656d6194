"""FLUX.1 Kontext behind the `Policy` protocol (`FluxKontextPipeline` components).

Kontext takes one reference natively: its VAE latent is packed into 2x2 tokens and
appended after the noisy tokens with position ids whose first coordinate is 1 (the
noisy latent has 0). Several references are appended the same way with index
offsets 1, 2, ..., n (the multi-reference extension used for OmniRefiner-style
refinement: noisy latent 0, draft 1, reference 2 -- ``ref_order=draft_first`` puts a
``draft`` reference first). Text: CLIP pooled embedding + T5 tokens, encoded by the
pipeline's own ``encode_prompt``. FLUX.1 Kontext [dev] is guidance-distilled: the
guidance scale is an input of the transformer (``model.diffusers.guidance``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from refrl.data.schema import LoadedSample, canonical_reference_type
from refrl.models.diffusers.common import DiffusersCondition, DiffusersPolicy
from refrl.models.diffusers.options import DiffusersModelConfig, DiffusersOptions
from refrl.models.diffusers.text_cache import text_key

DEFAULT_GUIDANCE = 3.5  # FluxKontextPipeline.__call__(guidance_scale=3.5)
DEFAULT_MAX_TEXT_TOKENS = 512  # FluxKontextPipeline.__call__(max_sequence_length=512)


class KontextOptions(DiffusersOptions):
    """``model.diffusers`` of kind ``kontext``."""

    ref_order: Literal["sample", "draft_first"] = Field(
        "draft_first",
        description="index offsets 1..n follow the sample's order, or put a draft reference first "
        "(OmniRefiner's refinement layout: noisy latent 0, draft 1, reference 2)",
    )


class KontextConfig(DiffusersModelConfig):
    """``model:`` of kind ``kontext`` (FLUX.1 Kontext, OmniRefiner)."""

    kind: Literal["kontext"] = "kontext"
    diffusers: KontextOptions = KontextOptions()


class KontextPolicy(DiffusersPolicy):
    config_class = KontextConfig
    pipeline_class_name = "FluxKontextPipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    skipped_components = ("image_encoder", "feature_extractor")
    transformer_class_name = "FluxTransformer2DModel"
    cfg_argument = "true_cfg_scale"  # guidance_scale is the distilled model's embedded guidance (model.diffusers.guidance)
    # Attention projections of the double-stream (both streams) and single-stream blocks,
    # as Flow-GRPO's FLUX LoRA.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @property
    def vae_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def guidance(self) -> float:
        return DEFAULT_GUIDANCE if self.opts.guidance is None else self.opts.guidance

    @property
    def max_text_tokens(self) -> int:
        return self.opts.max_text_tokens or DEFAULT_MAX_TEXT_TOKENS

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipe._encode_vae_image(images, generator=None)  # (z - shift) * scale

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        return self.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        f = self.vae_factor
        return self.pipe._unpack_latents(tokens, h * f, w * f, f)

    def _reference_order(self, sample: LoadedSample) -> list[int]:
        order = list(range(sample.n_refs))
        if self.opts.ref_order == "draft_first":
            order.sort(key=lambda j: canonical_reference_type(sample.ref_types[j]) != "draft")
        return order

    def _text_key(self, prompt: str, refs: list[torch.Tensor]) -> str:
        return text_key(self.kind, str(self.max_text_tokens), prompt)

    def _encode_text(self, prompts: list[str], refs: list[list[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        t5, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device_,
                                                max_sequence_length=self.max_text_tokens)
        return [{"t5": t5[i], "pooled": pooled[i]} for i in range(len(prompts))]

    def position_ids(self, grid: tuple[int, int], n_refs: int, ref_grid: tuple[int, int]) -> torch.Tensor:
        """(N + n_refs * T, 3) ids: noisy tokens (0, row, col), reference k (k, row, col)."""
        ids = [self.pipe._prepare_latent_image_ids(1, *grid, self.device_, self.dtype)]
        for k in range(n_refs):
            ref = self.pipe._prepare_latent_image_ids(1, *ref_grid, self.device_, self.dtype)
            ref[..., 0] = k + 1
            ids.append(ref)
        return torch.cat(ids)

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, grid: tuple[int, int], cond: DiffusersCondition,
                 rows: torch.Tensor, n_refs: int) -> torch.Tensor:
        b, rows = x.shape[0], rows.to(self.device_)
        hidden = self._in_context(x, cond, rows, n_refs)
        text = cond.text["t5"][rows]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=self.device_, dtype=torch.float32)
        out = self.transformer(
            hidden_states=hidden, timestep=sigma, guidance=guidance, pooled_projections=cond.text["pooled"][rows],
            encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3, device=self.device_, dtype=self.dtype),
            img_ids=self.position_ids(grid, n_refs, cond.ref_grid), return_dict=False,
        )[0]
        return out[:, : x.shape[1]]
