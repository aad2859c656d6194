"""Keep chosen modules of a full fine-tune at their initial weights (``model.frozen``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from refrl.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


def freeze_modules(network: nn.Module, prefixes: Sequence[str], key: str = "model.frozen") -> list[str]:
    """Stop the gradient of every parameter whose name starts with one of ``prefixes`` (a
    module name such as ``head`` or ``blocks.4``); returns the names frozen.

    Why: RL on the tiny DiT moved its output head, whose weights are shared by every
    patch, into a texture repeated at the patch period (docs/methods.md, "The dot grid").
    A prefix that names no parameter is a `ConfigError` naming ``key`` and the modules.
    """
    names = [n for n, _ in network.named_parameters()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            modules = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"config key '{key}': {prefix!r} names no module of the network "
                              f"(allowed: a module name such as {', '.join(modules)}, or a dotted sub-module)")
    frozen = []
    for name, param in network.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
