"""Typed configs: pydantic models, YAML presets and ``key=value`` overrides.

Every trainer config is a pydantic model with ``extra="forbid"`` so a misspelt key
is an error that names the key and the allowed keys. Presets ship in the package
(`refrl.presets`; a bare name such as ``tiny-cpu-grpo`` or a YAML path both work);
``load_config(Model, "tiny-cpu-grpo", ["optim.lr=1e-4", "group_size=8"])`` reads
the preset, applies dotted overrides (values parsed as YAML, so ``true``, ``1e-4``
and ``[a, b]`` work) and validates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from refrl.errors import ConfigError, clip_text, quote
from refrl.limits import MAX_CONFIG_BYTES, check_values, load_yaml

M = TypeVar("M", bound=BaseModel)
MAX_PROBLEMS = 10  # problems listed in one error line (10,000 unknown overrides: the first 10 and a count)


class StrictModel(BaseModel):
    """Base for configs: unknown keys are errors, assignments are validated, floats are finite
    (``nan``, ``inf``, ``1e400`` are refused: one would train a NaN model)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 0.0001)."""
    if "=" not in text:
        raise ConfigError(f"override {quote(text)} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {quote(text)} has an empty key")
    try:
        value = load_yaml(raw, f"override {clip_text(key, 120)}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (it wants 1.0e-4); numbers are what users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating intermediate dicts)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {quote(text)}: {quote(k)} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[Any], Any]:
    """The key parts of an error location, and the type holding its last part.

    A type standing for a tagged union (``union_member(tag)`` gives the member class, as
    `refrl.models.config.ModelConfig` does) puts the tag in the location: it is skipped."""
    parts: list[Any] = []
    current: Any = model
    parent: Any = None
    for part in loc:
        member = getattr(current, "union_member", None)
        if isinstance(part, str) and member is not None and member(part) is not None:
            current = member(part)
            continue
        parts.append(part)
        parent = current
        field = getattr(current, "model_fields", {}).get(part) if isinstance(part, str) else None
        current = field.annotation if field is not None else None
    return parts, parent


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One readable line per problem: the dotted key, what is wrong, the allowed values."""
    lines = []
    listed: set[int] = set()  # the allowed keys of a section are listed once
    errors = err.errors()
    for e in errors[:MAX_PROBLEMS]:
        parts, parent = _walk(model, tuple(e["loc"]))
        key = clip_text(".".join(str(p) for p in parts) or "<root>", 120)
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and id(parent) in listed:
            msg = "unknown key (allowed keys: as above)"
        elif e["type"] == "extra_forbidden":
            listed.add(id(parent))
            allowed = sorted(getattr(parent, "model_fields", {}).keys())
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        else:
            msg = f"{msg} (got {quote(e.get('input'))})"
        lines.append(f"{source}: config key '{key}': {msg}")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"and {len(errors) - MAX_PROBLEMS:,} more problems")
    return "; ".join(lines)


def validate_config(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    check_values(data, source)  # non-finite numbers, huge ints and lists anywhere, free-form sections included
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; ``path`` may be a shipped preset's bare name (`refrl.presets`)."""
    from refrl.presets import resolve_config

    path = resolve_config(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes exceed the limit of {MAX_CONFIG_BYTES:,} for a config file")
    try:
        data = load_yaml(path.read_text(), str(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(clip_text(f"{path}: not valid YAML: {exc}".replace("\n", " "), 600)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return data


def load_config(model: type[M], path: str | Path | None, overrides: list[str] | None = None) -> M:
    """Read a YAML preset (or start from the defaults), apply overrides, validate."""
    data = read_config(path, overrides)
    return validate_config(model, data, source=str(path) if path else "config")


def read_config(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The preset at ``path`` (or no keys) with ``overrides`` applied, not validated yet. Parsing
    is bounded (`refrl.limits`), so commands call this before importing torch: a hostile file
    is refused at a small memory cost."""
    data = read_yaml(path) if path is not None else {}
    return apply_overrides(data, list(overrides or []))


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """An integer setting from environment variable ``name`` (``_`` separators allowed),
    ``default`` when unset; ConfigError naming the variable when it is not an integer >= ``minimum``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer >= {minimum}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name} must be an integer >= {minimum}, got {raw!r}")
    return value


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (the run folder's ``config.yaml``), atomically."""
    from refrl.runfolder.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
