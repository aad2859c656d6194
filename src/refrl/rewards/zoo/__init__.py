"""The reward zoo: real reward and metric models (transformers, torch, or their own packages).

Nothing heavy is imported here: ``ZOO`` maps each name to ``module:class`` and
`build_zoo` imports the module when a reward is built, so listing the names
(``refrl.rewards.available()``) never imports transformers. ``remote:NAME`` builds
a client of a reward served by ``refrl serve-reward NAME`` (see ``remote.py``).
docs/guides/rewards.md has the table: what each measures, paper, package, default checkpoint, input size, memory.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from refrl.errors import RefrlError

ZOO: dict[str, str] = {
    "dino": "vision_encoders:DinoReward",
    "dinov2": "vision_encoders:Dinov2Reward",
    "clip_i": "vision_encoders:ClipImageReward",
    "clip_t": "vision_encoders:ClipTextReward",
    "siglip": "vision_encoders:SiglipReward",
    "pickscore": "vision_encoders:PickScoreReward",
    "dino_seg": "segment:DinoSegReward",
    "lpips": "perceptual:LpipsReward",
    "dreamsim": "perceptual:DreamSimReward",
    "csd": "style:CsdReward",
    "hpsv2": "preference:Hpsv2Reward",
    "hpsv3": "hpsv3:Hpsv3Reward",
    "image_reward": "preference:ImageRewardReward",
    "vlm_judge": "judge:VlmJudgeReward",
}
REMOTE_PREFIX = "remote:"


def zoo_names() -> list[str]:
    return sorted(ZOO)


def is_zoo_name(name: str) -> bool:
    return name in ZOO or name.startswith(REMOTE_PREFIX)


def zoo_class(name: str) -> type:
    """The reward class of a zoo name (imports its module)."""
    if name not in ZOO:
        raise RefrlError(f"unknown zoo reward {name!r}; available: {', '.join(zoo_names())}")
    module, cls = ZOO[name].split(":")
    return getattr(importlib.import_module(f"refrl.rewards.zoo.{module}"), cls)


def build_zoo(name: str, **options: Any) -> Any:
    """Build zoo reward ``name`` (or ``remote:NAME``) with its options; unknown options are named."""
    if name.startswith(REMOTE_PREFIX):
        from refrl.rewards.zoo.remote import RemoteReward

        return RemoteReward(name[len(REMOTE_PREFIX):], **options)
    cls = zoo_class(name)
    allowed = option_names(cls)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise RefrlError(f"reward {name!r}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return cls(**options)


def option_names(cls: type) -> set[str]:
    """Keyword options a reward class accepts, following ``**options`` up its bases."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names
