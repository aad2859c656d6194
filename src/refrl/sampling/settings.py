"""The sampler keys every command shares: ``sampling.steps``, ``sampling.cfg_scale``, ``sampling.shift``.

`SamplerConfig` is the ``sampling:`` section of the eval config and of ``refrl generate`` /
``refrl compare``; the RL config's ``sampling:`` section extends it with the rollout's SDE
keys (`refrl.train.grpo_config.SamplingConfig`). A key left unset (None) is the model's:
`resolve_sampler` fills it from the policy's `refrl.models.sampler.SamplerDefaults`.

The spellings these keys replaced fail with a line naming the new key (`RENAMED_KEYS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from refrl.config import StrictModel
from refrl.errors import ConfigError
from refrl.limits import MAX_SAMPLING_STEPS
from refrl.models.sampler import GENERIC_SAMPLER, SamplerDefaults, SamplerSettings

SAMPLER_KEYS = ("steps", "cfg_scale", "shift")
# old top-level eval-config key -> the key that replaced it
RENAMED_KEYS = {"steps": "sampling.steps", "cfg": "sampling.cfg_scale", "shift": "sampling.shift"}
# old command-line flag of eval / generate / compare -> the flag that replaced it
RENAMED_FLAGS = {"--steps": "--sampling-steps", "--cfg": "--cfg-scale"}


class SamplerConfig(StrictModel):
    """``sampling:``: the ODE sampler; every key unset (None) is the model's default."""

    steps: int | None = Field(None, ge=1, le=MAX_SAMPLING_STEPS, description="denoising steps (None: the model's)")
    cfg_scale: float | None = Field(
        None, ge=0, description="classifier-free guidance scale, v_u + w (v_c - v_u); 1 = off (None: the model's)"
    )
    shift: float | None = Field(
        None, gt=0, description="time shift of the sigma schedule, s t / (1 + (s - 1) t) (None: the model's; "
        "for a scheduler with dynamic shifting, the value that reproduces its sigmas at these steps)",
    )


def reject_renamed_keys(values: Mapping[str, Any], where: str) -> None:
    """ConfigError naming the new key when ``values`` (an eval config) uses an old top-level sampler key."""
    for old, new in RENAMED_KEYS.items():
        if old in values:
            raise ConfigError(f"{where}: config key '{old}' was renamed: use '{new}' ({new}={values[old]})")


def renamed_flag_error(flag: str) -> str:
    """The one line for an old sampler flag of eval / generate / compare."""
    new = RENAMED_FLAGS[flag]
    extra = " (sampler steps; --steps is the number of training steps of `refrl sft`)" if flag == "--steps" else ""
    return f"{flag} was renamed: use {new}{extra}"


def sampler_defaults(policy: Any) -> SamplerDefaults:
    """The policy's `SamplerDefaults` (its ``sampler_defaults()``), or `GENERIC_SAMPLER` for a
    policy that states none."""
    method = getattr(policy, "sampler_defaults", None)
    return method() if callable(method) else GENERIC_SAMPLER


def resolve_sampler(policy: Any, steps: int | None = None, cfg_scale: float | None = None,
                    shift: float | None = None, *, rollout: bool = False) -> SamplerSettings:
    """The sampler to run: each given value, else the policy's default (``rollout``: its RL-rollout
    steps and guidance). An unset shift of a dynamically shifting scheduler is
    ``policy.pipeline_shift(steps)``, so it follows the chosen number of steps."""
    d = sampler_defaults(policy)
    steps = int(steps if steps is not None else (d.rollout_steps if rollout else d.steps))
    cfg = float(cfg_scale if cfg_scale is not None else (d.rollout_cfg_scale if rollout else d.cfg_scale))
    if shift is None:
        shift = d.shift if d.shift is not None else float(policy.pipeline_shift(steps))
    return SamplerSettings(steps=steps, cfg_scale=cfg, shift=float(shift))


def resolve_config(policy: Any, cfg: SamplerConfig | None, *, rollout: bool = False) -> SamplerSettings:
    """`resolve_sampler` of a `SamplerConfig` section."""
    cfg = cfg or SamplerConfig()
    return resolve_sampler(policy, cfg.steps, cfg.cfg_scale, cfg.shift, rollout=rollout)


class SamplerSection(StrictModel):
    """The config of ``refrl generate`` / ``refrl compare``: only the ``sampling:`` section."""

    sampling: SamplerConfig = Field(default_factory=SamplerConfig)


def sampler_config(overrides: list[str], flags: Mapping[str, Any], source: str) -> SamplerConfig:
    """``sampling.KEY=VALUE`` overrides, then the flags (None: not given), validated: what
    ``refrl generate`` and ``refrl compare`` sample with (unset keys: the model's)."""
    from refrl.config import apply_overrides, validate_config

    values: dict[str, Any] = {}
    apply_overrides(values, list(overrides))
    reject_renamed_keys(values, source)
    section = values.setdefault("sampling", {})
    if isinstance(section, dict):
        section.update({k: v for k, v in flags.items() if v is not None})
    return validate_config(SamplerSection, values, source=source).sampling
