"""Saving a diffusers adapter: the folder `DiffusersPolicy.save_pretrained` writes.

A saved adapter is a folder a person can read: ``config.json`` names the kind, the base
model (hub id or absolute local folder) and the full model config, and lists the LoRA
configs; ``adapter.safetensors`` holds the live LoRA, ``merged-<i>.safetensors`` the
adapters already folded into the base (e.g. the SFT LoRA under a GRPO run), and a full
fine-tune adds ``transformer/``. The base weights are never copied. Loading it back:
`refrl.models.diffusers.persistence.load_diffusers_policy`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from refrl.models.diffusers.options import FORMAT
from refrl.runfolder.files import save_safetensors

if TYPE_CHECKING:  # only for the annotation: the adapter module imports this one
    from refrl.models.diffusers.common import DiffusersPolicy

CONFIG_NAME = "config.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
MERGED_WEIGHTS_NAME = "merged-{}.safetensors"
TRANSFORMER_DIR = "transformer"  # full fine-tunes save the whole transformer here


def save_policy(policy: DiffusersPolicy, directory: str | Path) -> None:
    """``config.json`` (kind, base model, model config, LoRA configs) + LoRA weights; a full
    fine-tune also writes ``transformer/``. The base weights stay where ``pretrained`` says."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [ADAPTER_WEIGHTS_NAME, *(p.name for p in directory.glob(MERGED_WEIGHTS_NAME.format("*")))]:
        (directory / stale).unlink(missing_ok=True)
    model = policy.cfg.model_dump(mode="json")
    model["init"] = None
    pretrained = model.get("pretrained")
    if pretrained and Path(pretrained).expanduser().is_dir():
        model["pretrained"] = str(Path(pretrained).expanduser().resolve())
    for i, (_, state) in enumerate(policy.merged_adapters):
        save_safetensors(state, directory / MERGED_WEIGHTS_NAME.format(i), metadata={"format": "pt"})
    if policy.has_lora:
        save_safetensors(policy.adapter_state_dict(), directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    if policy.full_finetune:
        policy.transformer.save_pretrained(directory / TRANSFORMER_DIR, safe_serialization=True)
    info = {"format": FORMAT, "kind": policy.kind, "pretrained": model.get("pretrained"), "model": model,
            "lora": policy.lora_config, "merged_adapters": [c for c, _ in policy.merged_adapters],
            "full_finetune": policy.full_finetune}
    (directory / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
