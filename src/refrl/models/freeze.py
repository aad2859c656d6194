"""Keep chosen modules of a full fine-tune at their initial weights (``model.frozen``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from refrl.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


def freeze_modules(network: nn.Module, prefixes: Sequence[str], key: str = "model.frozen") -> None:
    """Stop the gradient of every parameter under one of ``prefixes`` (a module name such
    as ``head``, or a dotted sub-module such as ``blocks.4``).

    Why: RL on the tiny DiT moved its output head, whose weights are shared by every
    patch, into a texture repeated at the patch period (docs/research/grpo.md#the-dot-grid-where-it-comes-from-how-to-measure-it-how-to-avoid-it).
    A prefix that names no parameter is a `ConfigError` naming ``key`` and the modules.
    """
    params = dict(network.named_parameters())
    for prefix in prefixes:
        under = [p for name, p in params.items() if name == prefix or name.startswith(prefix + ".")]
        if not under:
            modules = sorted({name.split(".")[0] for name in params})
            raise ConfigError(f"config key '{key}': {prefix!r} names no module of the network "
                              f"(allowed: a module name such as {', '.join(modules)}, or a dotted sub-module)")
        for param in under:
            param.requires_grad_(False)
