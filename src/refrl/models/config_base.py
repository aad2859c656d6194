"""What the ``model:`` section of every kind shares: ``kind``, ``init`` and the LoRA keys.

Each kind's config (`refrl.models.config.TinyDiTModelConfig`, one per diffusers
backend) subclasses `ModelOptions` and names in ``init_fields`` the keys that a saved
policy fixes. When ``init`` names a checkpoint that exists, those keys are read from it
while the config is validated, so the run folder's resolved ``config.yaml`` describes
the policy actually trained; a key given explicitly with another value is a
`ConfigError` naming the key, both values and the init. (An init that does not exist
yet is left alone here: building the policy reports it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from refrl.config import StrictModel
from refrl.errors import ConfigError, RefrlError
from refrl.limits import MAX_DEPTH


class ModelOptions(StrictModel):
    """Keys of the ``model:`` section common to every kind."""

    kind: str
    init: str | None = Field(None, description="start from this checkpoint (tiny-sft, run or checkpoint folder)")
    lora_rank: int = Field(0, ge=0, le=MAX_DEPTH * 4, description="0 = full fine-tune; >0 = LoRA of this rank (peft)")
    lora_alpha: float | None = Field(None, gt=0, le=1e6, description="default: equal to the rank")
    lora_targets: list[str] | None = Field(None, description="LoRA target module suffixes (None: the kind's default)")
    frozen: list[str] = Field(
        default_factory=list,
        description="full fine-tune: modules (parameter-name prefixes, e.g. head) whose weights keep their initial values",
    )

    @model_validator(mode="after")
    def _frozen_needs_full_finetune(self) -> ModelOptions:
        if self.frozen and self.lora_rank > 0:
            raise ConfigError(
                f"config key 'model.frozen': {self.frozen} applies to a full fine-tune; with model.lora_rank="
                f"{self.lora_rank} only the LoRA weights train already (allowed: model.frozen=[] or model.lora_rank=0)"
            )
        return self

    # Keys a saved policy fixes (its architecture): taken from ``init`` when it is given.
    init_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def saved_architecture(cls, folder: Path, saved: dict[str, Any]) -> dict[str, Any] | None:
        """The ``init_fields`` values of the policy saved in ``folder`` (``saved``: its
        config.json), or None when the folder holds another kind of policy."""
        return None

    @model_validator(mode="before")
    @classmethod
    def _take_init_architecture(cls, data: Any) -> Any:
        if not (isinstance(data, dict) and data.get("init") and cls.init_fields):
            return data
        init = str(data["init"])
        from refrl.runfolder.layout import resolve_checkpoint

        try:
            folder = resolve_checkpoint(init)
            saved = json.loads((folder / "config.json").read_text())
        except (RefrlError, OSError, ValueError):
            return data  # not there (yet): build_policy reports a missing init
        arch = cls.saved_architecture(folder, saved) if isinstance(saved, dict) else None
        if arch is None:
            return data
        return {**data, **merge_init_fields(data, arch, init)}


def merge_init_fields(given: dict[str, Any], saved: dict[str, Any], init: str, prefix: str = "model.") -> dict[str, Any]:
    """``saved`` with each key checked against ``given``: a given value that differs is a
    ConfigError; nested sections (dicts) are compared key by key."""
    merged = {}
    for key, value in saved.items():
        if key not in given:
            merged[key] = value
            continue
        mine = given[key]
        if hasattr(mine, "model_fields_set"):  # an options object made in Python: only what was set counts
            mine = mine.model_dump(mode="json", include=mine.model_fields_set)
        if isinstance(value, dict) and isinstance(mine, dict):
            merged[key] = {**mine, **merge_init_fields(mine, value, init, f"{prefix}{key}.")}
        elif _same(mine, value):
            merged[key] = value
        else:
            raise ConfigError(
                f"config key '{prefix}{key}': {mine!r} conflicts with model.init={init}, whose {key} is {value!r} "
                f"(a policy started from a checkpoint keeps its architecture; drop {prefix}{key} or set it to {value!r})"
            )
    return merged


def _same(a: Any, b: Any) -> bool:
    """Equal as config values (1 == 1.0; lists compared element-wise)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b
