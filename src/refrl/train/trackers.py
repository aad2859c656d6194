"""What refrl hands to accelerate's trackers (TensorBoard, Weights & Biases).

TensorBoard's hyperparameter record (`SummaryWriter.add_hparams`, which accelerate's
TensorBoard tracker calls with the run's config) takes only int, float, str, bool or
tensor values, so a nested config (``optim: {lr: ...}``, ``rewards: [...]``, ``None``)
stops the run before its first step. The config is therefore flattened to dotted keys
with scalar values; wandb shows the same keys. User docs: docs/guides/logging.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

Scalar = int | float | str | bool


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """``{"optim": {"lr": 1e-4}, "trackers": ["tensorboard"], "data": {"manifest": None}}`` ->
    ``{"optim.lr": 1e-4, "trackers": '["tensorboard"]', "data.manifest": "None"}``: nested
    mappings become dotted keys, lists their JSON text, None the string ``"None"``."""
    flat: dict[str, Scalar] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif value is None:
            flat[name] = "None"
        else:
            flat[name] = json.dumps(value, default=str, sort_keys=True)
    return flat
