"""Building and loading diffusers adapters (the folder they save: `refrl.models.diffusers.saving`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refrl.errors import RefrlError
from refrl.models.diffusers.common import DiffusersPolicy
from refrl.models.diffusers.saving import (
    ADAPTER_WEIGHTS_NAME,
    CONFIG_NAME,
    FORMAT,
    MERGED_WEIGHTS_NAME,
    TRANSFORMER_DIR,
)
from refrl.models.freeze import freeze_modules
from refrl.runfolder.layout import resolve_checkpoint


def backend_class(kind: str) -> type[DiffusersPolicy]:
    """The adapter class registered for ``kind`` (see `refrl.models.diffusers.registry`)."""
    from refrl.models.diffusers.registry import backend  # filled when the package is imported

    return backend(kind)


def build_base(cfg: Any) -> DiffusersPolicy:
    """The adapter of ``cfg.kind`` on the pretrained pipeline (no LoRA yet)."""
    if not cfg.pretrained:
        raise RefrlError(f"model.kind={cfg.kind} needs model.pretrained (a hub id or a local pipeline folder)")
    return backend_class(cfg.kind).from_config(cfg)


def build_diffusers_policy(cfg: Any) -> DiffusersPolicy:
    """A fresh adapter from ``cfg`` (or ``cfg.init`` loaded with its LoRA merged), then a
    new LoRA of ``cfg.lora_rank`` (or a full fine-tune when the rank is 0)."""
    if cfg.init:
        policy = load_diffusers_policy(resolve_checkpoint(cfg.init), overrides=cfg)
        policy.merge_lora()  # the starting model is the reference of the new adapter
    else:
        policy = build_base(cfg)
    if cfg.lora_rank > 0:
        policy.enable_lora(cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_targets)
    else:
        policy.enable_full_finetune()
        freeze_modules(policy.transformer, cfg.frozen)
    return policy


def load_diffusers_policy(directory: str | Path, overrides: Any = None) -> DiffusersPolicy:
    """Rebuild a saved adapter: base pipeline, merged adapters in order, then the live LoRA.

    ``overrides`` (a ModelConfig) replaces runtime settings (device, dtype, checkpointing,
    text cache, reference cache) and, when given, where the base model lives; not what
    defines the model (kind, resolution, backend options)."""
    from refrl.config import validate_config
    from refrl.runfolder.readers import read_safetensors as load_file  # one line if truncated

    directory = Path(directory)
    path = directory / CONFIG_NAME
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RefrlError(f"{path}: cannot read ({e})") from None
    if info.get("format") != FORMAT:
        raise RefrlError(f"{path} is not a saved diffusers policy (format {info.get('format')!r})")
    model = dict(info["model"])
    if overrides is not None:
        if overrides.kind != info.get("kind"):
            raise RefrlError(f"model.init={directory} holds a {info.get('kind')} policy but model.kind={overrides.kind}")
        for key in ("device", "dtype", "gradient_checkpointing", "text_cache", "use_ref_cache"):
            model[key] = getattr(overrides, key)
        model["pretrained"] = overrides.pretrained or model["pretrained"]  # the same base, maybe elsewhere
    # the kind's own config class (not refrl.models.config, which imports this package)
    cfg = validate_config(backend_class(model.get("kind")).config_class, model, source=str(path))
    needed = [MERGED_WEIGHTS_NAME.format(i) for i in range(len(info.get("merged_adapters", [])))]
    needed += [ADAPTER_WEIGHTS_NAME] if info.get("lora") else []
    missing = [n for n in needed if not (directory / n).is_file()]
    if info.get("full_finetune") and not (directory / TRANSFORMER_DIR).is_dir():
        missing.append(TRANSFORMER_DIR + "/")
    if missing:
        raise RefrlError(f"cannot load the policy in {directory}: missing {', '.join(missing)}")
    transformer_dir = directory / TRANSFORMER_DIR if info.get("full_finetune") else None
    policy = backend_class(cfg.kind).from_config(cfg, transformer_dir=transformer_dir)
    for i, lora in enumerate(info.get("merged_adapters", [])):
        policy.enable_lora(**lora)
        policy.load_adapter_state_dict(load_file(str(directory / MERGED_WEIGHTS_NAME.format(i))))
        policy.merge_lora()
    if info.get("lora"):
        policy.enable_lora(**info["lora"])
        policy.load_adapter_state_dict(load_file(str(directory / ADAPTER_WEIGHTS_NAME)))
    elif info.get("full_finetune"):
        policy.enable_full_finetune()
    return policy
