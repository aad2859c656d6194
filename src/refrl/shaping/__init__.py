"""Reward shaping: group advantages, GDPO, SARS/TDW (Customized-GRPO), DRS/DAR (DyRef).

Reward formulas themselves (e.g. OmniRefiner's patch reward) live in `refrl.rewards`.
"""

from refrl.shaping.customized_grpo import (
    SARS_MODES,
    customized_grpo_advantages,
    sars_bonus,
    sars_categories,
    tdw_weights,
)
from refrl.shaping.dyref import K_MODES, dar_group_weights, drs_slope, drs_transform
from refrl.shaping.normalize import (
    MISSING_RULES,
    STD_MODES,
    fill_missing,
    gdpo_combine,
    group_normalize,
    group_stats,
    weighted_sum,
)

__all__ = [
    "K_MODES",
    "MISSING_RULES",
    "SARS_MODES",
    "STD_MODES",
    "customized_grpo_advantages",
    "dar_group_weights",
    "drs_slope",
    "drs_transform",
    "fill_missing",
    "gdpo_combine",
    "group_normalize",
    "group_stats",
    "sars_bonus",
    "sars_categories",
    "tdw_weights",
    "weighted_sum",
]
