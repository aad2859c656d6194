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
  (anything with a ``config.json`` written by ``save_pretrained``);
* ``runs/NAME:best`` — the best checkpoint by validation (``validation.keep_best``): the
  policy in ``runs/NAME/best/``, with ``best.json`` saying which step it is and why.
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
BEST_SUFFIX = ":best"  # RUN:best
BEST_DIR = "best"  # the best checkpoint's policy (validation.keep_best)
BEST_FILE = "best.json"  # which step it is, by which criterion; or why there is none

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


def best_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The policy folder of ``RUN:best`` (``RUN/best``); a one-line error when the run kept none."""
    import json

    run = Path(run_dir)
    if not run.is_dir():
        raise RefrlError(f"run folder not found: {run} (in {run}{BEST_SUFFIX})")
    info_path = run / BEST_FILE
    if not info_path.is_file():
        raise RefrlError(f"{run}{BEST_SUFFIX}: the run kept no best checkpoint (no {BEST_FILE}; "
                         "train with validation.keep_best set)")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
        raise RefrlError(f"{info_path}: not readable JSON ({e})") from None
    if not isinstance(info, dict) or info.get("step") is None:
        reason = info.get("reason") if isinstance(info, dict) else None
        raise RefrlError(f"{run}{BEST_SUFFIX}: no best checkpoint: {reason or 'none was recorded'}")
    path = run / BEST_DIR
    if not (path / POLICY_CONFIG).is_file():
        raise RefrlError(f"{run}{BEST_SUFFIX}: {BEST_FILE} names step {info['step']} but {path} holds no policy")
    return path


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """The policy folder (``config.json`` inside) that a ``--ckpt`` value names."""
    key = str(name_or_path)
    if key.endswith(BEST_SUFFIX) and not Path(key).exists():
        return best_checkpoint(key[: -len(BEST_SUFFIX)])
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
