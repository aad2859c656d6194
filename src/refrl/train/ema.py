"""Exponential moving average of trainable weights (used for evaluation and export)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch


class EMA:
    """``ema = decay * ema + (1 - decay) * w`` after each optimizer step.

    With ``warmup`` the effective decay is ``min(decay, (1 + n) / (10 + n))`` (the
    usual warmup of diffusion EMAs) so early averages are not dominated by the
    random initialisation.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float, warmup: bool = True):
        self.params = dict(named_params)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {k: p.detach().clone().float() for k, p in self.params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__num_updates__": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.num_updates = int(state.get("__num_updates__", torch.tensor(0)))
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Temporarily load the EMA weights into the model (for eval or export)."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            for k, p in self.params.items():
                p.copy_(backup[k])
