"""The DiffSynth-Studio / DyRef columns, and reading them from a row: shared by the
``diffsynth`` and ``hf`` importers."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from typing import Any

from refrl.data.manifest_line import RESERVED_KEYS
from refrl.data.schema import canonical_reference_type

# DiffSynth-Studio metadata columns (its UnifiedDataset: `edit_image` = reference(s),
# `image` = target). The layout has no reference roles, hence the default type.
REFS_COLUMN = "edit_image"
TARGET_COLUMN = "image"
PROMPT_COLUMN = "prompt"
TYPES_COLUMN = "edit_image_types"
DEFAULT_REFERENCE_TYPE = "subject"
# Columns that map to RefSample fields of the same name.
PASSTHROUGH_FIELDS = ("id", "category", "mask")

Types = str | Sequence[str] | Sequence[Sequence[str]] | None


def split_paths(value: Any) -> list[str]:
    """A cell holding image paths -> list: a list, one path, a JSON/Python list literal
    (``'["a.jpg", "b.jpg"]'``) or a comma-separated string (``"a.jpg,b.jpg"``)."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (pandas)
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    text = str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list):
                return split_paths(parsed)
    return [p.strip() for p in text.split(",") if p.strip()]


def row_types(types: Types, row: Mapping[str, Any], row_idx: int, n_refs: int, types_column: str,
               default_type: str) -> list[str]:
    """Reference types of one row: ``types`` (a list per row; or one positional list for all
    rows — a row with fewer references takes its first entries — or a comma string), else
    the row's ``types_column``, else ``default_type``. A single entry broadcasts."""
    if types is not None and not isinstance(types, str) and types and not isinstance(types[0], str):
        if row_idx >= len(types):
            raise ValueError(f"types has {len(types)} per-row lists but there are more rows")
        names = list(types[row_idx])
    elif types is not None:
        names = split_paths(types)
        if len(names) > n_refs:
            names = names[:n_refs]
    elif split_paths(row.get(types_column)):
        names = split_paths(row.get(types_column))
    else:
        names = [default_type]
    if len(names) == 1:
        names = names * n_refs
    if len(names) != n_refs:
        raise ValueError(f"{len(names)} reference types {names} for {n_refs} references")
    return [canonical_reference_type(t) for t in names]


def extra_columns(row: Mapping[str, Any], used: set[str]) -> dict[str, Any]:
    extra = {k: v for k, v in row.items() if k not in used and k not in PASSTHROUGH_FIELDS}
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"columns {clash} clash with manifest fields; rename them")
    return extra


def opt_str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        return None
    return str(value)
