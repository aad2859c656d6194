"""DiffSynth-style columns in a Hugging Face ``datasets`` dataset -> RefSamples, the
images written as PNGs (`import_hf_dataset`)."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from refrl.data.images import check_image_pixels, max_image_pixels, save_pil_png
from refrl.data.importers.columns import (
    DEFAULT_REFERENCE_TYPE,
    PASSTHROUGH_FIELDS,
    PROMPT_COLUMN,
    REFS_COLUMN,
    TARGET_COLUMN,
    TYPES_COLUMN,
    Types,
    opt_str,
    row_types,
)
from refrl.data.importers.place import IMAGES_DIR
from refrl.data.manifest_line import RESERVED_KEYS
from refrl.data.schema import Reference, RefSample
from refrl.errors import RefrlError


def _hub_offline() -> bool:
    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(f in ("1", "ON", "YES", "TRUE") for f in flags):
        return True
    hub = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(hub, "HF_HUB_OFFLINE", False))


def _load_hf(name_or_path: str | os.PathLike, split: str) -> tuple[Any, Path | None]:
    """The dataset split and the folder its string image paths are relative to (None: hub)."""
    try:
        import datasets
    except ImportError as e:
        raise RefrlError("importing a Hugging Face dataset needs the `datasets` package: pip install 'refrl[hf]'") from e
    path = Path(name_or_path)
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise RefrlError(f"split {split!r} not in {path}; available: {', '.join(ds)}")
            ds = ds[split]
        return ds, path
    if path.exists():
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
        try:
            if path.is_dir():
                return datasets.load_dataset(str(path), split=split), path
            if path.suffix.lower() not in builder:
                raise RefrlError(f"{path}: unsupported data file; allowed: {', '.join(builder)} or a folder")
            return datasets.load_dataset(builder[path.suffix.lower()], data_files=str(path), split="train"), path.parent
        except (ValueError, OSError, KeyError) as e:  # datasets raises these for bad folders/splits
            raise RefrlError(f"cannot load dataset {path} split {split!r}: {e}") from e
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RefrlError(f"dataset folder not found: {name}")
    if _hub_offline():
        raise RefrlError(f"{name!r} is not a local folder and the Hugging Face hub is offline (HF_HUB_OFFLINE=1); "
                         "pass a local path (a folder saved with save_to_disk, or a data folder)")
    try:
        return datasets.load_dataset(name, split=split), None
    except Exception as e:  # network, auth, missing repo: all mean "cannot import this id"
        raise RefrlError(f"cannot load {name!r} (split {split!r}) from the Hugging Face hub: {type(e).__name__}: {e}; "
                         "pass a local path instead") from e


def _to_pil_images(value: Any, base: Path | None, where: str) -> list[Image.Image]:
    """A dataset cell -> PIL images: PIL, {"bytes", "path"} dicts, bytes, paths, or lists of them."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [im for v in value for im in _to_pil_images(v, base, where)]
    if isinstance(value, Image.Image):
        return [value]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    max_image_pixels()  # raises Pillow's own guard to the refrl limit before Pillow opens anything
    try:
        if isinstance(value, bytes):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value.strip():
            p = Path(value)
            if not p.is_absolute():
                if base is None:
                    raise RefrlError(f"{where}: relative image path {value!r} in a hub dataset cannot be resolved")
                p = base / p
            image = Image.open(p)
        else:
            return []
        check_image_pixels(*image.size, source=where)
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise RefrlError(f"{where}: cannot decode image: {e}") from e
    return [image]


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def import_hf_dataset(name_or_path: str | os.PathLike, split: str = "train",
                      image_columns: Sequence[str] = (REFS_COLUMN,), *, out_dir: str | os.PathLike,
                      target_column: str = TARGET_COLUMN, prompt_column: str = PROMPT_COLUMN,
                      types: Types = None, types_column: str = TYPES_COLUMN,
                      default_type: str = DEFAULT_REFERENCE_TYPE,
                      max_rows: int | None = None) -> list[RefSample]:
    """A ``datasets`` dataset with DiffSynth-style columns -> RefSamples, images as PNGs.

    ``name_or_path``: a folder saved with ``save_to_disk``, a local data folder or file,
    or a hub id (only when online; offline it fails at once naming the id). References
    come from ``image_columns`` in order (each a single image or a list), the target
    from ``target_column``. Images are written to ``out_dir/images/`` and the samples'
    paths are relative to ``out_dir`` (write the manifest there). Columns that are
    JSON values go to ``extra``.
    """
    ds, base = _load_hf(name_or_path, split)
    columns = set(ds.column_names)
    missing = [c for c in (*image_columns, prompt_column) if c not in columns]
    if missing:
        raise RefrlError(f"dataset {name_or_path}: columns {missing} not found; available: {', '.join(sorted(columns))}")
    out_dir = Path(out_dir)
    used = {*image_columns, target_column, prompt_column, types_column}
    samples = []
    for i, row in enumerate(ds):
        if max_rows is not None and i >= max_rows:
            break
        where = f"dataset {name_or_path} row {i}"
        prompt = opt_str(row.get(prompt_column))
        if prompt is None:
            raise RefrlError(f"{where}: missing or empty {prompt_column!r}")
        refs = [im for col in image_columns for im in _to_pil_images(row.get(col), base, f"{where} column {col!r}")]
        try:
            ref_types = row_types(types, row, i, len(refs), types_column, default_type)
        except ValueError as e:
            raise RefrlError(f"{where}: {e}") from None
        ref_paths = []
        for j, image in enumerate(refs):
            rel = f"{IMAGES_DIR}/{i:06d}-ref{j}.png"
            save_pil_png(image, out_dir / rel)
            ref_paths.append(rel)
        target = None
        target_images = _to_pil_images(row.get(target_column), base, f"{where} column {target_column!r}")
        if target_images:
            target = f"{IMAGES_DIR}/{i:06d}-target.png"
            save_pil_png(target_images[0], out_dir / target)
        mask = None
        mask_images = _to_pil_images(row.get("mask"), base, f"{where} column 'mask'")
        if mask_images:
            mask = f"{IMAGES_DIR}/{i:06d}-mask.png"
            save_pil_png(mask_images[0], out_dir / mask)
        extra = {k: v for k, v in row.items()
                 if k not in used and k not in PASSTHROUGH_FIELDS and k not in RESERVED_KEYS and _json_safe(v)}
        samples.append(RefSample(
            id=opt_str(row.get("id")) or f"{split}-{i:06d}",
            prompt=prompt,
            references=[Reference(image=p, type=t) for p, t in zip(ref_paths, ref_types, strict=True)],
            target=target,
            mask=mask,
            category=opt_str(row.get("category")),
            extra=extra,
        ))
    return samples
