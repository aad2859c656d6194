"""Checkpoints that resume exactly, written atomically.

A checkpoint is a folder ``checkpoints/step-N/``:

* ``policy/`` — the policy's own ``save_pretrained`` output (safetensors weights,
  config, tokenizer) so any checkpoint is also a loadable model;
* ``trainable.safetensors`` — the raw trainable weights (what training continues from);
* ``ema.safetensors`` — EMA of the trainable weights (used for evaluation);
* ``trainer.pt`` — optimizer + LR-scheduler state and RNG states (tensors and
  plain Python values only, read back with ``torch.load(weights_only=True)``);
* ``state.json`` — step, data position and anything else the trainer needs.

The folder is written by `refrl.runfolder.files.atomic_dir` (as ``step-N.tmp``, fsync'd, then
renamed), so a crash mid-write never leaves a half checkpoint that
`refrl.runfolder.layout.latest_checkpoint` would pick.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refrl.errors import RefrlError
from refrl.runfolder.files import atomic_dir, checkpoint_write_errors, save_safetensors
from refrl.runfolder.layout import (
    checkpoint_dir,
    list_checkpoints,
    resolve_checkpoint,
)
from refrl.runfolder.readers import checkpoint_advice, read_json, read_safetensors, read_torch


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (torch CPU, Python, NumPy global)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    save_policy: Callable[[Path], None],
    trainer_state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None,
    info: dict[str, Any],
    trainable: dict[str, torch.nn.Parameter] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``ckpt_root/step-N`` atomically and return its path."""
    final = checkpoint_dir(ckpt_root, step)
    with checkpoint_write_errors(final), atomic_dir(final) as tmp:  # a full disk: one line, exit 1
        save_policy(tmp / "policy")
        if ema_state is not None:
            save_safetensors({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / "ema.safetensors")
        if trainable is not None:  # the raw (non-EMA) trainable weights, for exact resume
            save_safetensors({k: p.detach().contiguous().cpu() for k, p in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2))
    if keep_last and keep_last > 0:  # 0 or None: keep every checkpoint
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(trainer_state, ema_state or None, info) of a checkpoint folder."""
    path = Path(path)
    # each file missing, truncated or corrupt is one line naming it and what to do (refrl.runfolder.readers)
    info = read_json(path / "state.json")
    if not isinstance(info.get("step"), int):
        raise RefrlError(f"{path / 'state.json'}: no integer 'step'; {checkpoint_advice(path / 'state.json')}")
    trainer_state = read_torch(path / "trainer.pt")
    lacking = [k for k in ("scheduler", "rng") if not isinstance(trainer_state, dict) or k not in trainer_state]
    if lacking:
        raise RefrlError(f"{path / 'trainer.pt'}: not a trainer state (no {', '.join(lacking)}); "
                         f"{checkpoint_advice(path / 'trainer.pt')}")
    ema_path = path / "ema.safetensors"
    ema = read_safetensors(ema_path) if ema_path.is_file() else None
    return trainer_state, ema, info


@torch.no_grad()
def load_trainable(named: list[tuple[str, torch.nn.Parameter]], ckpt: str | Path) -> None:
    """Copy ``trainable.safetensors`` of a checkpoint into the given parameters."""
    path = Path(ckpt) / "trainable.safetensors"
    state = read_safetensors(path)
    missing = [k for k, _ in named if k not in state]
    if missing or len(state) != len(named):
        # the trainable set comes from model.frozen and model.lora_rank: a run resumed with
        # other values of either cannot continue from these weights
        raise RefrlError(f"{ckpt}: trainable weights do not match this model ({len(state)} saved, {len(named)} "
                         "expected); resume with the model.frozen and model.lora_rank the run started with")
    for k, p in named:
        if state[k].shape != p.shape:
            raise RefrlError(f"{ckpt}: weight {k} has shape {tuple(state[k].shape)}, model expects {tuple(p.shape)}; "
                             "resume with the model architecture (model.*) the run started with")
        p.copy_(state[k])


def init_fingerprint(init: str | None) -> str | None:
    """SHA-256 over the weight files of the checkpoint that ``model.init`` names (None: no init).

    Names such as ``tiny-sft`` can point at different weights after an upgrade, so a
    resumed run compares contents, not names.
    """
    if init is None:
        return None
    folder = resolve_checkpoint(init)
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_same_init(info: dict[str, Any], fingerprint: str | None, init: str | None, run_dir: str | Path) -> None:
    """Refuse to resume a run started from other initial weights than ``init`` holds now.

    Checkpoints from before fingerprints existed (no ``init_sha256`` key) are trusted.
    """
    saved = info.get("init_sha256", fingerprint)
    if saved != fingerprint:
        raise RefrlError(
            f"{run_dir} was started from different initial weights than model.init={init!r} holds now "
            "(the checkpoint was retrained or replaced); choose another --out or delete that folder"
        )
