"""The reward registry: build any reward by name (embedded, zoo, remote, or user-registered).

``available()`` lists the names; ``build(name, **options)`` makes one, naming the
allowed names or options when given a wrong one; ``register(name, factory)``
adds a user's reward (a class or a function returning an object with ``name`` and
``__call__(images, samples) -> RewardOutput``). Zoo rewards are only imported when
built, so listing names never imports transformers.

Rewards had a ``role`` once, declared and never read. It is gone: ``register``
still accepts ``role`` with a DeprecationWarning and ignores it; a reward option
``role`` is an error that says so.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import Reward, RewardOutput
from refrl.rewards.embedded import EMBEDDED_REWARDS
from refrl.rewards.zoo import build_zoo, is_zoo_name, zoo_names

_REGISTRY: dict[str, Callable[..., Any]] = dict(EMBEDDED_REWARDS)


def available() -> list[str]:
    """Every buildable reward name (``remote:NAME`` also builds a client of a served reward)."""
    return sorted(set(_REGISTRY) | set(zoo_names()))


def option_names(factory: Callable[..., Any]) -> set[str] | None:
    """Keyword options ``factory`` accepts (following ``**options`` up a class's bases); None if it takes any."""
    targets = [k.__dict__.get("__init__") for k in factory.__mro__] if inspect.isclass(factory) else [factory]
    names: set[str] = set()
    for fn in targets:
        if fn is None:
            continue
        params = list(inspect.signature(fn).parameters.values())
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None if not inspect.isclass(factory) else names


def build(name: str, **options: Any) -> Reward:
    """A reward by name with its options; RefrlError naming the allowed names / options otherwise."""
    if not isinstance(name, str) or not name:
        raise RefrlError(f"a reward name must be a non-empty string, got {name!r}; available: {', '.join(available())}")
    if "role" in options:
        raise RefrlError(f"reward {name!r}: option 'role' was removed (rewards have no role); drop it")
    if name in _REGISTRY:
        factory = _REGISTRY[name]
        allowed = option_names(factory)
        unknown = sorted(set(options) - allowed) if allowed is not None else []
        if unknown:
            raise RefrlError(
                f"reward {name!r}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed or ())) or 'none'}"
            )
        try:
            reward = factory(**options)
        except ValueError as err:  # a bad option value: the constructors' messages name it and its allowed values
            raise RefrlError(f"reward {name!r}: {err}") from err
        return reward
    if is_zoo_name(name):
        return build_zoo(name, **options)
    raise RefrlError(f"unknown reward {name!r}; available: {', '.join(available())} (or remote:NAME)")


def register(name: str, factory: Callable[..., Any], role: str | None = None, overwrite: bool = False) -> None:
    """Make ``build(name, **options)`` call ``factory(**options)``. ``role`` is deprecated and ignored."""
    if not isinstance(name, str) or not name or ":" in name:
        raise RefrlError(f"a reward name must be a non-empty string without ':', got {name!r}")
    if role is not None:
        warnings.warn(f"register({name!r}, ..., role={role!r}): rewards have no role any more; it is ignored",
                      DeprecationWarning, stacklevel=2)
    if not callable(factory):
        raise RefrlError(f"reward {name!r}: factory must be callable, got {type(factory).__name__}")
    if not overwrite and (name in _REGISTRY or is_zoo_name(name)):
        raise RefrlError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def compute_rewards(
    rewards: Mapping[str, Reward], images: torch.Tensor, samples: Sequence[LoadedSample]
) -> dict[str, RewardOutput]:
    """Score one batch with every reward; checks each returns (B,) scores and (B,) extras."""
    out = {}
    n = images.shape[0]
    for key, reward in rewards.items():
        result = reward(images, samples)
        if tuple(result.scores.shape) != (n,):
            raise ValueError(f"reward {key!r} returned scores of shape {tuple(result.scores.shape)}, expected ({n},)")
        for extra, value in result.extras.items():
            if tuple(value.shape) != (n,):
                raise ValueError(f"reward {key!r} extra {extra!r} has shape {tuple(value.shape)}, expected ({n},)")
        out[key] = result
    return out
