"""Rewards: the protocol, a registry, the embedded RefWorld rewards and the real reward zoo."""

from refrl.rewards.base import Reward, RewardOutput

__all__ = ["Reward", "RewardOutput"]
