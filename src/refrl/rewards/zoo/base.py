"""What every zoo reward shares: its declared needs, device and batching, image preprocessing.

A zoo reward compares generated images either with the **target** (DyRef's
fidelity, OmniRefiner's GT similarity) or with the **references of one type**
(DreamBench's DINO / CLIP-I: the output vs each subject reference, averaged), or
scores them against the **prompt** (CLIP-T, PickScore, HPS, ImageReward).

``needs`` names what a reward reads from a sample, in this vocabulary:
``prompt``, ``target``, ``mask``, ``references:<type>`` (a type of
`refrl.data.schema.REFERENCE_TYPES`). A sample lacking what the reward needs gets
NaN, never 0 (docs/reference/methods.md#advantages-group-normalization-gdpo-missing-rewards: NaN rewards are filled or excluded by the
advantage computation). The reference cache and the batch checks are those of
every reward (`refrl.rewards.base.BaseReward`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from refrl.data.schema import REFERENCE_TYPES, LoadedSample, canonical_reference_type
from refrl.errors import RefrlError
from refrl.rewards.base import BaseReward, RefIndex, RewardOutput
from refrl.rewards.cache import DEFAULT_MAX_ENTRIES
from refrl.rewards.zoo.loading import resolve_device, resolve_dtype

Against = Literal["references", "target"]
AGAINST = ("references", "target")
DEFAULT_BATCH_SIZE = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)  # SigLIP: x*2-1
HALF_STD = (0.5, 0.5, 0.5)


def check_choice(reward: str, option: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise RefrlError(f"reward {reward!r}: {option}={value!r} is not one of {', '.join(map(str, allowed))}")


def resize_center_crop(images: torch.Tensor, size: int | tuple[int, int], crop: bool = True) -> torch.Tensor:
    """(B,3,H,W) -> (B,3,h,w): resize the shorter side to ``size`` (bicubic, antialiased) then
    centre-crop, as the CLIP/DINO image processors do; ``crop=False`` resizes straight to ``size``."""
    h_out, w_out = (size, size) if isinstance(size, int) else size
    h, w = images.shape[-2:]
    if not crop:
        return F.interpolate(images, size=(h_out, w_out), mode="bicubic", antialias=True, align_corners=False)
    scale = max(h_out / h, w_out / w)
    new = (max(h_out, round(h * scale)), max(w_out, round(w * scale)))
    if new != (h, w):
        images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
    top, left = (new[0] - h_out) // 2, (new[1] - w_out) // 2
    return images[..., top : top + h_out, left : left + w_out]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (N, D) tensors (any trailing dims are flattened), float32."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=1e-8)


def preprocess_settings(config: dict[str, Any] | None, default_size: int, mean: Sequence[float],
                        std: Sequence[float]) -> tuple[int | tuple[int, int], tuple[float, ...], tuple[float, ...], bool]:
    """(size, mean, std, crop) from a ``preprocessor_config.json`` dict, with fallbacks.

    ``crop_size`` wins over ``size`` (CLIP/DINO resize then crop); a ``size`` with
    ``height``/``width`` and no crop is a plain resize (SigLIP, DINOv2 hub configs use
    ``shortest_edge`` + ``crop_size``)."""
    if not config:
        return default_size, tuple(mean), tuple(std), True
    mean = tuple(config.get("image_mean") or mean)
    std = tuple(config.get("image_std") or std)
    crop_size = config.get("crop_size") if config.get("do_center_crop", True) else None
    size_cfg = crop_size or config.get("size") or default_size
    if isinstance(size_cfg, dict):
        if "height" in size_cfg:
            size: int | tuple[int, int] = (int(size_cfg["height"]), int(size_cfg["width"]))
        else:
            size = int(size_cfg.get("shortest_edge", default_size))
    else:
        size = int(size_cfg)
    return size, mean, std, crop_size is not None


class ZooReward(BaseReward):
    """Base of the zoo rewards: the options common to all (device, dtype, batch size).

    Subclasses set ``name``, ``needs`` and implement ``score``. ``encoder_calls``
    counts real runs of the encoder on reference-side images (cache misses); a
    GRPO group of G images shares its references, so it is encoded once, not G times.
    """

    name = "zoo"
    needs: tuple[str, ...] = ()

    def __init__(self, device: str | None = "auto", dtype: str | torch.dtype | None = "float32",
                 batch_size: int = DEFAULT_BATCH_SIZE, cache_size: int = DEFAULT_MAX_ENTRIES):
        if batch_size < 1:
            raise RefrlError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        super().__init__(cache_size)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = int(batch_size)

    def batched(self, fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """``fn`` over chunks of ``batch_size`` images, results concatenated, on the CPU in float32."""
        outs = [fn(images[i : i + self.batch_size].to(self.device, self.dtype)).float().cpu()
                for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(outs, dim=0)


class SimilarityReward(ZooReward):
    """An embedding-similarity reward: score = cosine(embed(output), embed(comparison)).

    ``against="references"``: the mean over the sample's references of ``ref_type``
    (NaN when it has none; DreamBench averages over the real subject images);
    ``against="target"``: the ground-truth target (NaN when absent).
    Identical images score the maximum, 1.
    """

    def __init__(self, against: Against = "references", ref_type: str = "subject", **common: Any):
        super().__init__(**common)
        check_choice(self.name, "against", against, AGAINST)
        try:
            self.ref_type = canonical_reference_type(ref_type)
        except ValueError as exc:
            raise RefrlError(f"reward {self.name!r}: ref_type={ref_type!r}: allowed {', '.join(REFERENCE_TYPES)}") from exc
        self.against = against
        self.needs = ("target",) if against == "target" else (f"references:{self.ref_type}",)

    # Subclasses: (B,3,H,W) in [0,1] on the reward's device -> (B, ...) embeddings.
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_reference(self, images: torch.Tensor) -> torch.Tensor:
        """Embedding of the comparison side (reference or target); the same as ``embed`` unless overridden."""
        return self.embed(images)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cosine(a, b)

    def comparisons(self, sample: LoadedSample) -> list[tuple[RefIndex, torch.Tensor]]:
        """(index, image) pairs the output of ``sample`` is compared with."""
        if self.against == "target":
            return [] if sample.target is None else [("target", sample.target)]
        return list(sample.refs_of_type(self.ref_type))

    def reference_embedding(self, sample: LoadedSample, index: RefIndex, image: torch.Tensor) -> torch.Tensor:
        """The embedding of comparison ``image`` (reference ``index`` of ``sample``); computed on a cache miss."""
        return self.batched(self.embed_reference, image.unsqueeze(0))[0]

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        out_emb = self.batched(self.embed, images)
        scores = torch.full((images.shape[0],), float("nan"))
        best = torch.full_like(scores, float("nan"))
        for b, sample in enumerate(samples):
            pairs = self.comparisons(sample)
            if not pairs:
                continue
            refs = torch.stack([self.cached(sample, i, self.against,
                                            lambda s=sample, i=i, im=im: self.reference_embedding(s, i, im))
                                for i, im in pairs])
            sims = self.similarity(out_emb[b : b + 1].expand(len(pairs), *out_emb.shape[1:]), refs)
            scores[b], best[b] = sims.mean(), sims.max()
        return RewardOutput(scores=scores, extras={"max": best})

