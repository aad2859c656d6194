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
from refrl.rewards.base import Reward, RewardOutput

NO_CATEGORY = "(none)"  # the bucket of samples without a category (as `refrl data validate` counts them)
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


def aggregate(
    records: Sequence[Mapping[str, Any]], reward_names: Sequence[str], group_keys: Sequence[str] = ()
) -> dict[str, Any]:
    """Means (and std, count of applicable samples) overall / per category / per n_refs / per bucket,
    plus ``by_<key>`` for each extra record key in ``group_keys`` (e.g. DreamBench's ``subject``)."""
    def summarize(recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out = {name: _mean_std([_as_float(r.get(name)) for r in recs]) for name in reward_names}
        out["n_samples"] = len(recs)
        return out

    keys = ("category", "n_refs", "bucket", *group_keys)
    by: dict[str, dict[str, list]] = {k: defaultdict(list) for k in keys}
    for r in records:
        by["category"][NO_CATEGORY if r["category"] is None else str(r["category"])].append(r)
        by["n_refs"][str(r["n_refs"])].append(r)
        by["bucket"][bucket_of(int(r["n_refs"]))].append(r)
        for k in group_keys:
            by[k][str(r.get(k))].append(r)
    out = {
        "overall": summarize(records),
        "by_category": {k: summarize(v) for k, v in sorted(by["category"].items())},
        "by_n_refs": {k: summarize(v) for k, v in sorted(by["n_refs"].items(), key=lambda kv: int(kv[0]))},
        "by_bucket": {k: summarize(v) for k, v in sorted(by["bucket"].items())},
    }
    for k in group_keys:
        out[f"by_{k}"] = {g: summarize(v) for g, v in sorted(by[k].items())}
    return out


def _as_float(value: Any) -> float:
    """A record value as a float: None (NaN written to JSON as null) counts as NaN."""
    return float("nan") if value is None else float(value)


# --------------------------------------------------------------------------- masked pixel metrics

PSNR_PEAK = 1.0  # images in [0, 1]
PSNR_MAX_DB = 100.0  # a perfect match; keeps means and JSON finite
MASK_THRESHOLD = 0.5  # a mask pixel counts as "inside" from this value on
PIXEL_REGIONS = ("inside", "outside")


def region_mse(image: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, region: str) -> float:
    """Mean squared error over the pixels of one region of ``mask``.

    ``MSE = sum_p m_p ||x_p - y_p||^2 / (C * sum_p m_p)`` with ``m = [mask >= 0.5]`` for the
    ``inside`` region (OmniRefiner's masked pixel accuracy) and its complement for ``outside``
    (what refinement must leave as it was). NaN when the region is empty.
    """
    if region not in PIXEL_REGIONS:
        raise ValueError(f"unknown region {region!r}; allowed: {', '.join(PIXEL_REGIONS)}")
    inside = (mask.float() >= MASK_THRESHOLD).float()
    m = inside if region == "inside" else 1.0 - inside
    denom = float(m.sum()) * image.shape[0]
    if denom == 0:
        return float("nan")
    return float(((image.float() - target.float()) ** 2 * m).sum() / denom)


def psnr(mse: float, peak: float = PSNR_PEAK, max_db: float = PSNR_MAX_DB) -> float:
    """``PSNR = 10 log10(peak^2 / MSE)`` in dB, capped at ``max_db`` (a perfect match); NaN stays NaN."""
    if math.isnan(mse):
        return mse
    return max_db if mse <= peak**2 * 10 ** (-max_db / 10) else 10.0 * math.log10(peak**2 / mse)


class MaskedPSNR:
    """PSNR to the sample's target inside (or outside) its mask, as a `Reward`.

    NaN for samples without a target or mask. The ``refine`` suite reports both regions:
    inside = the restored detail, outside = what had to stay untouched.
    """

    def __init__(self, region: str = "inside"):
        if region not in PIXEL_REGIONS:
            raise ValueError(f"unknown region {region!r}; allowed: {', '.join(PIXEL_REGIONS)}")
        self.region = region
        self.name = f"psnr_{region}"

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        scores = []
        for image, s in zip(images, samples, strict=True):
            if s.target is None or s.mask is None:
                scores.append(float("nan"))
                continue
            target = target_at_size(s.target, image)
            mask = s.mask
            if mask.shape[-2:] != image.shape[-2:]:
                mask = torch.nn.functional.interpolate(mask[None].float(), size=image.shape[-2:], mode="nearest")[0]
            scores.append(psnr(region_mse(image, target, mask, self.region)))
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32))


def target_at_size(target: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``target`` resized (bilinear, antialiased) to ``image``'s height and width, if they differ."""
    if target.shape[-2:] == image.shape[-2:]:
        return target
    return torch.nn.functional.interpolate(target[None], size=image.shape[-2:], mode="bilinear",
                                           antialias=True, align_corners=False)[0]


class TargetPSNR:
    """PSNR of the whole image to the sample's target (its ground truth), as a `Reward`.

    ``PSNR = 10 log10(1 / MSE)`` over every pixel (`psnr`); NaN for samples without a
    target. A gold metric of RefWorld, whose every sample knows the image it asks for.
    """

    name = "psnr"

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        scores = []
        for image, s in zip(images, samples, strict=True):
            if s.target is None:
                scores.append(float("nan"))
                continue
            target = target_at_size(s.target, image)
            scores.append(psnr(float(((image.float() - target.float()) ** 2).mean())))
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32))
