"""TinyDiTPolicy: `TinyDiT` + `WordTokenizer` behind the `Policy` protocol.

Pixel-space latents: an image in [0, 1] is the latent ``2 x - 1``. References are
resized (bilinear, antialiased) to ``ref_size`` squares. Condition dropout for
classifier-free guidance is done here by emptying the prompt / removing the
references (never by ``nn.Dropout``, which would make GRPO's old/new policies differ).

Saved form (``save_pretrained``): ``model.safetensors``, ``config.json``
(`TinyDiTConfig`) and ``tokenizer.json``. By default LoRA, if enabled, is *merged*
into the weights, so the folder is a plain model and a loaded policy has no adapter
(``enable_lora`` again to go on with one). ``merge_lora=False`` keeps the adapter
apart (``adapter.safetensors`` + ``adapter.json``: rank, alpha, targets): the loaded
policy then has the same adapter and ``adapter_disabled`` still gives the pre-LoRA
reference policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from refrl.data.schema import REFERENCE_TYPES, LoadedSample, canonical_reference_type
from refrl.errors import RefrlError, clip_text
from refrl.models.inputs import drop_flags, resize_square
from refrl.models.sampler import SamplerDefaults
from refrl.models.tiny_dit import ConditionInputs, TinyDiT, TinyDiTCondition, TinyDiTConfig
from refrl.models.tokenizer import WordTokenizer
from refrl.runfolder.files import save_safetensors
from refrl.runfolder.readers import read_safetensors

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter.json"
# Every attention and MLP linear of both streams (``kv`` is the last condition layer's).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("qkv", "kv", "proj", "fc1", "fc2")
_ADAPTER = "default"
# The tiny DiT's sampler: every RefWorld result in docs/ was evaluated with 20 steps, CFG 2 and
# no shift, and trained from 10-step rollouts without guidance (the presets may say otherwise).
TINY_DIT_SAMPLER = SamplerDefaults(steps=20, cfg_scale=2.0, shift=1.0, rollout_steps=10, rollout_cfg_scale=1.0,
                                   source="the tiny DiT (refrl.models.tiny_dit_policy.TINY_DIT_SAMPLER)")


class TinyDiTPolicy(nn.Module):
    """The embedded reference-conditioned flow-matching policy (see module docstring)."""

    def __init__(self, tokenizer: WordTokenizer, config: TinyDiTConfig | None = None):
        super().__init__()
        config = config or TinyDiTConfig()
        if config.vocab_size is None:
            config = config.model_copy(update={"vocab_size": tokenizer.vocab_size})
        elif config.vocab_size < tokenizer.vocab_size:
            raise RefrlError(f"config vocab_size={config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} words")
        self.tokenizer = tokenizer
        self.net = TinyDiT(config)
        # Kept outside the module tree: the peft wrapper holds `self.net` itself.
        self.__dict__["_peft"] = None
        self.lora_config: dict | None = None

    @property
    def config(self) -> TinyDiTConfig:
        return self.net.config

    @property
    def image_size(self) -> int:
        return self.net.config.image_size

    def sampler_defaults(self) -> SamplerDefaults:
        """The sampler eval, generate and RL rollouts use where no key sets it (`TINY_DIT_SAMPLER`)."""
        return TINY_DIT_SAMPLER

    @property
    def use_ref_cache(self) -> bool:
        return self.net.use_ref_cache

    @use_ref_cache.setter
    def use_ref_cache(self, value: bool) -> None:
        self.net.use_ref_cache = bool(value)

    @property
    def device(self) -> torch.device:
        return self.net.image_embed.weight.device

    # -- Policy: condition ------------------------------------------------------------

    def encode_condition(
        self,
        samples: Sequence[LoadedSample],
        drop_text: torch.Tensor | None = None,
        drop_refs: torch.Tensor | None = None,
    ) -> TinyDiTCondition:
        """Tokenise prompts and pad references of a batch, then run the condition stream
        (cached K/V) or keep the inputs (cache off). Dropped prompts become ``""``, dropped
        references are removed."""
        return self.net.encode_condition(self.condition_inputs(samples, drop_text, drop_refs))

    def condition_inputs(
        self,
        samples: Sequence[LoadedSample],
        drop_text: torch.Tensor | None = None,
        drop_refs: torch.Tensor | None = None,
    ) -> ConditionInputs:
        cfg, b = self.config, len(samples)
        no_text, no_refs = drop_flags(drop_text, b, "drop_text"), drop_flags(drop_refs, b, "drop_refs")
        for s in samples:
            if s.n_refs > cfg.max_refs:
                raise RefrlError(f"sample {s.id!r} has {s.n_refs} references; the model takes at most max_refs={cfg.max_refs}")
            if len(s.ref_types) != s.n_refs:
                raise RefrlError(f"sample {s.id!r} has {s.n_refs} reference images but {len(s.ref_types)} reference types")
        text_ids, text_mask = self.tokenizer.encode(["" if d else s.prompt for s, d in zip(samples, no_text, strict=True)], cfg.max_text_len)
        n_refs = max((s.n_refs for s, d in zip(samples, no_refs, strict=True) if not d), default=0)
        pixels = torch.zeros(b, n_refs, 3, cfg.ref_size, cfg.ref_size)
        types = torch.zeros(b, n_refs, dtype=torch.long)
        mask = torch.zeros(b, n_refs, dtype=torch.bool)
        for i, (s, dropped) in enumerate(zip(samples, no_refs, strict=True)):
            if dropped:
                continue
            for j, (image, ref_type) in enumerate(zip(s.ref_images, s.ref_types, strict=True)):
                pixels[i, j] = resize_square(image, cfg.ref_size, f"sample {s.id!r} reference {j + 1}") * 2 - 1
                try:
                    types[i, j] = REFERENCE_TYPES.index(canonical_reference_type(ref_type))
                except ValueError as e:
                    raise RefrlError(f"sample {s.id!r} reference {j + 1}: {e}") from None
                mask[i, j] = True
        dev = self.device
        return ConditionInputs(text_ids.to(dev), text_mask.to(dev), pixels.to(dev), types.to(dev), mask.to(dev))

    def select_condition(self, condition: TinyDiTCondition, index: torch.Tensor) -> TinyDiTCondition:
        return condition.select(index)

    # -- Policy: denoiser and latents -------------------------------------------------

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, condition: TinyDiTCondition) -> torch.Tensor:
        return self.net.velocity(x, sigma, condition)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, condition: TinyDiTCondition) -> torch.Tensor:
        return self.net.velocity(x, sigma, condition)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (3, height, width)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    # -- Policy: training -------------------------------------------------------------

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 sharding units, root last (`refrl.train.sharding`): each condition block, the
        last condition layer, each image block, then the network (its embeddings and head)."""
        net = self.net
        return [*net.cond_blocks, net.cond_last, *net.blocks, net]

    @property
    def has_lora(self) -> bool:
        return self._peft is not None

    def enable_lora(
        self, rank: int, alpha: float, target_modules: Sequence[str] = DEFAULT_LORA_TARGETS, dropout: float = 0.0
    ) -> None:
        """Wrap the attention/MLP linears with peft LoRA; afterwards only LoRA weights train.

        ``dropout`` > 0 puts dropout inside the network: fine for SFT, wrong for GRPO
        (old and new log-probabilities would differ at identical weights).
        """
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise RuntimeError("LoRA is already enabled on this policy")
        names = {n.rsplit(".", 1)[-1] for n, m in self.net.named_modules() if isinstance(m, nn.Linear)}
        unknown = sorted(set(target_modules) - names)
        if unknown:
            raise RefrlError(f"unknown LoRA target modules {unknown}; allowed: {sorted(names)}")
        lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout)
        self.__dict__["_peft"] = get_peft_model(self.net, lora, adapter_name=_ADAPTER)
        self.lora_config = {"rank": rank, "alpha": alpha, "target_modules": list(target_modules), "dropout": dropout}

    def adapter_disabled(self) -> AbstractContextManager[None]:
        if not self.has_lora:
            raise NotImplementedError("TinyDiTPolicy has no LoRA adapter (call enable_lora first); keep a frozen copy instead")
        return self._peft.disable_adapter()

    # -- persistence ------------------------------------------------------------------

    def base_state_dict(self, merge_lora: bool = False) -> dict[str, torch.Tensor]:
        """Plain `TinyDiT` weights (LoRA layers unwrapped); with ``merge_lora`` each LoRA
        delta (B A * alpha / r) is added into its base weight."""
        from peft.tuners.lora import LoraLayer

        deltas = {}
        if merge_lora and self.has_lora:
            deltas = {n: m.get_delta_weight(_ADAPTER) for n, m in self.net.named_modules() if isinstance(m, LoraLayer)}
        state = {}
        for key, value in self.net.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            module, _, leaf = key.rpartition(".")
            if leaf == "weight" and module in deltas:
                value = value + deltas[module]
            state[key] = value.detach().to("cpu", copy=True).contiguous()
        return state

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights only, under their peft names (empty without LoRA)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.net.state_dict().items() if ".lora_" in k}

    def save_pretrained(self, directory: str | Path, merge_lora: bool = True) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.base_state_dict(merge_lora), directory / WEIGHTS_NAME, metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n")
        self.tokenizer.save(directory / TOKENIZER_NAME)
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):  # never leave a stale adapter behind
            (directory / name).unlink(missing_ok=True)
        if self.has_lora and not merge_lora:
            save_safetensors(self.adapter_state_dict(), directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
            (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(self.lora_config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> TinyDiTPolicy:
        directory = Path(directory)
        required = [WEIGHTS_NAME, CONFIG_NAME, TOKENIZER_NAME]
        if (directory / ADAPTER_CONFIG_NAME).exists():
            required.append(ADAPTER_WEIGHTS_NAME)
        for name in required:
            if not (directory / name).is_file():
                raise RefrlError(f"not a TinyDiT policy folder: {directory / name} is missing")
        try:
            config = TinyDiTConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        except (ValueError, TypeError) as e:
            raise RefrlError(f"{directory / CONFIG_NAME}: {e}") from None
        policy = cls(WordTokenizer.load(directory / TOKENIZER_NAME), config)
        try:
            policy.net.load_state_dict(read_safetensors(directory / WEIGHTS_NAME))  # one line if truncated
        except RuntimeError as e:
            raise RefrlError(f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: {clip_text(str(e), 300)}") from None
        if (directory / ADAPTER_CONFIG_NAME).exists():
            policy.enable_lora(**json.loads((directory / ADAPTER_CONFIG_NAME).read_text()))
            adapter = read_safetensors(directory / ADAPTER_WEIGHTS_NAME)
            missing, unexpected = policy.net.load_state_dict(adapter, strict=False)
            missing = [k for k in missing if ".lora_" in k]
            if missing or unexpected:
                raise RefrlError(
                    f"{directory / ADAPTER_WEIGHTS_NAME} does not match {directory / ADAPTER_CONFIG_NAME}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        return policy.to(device)
