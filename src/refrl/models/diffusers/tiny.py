"""Tiny random-weight diffusers components, built in code, with locally built tokenizers.

For tests and docs examples: the same classes the real checkpoints use
(`Flux2Transformer2DModel`, `QwenImageTransformer2DModel`, `FluxTransformer2DModel`,
their VAEs, Qwen3 / Qwen2.5-VL / CLIP / T5 text encoders), shrunk to 1-2 layers and
widths of 16-32, as diffusers' own fast tests do. Nothing is downloaded: the
tokenizers are byte- or character-level vocabularies built here (diffusers' tests
fetch ``hf-internal-testing`` tokenizers instead).

`save_tiny_pipeline(kind, folder)` writes a complete pipeline folder
(``model_index.json`` + one sub-folder per component), so the real loading path
(`refrl.models.diffusers.common.load_pipeline`) is exercised on it.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

# Sizes of the tiny components (named so tests can reason about token counts).
TINY_HIDDEN = 16  # text-encoder width
TINY_HEADS = 2
TINY_HEAD_DIM = 16
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen3's chat template reduced to what `Flux2KleinPipeline` asks of it (one user turn,
# generation prompt, thinking disabled -> an empty think block).
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
TINY_KINDS = ("flux2-klein", "qwen-edit-plus", "kontext")
TINY_IMAGE_SIZE = 32
# FLUX.2 pipelines refuse references under 64 px.
TINY_REF_SIZE = {"flux2-klein": 64, "qwen-edit-plus": 32, "kontext": 32}
# Model options that fit the tiny components (merge into `ModelConfig.diffusers`).
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "flux2-klein": {"text_encoder_out_layers": [1, 2], "max_text_tokens": 24},
    "qwen-edit-plus": {"vlm_image_area": 32 * 32},
    "kontext": {"max_text_tokens": 24, "guidance": 2.5},
}


def byte_level_qwen_tokenizer(chat_template: str | None = None):
    """A Qwen2 tokenizer whose vocabulary is the 256 byte-level symbols plus Qwen's special tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def _chars() -> list[str]:
    return [c for c in string.printable if not c.isspace()]


def char_clip_tokenizer(max_length: int = 77):
    """A CLIP tokenizer over single characters (lower case, as CLIP normalises)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _chars():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def char_t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters and word-initial characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _chars()] + [("\u2581" + c, -3.5) for c in _chars()]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_flux2_klein_components(seed: int = 0, layers: int = 1) -> dict[str, Any]:
    """FLUX.2 [klein]: ``layers`` double + single blocks, a 3-level VAE (x4 down), a 2-layer Qwen3.

    The FLUX.2 pipelines refuse references under 64 px, so tests use 64 px references."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_layers = TINY_OPTIONS["flux2-klein"]["text_encoder_out_layers"]
    latent_channels = 2
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=layers,
        attention_head_dim=TINY_HEAD_DIM, num_attention_heads=TINY_HEADS,
        joint_attention_dim=TINY_HIDDEN * len(out_layers), timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    # Non-trivial latent statistics so that the normalisation is really exercised.
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    tokenizer = byte_level_qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
    ))
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "transformer": transformer}


def tiny_qwen_edit_plus_components(seed: int = 0) -> dict[str, Any]:
    """Qwen-Image-Edit-Plus: 1 MMDiT block, the causal 3-D VAE (x4 down), a 2-layer Qwen2.5-VL."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from refrl.models.diffusers.qwen_edit_plus import image_only_processor

    z_dim = 4
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=1, attention_head_dim=TINY_HEAD_DIM,
        num_attention_heads=TINY_HEADS, joint_attention_dim=TINY_HIDDEN, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 1.2],
    )
    tokenizer = byte_level_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    patch, merge = 4, 2
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": TINY_HIDDEN, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": TINY_HIDDEN, "patch_size": patch, "spatial_merge_size": merge,
                       "window_size": 16, "fullatt_block_indexes": [0]},
        vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=64 * 64,
    )
    processor = image_only_processor(image_processor, tokenizer)
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "processor": processor, "transformer": transformer}


def tiny_kontext_components(seed: int = 0) -> dict[str, Any]:
    """FLUX.1 Kontext: 1 double + 1 single block with guidance embedding, a 2-level VAE, tiny CLIP + T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=TINY_HEAD_DIM,
        num_attention_heads=TINY_HEADS, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    tokenizer = char_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        projection_dim=32, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    tokenizer_2 = char_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    return {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
            "transformer": transformer}


TINY_BUILDERS = {
    "flux2-klein": tiny_flux2_klein_components,
    "qwen-edit-plus": tiny_qwen_edit_plus_components,
    "kontext": tiny_kontext_components,
}


def tiny_model_config(kind: str, pretrained: str | Path, **overrides: Any):
    """A `ModelConfig` of ``kind`` sized for the tiny components (32 px images)."""
    from refrl.models.build import ModelConfig

    data: dict[str, Any] = {"kind": kind, "pretrained": str(pretrained), "image_size": TINY_IMAGE_SIZE,
                            "ref_size": TINY_REF_SIZE[kind], "device": "cpu"}
    options = dict(TINY_OPTIONS[kind])
    options.update(overrides.pop("diffusers", {}))
    data.update(overrides)
    data["diffusers"] = options
    return ModelConfig.model_validate(data)


def quantize_sample(sample, n_refs: int | None = None):
    """A copy of a `LoadedSample` (optionally with its first ``n_refs`` references) whose
    images lie on the uint8 grid, so that PIL round trips in the pipelines are exact."""
    from refrl.data.schema import LoadedSample

    q = lambda im: None if im is None else (im * 255).round() / 255  # noqa: E731
    refs = sample.ref_images[:n_refs] if n_refs else sample.ref_images
    return LoadedSample(sample.id, sample.prompt, [q(r) for r in refs], list(sample.ref_types[: len(refs)]),
                        target=q(sample.target), mask=sample.mask, category=sample.category, extra=sample.extra)


def tiny_pipeline(kind: str, seed: int = 0, **sizes: int):
    """The diffusers pipeline of ``kind`` assembled from tiny components (in memory)."""
    from refrl.models.diffusers.registry import pipeline_class

    if kind not in TINY_BUILDERS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(TINY_BUILDERS)}")
    return pipeline_class(kind)(**TINY_BUILDERS[kind](seed, **sizes))


def save_tiny_pipeline(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline of ``kind`` as a diffusers folder; returns the folder."""
    import json

    folder = Path(folder)
    pipe = tiny_pipeline(kind, seed)
    processor = getattr(pipe, "processor", None)
    if processor is not None:  # an image-only processor cannot save itself: write its parts
        pipe.register_modules(processor=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    if processor is not None:
        processor.image_processor.save_pretrained(folder / "processor")
        processor.tokenizer.save_pretrained(folder / "processor")
        index = json.loads((folder / "model_index.json").read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
