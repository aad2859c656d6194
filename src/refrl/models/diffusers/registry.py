"""The registry of diffusers backends: ``model.kind`` -> its adapter class.

A backend is one file that defines three classes: its options (a `DiffusersOptions`
subclass: the ``model.diffusers.*`` knobs), its config (a `DiffusersModelConfig`
subclass that fixes ``kind`` and types ``diffusers`` with those options) and its
adapter (a `DiffusersPolicy` subclass naming ``config_class`` and the diffusers
``pipeline_class_name``). One `register_backend` call in `refrl.models.diffusers`
adds it; the list of kinds, the ``model:`` config union, the loader and the docs
check all read `BACKENDS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refrl.errors import RefrlError

if TYPE_CHECKING:
    from refrl.models.diffusers.common import DiffusersPolicy

BACKENDS: dict[str, type[DiffusersPolicy]] = {}


def register_backend(policy_class: type[DiffusersPolicy]) -> type[DiffusersPolicy]:
    """Add a backend under its config's ``kind``; returns the class (usable as a decorator).

    Register in `refrl.models.diffusers` itself: the ``model:`` config union of kinds is
    built from `BACKENDS` when `refrl.models.config` is first imported."""
    kind = policy_class.kind
    if kind in BACKENDS and BACKENDS[kind] is not policy_class:
        raise ValueError(f"diffusers kind {kind!r} is registered twice ({BACKENDS[kind].__name__}, {policy_class.__name__})")
    BACKENDS[kind] = policy_class
    return policy_class


def backend(kind: str) -> type[DiffusersPolicy]:
    """The adapter class of ``kind``; RefrlError listing the kinds when there is none."""
    if kind not in BACKENDS:
        raise RefrlError(f"unknown diffusers kind {kind!r}; allowed: {', '.join(BACKENDS)}")
    return BACKENDS[kind]


def pipeline_class(kind: str) -> type:
    """The diffusers pipeline class of ``kind`` (imports diffusers)."""
    import diffusers

    return getattr(diffusers, backend(kind).pipeline_class_name)
