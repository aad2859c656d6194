"""RL objectives over the shared rollout, reward and advantage path of `refrl.train.grpo`.

* ``grpo``: PPO-clip on stored SDE steps (Flow-GRPO);
* ``nft``: DiffusionNFT, implicit positive/negative policies on the forward process;
* ``awm``: advantage-weighted matching, PPO-clip on the flow-matching log-likelihood.
"""

from __future__ import annotations

from typing import Any

from refrl.train.objectives.awm import AWMObjective
from refrl.train.objectives.base import Objective
from refrl.train.objectives.grpo import GRPOObjective
from refrl.train.objectives.nft import NFTObjective

OBJECTIVES: dict[str, type[Objective]] = {"grpo": GRPOObjective, "nft": NFTObjective, "awm": AWMObjective}


def build_objective(trainer: Any) -> Objective:
    """The objective ``trainer.cfg.objective`` names, bound to the trainer."""
    return OBJECTIVES[trainer.cfg.objective](trainer)


__all__ = ["OBJECTIVES", "AWMObjective", "GRPOObjective", "NFTObjective", "Objective", "build_objective"]
