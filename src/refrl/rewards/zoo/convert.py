"""Published reward checkpoints in their original layouts -> transformers module names.

* OpenAI CLIP / open_clip layout (HPSv2's ``HPS_v2*_compressed.pt``, CSD's
  ``checkpoint.pth`` backbone) -> ``CLIPModel`` / ``CLIPVisionModel``: fused
  ``attn.in_proj_weight`` is split into q/k/v, ``proj`` matrices are transposed.
* BLIP layout (ImageReward's ``ImageReward.pt``: ``blip.visual_encoder`` timm-style
  ViT + ``blip.text_encoder`` BERT with cross-attention) -> ``BlipVisionModel`` +
  ``BlipTextModel`` names.

Each mapping is one table of (original, transformers) name patterns, used in both
directions, so ``to_original(from_original(sd)) == sd`` holds key for key.
"""

from __future__ import annotations

import re

import torch

# (original regex, transformers template) — ``{i}`` is the layer index.
_CLIP_BLOCK = [
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
]
_CLIP_VISION = [
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("class_embedding", "embeddings.class_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_pre", "pre_layrnorm"),
    ("ln_post", "post_layernorm"),
]
_CLIP_TEXT = [
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final", "final_layer_norm"),
]


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` (e.g. ``module.`` of DataParallel checkpoints) from every key that has it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _clip_tower(state: dict[str, torch.Tensor], src: str, dst: str, flat: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """One CLIP tower: original keys under ``src`` -> transformers keys under ``dst``."""
    out: dict[str, torch.Tensor] = {}
    block = re.compile(rf"^{re.escape(src)}transformer\.resblocks\.(\d+)\.(.+)$")
    for key, value in state.items():
        if not key.startswith(src):
            continue
        m = block.match(key)
        if m:
            i, rest = m.groups()
            layer = f"{dst}encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[-1]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{name}.{kind}"] = part.clone()
                continue
            for a, b in _CLIP_BLOCK:
                if rest.startswith(a + "."):
                    out[layer + b + rest[len(a):]] = value
                    break
            else:
                raise KeyError(f"unexpected CLIP block key {key!r}")
            continue
        rest = key[len(src):]
        for a, b in flat:
            if rest == a or rest.startswith(a + "."):
                out[dst + b + rest[len(a):]] = value
                break
    return out


def openai_clip_to_hf(state: dict[str, torch.Tensor], vision_prefix: str = "visual.", with_text: bool = True,
                      hf_vision_prefix: str = "vision_model.") -> dict[str, torch.Tensor]:
    """OpenAI/open_clip CLIP weights -> ``CLIPModel`` state dict (``with_text=False``: the vision tower only,
    without ``visual_projection`` unless ``proj`` is present)."""
    out = _clip_tower(state, vision_prefix, hf_vision_prefix, _CLIP_VISION)
    if f"{vision_prefix}proj" in state and state[f"{vision_prefix}proj"] is not None:
        out["visual_projection.weight"] = state[f"{vision_prefix}proj"].t().contiguous()
    if with_text:
        text = {k: v for k, v in state.items() if not k.startswith(vision_prefix)}
        out.update(_clip_tower(text, "", "text_model.", _CLIP_TEXT))
        out["text_projection.weight"] = state["text_projection"].t().contiguous()
        out["logit_scale"] = state["logit_scale"]
    return out


def hf_clip_to_openai(state: dict[str, torch.Tensor], with_text: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of `openai_clip_to_hf` (used to write original-layout files, e.g. for tests)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state.items():
        m = re.match(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$", key)
        if m:
            tower, i, rest = m.groups()
            src = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            q = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
            if q:
                slot = qkv.setdefault(f"{src}attn.in_proj_{q.group(2)}", [None, None, None])
                slot["qkv".index(q.group(1))] = value
                continue
            for a, b in _CLIP_BLOCK:
                if rest.startswith(b + "."):
                    out[src + a + rest[len(b):]] = value
                    break
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key == "text_projection.weight":
            if with_text:
                out["text_projection"] = value.t().contiguous()
        elif key == "logit_scale":
            if with_text:
                out["logit_scale"] = value
        elif key.startswith("vision_model."):
            rest = key[len("vision_model."):]
            for a, b in _CLIP_VISION:
                if rest == b or rest.startswith(b + "."):
                    out["visual." + a + rest[len(b):]] = value
                    break
        elif key.startswith("text_model.") and with_text:
            rest = key[len("text_model."):]
            for a, b in _CLIP_TEXT:
                if rest == b or rest.startswith(b + "."):
                    out[a + rest[len(b):]] = value
                    break
    for key, parts in qkv.items():
        if with_text or key.startswith("visual."):
            out[key] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    return out


_BLIP_VISION = [
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm1.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm2.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.qkv.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"visual_encoder\.norm\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"text_encoder\.(embeddings|encoder)\.(.+)", r"text_encoder.\1.\2"),  # BERT names are kept as is
]
_HF_BLIP = [
    (r"vision_model\.embeddings\.class_embedding", "visual_encoder.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "visual_encoder.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"visual_encoder.patch_embed.proj.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"visual_encoder.blocks.\1.norm1.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"visual_encoder.blocks.\1.norm2.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)", r"visual_encoder.blocks.\1.attn.qkv.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"visual_encoder.blocks.\1.attn.proj.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"visual_encoder.blocks.\1.mlp.\2.\3"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual_encoder.norm.\1"),
    (r"text_encoder\.(embeddings|encoder)\.(.+)", r"text_encoder.\1.\2"),
]


def _rename(state: dict[str, torch.Tensor], table: list[tuple[str, str]], src: str, dst: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(src):
            continue
        rest = key[len(src):]
        for pattern, template in table:
            if re.fullmatch(pattern, rest):
                out[dst + re.sub(pattern, template, rest)] = value
                break
    return out


def blip_to_hf(state: dict[str, torch.Tensor], prefix: str = "blip.") -> dict[str, torch.Tensor]:
    """BLIP (ImageReward) ``visual_encoder`` + ``text_encoder`` weights -> transformers names
    (``vision_model.*`` of ``BlipVisionModel``, ``text_encoder.*`` of ``BlipTextModel``). Other
    BLIP parts (decoder, projections, momentum encoders) are not used by ImageReward and dropped."""
    return _rename(state, _BLIP_VISION, prefix, "")


def hf_to_blip(state: dict[str, torch.Tensor], prefix: str = "blip.") -> dict[str, torch.Tensor]:
    """Inverse of `blip_to_hf`."""
    return _rename(state, _HF_BLIP, "", prefix)
