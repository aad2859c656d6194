"""Typed options shared by the diffusers backends; no heavy imports here.

Each backend file subclasses `DiffusersOptions` with its own knobs (``model.diffusers.*``)
and `DiffusersModelConfig` with its ``kind`` (see `refrl.models.diffusers.registry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from refrl.config import StrictModel
from refrl.limits import MAX_IMAGE_SIZE, MAX_TOKENS
from refrl.models.config_base import ModelOptions

FORMAT = "refrl-diffusers-policy"  # the "format" of a saved adapter's config.json


class DiffusersOptions(StrictModel):
    """Knobs every diffusers backend has; defaults follow each diffusers pipeline."""

    load_text_encoder: bool = Field(
        True, description="load the text encoder(s); false = use only precomputed embeddings (model.text_cache)"
    )
    max_text_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="text length (None: the pipeline's default, 512 for FLUX.2 and Kontext's T5)"
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


class DiffusersModelConfig(ModelOptions):
    """The ``model:`` keys of every diffusers kind; a backend narrows ``kind`` and ``diffusers``."""

    image_size: int = Field(32, ge=1, le=MAX_IMAGE_SIZE, description="generation resolution (square)")
    ref_size: int = Field(32, ge=1, le=MAX_IMAGE_SIZE, description="references are resized to this square size")
    use_ref_cache: bool = Field(True, description="cache reference keys/values across steps where the backend can")
    pretrained: str | None = Field(None, description="hub id or local pipeline folder")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype")
    device: str = Field("auto", description="auto = this process's GPU if any, else cpu")
    gradient_checkpointing: bool = Field(False, description="activation checkpointing of the transformer blocks")
    text_cache: str | None = Field(None, description="folder of precomputed text embeddings")
    diffusers: DiffusersOptions = DiffusersOptions()

    # What `refrl.models.diffusers.persistence.load_diffusers_policy` takes from a saved adapter.
    init_fields: ClassVar[tuple[str, ...]] = ("image_size", "ref_size", "diffusers")

    @classmethod
    def saved_architecture(cls, folder: Path, saved: dict[str, Any]) -> dict[str, Any] | None:
        if saved.get("format") != FORMAT or saved.get("kind") != cls.model_fields["kind"].default:
            return None
        model = saved.get("model") or {}
        return {k: model[k] for k in cls.init_fields if k in model}
