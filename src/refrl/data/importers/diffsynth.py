"""DiffSynth-Studio / DyRef metadata (``edit_image`` references, ``image`` target,
``prompt``) from .jsonl, .json (a list) or .csv -> RefSamples (`import_diffsynth`)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refrl.data.importers.columns import (
    DEFAULT_REFERENCE_TYPE,
    PROMPT_COLUMN,
    REFS_COLUMN,
    TARGET_COLUMN,
    TYPES_COLUMN,
    Types,
    extra_columns,
    opt_str,
    row_types,
    split_paths,
)
from refrl.data.manifest_line import loads_bounded, max_json_depth
from refrl.data.schema import Reference, RefSample
from refrl.errors import RefrlError


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (a list of objects) or .csv metadata file."""
    path = Path(path)
    if not path.is_file():
        raise RefrlError(f"metadata file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
                if line.strip():
                    try:
                        rows.append(loads_bounded(line))
                    except json.JSONDecodeError as e:
                        raise RefrlError(f"{path}:{n}: bad JSON ({e.msg})") from e
                    except ValueError as e:
                        raise RefrlError(f"{path}:{n}: {e}") from e
        elif suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:  # a list of rows: one level more than a manifest line
                rows = loads_bounded(text, max_bytes=len(text.encode("utf-8", "surrogatepass")),
                                     max_depth=max_json_depth() + 1)
            except json.JSONDecodeError:
                raise
            except ValueError as e:
                raise RefrlError(f"{path}: {e}") from e
            if not isinstance(rows, list):
                raise RefrlError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        else:
            raise RefrlError(f"{path}: unsupported metadata format {suffix!r}; allowed: .jsonl, .json, .csv")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefrlError(f"{path}: cannot parse ({e})") from e
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise RefrlError(f"{path}: row {bad[0]} is not an object")
    return rows


def import_diffsynth(path_or_rows: str | os.PathLike | Sequence[Mapping[str, Any]],
                     root: str | os.PathLike | None = None, types: Types = None,
                     types_column: str = TYPES_COLUMN,
                     default_type: str = DEFAULT_REFERENCE_TYPE) -> list[RefSample]:
    """DiffSynth-Studio / DyRef rows (``edit_image``, ``image``, ``prompt``) -> RefSamples.

    ``root`` is the folder the rows' image paths are relative to (DiffSynth's
    ``dataset_base_path``); default: the metadata file's folder. The samples keep the
    rows' paths (relative to ``root``, or absolute). Other columns go to ``extra``;
    ``id``, ``category`` and ``mask`` columns fill those fields. Default id: row index.
    """
    if isinstance(path_or_rows, str | os.PathLike):
        source = str(path_or_rows)
        rows = read_rows(path_or_rows)
    else:
        if root is None:
            raise RefrlError("import_diffsynth: pass root (the folder image paths are relative to) with in-memory rows")
        source, rows = "rows", list(path_or_rows)
    used = {REFS_COLUMN, TARGET_COLUMN, PROMPT_COLUMN, types_column}
    samples = []
    for i, row in enumerate(rows):
        try:
            prompt = opt_str(row.get(PROMPT_COLUMN))
            if prompt is None:
                raise ValueError(f"missing or empty {PROMPT_COLUMN!r}")
            refs = split_paths(row.get(REFS_COLUMN))
            ref_types = row_types(types, row, i, len(refs), types_column, default_type)
            targets = split_paths(row.get(TARGET_COLUMN))
            if len(targets) > 1:
                raise ValueError(f"{TARGET_COLUMN!r} must be one path, got {targets}")
            samples.append(RefSample(
                id=opt_str(row.get("id")) or str(i),
                prompt=prompt,
                references=[Reference(image=p, type=t) for p, t in zip(refs, ref_types, strict=True)],
                target=targets[0] if targets else None,
                mask=opt_str(row.get("mask")),
                category=opt_str(row.get("category")),
                extra=extra_columns(row, used),
            ))
        except ValueError as e:
            raise RefrlError(f"{source}: row {i}: {e}") from None
    return samples
