"""What ``refrl eval`` prints: the sampler it ran and, per metric, its mean over the samples it scored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """Two lines from eval.json's contents: images and sampler; ``metric mean (scored/total)`` each.

    A metric that scored no sample (it needs what the samples lack: a target, a style
    reference, RefWorld's boxes) shows ``-``, so a reward that silently applied to nothing
    is visible."""
    n = result["n_images"]
    s = result.get("sampling", {})
    head = (f"{result['suite']}: {n} images ({result['generated']} generated); sampling: {s.get('steps')} steps, "
            f"cfg_scale {s.get('cfg_scale'):g}, shift {s.get('shift'):.4g}")
    parts = []
    for name, stats in result["metrics"]["overall"].items():
        if not isinstance(stats, dict):
            continue
        mean = f"{stats['mean']:.4g}" if stats["n"] else "-"
        parts.append(f"{name} {mean} ({stats['n']}/{n} scored)")
    return [head, "; ".join(parts)]
