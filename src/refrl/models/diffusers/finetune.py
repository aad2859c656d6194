"""Fine-tuning the transformer of a diffusers adapter: peft LoRA, full fine-tune, and
activation checkpointing that is safe with FLUX.2's reference key/value cache.

`FinetuneMixin` is mixed into `DiffusersPolicy`; it uses ``self.transformer`` and keeps
``lora_config`` (the live adapter), ``merged_adapters`` (adapters already folded into
the base weights, e.g. the SFT LoRA under a GRPO run) and ``full_finetune``.
The KL reference of GRPO is the same transformer with the adapter disabled
(``adapter_disabled``), as in Flow-GRPO: no second copy in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from refrl.errors import RefrlError

ADAPTER_NAME = "default"


def lora_target_names(module: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` layers whose name ends with one of ``suffixes``
    (dotted, e.g. ``to_out.0``); raises RefrlError naming suffixes that match nothing."""
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    names, unknown = [], []
    for suffix in suffixes:
        hits = [n for n in linears if n == suffix or n.endswith("." + suffix)]
        (names.extend(hits) if hits else unknown.append(suffix))
    if unknown:
        leaves = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in linears})
        raise RefrlError(f"unknown LoRA target modules {unknown}; linear layers of this transformer: {leaves}")
    return sorted(set(names))


def checkpoint_with_fresh_kwargs(module: nn.Module, *args: Any) -> Any:
    """Activation checkpointing that gives each block its own copy of dict arguments.

    diffusers' FLUX.2 forward reuses one kwargs dict for every block and sets the
    block's key/value cache in it before each call; a non-reentrant checkpoint
    recomputes the block during backward with the dict as it is *then* (the last
    block's cache), which silently corrupts gradients. Copying dicts at call time
    pins each block's own entries.
    """
    from torch.utils.checkpoint import checkpoint

    args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
    return checkpoint(module.__call__, *args, use_reentrant=False)


class FinetuneMixin:
    """LoRA / full fine-tune of ``self.transformer`` (see module docstring)."""

    transformer: nn.Module
    default_lora_targets: tuple[str, ...]
    lora_config: dict[str, Any] | None
    merged_adapters: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]
    full_finetune: bool

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.transformer.parameters() if p.requires_grad)

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 sharding units, root last (`refrl.train.sharding`): each block of the
        transformer's block lists (FLUX-type: ``transformer_blocks`` and
        ``single_transformer_blocks``), then the transformer. Text encoder and VAE are frozen
        and stay whole."""
        blocks = [b for name in ("transformer_blocks", "single_transformer_blocks")
                  for b in getattr(self.transformer, name, None) or []]
        return [*blocks, self.transformer]

    @property
    def has_lora(self) -> bool:
        return self.lora_config is not None

    def enable_lora(self, rank: int, alpha: float, target_modules: Sequence[str] | None = None,
                    dropout: float = 0.0) -> None:
        """peft LoRA on the transformer's linears named by ``target_modules`` (suffixes);
        LoRA weights are float32 whatever the base dtype, and only they train."""
        from peft import LoraConfig

        if self.has_lora:
            raise RuntimeError("LoRA is already enabled on this policy")
        targets = list(target_modules or self.default_lora_targets)
        names = lora_target_names(self.transformer, targets)
        self.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=dropout,
                                                init_lora_weights=True), adapter_name=ADAPTER_NAME)
        for n, p in self.transformer.named_parameters():
            if ".lora_" in n:
                p.data = p.data.float()
                p.requires_grad_(True)
        self.lora_config = {"rank": rank, "alpha": alpha, "target_modules": targets, "dropout": dropout}

    def enable_full_finetune(self) -> None:
        self.transformer.requires_grad_(True)
        self.full_finetune = True

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        if not self.has_lora:
            raise NotImplementedError(f"{type(self).__name__} has no LoRA adapter; keep a frozen copy instead")
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER_NAME)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.transformer, state, adapter_name=ADAPTER_NAME)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise RefrlError(f"adapter weights do not match the LoRA config: unexpected {unexpected[:5]}")

    def merge_lora(self) -> None:
        """Fold the current LoRA into the base weights (e.g. SFT before GRPO); it is kept
        in ``merged_adapters`` so that ``save_pretrained`` can rebuild the same model."""
        if not self.has_lora:
            return
        self.merged_adapters.append((dict(self.lora_config), self.adapter_state_dict()))
        self.transformer.fuse_lora(adapter_names=[ADAPTER_NAME])
        self.transformer.unload_lora()
        self.lora_config = None
        self.transformer.requires_grad_(False)
