"""What an RL objective supplies to the RL trainer `refrl.train.grpo.GRPOTrainer`.

The trainer owns rollout, rewards, advantages, minibatching, gradient accumulation,
checkpoints and the on-policy guard. An objective owns only the loss over the shared
rollout: it may prepare per-iteration data after the rollout (training times, the old
policy's outputs, kept in `Rollout.prepared`), names the steps its advantages are computed at, and returns the
loss of a minibatch together with the ratios the on-policy guard checks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from refrl.sampling.rollout import Rollout, encode_for_guidance, guided_velocity

MinibatchLoss = tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]


class Objective:
    """Base: no preparation, advantages at the rollout's SDE steps, no extra state."""

    name = "base"
    needs_sde_steps = True  # GRPO trains on stored SDE steps; the matching objectives on clean images

    def __init__(self, trainer: Any):
        # The trainer is passed whole: an objective reads its policy, config, process
        # layout and KL reference, and never changes them except through `after_iteration`.
        self.trainer = trainer
        self.cfg = trainer.cfg

    @property
    def on_policy(self) -> bool:
        """Whether the ratio must be 1 on the first minibatch (the trainer's on-policy guard)."""
        return True

    def sampling_context(self) -> AbstractContextManager[Any]:
        """The weights rollouts are drawn with (default: the trained weights)."""
        return nullcontext()

    def prepare(self, it: int, ro: Rollout) -> None:
        """Add per-iteration training data to the rollout record ``ro`` (before any update)."""

    def advantage_steps(self, ro: Rollout) -> list[int] | torch.Tensor:
        """Step indices passed to `compute_advantages` (where TDW is evaluated)."""
        return ro.sde_steps

    def minibatch_loss(self, ro: Rollout, idx: torch.Tensor, mb_samples: list, adv: torch.Tensor,
                       loss_weights: torch.Tensor) -> MinibatchLoss:
        """Loss (with gradients) of the rollout samples ``idx``, their ratios (detached), per-step stats."""
        raise NotImplementedError

    def after_iteration(self, it: int) -> None:
        """Called once the iteration's updates are done."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state an exact resume needs (saved in ``trainer.pt``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ shared helpers
    def conditions(self, mb_samples: list) -> tuple[Any, Any | None]:
        """The minibatch's conditions (with gradients) and, with a KL term, the reference's (without)."""
        trainer = self.trainer
        conds = encode_for_guidance(trainer.policy, mb_samples, self.cfg.sampling.cfg_scale)
        ref_conds = None
        if trainer.reference is not None:
            ref_policy, ctx = trainer._as_reference()
            with torch.no_grad(), ctx:
                ref_conds = encode_for_guidance(ref_policy, mb_samples, self.cfg.sampling.cfg_scale)
        return conds, ref_conds

    def velocity(self, conds: Any, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The trained policy's (guided) velocity: the velocity rollouts integrate."""
        return guided_velocity(self.trainer.policy, x, sigma, conds[0], conds[1], self.cfg.sampling.cfg_scale)

    @torch.no_grad()
    def reference_velocity(self, ref_conds: Any, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        ref_policy, ctx = self.trainer._as_reference()
        with ctx:
            return guided_velocity(ref_policy, x, sigma, ref_conds[0], ref_conds[1], self.cfg.sampling.cfg_scale)
