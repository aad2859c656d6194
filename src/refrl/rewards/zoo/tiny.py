"""Tiny random-weight checkpoints of every zoo reward, built from config in code.

They exercise the real loading and scoring code offline (tests, CI, a smoke test
of ``refrl serve-reward`` on a machine with no weights): the architecture and the
files are those of the real checkpoints, only the sizes are tiny and the weights
random. ``save_tiny(name, folder)`` writes one and returns the options that build
the reward from it, e.g. ``build("dino", **save_tiny("dino", tmp))``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TINY_IMAGE = 32
TINY_PATCH = 8
TINY_WIDTH = 32
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def _vision(**extra: Any) -> dict[str, Any]:
    return dict(hidden_size=TINY_WIDTH, intermediate_size=2 * TINY_WIDTH, num_hidden_layers=1,
                num_attention_heads=2, image_size=TINY_IMAGE, patch_size=TINY_PATCH, **extra)


def _text(vocab_size: int, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=TINY_WIDTH, intermediate_size=2 * TINY_WIDTH,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32, **extra)


def word_vocab() -> list[str]:
    """Special tokens, then every RefWorld word and a few common English ones."""
    from refrl.data.refworld.vocab import WORDS

    extra = ("a", "an", "the", "photo", "of", "image", "in", "on", "with", "and", "rate", "score", "answer")
    words = list(SPECIAL_TOKENS)
    for w in (*WORDS, *extra):
        if w not in words:
            words.append(w)
    return words


def save_word_tokenizer(folder: Path, vocab: list[str] | None = None, eos: bool = True) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (lowercase, whitespace/punctuation split) saved to ``folder``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = vocab or word_vocab()
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=False)])
    if eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=32)
    fast.save_pretrained(folder)
    return fast


def save_preprocessor(folder: Path, mean: tuple[float, ...], std: tuple[float, ...], size: int = TINY_IMAGE,
                      **extra: Any) -> None:
    """A ``preprocessor_config.json`` with the fields the zoo reads (resize + centre crop)."""
    cfg = {"image_mean": list(mean), "image_std": list(std), "size": {"shortest_edge": size},
           "crop_size": {"height": size, "width": size}, "do_center_crop": True, **extra}
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def _save_dino(folder: Path) -> dict[str, Any]:
    from transformers import ViTConfig, ViTModel

    from refrl.rewards.zoo.base import IMAGENET_MEAN, IMAGENET_STD

    ViTModel(ViTConfig(**_vision()), add_pooling_layer=False).save_pretrained(folder)
    save_preprocessor(folder, IMAGENET_MEAN, IMAGENET_STD)
    return {"checkpoint": str(folder)}


def _save_dinov2(folder: Path) -> dict[str, Any]:
    from transformers import Dinov2Config, Dinov2Model

    from refrl.rewards.zoo.base import IMAGENET_MEAN, IMAGENET_STD

    cfg = _vision()
    cfg.pop("intermediate_size")
    Dinov2Model(Dinov2Config(mlp_ratio=2, **cfg)).save_pretrained(folder)
    save_preprocessor(folder, IMAGENET_MEAN, IMAGENET_STD)
    return {"checkpoint": str(folder)}


def tiny_clip_config(vocab_size: int, projection_dim: int = 16) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(text_config=_text(vocab_size, eos_token_id=EOS_ID, bos_token_id=BOS_ID, pad_token_id=PAD_ID),
                      vision_config=_vision(), projection_dim=projection_dim)


def _save_clip(folder: Path) -> dict[str, Any]:
    from transformers import CLIPModel

    from refrl.rewards.zoo.base import CLIP_MEAN, CLIP_STD

    tok = save_word_tokenizer(folder)
    CLIPModel(tiny_clip_config(len(tok))).save_pretrained(folder)
    save_preprocessor(folder, CLIP_MEAN, CLIP_STD)
    return {"checkpoint": str(folder)}


def _save_siglip(folder: Path) -> dict[str, Any]:
    from transformers import SiglipConfig, SiglipModel

    from refrl.rewards.zoo.base import HALF_MEAN, HALF_STD

    tok = save_word_tokenizer(folder)
    SiglipModel(SiglipConfig(text_config=_text(len(tok)), vision_config=_vision())).save_pretrained(folder)
    save_preprocessor(folder, HALF_MEAN, HALF_STD)
    return {"checkpoint": str(folder)}


def _save_siglip2(folder: Path) -> dict[str, Any]:
    """A NaFlex SigLIP2 (``Siglip2Model``): patchified input, position embeddings resized per image."""
    from transformers import Siglip2Config, Siglip2Model

    from refrl.rewards.zoo.base import HALF_MEAN, HALF_STD

    tok = save_word_tokenizer(folder)
    vision = _vision(num_patches=16)
    vision.pop("image_size")
    Siglip2Model(Siglip2Config(text_config=_text(len(tok)), vision_config=vision)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(HALF_MEAN), "image_std": list(HALF_STD), "patch_size": TINY_PATCH, "max_num_patches": 16}))
    return {"checkpoint": str(folder)}


def _save_dino_seg(folder: Path) -> dict[str, Any]:
    """A tiny DINOv2 encoder plus a tiny CLIPSeg segmenter (its own tokenizer and preprocessor)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    from refrl.rewards.zoo.base import CLIP_MEAN, CLIP_STD

    options = _save_dinov2(folder / "encoder")
    seg = folder / "segmenter"
    tok = save_word_tokenizer(seg)
    config = CLIPSegConfig(text_config=_text(len(tok), eos_token_id=EOS_ID, bos_token_id=BOS_ID, pad_token_id=PAD_ID),
                           vision_config=_vision(), projection_dim=16, reduce_dim=16, extract_layers=[0],
                           decoder_num_attention_heads=2, decoder_intermediate_size=32, conditional_layer=0)
    CLIPSegForImageSegmentation(config).save_pretrained(seg)
    save_preprocessor(seg, CLIP_MEAN, CLIP_STD)
    return {**options, "segmenter_checkpoint": str(seg)}


def _save_lpips(folder: Path) -> dict[str, Any]:
    """AlexNet-LPIPS with random backbone weights and non-negative heads (as trained LPIPS heads are)."""
    from refrl.rewards.zoo.perceptual import LpipsNet, save_lpips_net

    net = LpipsNet("alex")
    for name, p in net.named_parameters():
        if name.startswith("lin"):
            p.data.abs_()

    save_lpips_net(net, folder)
    return {"checkpoint": str(folder), "size": TINY_IMAGE}


def _save_hpsv2(folder: Path) -> dict[str, Any]:
    """A tiny CLIP saved twice: as a transformers folder (``processor/``: config, tokenizer, preprocessor)
    and in HPSv2's original open_clip layout (``HPS_v2.1_compressed.pt``, ``{"state_dict": ...}``)."""
    from transformers import CLIPModel

    from refrl.rewards.zoo.convert import hf_clip_to_openai
    from refrl.rewards.zoo.preference import HPSV2_FILE

    _save_clip(folder / "processor")
    model = CLIPModel.from_pretrained(folder / "processor")
    state = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
    torch.save({"epoch": 1, "state_dict": hf_clip_to_openai(state)}, folder / HPSV2_FILE)
    return {"checkpoint": str(folder / HPSV2_FILE), "processor": str(folder / "processor")}


TINY_IMAGE_REWARD = {"vision": {"hidden_size": TINY_WIDTH, "intermediate_size": 2 * TINY_WIDTH, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "image_size": TINY_IMAGE, "patch_size": TINY_PATCH},
                     "text": {"hidden_size": TINY_WIDTH, "intermediate_size": 2 * TINY_WIDTH, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "encoder_hidden_size": TINY_WIDTH,
                              "max_position_embeddings": 64}}


def _save_image_reward(folder: Path) -> dict[str, Any]:
    """A tiny BLIP + MLP written in ImageReward's original layout (``ImageReward.pt``: ``blip.*``, ``mlp.*``)."""
    from refrl.rewards.zoo.convert import hf_to_blip
    from refrl.rewards.zoo.preference import (
        IMAGE_REWARD_FILE,
        IMAGE_REWARD_TEXT,
        IMAGE_REWARD_VISION,
        ImageRewardModel,
    )

    tok = save_word_tokenizer(folder)
    arch = {"vision": dict(TINY_IMAGE_REWARD["vision"]), "text": {**TINY_IMAGE_REWARD["text"], "vocab_size": len(tok)}}
    model = ImageRewardModel({**IMAGE_REWARD_VISION, **arch["vision"]}, {**IMAGE_REWARD_TEXT, **arch["text"]})
    state = model.state_dict()
    original = {**hf_to_blip(state), **{k: v for k, v in state.items() if k.startswith("mlp.")}}
    torch.save(original, folder / IMAGE_REWARD_FILE)
    return {"checkpoint": str(folder / IMAGE_REWARD_FILE), "tokenizer": str(folder), "architecture": arch}


def _save_csd(folder: Path) -> dict[str, Any]:
    """A tiny CLIP vision tower + style head in CSD's original layout (``checkpoint.pth``:
    ``model_state_dict`` with ``module.backbone.*`` OpenAI names and ``module.last_layer_style``), and the
    tower's config in ``base/`` (the role of openai/clip-vit-large-patch14)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from refrl.rewards.zoo.convert import hf_clip_to_openai

    config = CLIPVisionConfig(**_vision())
    config.save_pretrained(folder / "base")
    tower = CLIPVisionModel(config)
    state = {"vision_model." + k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()
             if "position_ids" not in k}
    original = {"module.backbone." + k[len("visual."):]: v for k, v in hf_clip_to_openai(state, with_text=False).items()}
    original["module.last_layer_style"] = torch.randn(TINY_WIDTH, 16) / TINY_WIDTH**0.5
    original["module.last_layer_content"] = torch.randn(TINY_WIDTH, 16) / TINY_WIDTH**0.5
    torch.save({"epoch": 1, "model_state_dict": original}, folder / "checkpoint.pth")
    return {"checkpoint": str(folder / "checkpoint.pth"), "base": str(folder / "base")}


JSON_WORDS = ("{", "}", '"', ":", ",", "-", "subject", "style", "background", "layout", "lighting", "prompt",
              "quality", "user", "assistant", "system", "you", "are", "helpful", "assistant", *map(str, range(11)))


def save_qwen_tokenizer(folder: Path, extra_special: tuple[str, ...] = ()) -> Any:
    """A word-level tokenizer with Qwen's special tokens (chat and vision markers), saved to ``folder``."""
    from refrl.rewards.zoo.qwen_vl import QWEN_SPECIAL_TOKENS

    vocab = list(dict.fromkeys([*word_vocab(), *JSON_WORDS]))
    tok = save_word_tokenizer(folder, vocab, eos=False)
    tok.add_tokens([*QWEN_SPECIAL_TOKENS, *extra_special], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.model_max_length = 4096  # chat prompts with image tokens are long
    tok.save_pretrained(folder)
    return tok


def tiny_qwen_config(kind: str, tok: Any) -> Any:
    """A one-layer Qwen2-VL (``qwen2_vl``) or Qwen2.5-VL (``qwen2_5_vl``) config matching ``tok``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {"image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
           "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
           "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>")}
    text = dict(vocab_size=len(tok), hidden_size=TINY_WIDTH, intermediate_size=2 * TINY_WIDTH, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, pad_token_id=PAD_ID,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), bos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]})
    common = dict(patch_size=TINY_PATCH, spatial_merge_size=2, temporal_patch_size=2, num_heads=2, depth=1)
    if kind == "qwen2_vl":
        return Qwen2VLConfig(text_config=text, vision_config=dict(embed_dim=TINY_WIDTH, hidden_size=TINY_WIDTH,
                                                                  mlp_ratio=2, **common), **ids)
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(hidden_size=TINY_WIDTH, intermediate_size=2 * TINY_WIDTH,
                                                                 out_hidden_size=TINY_WIDTH, window_size=2 * TINY_PATCH,
                                                                 fullatt_block_indexes=[0], **common), **ids)


def save_qwen_preprocessor(folder: Path, pixels: int = TINY_IMAGE * TINY_IMAGE) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": TINY_PATCH, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": pixels,
        "max_pixels": pixels, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))


def _save_hpsv3(folder: Path) -> dict[str, Any]:
    """A tiny Qwen2-VL base (``base/``: config, tokenizer without <|Reward|>, preprocessor) and an
    ``HPSv3.safetensors`` in HPSv3's original names (``model.*``, ``visual.*``, ``lm_head.*``, ``rm_head.*``)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    from refrl.rewards.zoo.hpsv3 import HPSV3_FILE, REWARD_TOKEN, hpsv3_head

    base = folder / "base"
    tok = save_qwen_tokenizer(base)
    config = tiny_qwen_config("qwen2_vl", tok)
    config.save_pretrained(base)
    save_qwen_preprocessor(base)
    tok.add_tokens([REWARD_TOKEN], special_tokens=True)  # HPSv3 adds it and resizes the embeddings
    config.text_config.vocab_size = len(tok)
    model = Qwen2VLForConditionalGeneration(config)
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        state[key] = value.contiguous()
    state.update({f"rm_head.{k}": v for k, v in hpsv3_head(TINY_WIDTH).state_dict().items()})
    save_file(state, folder / HPSV3_FILE)
    return {"checkpoint": str(folder / HPSV3_FILE), "base": str(base), "pixels": TINY_IMAGE * TINY_IMAGE}


def _save_vlm_judge(folder: Path) -> dict[str, Any]:
    """A tiny Qwen2.5-VL with its tokenizer and image settings (random weights: its answers do not parse)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = save_qwen_tokenizer(folder)
    Qwen2_5_VLForConditionalGeneration(tiny_qwen_config("qwen2_5_vl", tok)).save_pretrained(folder)
    save_qwen_preprocessor(folder, pixels=16 * 16)
    return {"checkpoint": str(folder), "max_new_tokens": 8}


TINY_BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "dino": _save_dino,
    "dinov2": _save_dinov2,
    "clip_i": _save_clip,
    "clip_t": _save_clip,
    "pickscore": _save_clip,
    "siglip": _save_siglip,
    "siglip2": _save_siglip2,
    "dino_seg": _save_dino_seg,
    "lpips": _save_lpips,
    "hpsv2": _save_hpsv2,
    "image_reward": _save_image_reward,
    "csd": _save_csd,
    "hpsv3": _save_hpsv3,
    "vlm_judge": _save_vlm_judge,
}


def save_tiny(name: str, folder: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write a tiny random checkpoint for zoo reward ``name`` into ``folder``; return its build options."""
    if name not in TINY_BUILDERS:
        raise KeyError(f"no tiny checkpoint for {name!r}; available: {', '.join(sorted(TINY_BUILDERS))}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return TINY_BUILDERS[name](folder)
