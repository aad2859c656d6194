"""What a backend samples with by default: steps, classifier-free guidance and the time shift.

Each backend states its defaults in one place, a `sampler_defaults()` method returning
`SamplerDefaults` (the tiny DiT: `refrl.models.tiny_dit_policy.TINY_DIT_SAMPLER`; the
diffusers backends: `refrl.models.diffusers.common.DiffusersPolicy.sampler_defaults`, read
from the pipeline's ``__call__`` defaults and its scheduler config). ``refrl eval``,
``generate``, ``compare`` and the RL rollouts take them for every sampler key left unset
(`refrl.sampling.settings.resolve_sampler`). docs/guides/evaluation.md lists them per backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SamplerSettings:
    """The sampler of one run, every value known: ``steps`` Euler steps, guidance ``cfg_scale``
    (``v_u + w (v_c - v_u)``; 1 = off) and the time shift of the sigma schedule."""

    steps: int
    cfg_scale: float
    shift: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SamplerDefaults:
    """A backend's sampling defaults.

    ``steps`` / ``cfg_scale``: for evaluation and generation (the pipeline's ``__call__``
    defaults for diffusers backends); ``rollout_steps`` / ``rollout_cfg_scale``: for RL
    rollouts, which are scored and trained on at every iteration and so are shorter.
    ``shift``: a constant time shift, or None when the scheduler shifts by the image size and
    the number of steps (``use_dynamic_shifting``): the policy's ``pipeline_shift(steps)``
    then gives the constant that reproduces the scheduler's sigmas.
    """

    steps: int
    cfg_scale: float
    shift: float | None
    rollout_steps: int
    rollout_cfg_scale: float
    source: str = ""  # where the numbers come from, for docs and `refrl eval` output


# A `Policy` without ``sampler_defaults`` (a user's own class) samples as the embedded tiny DiT.
GENERIC_SAMPLER = SamplerDefaults(steps=20, cfg_scale=2.0, shift=1.0, rollout_steps=10, rollout_cfg_scale=1.0,
                                  source="refrl's generic defaults")
