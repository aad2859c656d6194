"""Reading checkpoint files with one-line errors: a missing, truncated or corrupt file names
itself and what to do (docs/guides/reliability.md).

Every reader raises `refrl.errors.RefrlError` (exit 2: the input is at fault) instead of the
library's own error (safetensors' ``SafetensorError``, torch's ``RuntimeError`` or
``UnpicklingError``, ``json.JSONDecodeError``, ``FileNotFoundError``), so a damaged checkpoint
ends a command with one line instead of a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from refrl.errors import RefrlError, clip_text
from refrl.runfolder.layout import CHECKPOINTS_DIR, STEP_PREFIX


def checkpoint_advice(path: str | os.PathLike) -> str:
    """What to do about a damaged file: inside ``checkpoints/step-N`` of a run folder, delete that
    folder (a resumed run then continues from the checkpoint before it); elsewhere, restore it."""
    path = Path(path)
    for parent in path.parents:
        if parent.name.startswith(STEP_PREFIX) and parent.parent.name == CHECKPOINTS_DIR:
            return (f"delete the folder {parent} to continue from the checkpoint before it, "
                    "or restore the file from a copy")
    return "restore it from a copy or choose another checkpoint"


def _fail(path: Path, what: str, exc: BaseException | None = None) -> RefrlError:
    detail = f" ({clip_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 160)})" if exc else ""
    return RefrlError(f"{path}: {what}{detail}; {checkpoint_advice(path)}")


def _require(path: Path) -> None:
    if not path.is_file():
        raise _fail(path, "the file is missing")


def read_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """All tensors of a safetensors file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _require(path)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError) as exc:  # truncated, a bad header (too deep, not JSON), bad offsets
        raise _fail(path, "not a readable safetensors file (truncated or corrupt)", exc) from None


def read_torch(path: str | os.PathLike) -> Any:
    """A ``torch.save`` file read with ``weights_only=True`` (tensors and plain values only)."""
    import pickle

    import torch

    path = Path(path)
    _require(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError) as exc:
        raise _fail(path, "not a readable torch file (truncated or corrupt)", exc) from None


def read_json(path: str | os.PathLike, kind: type = dict) -> Any:
    """A JSON file whose top level is a ``kind`` (an object by default)."""
    path = Path(path)
    _require(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise _fail(path, "not valid JSON (truncated or corrupt)", exc) from None
    if not isinstance(data, kind):
        raise _fail(path, f"expected a JSON {kind.__name__}, got {type(data).__name__}")
    return data
