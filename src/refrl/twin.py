"""Tiny twins: any preset, run offline on a CPU with tiny random-weight stand-ins.

``tiny_twin: true`` (a top-level key of every config: ``refrl sft -c flux2-klein-sft
tiny_twin=true``) keeps the preset as it is (objective, data source, rewards and their
weights, shaping, LoRA, schedule) and replaces only what needs the real weights:

- a diffusers model (``model.kind`` flux2-klein, qwen-edit-plus, kontext) by the same
  pipeline classes shrunk to 1-2 layers (`refrl.models.diffusers.tiny`), at 32 px,
  in float32; ``data.size`` follows;
- every zoo reward that has a tiny stand-in (`refrl.rewards.zoo.tiny`) by it: the real
  architecture and file layout, random weights, loaded through the real loading code.

The stand-ins are written once into a cache folder (``REFRL_TWIN_DIR``, default
``~/.cache/refrl/tiny-twins``; the folder names carry a fingerprint of the code that
builds them) and reused, so a checkpoint trained on a twin reloads later. Used to check
that a preset runs (tests/test_presets_run.py) and to try a GPU preset's whole chain on a
laptop; the numbers it gives mean nothing. docs/guides/presets.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from refrl.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

TWIN_KEY = "tiny_twin"
TWIN_DIR_VARIABLE = "REFRL_TWIN_DIR"
OPTIONS_FILE = "twin-options.json"


def twin_dir() -> Path:
    """Where the tiny stand-ins are written: ``$REFRL_TWIN_DIR``, else ``~/.cache/refrl/tiny-twins``."""
    env = os.environ.get(TWIN_DIR_VARIABLE, "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "refrl" / "tiny-twins"


def _fingerprint(module: Any) -> str:
    """A short hash of the source that builds a stand-in: a changed builder writes a new folder."""
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:10]


def _build_once(folder: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``build(tmp)`` into a temporary sibling, renamed to ``folder`` when complete (several
    processes may race: the first rename wins, the others discard theirs); the options it
    returned are kept in ``folder/OPTIONS_FILE``, paths relative to the folder."""
    marker = folder / OPTIONS_FILE
    if not marker.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            options = build(tmp)
            rel = {k: os.path.relpath(v, tmp) if isinstance(v, str) and v.startswith(str(tmp)) else v
                   for k, v in options.items()}
            (tmp / OPTIONS_FILE).write_text(json.dumps(rel, indent=2))
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished first
                if not marker.is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    saved = json.loads(marker.read_text())
    paths = {"checkpoint", "base", "processor", "tokenizer", "segmenter_checkpoint"}
    return {k: str(folder / v) if k in paths and isinstance(v, str) else v for k, v in saved.items()}


def twin_pipeline(kind: str) -> Path:
    """The tiny pipeline folder of diffusers kind ``kind`` (written on first use)."""
    from refrl.models.diffusers import tiny

    def build(tmp: Path) -> dict[str, Any]:
        tiny.save_tiny_pipeline(kind, tmp)
        return {}

    folder = twin_dir() / "pipelines" / f"{kind}-{_fingerprint(tiny)}"
    _build_once(folder, build)
    return folder


def twin_reward_options(name: str) -> dict[str, Any] | None:
    """Options that build zoo reward ``name`` from its tiny stand-in, or None if it has none."""
    from refrl.rewards.zoo import tiny

    if name not in tiny.TINY_BUILDERS:
        return None
    folder = twin_dir() / "rewards" / f"{name}-{_fingerprint(tiny)}"
    return _build_once(folder, lambda tmp: tiny.save_tiny(name, tmp))


def _twin_model(model: dict[str, Any], data: dict[str, Any]) -> None:
    from refrl.models.diffusers import tiny

    kind = model.get("kind")
    if kind not in tiny.TINY_KINDS:
        return  # the tiny DiT is its own twin
    model["pretrained"] = str(twin_pipeline(kind))
    model.update(image_size=tiny.TINY_IMAGE_SIZE, ref_size=tiny.TINY_REF_SIZE[kind], dtype="float32")
    options = model.get("diffusers")
    model["diffusers"] = {**(options if isinstance(options, dict) else {}), **tiny.TINY_OPTIONS[kind]}
    if isinstance(data.get("data"), dict):
        data["data"]["size"] = tiny.TINY_IMAGE_SIZE


def _twin_rewards(data: dict[str, Any]) -> None:
    rewards = data.get("rewards")
    if isinstance(rewards, list):  # training configs: [{name, weight, options}]
        for spec in rewards:
            if isinstance(spec, dict) and (options := twin_reward_options(str(spec.get("name")))) is not None:
                spec["options"] = {**(spec.get("options") or {}), **options}
    if isinstance(rewards, str) or (isinstance(rewards, list) and all(isinstance(r, str) for r in rewards)):
        per_metric = data.setdefault("reward_options", {})  # eval configs: "METRIC or METRIC=REWARD, ..."
        for item in ",".join([rewards] if isinstance(rewards, str) else rewards).split(","):
            metric, _, reward = (part.strip() for part in item.partition("="))
            if metric and (options := twin_reward_options(reward or metric)) is not None:
                per_metric[metric] = {**(per_metric.get(metric) or {}), **options}


def apply_tiny_twin(data: dict[str, Any]) -> dict[str, Any]:
    """Remove the ``tiny_twin`` key from a config mapping and, when it is true, replace the
    model and the zoo rewards' backbones by their tiny stand-ins (in place; returns ``data``)."""
    flag = data.pop(TWIN_KEY, False)
    if not isinstance(flag, bool):
        raise ConfigError(f"config key '{TWIN_KEY}': must be true or false (got {flag!r})")
    if flag:
        if isinstance(data.get("model"), dict):
            _twin_model(data["model"], data)
        _twin_rewards(data)
    return data


def load_config(model: type[M], path: str | os.PathLike | None, overrides: list[str] | None = None) -> M:
    """`refrl.config.load_config` honouring ``tiny_twin``: the preset (a name or a file), the
    overrides, the twin applied when asked, validated. What ``refrl sft`` and ``refrl rl`` run."""
    from refrl.config import read_config, validate_config

    data = apply_tiny_twin(read_config(path, overrides))
    return validate_config(model, data, source=str(path) if path is not None else "config")
