"""``refrl report RUN1 RUN2 ...``: several runs in one ``report.html``.

For comparing objectives or settings on the same budget (for example GRPO, DiffusionNFT
and AWM from one SFT checkpoint):

* a table per run: what it did (its resolved config), rollouts per iteration, iterations
  logged, rollouts in all, median wall seconds per iteration;
* the training reward curves of every run overlaid, one panel per ``reward/*`` key plus
  the mean of each run's trained rewards, against rollouts (generated images), so runs
  whose iterations differ in size line up; lines are moving averages, raw values faint;
* every evaluation found in the runs, in one table per suite (change = last - first).

The page is static HTML with images embedded, like the single-run report.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from refrl.errors import RefrlError
from refrl.eval import plots
from refrl.eval.html import _e, _fmt, _img, _table, html_page
from refrl.eval.report import _eval_tables, _metric_names, _read_jsonl, describe_run, find_evals
from refrl.eval.validation_report import split_records
from refrl.limits import load_yaml

OVERLAY_FILE = "report-overlay.html"
TRAINED_MEAN_KEY = "trained rewards, mean"
DEFAULT_SMOOTH = 10
TIMING_KEYS = ("seconds/rollout", "seconds/reward", "seconds/train")


def run_labels(run_dirs: Sequence[Path]) -> dict[str, Path]:
    """Unique labels: each run's path relative to the runs' common parent (its name when alone)."""
    resolved = [Path(p).resolve() for p in run_dirs]
    if len(set(resolved)) != len(resolved):
        raise RefrlError("the same run folder is given twice: " + ", ".join(str(p) for p in run_dirs))
    parent = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    return {p.relative_to(parent).as_posix() or p.name: p for p in resolved}


def rollouts_per_iteration(config: Mapping[str, Any]) -> int | None:
    """Images generated per RL iteration: ``groups_per_iteration x group_size`` (None for SFT runs)."""
    groups, size = config.get("groups_per_iteration"), config.get("group_size")
    return groups * size if isinstance(groups, int) and isinstance(size, int) else None


def trained_reward_mean(record: Mapping[str, Any], names: Sequence[str]) -> float | None:
    """Mean of ``reward/<name>`` over the run's configured rewards that are finite in this record."""
    vals = [record.get(f"reward/{n}") for n in names]
    vals = [float(v) for v in vals if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def seconds_per_iteration(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Median over iterations of rollout + reward + train seconds (None when not logged)."""
    totals = [sum(float(r[k]) for k in TIMING_KEYS) for r in records if all(k in r for k in TIMING_KEYS)]
    return statistics.median(totals) if totals else None


def _load_run(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise RefrlError(f"run folder not found: {path}")
    cfg_path, metrics_path = path / "config.yaml", path / "metrics.jsonl"
    config: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            loaded = load_yaml(cfg_path.read_text(), str(cfg_path))  # bounded: no aliases (refrl.limits)
        except yaml.YAMLError as e:
            raise RefrlError(f"cannot read {cfg_path}: {e}") from None
        config = loaded if isinstance(loaded, dict) else {}
    records = _read_jsonl(metrics_path) if metrics_path.is_file() else []
    records = split_records(records)[0]  # training lines; validation lines are drawn by `refrl report`
    evals = find_evals(path)
    if not records and not evals:
        raise RefrlError(f"{path} holds no metrics.jsonl and no eval.json to compare")
    return {"config": config, "records": records, "evals": evals}


def write_overlay_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                         smooth: int = DEFAULT_SMOOTH) -> Path:
    """Write one report overlaying ``run_dirs`` (default: ``report-overlay.html`` in their common parent)."""
    if len(run_dirs) < 2:
        raise RefrlError("an overlay report needs at least two run folders")
    if smooth < 1:
        raise RefrlError(f"smooth must be >= 1 (records in the moving average), got {smooth}")
    labels = run_labels([Path(p) for p in run_dirs])
    runs = {label: _load_run(path) for label, path in labels.items()}

    per_iteration = {label: rollouts_per_iteration(run["config"]) for label, run in runs.items()}
    # an SFT run or a run without its config has no rollout count: steps are then the common unit
    by_rollouts = all(v is not None for label, v in per_iteration.items() if runs[label]["records"])
    x_label = "rollouts (images generated)" if by_rollouts else "iteration"
    rows, series, reward_keys, has_mean = [], {}, set(), False
    for label, run in runs.items():
        cfg, records = run["config"], run["records"]
        names = [r.get("name") for r in cfg.get("rewards") or [] if isinstance(r, dict)]
        reward_keys.update(k for k in plots.curve_keys(records) if k.startswith(plots.CURVE_PREFIXES))
        points = []
        for i, rec in enumerate(records):
            step = rec.get("step", i + 1)
            rec = dict(rec)
            mean = trained_reward_mean(rec, names)
            if mean is not None:
                rec[TRAINED_MEAN_KEY] = mean
                has_mean = True
            points.append((step * per_iteration[label] if by_rollouts else step, rec))
        if points:
            series[label] = points
        rows.append([_e(label), _e(describe_run(cfg) if cfg else "no config.yaml"),
                     _fmt(per_iteration[label]), _fmt(len(records)),
                     _fmt(points[-1][0] if points and by_rollouts else None),
                     _fmt(seconds_per_iteration(records))])

    sections = [("runs", "Runs", _table(["run", "what it did", "rollouts / iteration", "iterations logged",
                                          "rollouts", "s / iteration (median)"], rows, left=2))]
    curve_keys = ([TRAINED_MEAN_KEY] if has_mean else []) + sorted(reward_keys)
    png = plots.overlay_curves_png(series, curve_keys, x_label, smooth,
                                   title=f"training rewards (moving average over {smooth} iterations)"
                                   if smooth > 1 else "training rewards")
    if png:
        sections.append(("curves", "Training curves", _img(png, "training curves of every run")))

    by_suite: dict[str, dict[str, dict[str, Any]]] = {}
    for label, run in runs.items():
        for ev_label, ev in run["evals"].items():
            full = label if ev_label == "run" else f"{label}/{ev_label}"
            by_suite.setdefault(str(ev.get("suite")), {})[full] = ev
    for suite, group in by_suite.items():
        sections.append((f"eval-{suite}", f"Evaluation: {suite}", _eval_tables(group, _metric_names(group))))

    parent = Path(os.path.commonpath([str(p) for p in labels.values()]))
    page = html_page(f"refrl report: {len(runs)} runs", _e(", ".join(runs)), str(parent), sections)
    out_path = Path(out) if out is not None else parent / OVERLAY_FILE
    from refrl.runfolder.files import atomic_write_text

    return atomic_write_text(out_path, page)
