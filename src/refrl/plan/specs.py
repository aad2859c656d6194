"""`refrl.plan.memory.ModelSpec` of each model kind: how to build its trained network and
run one flow-matching loss step on it (real shapes, any device, fake tensors included).

The tiny DiT runs its own policy code on RefWorld samples. A diffusers transformer gets
the inputs its refrl backend gives it (`refrl.models.diffusers`): the noisy image tokens
followed by ``data.max_refs`` references' tokens, the text embeddings padded to
``model.diffusers.max_text_tokens`` (default 512, the pipelines' ``max_sequence_length``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refrl.plan.architectures import build_transformer, resolve_transformer_config
from refrl.plan.memory import DTYPES, PATCH_PIXELS, ModelSpec

DEFAULT_TEXT_TOKENS = 512


def model_spec(model_cfg: Any, data_cfg: Any) -> ModelSpec:
    if model_cfg.kind == "tiny-dit":
        return tiny_dit_spec(model_cfg, data_cfg)
    return diffusers_spec(model_cfg, data_cfg)


def tiny_dit_spec(model_cfg: Any, data_cfg: Any) -> ModelSpec:
    import numpy as np

    from refrl.data.refworld import RefWorld
    from refrl.models.build import build_policy

    max_refs = data_cfg.max_refs
    world = RefWorld(size=data_cfg.size, level=0, max_refs=max_refs, categories=["subject_bg"])
    pool = [world.sample(np.random.default_rng(i)) for i in range(4)]

    def build(lora_rank: int, depth: int = model_cfg.depth) -> nn.Module:
        return build_policy(model_cfg.model_copy(update={"lora_rank": lora_rank, "init": None, "depth": depth}))

    def step(policy: nn.Module, batch: int) -> torch.Tensor:
        # the per-sample Python work (tokenizing, resizing) once for the pool, then rows by index:
        # under fake tensors each of its small ops costs a dispatch, which made a 1024-row trace take minutes
        inputs = policy.condition_inputs(pool).select(torch.arange(batch) % len(pool))
        x = torch.randn(batch, *policy.latent_shape(data_cfg.size, data_cfg.size))
        v = policy.velocity(x, torch.rand(batch), policy.net.encode_condition(inputs))
        return ((v - x) ** 2).mean()

    size = data_cfg.size
    return ModelSpec(label=f"tiny-dit width={model_cfg.width} depth={model_cfg.depth}", build=build,
                     units=lambda p: p.fsdp_units(), step=step, latent_numel=3 * size * size,
                     depth={"depth": model_cfg.depth})


def diffusers_spec(model_cfg: Any, data_cfg: Any) -> ModelSpec:
    from refrl.models.diffusers.finetune import lora_target_names
    from refrl.models.diffusers.persistence import backend_class

    label, config = resolve_transformer_config(model_cfg.pretrained, model_cfg.kind)
    dtype = DTYPES[model_cfg.dtype]
    targets = list(backend_class(model_cfg.kind).default_lora_targets)
    family = config["_class_name"]

    def build(lora_rank: int, **depth: int) -> nn.Module:
        from peft import LoraConfig

        model = build_transformer({**config, **depth}, dtype)
        model.requires_grad_(lora_rank == 0)
        if lora_rank:  # as refrl.models.diffusers.finetune.FinetuneMixin.enable_lora: float32 LoRA weights
            model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=lora_target_names(model, targets),
                                         init_lora_weights=True), adapter_name="default")
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.data = p.data.float()
                    p.requires_grad_(True)
        return model

    grid = model_cfg.image_size // PATCH_PIXELS
    ref_grid = model_cfg.ref_size // PATCH_PIXELS
    n_img, n_ref = grid * grid, data_cfg.max_refs * ref_grid * ref_grid
    text = getattr(model_cfg.diffusers, "max_text_tokens", None) or DEFAULT_TEXT_TOKENS
    cfg = config

    def step(model: nn.Module, b: int) -> torch.Tensor:
        c = model.config
        hidden = torch.randn(b, n_img + n_ref, c.in_channels, dtype=dtype)
        enc = torch.randn(b, text, c.joint_attention_dim, dtype=dtype)
        t = torch.rand(b)
        if family == "QwenImageTransformer2DModel":
            shapes = [[(1, grid, grid)] + [(1, ref_grid, ref_grid)] * data_cfg.max_refs] * b
            out = model(hidden_states=hidden, encoder_hidden_states=enc, timestep=t, img_shapes=shapes, return_dict=False)[0]
        elif family == "FluxTransformer2DModel":
            out = model(hidden_states=hidden, encoder_hidden_states=enc, timestep=t,
                        pooled_projections=torch.randn(b, c.pooled_projection_dim, dtype=dtype),
                        guidance=torch.ones(b) if c.guidance_embeds else None, txt_ids=torch.zeros(text, 3),
                        img_ids=torch.zeros(n_img + n_ref, 3), return_dict=False)[0]
        else:  # Flux2Transformer2DModel
            out = model(hidden_states=hidden, encoder_hidden_states=enc, timestep=t,
                        guidance=torch.ones(b) if c.guidance_embeds else None, txt_ids=torch.zeros(text, 4),
                        img_ids=torch.zeros(n_img + n_ref, 4), return_dict=False)[0]
        return (out[:, :n_img].float() ** 2).mean()

    def units(model: nn.Module) -> list[nn.Module]:
        blocks = [b for name in ("transformer_blocks", "single_transformer_blocks")
                  for b in getattr(model, name, None) or []]
        return [*blocks, model]

    channels = cfg["in_channels"]
    return ModelSpec(label=label, build=build, units=units, step=step, latent_numel=n_img * channels,
                     frozen_bytes=frozen_component_bytes(model_cfg.pretrained, dtype),
                     checkpointing=lambda m: m.enable_gradient_checkpointing(),
                     depth={k: config[k] for k in ("num_layers", "num_single_layers") if k in config})


def frozen_component_bytes(pretrained: str | None, dtype: torch.dtype) -> dict[str, int | None]:
    """Text encoder and VAE bytes from a local pipeline folder's configs (built on meta); None: unknown."""
    out: dict[str, int | None] = {"text_encoder": None, "vae": None}
    folder = Path(pretrained).expanduser() if pretrained else None
    if folder is None or not folder.is_dir():
        return out
    size = torch.tensor([], dtype=dtype).element_size()
    for name in ("text_encoder", "vae"):
        cfg_path = folder / name / "config.json"
        if not cfg_path.is_file():
            continue
        config = json.loads(cfg_path.read_text())
        with torch.device("meta"):
            if "_class_name" in config:  # diffusers
                import diffusers

                model = getattr(diffusers, config["_class_name"]).from_config(config)
            else:  # transformers
                import transformers

                model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(cfg_path.parent))
        out[name] = sum(p.numel() for p in model.parameters()) * size
    return out
