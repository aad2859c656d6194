"""The embedded RefWorld rewards: real computations on generated pixels, no downloads.

=============  ====================================================================
name           what it measures
=============  ====================================================================
identity       best-window similarity of each subject reference (DINO-Seg role)
layout         detected / foreground boxes vs instructed boxes (HPS role)
style          output colours vs the reference's colour transform (CSD role)
background     pixels outside the subject boxes vs the asked-for background
fidelity       token-feature cosine with the target (DyRef's SigLIP role)
patch          OmniRefiner's per-patch + global + masked-pixel reward
=============  ====================================================================
"""

from refrl.rewards.embedded.background import BackgroundReward
from refrl.rewards.embedded.fidelity import FidelityReward
from refrl.rewards.embedded.identity import IdentityReward
from refrl.rewards.embedded.layout import LayoutReward
from refrl.rewards.embedded.patch import PatchReward
from refrl.rewards.embedded.style import StyleReward

EMBEDDED_REWARDS = {
    cls.name: cls
    for cls in (IdentityReward, LayoutReward, StyleReward, BackgroundReward, FidelityReward, PatchReward)
}

__all__ = [
    "EMBEDDED_REWARDS",
    "BackgroundReward",
    "FidelityReward",
    "IdentityReward",
    "LayoutReward",
    "PatchReward",
    "StyleReward",
]
