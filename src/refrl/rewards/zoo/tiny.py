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
    from refrl.rewards.zoo.preference import IMAGE_REWARD_FILE, IMAGE_REWARD_TEXT, IMAGE_REWARD_VISION, ImageRewardModel

    tok = save_word_tokenizer(folder)
    arch = {"vision": dict(TINY_IMAGE_REWARD["vision"]), "text": {**TINY_IMAGE_REWARD["text"], "vocab_size": len(tok)}}
    model = ImageRewardModel({**IMAGE_REWARD_VISION, **arch["vision"]}, {**IMAGE_REWARD_TEXT, **arch["text"]})
    state = model.state_dict()
    original = {**hf_to_blip(state), **{k: v for k, v in state.items() if k.startswith("mlp.")}}
    torch.save(original, folder / IMAGE_REWARD_FILE)
    return {"checkpoint": str(folder / IMAGE_REWARD_FILE), "tokenizer": str(folder), "architecture": arch}


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
}


def save_tiny(name: str, folder: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write a tiny random checkpoint for zoo reward ``name`` into ``folder``; return its build options."""
    if name not in TINY_BUILDERS:
        raise KeyError(f"no tiny checkpoint for {name!r}; available: {', '.join(sorted(TINY_BUILDERS))}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    return TINY_BUILDERS[name](folder)
