"""The real transformers refrl supports, as architecture files (no weights).

``src/refrl/assets/architectures/<name>/config.json`` is the diffusers-format
``transformer/config.json`` of the published model (the keys that define the
architecture); `build_transformer` builds it on the meta device (no memory) or under
fake tensors (`refrl.plan.trace`). ``published_billions`` is the size the publisher
names the model by.

Sources of the configs: FLUX.2 klein 4B / 9B as diffusers' FLUX.2 conversion script
(scripts/convert_flux2_to_diffusers.py) writes them; FLUX.1 Kontext dev as FLUX.1 dev's
``FluxTransformer2DModel`` config; Qwen-Image-Edit-2509 as Qwen-Image's
``QwenImageTransformer2DModel`` config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refrl.errors import RefrlError


@dataclass(frozen=True)
class Architecture:
    name: str  # folder under assets/architectures
    kind: str  # refrl model kind
    repos: tuple[str, ...]  # hub ids planned with this architecture
    published_billions: int  # the size in the model's name


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("flux2-klein-4b", "flux2-klein",
                 ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-4B"), 4),
    Architecture("flux2-klein-9b", "flux2-klein",
                 ("black-forest-labs/FLUX.2-klein-9B", "black-forest-labs/FLUX.2-klein-base-9B"), 9),
    Architecture("flux1-kontext-dev", "kontext", ("black-forest-labs/FLUX.1-Kontext-dev",), 12),
    Architecture("qwen-image-edit-2509", "qwen-edit-plus",
                 ("Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2511", "Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image"),
                 20),
)}


def architecture_config(name: str) -> dict[str, Any]:
    """The shipped ``config.json`` of architecture ``name``."""
    path = resources.files("refrl") / "assets" / "architectures" / name / "config.json"
    return json.loads(path.read_text())


def resolve_transformer_config(pretrained: str | None, kind: str) -> tuple[str, dict[str, Any]]:
    """(label, transformer config) for a diffusers model: a local pipeline folder's own
    ``transformer/config.json``, else the shipped architecture of the hub id."""
    if pretrained and (Path(pretrained).expanduser() / "transformer" / "config.json").is_file():
        folder = Path(pretrained).expanduser()
        return str(folder), json.loads((folder / "transformer" / "config.json").read_text())
    for arch in ARCHITECTURES.values():
        if pretrained and pretrained.lower() in (r.lower() for r in arch.repos):
            return arch.name, architecture_config(arch.name)
    known = sorted(r for a in ARCHITECTURES.values() if a.kind == kind for r in a.repos)
    raise RefrlError(f"refrl plan: no architecture known for model.pretrained={pretrained!r}; give a local pipeline "
                     f"folder or one of {known}")


def build_transformer(config: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The diffusers transformer of ``config`` (on the current default device: use ``torch.device("meta")``)."""
    import diffusers

    config = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    name = config.pop("_class_name")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise RefrlError(f"refrl plan: unknown transformer class {name!r}")
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not its note on modules kept in float32: there are none to keep
    try:
        return cls.from_config(config).to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)


def parameter_count(name: str) -> int:
    """Parameters of a shipped architecture, built on the meta device."""
    with torch.device("meta"):
        model = build_transformer(architecture_config(name))
    return sum(p.numel() for p in model.parameters())
