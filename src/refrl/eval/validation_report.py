"""The report's part for validation during training (`refrl.train.validation`): curves and the best checkpoint.

A run folder's ``metrics.jsonl`` holds training lines and validation lines (``"kind":
"validation"``); the report draws the training curves from the first and, next to them,
the validation curves from the second, one panel per metric, with the best checkpoint of
``best.json`` (``validation.keep_best``) marked and validations that failed the guard crossed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refrl.eval import plots
from refrl.eval.html import _e, _fmt, _img, _table
from refrl.runfolder.layout import BEST_FILE

LINE_KIND = "validation"  # as refrl.train.validation writes them
VALIDATION_DIR = "validation"  # RUN/validation/step-N: eval folders, not evaluations of the run


def split_records(records: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(training lines, validation lines) of a metrics.jsonl."""
    train = [r for r in records if r.get("kind") != LINE_KIND]
    val = [r for r in records if r.get("kind") == LINE_KIND]
    return train, val


def read_best(folder: Path) -> dict[str, Any] | None:
    path = folder / BEST_FILE
    try:
        info = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def validation_html(label: str, folder: Path, val: Sequence[Mapping[str, Any]]) -> str:
    """Validation curves of one run folder and a line on its best checkpoint (or why it has none)."""
    if not val:
        return ""
    best = read_best(folder)
    best_step = best.get("step") if best else val[-1].get("best_step")
    parts = []
    png = plots.validation_png(val, best_step, title=f"{label}: validation ({len(val)} validations)")
    if png:
        parts.append(_img(png, f"{label} validation curves"))
    if best and best.get("step") is not None:
        parts.append(_table(["best checkpoint", "step", "why"], [[_e(f"{label}:best"), _fmt(best["step"]),
                                                                   _e(best.get("why", ""))]], left=3))
    elif best:
        parts.append(f"<p>{_e(label)}: no best checkpoint: {_e(best.get('reason', ''))}</p>")
    stops = [r for r in val if r.get("guard_stop")]
    flags = [(r["step"], k, v) for r in val for k, v in (r.get("guard") or {}).items()]
    if flags:
        rows = [[_fmt(s), _e(k), _e(v) + (" <b>(stopped the run)</b>" if stops and s == stops[-1]["step"]
                                          and k == stops[-1]["guard_stop"] else "")] for s, k, v in flags]
        parts.append("<h3>Guard</h3>" + _table(["step", "rule", "what happened"], rows, left=3))
    return "".join(parts)
