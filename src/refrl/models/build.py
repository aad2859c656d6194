"""Build a policy from a config, or load one from a checkpoint name or folder.

Which folder a name (``--ckpt``: ``tiny-sft``, a run folder, a checkpoint folder) points
at is decided by `refrl.runfolder.layout.resolve_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

from refrl.errors import ConfigError
from refrl.models.config import ModelConfig  # noqa: F401  (re-exported: the `model:` section's type)
from refrl.models.config_base import ModelOptions
from refrl.models.diffusers import DIFFUSERS_KINDS
from refrl.models.freeze import freeze_modules
from refrl.models.policy import Policy
from refrl.runfolder.layout import resolve_checkpoint

# LoRA targets of the tiny DiT when `lora_targets` is not given (diffusers kinds have their own).
TINY_LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]


def _saved_kind(folder: Path) -> str:
    """The kind a policy folder was saved by (diffusers adapters name theirs in config.json)."""
    import json

    try:
        info = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "tiny-dit"
    return info.get("kind", "tiny-dit") if isinstance(info, dict) else "tiny-dit"


def load_policy(name_or_path: str | Path) -> Policy:
    """Load a saved policy (EMA weights as exported at the checkpoint)."""
    folder = resolve_checkpoint(name_or_path)
    if _saved_kind(folder) in DIFFUSERS_KINDS:
        from refrl.models.diffusers import load_diffusers_policy

        return load_diffusers_policy(folder)
    from refrl.models.tiny_dit_policy import TinyDiTPolicy

    return TinyDiTPolicy.from_pretrained(folder)


def check_image_size(policy: Policy, size: int, key: str = "data.size") -> None:
    """Refuse, naming ``key``, an image size the policy cannot generate at: the tiny DiT
    needs a multiple of its patch size (diffusers adapters resize to their own resolution)."""
    from refrl.models.tiny_dit_policy import TinyDiTPolicy

    if isinstance(policy, TinyDiTPolicy) and size % policy.config.patch:
        patch = policy.config.patch
        raise ConfigError(f"config key '{key}': {size} is not a multiple of the model's patch size {patch} "
                          f"(allowed: {patch}, {2 * patch}, ..., e.g. {patch * max(1, round(size / patch))})")


def _index_word_ids(tok, n: int) -> list[int]:
    """Token ids of "1".."n", how prompts name the references ("image 2"); -1 for a number not in the vocabulary."""
    return [tok.word_to_id.get(str(i + 1), -1) for i in range(n)]


def build_policy(cfg: ModelOptions) -> Policy:
    """A fresh policy from a model config (or its ``init`` loaded), with LoRA if asked."""
    if cfg.kind in DIFFUSERS_KINDS:
        from refrl.models.diffusers import build_diffusers_policy

        return build_diffusers_policy(cfg)
    from refrl.data.refworld.vocab import WORDS
    from refrl.models.tiny_dit_config import TinyDiTArch, TinyDiTConfig
    from refrl.models.tiny_dit_policy import TinyDiTPolicy
    from refrl.models.tokenizer import WordTokenizer

    if cfg.init:
        policy = load_policy(cfg.init)
        policy.use_ref_cache = cfg.use_ref_cache
    else:
        tok = WordTokenizer.from_words(WORDS)
        arch = TinyDiTConfig(
            **cfg.model_dump(include=set(TinyDiTArch.model_fields)), vocab_size=tok.vocab_size,
            index_word_ids=_index_word_ids(tok, cfg.max_refs) if cfg.tie_index_words else None,
        )
        policy = TinyDiTPolicy(tok, arch)
    if cfg.lora_rank > 0:
        policy.enable_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha or cfg.lora_rank,
                           target_modules=cfg.lora_targets or TINY_LORA_TARGETS)
    freeze_modules(policy.net, cfg.frozen)
    return policy
