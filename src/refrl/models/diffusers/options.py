"""Typed options of the diffusers backends (`ModelConfig.diffusers`); no heavy imports here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from refrl.config import StrictModel

DIFFUSERS_KINDS: tuple[str, ...] = ("flux2-klein", "qwen-edit-plus", "kontext")


class DiffusersOptions(StrictModel):
    """Per-model knobs; defaults follow each diffusers pipeline."""

    load_text_encoder: bool = Field(
        True, description="load the text encoder(s); false = use only precomputed embeddings (model.text_cache)"
    )
    max_text_tokens: int | None = Field(
        None, ge=1, description="text length (None: the pipeline's default, 512 for FLUX.2 and Kontext's T5)"
    )
    negative_prompt: str = Field("", description="the prompt of the unconditional branch (dropped text)")
    cfg_keep_refs: bool = Field(
        True,
        description="a sample whose prompt AND references are dropped keeps its references "
        "(the pipelines' unconditional branch keeps them); false = fully unconditional",
    )
    guidance: float | None = Field(
        None, description="embedded guidance of guidance-distilled transformers (None: the pipeline default)"
    )
    # FLUX.2 [klein]
    text_encoder_out_layers: list[int] = Field(
        [9, 18, 27], description="FLUX.2: Qwen3 hidden layers stacked into the text embedding"
    )
    ref_attention: Literal["full", "causal"] = Field(
        "full",
        description="FLUX.2: full = Flux2KleinPipeline (reference tokens attend to all tokens); causal = "
        "Flux2KleinKVPipeline (references attend only to references, so their keys/values can be cached: "
        "model.use_ref_cache)",
    )
    ref_timestep: float = Field(0.0, ge=0, le=1, description="FLUX.2 causal: fixed timestep of reference tokens")
    # Qwen-Image-Edit-Plus
    vlm_image_area: int = Field(
        384 * 384, ge=64, description="Qwen-Edit-Plus: pixels of each reference shown to the Qwen2.5-VL encoder"
    )
    # FLUX.1 Kontext
    ref_order: Literal["sample", "draft_first"] = Field(
        "draft_first",
        description="Kontext: index offsets 1..n follow the sample's order, or put a draft reference first "
        "(OmniRefiner's refinement layout: noisy latent 0, draft 1, reference 2)",
    )
