"""Rewards: the protocol, a registry, the embedded RefWorld rewards and the real reward zoo."""

from refrl.rewards.base import Reward, RewardOutput
from refrl.rewards.registry import available, build, compute_rewards, register

__all__ = ["Reward", "RewardOutput", "available", "build", "compute_rewards", "register"]
