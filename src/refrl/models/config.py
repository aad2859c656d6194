"""The ``model`` section of a training config: which network, its architecture, LoRA.

Kept apart from `refrl.models.build` so that the diffusers adapters, which validate a
saved ``model`` section when they load, do not import the module that builds them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from refrl.config import StrictModel
from refrl.models.diffusers.options import DiffusersOptions


class ModelConfig(StrictModel):
    kind: Literal["tiny-dit", "flux2-klein", "qwen-edit-plus", "kontext"] = "tiny-dit"
    init: str | None = Field(None, description="start from this checkpoint (tiny-sft, run or checkpoint folder)")
    image_size: int = Field(32, description="tiny-dit: image size; diffusers kinds: generation resolution")
    patch: int = 4
    ref_size: int = Field(32, description="references are resized to this square size")
    ref_patch: int = 8
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: int = 4
    max_refs: int = 8
    max_text_len: int = 48
    use_ref_cache: bool = True
    tie_index_words: bool = Field(False, description="tiny-dit: reference i also gets the embedding of the word naming it")
    prediction: Literal["v", "x0"] = Field("x0", description="what the network's head predicts (x0: JiT-style)")
    lora_rank: int = Field(0, ge=0, description="0 = full fine-tune; >0 = LoRA of this rank (peft)")
    lora_alpha: float | None = Field(None, description="default: equal to the rank")
    lora_targets: list[str] | None = Field(None, description="LoRA target module suffixes (None: the kind's default)")
    # diffusers kinds (flux2-klein, qwen-edit-plus, kontext); see docs/backends.md
    pretrained: str | None = Field(None, description="diffusers kinds: hub id or local pipeline folder")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="diffusers kinds: weights dtype")
    device: str = Field("auto", description="diffusers kinds: auto = this process's GPU if any, else cpu")
    gradient_checkpointing: bool = False
    text_cache: str | None = Field(None, description="diffusers kinds: folder of precomputed text embeddings")
    diffusers: DiffusersOptions = DiffusersOptions()
