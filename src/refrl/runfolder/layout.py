"""The run folder: what its files are called, and which checkpoint a ``--ckpt`` value names.

A run folder (``refrl sft`` / ``grpo`` / ``rl --out runs/NAME``)::

    runs/NAME/
      config.yaml            # CONFIG_FILE: the resolved config
      metrics.jsonl          # METRICS_FILE: one JSON object per step / iteration
      checkpoints/           # CHECKPOINTS_DIR
        step-N/              # STEP_PREFIX + N, written atomically (`refrl.runfolder.files.atomic_dir`)
          policy/            # POLICY_DIR: the policy's save_pretrained (config.json inside)
          ...                # the trainer's own state (`refrl.train.checkpoint`)

Names a user can pass wherever a checkpoint is taken (`resolve_checkpoint`):

* ``tiny-sft`` — the SFT checkpoint shipped inside the package (RefWorld, 32 px);
* a run folder (``runs/NAME``) — its latest checkpoint;
* a checkpoint folder (``runs/NAME/checkpoints/step-N``) or a policy folder
  (anything with a ``config.json`` written by ``save_pretrained``).
"""

from __future__ import annotations

import os
from pathlib import Path

from refrl.errors import RefrlError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
POLICY_DIR = "policy"
POLICY_CONFIG = "config.json"  # every policy's save_pretrained writes it

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"tiny-sft": ASSETS / "tiny-sft"}


def checkpoint_dir(ckpt_root: str | os.PathLike, step: int) -> Path:
    """``ckpt_root/step-N``."""
    return Path(ckpt_root) / f"{STEP_PREFIX}{step}"


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """The complete ``step-N`` folders under ``ckpt_root``, oldest first (``step-N.tmp`` and
    other leftovers of an interrupted save are not checkpoints)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        suffix = p.name[len(STEP_PREFIX):]
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and suffix.isdigit():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest ``step-N`` folder under ``ckpt_root``, or None."""
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The policy folder (``config.json`` inside) that a ``--ckpt`` value names."""
    key = str(name_or_path)
    if key in SHIPPED:
        path = SHIPPED[key]
        if not (path / POLICY_CONFIG).is_file():
            raise RefrlError(f"the shipped checkpoint {key!r} is missing from {path}; reinstall refrl")
        return path
    path = Path(key)
    if not path.exists():
        raise RefrlError(f"checkpoint not found: {key} (give a run folder, a checkpoint folder or one of {sorted(SHIPPED)})")
    if (path / POLICY_CONFIG).is_file():
        return path
    if (path / POLICY_DIR / POLICY_CONFIG).is_file():
        return path / POLICY_DIR
    last = latest_checkpoint(path / CHECKPOINTS_DIR)
    if last is not None:
        return last / POLICY_DIR
    raise RefrlError(f"{path} holds no checkpoint (expected config.json, policy/ or checkpoints/step-N/)")
