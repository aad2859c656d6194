"""Where a zoo reward's weights come from: a local folder/file, or a Hugging Face hub id.

Resolution order for a ``checkpoint`` option:

1. an existing local path (folder written by ``save_pretrained``, or a single
   weights file) is used as is;
2. otherwise the value is a hub id: the local Hugging Face cache is tried first
   (``local_files_only=True``, no network at all), and only when
   ``HF_HUB_OFFLINE`` is not set is the hub asked.

Any failure becomes one `RefrlError` line naming the reward, the checkpoint and
how to provide it (a local path option, or the cache variables) — never a hang on
a machine without network and never a long traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from refrl.errors import RefrlError

T = TypeVar("T")

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
CACHE_HELP = "HF_HOME or HF_HUB_CACHE (the Hugging Face cache folder)"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def looks_like_path(value: str) -> bool:
    """A value meant as a local path (absolute, ./, ~, or more than one '/'), not a hub id ``org/name``."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value


def missing_weights_error(reward: str, checkpoint: str, option: str = "checkpoint", cause: object = None) -> RefrlError:
    """The one-line error for weights that cannot be found locally or fetched."""
    mode = "HF_HUB_OFFLINE is set" if is_offline() else "the hub could not be reached"
    why = f" ({_one_line(cause)})" if cause is not None else ""
    return RefrlError(
        f"reward {reward!r}: weights {checkpoint!r} are not available locally and {mode}{why}. "
        f"Provide them: download once where there is network (`refrl weights download --config CONFIG`, "
        f"or `hf download {checkpoint}`) and point "
        f"{CACHE_HELP} at that cache, or pass the folder as the option {option}=/path/to/folder"
    )


def _one_line(cause: object, limit: int = 160) -> str:
    text = " ".join(str(cause).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_pretrained(loader: Callable[..., T], checkpoint: str, reward: str, option: str = "checkpoint",
                    **kwargs: Any) -> T:
    """``loader(checkpoint, **kwargs)`` (a ``from_pretrained``) with local-first hub resolution.

    A local folder that exists but cannot be loaded is reported as such (its
    content is wrong, not missing).
    """
    path = Path(os.path.expanduser(checkpoint))
    if path.exists():
        try:
            return loader(str(path), **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise RefrlError(f"reward {reward!r}: cannot load {option}={checkpoint}: {_one_line(exc)}") from exc
    if looks_like_path(checkpoint):
        raise RefrlError(f"reward {reward!r}: {option}={checkpoint} does not exist (give a folder or a hub id)")
    try:
        return loader(checkpoint, local_files_only=True, **kwargs)
    except OSError as exc:
        if is_offline():
            raise missing_weights_error(reward, checkpoint, option) from exc
    try:
        return loader(checkpoint, **kwargs)
    except OSError as exc:
        raise missing_weights_error(reward, checkpoint, option, exc) from exc


def resolve_file(checkpoint: str, filename: str, reward: str, option: str = "checkpoint") -> Path:
    """A single weights file: ``checkpoint`` itself if it is a file, ``checkpoint/filename`` for a
    folder, else ``filename`` from the hub repo ``checkpoint`` (cache first)."""
    path = Path(os.path.expanduser(checkpoint))
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise RefrlError(f"reward {reward!r}: {option}={checkpoint} has no file {filename!r}")
    if looks_like_path(checkpoint):
        raise RefrlError(f"reward {reward!r}: {option}={checkpoint} does not exist (give a file, a folder or a hub id)")
    from huggingface_hub import hf_hub_download

    def download(repo: str, local_files_only: bool = False) -> str:
        return hf_hub_download(repo, filename, local_files_only=local_files_only)

    return Path(load_pretrained(download, checkpoint, reward, option))


def read_json(checkpoint: str, filename: str, reward: str) -> dict[str, Any] | None:
    """``filename`` (e.g. ``preprocessor_config.json``) of a folder or hub repo, or None if it has none."""
    try:
        path = resolve_file(checkpoint, filename, reward)
    except RefrlError:
        return None
    return json.loads(path.read_text())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` / None -> cuda when available else cpu; otherwise the named device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A dtype from its name (float32, float16, bfloat16 and the short forms)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise RefrlError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[key]


def load_transformers(class_name: str, checkpoint: str, reward: str, device: torch.device, dtype: torch.dtype,
                      option: str = "checkpoint", **kwargs: Any) -> Any:
    """A ``transformers`` class (by name, imported here so ``import refrl`` stays light) from a
    folder or hub id, in eval mode on ``device``."""
    import transformers

    cls = getattr(transformers, class_name)
    model = load_pretrained(cls.from_pretrained, checkpoint, reward, option, dtype=dtype, **kwargs)
    return model.to(device).eval()


def load_tokenizer(checkpoint: str, reward: str, option: str = "checkpoint") -> Any:
    """``AutoTokenizer`` of a folder or hub id."""
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer.from_pretrained, checkpoint, reward, option)
