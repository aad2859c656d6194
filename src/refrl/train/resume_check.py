"""Resume refuses another model: the key that differs from the run's ``config.yaml`` is named.

A resumed run must build the model the checkpoint was trained as. Without this check a
changed ``model.width`` surfaced as a mismatch of the trainable weights, blamed on
``model.frozen`` / ``model.lora_rank``; now the error names ``model.width``, both values
and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refrl.errors import ConfigError, quote
from refrl.limits import load_yaml
from refrl.runfolder.layout import CONFIG_FILE

# Keys beyond a kind's architecture (``init_fields``) that decide which weights train.
TRAINABLE_KEYS = ("kind", "frozen", "lora_rank", "lora_targets")


def check_same_model(run_dir: str | Path, model: Any) -> None:
    """ConfigError naming each ``model.*`` key whose value differs from the run folder's
    ``config.yaml`` among the keys that shape the trained weights. A missing or unreadable
    ``config.yaml`` is left to the weight checks of the resume."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        saved = load_yaml(path.read_text(encoding="utf-8"), str(path))["model"]
    except Exception:  # noqa: BLE001 -- unreadable: the weight checks of the resume speak instead
        return
    if not isinstance(saved, dict):
        return
    now = model.model_dump(mode="json")
    keys = [*getattr(type(model), "init_fields", ()), *TRAINABLE_KEYS]
    differ = [k for k in dict.fromkeys(keys) if k in saved and k in now and saved[k] != now[k]]
    if differ:
        parts = ", ".join(f"model.{k}={quote(saved[k])} (now {quote(now[k])})" for k in differ)
        names = " and ".join(f"model.{k}" for k in differ)
        raise ConfigError(f"--resume: {run_dir} was trained with {parts}; resume with the {names} the run started "
                          "with, or start a new run with another --out")
