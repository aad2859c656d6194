"""Plots of the report, as PNG bytes (matplotlib's Agg canvas; pyplot's global state is never touched).

* `curves_png`: training curves from ``metrics.jsonl`` records, one panel per key;
* `score_vs_refs_png`: OmniRef-Bench's headline plot, score vs number of references,
  one panel per metric and one line per evaluation (e.g. before / after RL);
* `category_vs_refs_png`: the same for one evaluation, one line per category;
* `overlay_curves_png`: several runs' curves in one panel per key, against rollouts.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PANEL_SIZE_IN = (3.6, 2.6)
MAX_COLUMNS = 3
DPI = 90
# Keys of metrics.jsonl plotted besides every ``reward/*``: what a reader checks first
# (loss, KL to the reference policy, the PPO ratio and clipping, gradient size).
CURVE_KEYS = ("loss", "kl", "ratio_mean", "ratio_max", "ratio_first", "clipfrac", "grad_norm", "zero_std_groups")
CURVE_PREFIXES = ("reward/",)


def curve_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys worth a curve: every ``reward/*`` then `CURVE_KEYS`, if some record has a number there."""
    present: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                present.setdefault(k, None)
    rewards = sorted(k for k in present if k.startswith(CURVE_PREFIXES))
    return rewards + [k for k in CURVE_KEYS if k in present]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _panels(n: int, title: str | None = None) -> tuple[Figure, list[Any]]:
    cols = min(MAX_COLUMNS, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(PANEL_SIZE_IN[0] * cols, PANEL_SIZE_IN[1] * rows + (0.3 if title else 0)), dpi=DPI)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    if title:
        fig.suptitle(title)
    return fig, axes


def _style_panel(ax: Any, title: str, xlabel: str) -> None:
    """The look every panel of the report shares: small title, axis label, ticks, light grid."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def curves_png(records: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None, x_key: str = "step",
               title: str | None = None) -> bytes | None:
    """One panel per key (y) against ``x_key``; None when nothing is plottable."""
    keys = list(keys) if keys is not None else curve_keys(records)
    if not keys:
        return None
    fig, axes = _panels(len(keys), title)
    for ax, key in zip(axes, keys, strict=True):
        pts = [(r.get(x_key, i + 1), r[key]) for i, r in enumerate(records) if _finite(r.get(key))]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if len(pts) < 40 else None, linewidth=1.2)
        _style_panel(ax, key, x_key)
    return _png(fig)


def score_vs_refs_png(evals: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> bytes | None:
    """Mean score per number of references (error bars: standard error), one line per evaluation."""
    if not metrics or not evals:
        return None
    fig, axes = _panels(len(metrics), "score vs number of references")
    for ax, metric in zip(axes, metrics, strict=True):
        for label, ev in evals.items():
            by = ev.get("metrics", {}).get("by_n_refs", {})
            pts = []
            for n_refs, summary in by.items():
                s = summary.get(metric) or {}
                if _finite(s.get("mean")) and s.get("n", 0) > 0:
                    sem = (s.get("std") or 0.0) / math.sqrt(s["n"]) if _finite(s.get("std")) else 0.0
                    pts.append((int(n_refs), s["mean"], sem))
            if pts:
                pts.sort()
                xs, ys, es = zip(*pts, strict=True)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2, linewidth=1.3, label=label)
        _style_panel(ax, metric, "number of references")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def category_vs_refs_png(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], title: str) -> bytes | None:
    """Per-image records -> mean score per (category, number of references), one line per category."""
    if not records or not metrics:
        return None
    fig, axes = _panels(len(metrics), title)
    for ax, metric in zip(axes, metrics, strict=True):
        groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            if _finite(r.get(metric)):
                groups[str(r.get("category"))][int(r["n_refs"])].append(float(r[metric]))
        for category in sorted(groups):
            pts = sorted((n, sum(v) / len(v)) for n, v in groups[category].items())
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", linewidth=1.0, label=category)
        _style_panel(ax, metric, "number of references")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    return _png(fig)



def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): m_i = mean(v[max(0, i-w+1) .. i])."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def overlay_curves_png(series: Mapping[str, Sequence[tuple[float, Mapping[str, Any]]]], keys: Sequence[str],
                       x_label: str, smooth: int = 1, title: str | None = None) -> bytes | None:
    """One panel per key, one line per run: ``series[label]`` is ``[(x, record), ...]``.

    With ``smooth > 1`` each line is the trailing moving average over ``smooth`` records (the
    raw points are drawn faintly behind it), because per-iteration rewards are noisy.
    """
    if not keys or not series:
        return None
    fig, axes = _panels(len(keys), title)
    for ax, key in zip(axes, keys, strict=True):
        for i, (label, points) in enumerate(series.items()):
            pts = [(x, float(r[key])) for x, r in points if _finite(r.get(key))]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            color = f"C{i % 10}"
            if smooth > 1:
                ax.plot(xs, ys, color=color, alpha=0.18, linewidth=0.8)
                ys = tuple(moving_average(ys, smooth))
            ax.plot(xs, ys, color=color, linewidth=1.4, label=label)
        _style_panel(ax, key, x_label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return _png(fig)


def validation_png(records: Sequence[Mapping[str, Any]], best_step: int | None = None, prefix: str = "val/",
                   title: str | None = None) -> bytes | None:
    """Validation curves (``metrics.jsonl`` lines of kind ``validation``): one panel per ``val/*`` metric,
    the best checkpoint's step marked (a dashed line and a star), validations that failed the guard as x."""
    keys = sorted({k for r in records for k, v in r.items() if k.startswith(prefix) and _finite(v)})
    if not keys:
        return None
    fig, axes = _panels(len(keys), title)
    for ax, key in zip(axes, keys, strict=True):
        pts = [(r["step"], float(r[key]), r.get("guard_pass", True)) for r in records if _finite(r.get(key))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker=".", linewidth=1.2, color="C0")
        failed = [(x, y) for x, y, ok in pts if not ok]
        if failed:
            ax.scatter(*zip(*failed, strict=True), marker="x", color="C3", zorder=3, label="failed the guard")
        if best_step is not None:
            ax.axvline(best_step, color="C2", linestyle="--", linewidth=1.0)
            at = [(x, y) for x, y, _ in pts if x == best_step]
            if at:
                ax.scatter(*zip(*at, strict=True), marker="*", s=90, color="C2", zorder=4, label=f"best (step {best_step})")
        _style_panel(ax, key[len(prefix):], "step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return _png(fig)
