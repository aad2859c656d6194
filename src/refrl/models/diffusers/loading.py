"""Loading a diffusers pipeline by hub id or local folder, with one clear line when files are missing.

A pipeline folder is ``model_index.json`` plus one sub-folder per component. Before
handing a folder to ``from_pretrained`` we check that every component we will load
has its config and its weights (every shard an index names), so an offline machine
without the weights gets ``RefrlError: cannot load ...: missing transformer/...``
instead of a stack trace from deep inside huggingface_hub.

A hub id is looked up in the local Hugging Face cache first; with ``HF_HUB_OFFLINE=1``
(or ``local_files_only``) nothing is downloaded and missing files are reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refrl.errors import RefrlError

MODEL_INDEX = "model_index.json"
# Files whose presence makes a component folder loadable, by what the component is.
SCHEDULER_FILES = ("scheduler_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MAX_LISTED = 6  # missing files named in the error line before "... and N more"


def is_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or flag in {"1", "true", "yes", "on"}


def _component_missing(folder: Path, name: str, library: str | None, class_name: str | None) -> list[str]:
    """Relative paths missing for one component of a pipeline folder."""
    sub = folder / name
    if not sub.is_dir():
        return [f"{name}/ (the whole {class_name or name} folder)"]
    lowered = (class_name or "").lower()
    if "scheduler" in lowered or name == "scheduler":
        return [] if any((sub / f).is_file() for f in SCHEDULER_FILES) else [f"{name}/{SCHEDULER_FILES[0]}"]
    if "tokenizer" in lowered or name.startswith("tokenizer"):
        return [] if any((sub / f).is_file() for f in TOKENIZER_FILES) else [f"{name}/tokenizer.json"]
    if "processor" in lowered or name in {"processor", "feature_extractor"}:
        return [] if any((sub / f).is_file() for f in PROCESSOR_FILES) else [f"{name}/{PROCESSOR_FILES[0]}"]
    missing = [] if (sub / "config.json").is_file() else [f"{name}/config.json"]
    indexes = sorted(sub.glob("*.index.json"))
    if indexes:
        for index in indexes:
            try:
                shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            except (OSError, ValueError):
                missing.append(f"{name}/{index.name} (unreadable)")
                continue
            missing += [f"{name}/{s}" for s in shards if not (sub / s).is_file()]
    elif not any(p.suffix in WEIGHT_SUFFIXES for p in sub.iterdir()):
        default = "diffusion_pytorch_model.safetensors" if library == "diffusers" else "model.safetensors"
        missing.append(f"{name}/{default}")
    return missing


def missing_files(folder: str | Path, components: Iterable[str] | None = None) -> list[str]:
    """Files a pipeline folder lacks for the named components (all listed ones by default)."""
    folder = Path(folder)
    index_path = folder / MODEL_INDEX
    if not index_path.is_file():
        return [MODEL_INDEX]
    try:
        index: dict[str, Any] = json.loads(index_path.read_text())
    except ValueError as e:
        raise RefrlError(f"{index_path}: not valid JSON ({e})") from None
    listed = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2}
    wanted = list(listed) if components is None else list(components)
    missing = []
    for name in wanted:
        library, class_name = listed.get(name, (None, None))
        if name in listed and library is None:  # saved as None: the pipeline runs without it
            continue
        missing += _component_missing(folder, name, library, class_name)
    return missing


def _missing_line(source: str, where: Path | None, missing: list[str]) -> str:
    shown = ", ".join(missing[:MAX_LISTED]) + (f" ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else "")
    place = f" (looked in {where})" if where is not None else ""
    return f"cannot load {source}{place}: missing {shown}"


def resolve_pretrained(source: str, components: Iterable[str], local_files_only: bool = False) -> str:
    """The folder (or, online, the hub id) to give ``from_pretrained``; raises RefrlError naming missing files.

    ``source`` is a local pipeline folder or a hub id (``org/name``). Offline, a hub id
    must be fully present in the local Hugging Face cache.
    """
    components = list(components)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RefrlError(f"model.pretrained={source!r} is a file; give a pipeline folder (with {MODEL_INDEX}) or a hub id")
        missing = missing_files(path, components)
        if missing:
            raise RefrlError(_missing_line(source, None, missing))
        return str(path)
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise RefrlError(f"model.pretrained={source!r}: no such folder, and not a hub id of the form org/name")
    offline = local_files_only or is_offline()
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        cached = Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if cached is not None:
        missing = missing_files(cached, components)
        if not missing:
            return str(cached)
        if offline:
            raise RefrlError(_missing_line(source, cached, missing) + " (offline: download them first, e.g. `refrl weights download "
                             f"--config CONFIG` or `hf download {source}`, or set model.pretrained to a local folder)")
    elif offline:
        raise RefrlError(
            f"cannot load {source}: it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and downloads "
            f"are off (HF_HUB_OFFLINE); missing {MODEL_INDEX} and the weights of {', '.join(components)} "
            f"(download with `refrl weights download --config CONFIG` or `hf download {source}`, or set model.pretrained "
            "to a local folder)"
        )
    return source  # online: from_pretrained downloads what is missing


def load_pipeline(pipeline_cls: type, location: str, skip: Iterable[str] = (), extra: dict[str, Any] | None = None,
                  torch_dtype=None, local_files_only: bool = False, source: str | None = None):
    """``pipeline_cls.from_pretrained(location)`` (a folder or hub id from `resolve_pretrained`),
    with the ``skip`` components set to None and ``extra`` components passed in ready-made."""
    kwargs: dict[str, Any] = {name: None for name in skip}
    kwargs.update(extra or {})
    try:
        return pipeline_cls.from_pretrained(location, dtype=torch_dtype,
                                            local_files_only=local_files_only or is_offline(), **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RefrlError(f"cannot load {source or location} with {pipeline_cls.__name__}: {first}") from None
