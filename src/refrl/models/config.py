"""The ``model:`` section of a training config: one config class per ``kind``.

``kind: tiny-dit`` (the default) is `TinyDiTModelConfig`: the tiny DiT's architecture
(`refrl.models.tiny_dit_config.TinyDiTArch`, where each field and default is declared)
plus ``init`` and the LoRA keys. Every diffusers kind has its own config class, defined
in its backend file and found through `refrl.models.diffusers.BACKENDS`. Validation
picks the class from ``kind``, so a key of another kind (``model.width`` for
``kontext``, ``model.diffusers.ref_order`` for ``flux2-klein``) is an unknown key.

``ModelConfig`` is both the annotation of that section and a constructor:
``ModelConfig(init="tiny-sft")`` returns the config of the kind given (tiny-dit here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter

from refrl.config import StrictModel, validate_config
from refrl.models.config_base import ModelOptions
from refrl.models.diffusers import BACKENDS
from refrl.models.tiny_dit_config import TinyDiTArch

TINY_DIT = "tiny-dit"


class TinyDiTModelConfig(TinyDiTArch, ModelOptions):
    """``model:`` of kind ``tiny-dit``: the architecture keys, ``init`` and LoRA."""

    kind: Literal["tiny-dit"] = TINY_DIT
    tie_index_words: bool = Field(False, description="reference i also gets the embedding of the word naming it")

    init_fields: ClassVar[tuple[str, ...]] = (*(k for k in TinyDiTArch.model_fields if k != "use_ref_cache"), "tie_index_words")

    @classmethod
    def saved_architecture(cls, folder: Path, saved: dict[str, Any]) -> dict[str, Any] | None:
        if "format" in saved:  # a diffusers adapter
            return None
        arch = {k: saved[k] for k in TinyDiTArch.model_fields if k in saved and k != "use_ref_cache"}
        arch["tie_index_words"] = saved.get("index_word_ids") is not None
        return arch


def _kind_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("kind", TINY_DIT)
    return getattr(value, "kind", None)


KINDS: tuple[str, ...] = (TINY_DIT, *BACKENDS)
MODEL_CONFIG_CLASSES: dict[str, type[ModelOptions]] = {
    TINY_DIT: TinyDiTModelConfig, **{kind: cls.config_class for kind, cls in BACKENDS.items()}
}
AnyModelConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(kind)] for kind, cls in MODEL_CONFIG_CLASSES.items())],  # noqa: UP007
    Discriminator(_kind_of, custom_error_type="model_kind",
                  custom_error_message=f"unknown model kind; allowed: {', '.join(KINDS)}"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyModelConfig)


def parse_model_config(data: dict[str, Any] | ModelOptions, source: str = "model") -> Any:
    """The config of ``data``'s kind; ConfigError naming the key and the allowed values."""
    if isinstance(data, ModelOptions):
        return data
    return validate_config(_ModelSection, {"model": data}, source=source).model


class ModelConfig:
    """The ``model:`` section: as an annotation, the union of the kinds' configs; called,
    the config of the kind given (``ModelConfig(kind="kontext", pretrained=...)``)."""

    def __new__(cls, **data: Any) -> Any:  # returns the kind's config, not a ModelConfig
        return _ADAPTER.validate_python(data)

    @classmethod
    def model_validate(cls, data: Any) -> Any:
        return _ADAPTER.validate_python(data)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return handler.generate_schema(AnyModelConfig)

    @classmethod
    def union_member(cls, kind: str) -> type[ModelOptions] | None:
        """The config class of ``kind`` (for error messages that list a kind's keys)."""
        return MODEL_CONFIG_CLASSES.get(kind)


class _ModelSection(StrictModel):
    """Wraps a bare model section so its errors read ``model.KEY`` like in a training config."""

    model: ModelConfig
