"""Score generated images with a set of rewards and aggregate the way the papers report:
overall, per category, per number of references (OmniRef-Bench's headline curve) and
per reference-count bucket (1-2, 3-4, 5-7)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import Reward

BUCKETS: tuple[tuple[str, int, int], ...] = (("1-2", 1, 2), ("3-4", 3, 4), ("5-7", 5, 7))


def bucket_of(n_refs: int) -> str:
    for name, lo, hi in BUCKETS:
        if lo <= n_refs <= hi:
            return name
    return f"{n_refs}"


def score_images(
    images: torch.Tensor, samples: Sequence[LoadedSample], rewards: Mapping[str, Reward]
) -> list[dict[str, Any]]:
    """One record per sample: id, category, n_refs and every reward (NaN if not applicable)."""
    records = [{"id": s.id, "category": s.category, "n_refs": s.n_refs} for s in samples]
    for name, reward in rewards.items():
        out = reward(images, samples)
        for rec, v in zip(records, out.scores.tolist(), strict=True):
            rec[name] = float(v)
    return records


def _mean_std(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    m = sum(vals) / len(vals)
    var = sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1)
    return {"mean": m, "std": math.sqrt(var), "n": len(vals)}


def aggregate(records: Sequence[Mapping[str, Any]], reward_names: Sequence[str]) -> dict[str, Any]:
    """Means (and std, count of applicable samples) overall / per category / per n_refs / per bucket."""
    def summarize(recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out = {name: _mean_std([r[name] for r in recs]) for name in reward_names}
        out["n_samples"] = len(recs)
        return out

    by: dict[str, dict[str, list]] = {"category": defaultdict(list), "n_refs": defaultdict(list), "bucket": defaultdict(list)}
    for r in records:
        by["category"][str(r["category"])].append(r)
        by["n_refs"][str(r["n_refs"])].append(r)
        by["bucket"][bucket_of(int(r["n_refs"]))].append(r)
    return {
        "overall": summarize(records),
        "by_category": {k: summarize(v) for k, v in sorted(by["category"].items())},
        "by_n_refs": {k: summarize(v) for k, v in sorted(by["n_refs"].items(), key=lambda kv: int(kv[0]))},
        "by_bucket": {k: summarize(v) for k, v in sorted(by["bucket"].items())},
    }
