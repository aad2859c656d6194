"""What every embedded reward shares: input checks, the reference cache, the sample's style map.

The embedded rewards score generated RefWorld images against the sample's
references and ground truth (see DESIGN.md, "The embedded world"). Reference-side
work (templates, style maps, background predictions) goes through one bounded
`ReferenceCache` per reward, and ``encoder_calls`` counts the real computations,
so a GRPO group (one sample repeated G times) costs one call per reference.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput
from refrl.rewards.embedded.cache import DEFAULT_MAX_ENTRIES, ReferenceCache, image_fingerprint
from refrl.rewards.embedded.stylemap import StyleMap, fit_style_map

# A style reference whose affine/curve fit to the exemplar chart leaves more error than
# this is not a RefWorld style chart (e.g. a real painting): no style adaptation then.
STYLE_FIT_MAX_RMSE = 0.08


class EmbeddedReward:
    """Base class: subclasses set ``name``/``role`` and implement ``score``."""

    name: str = ""
    role: str = ""

    def __init__(self, cache_size: int = DEFAULT_MAX_ENTRIES):
        self.cache = ReferenceCache(cache_size)

    @property
    def encoder_calls(self) -> int:
        """How many reference-side computations ran (cache misses)."""
        return self.cache.calls

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        check_batch(images, samples, self.name)
        with torch.no_grad():
            # The embedded world is CPU-sized; references and caches live on the CPU.
            out = self.score(images.detach().float().cpu().clamp(0, 1), samples)
        return out

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        raise NotImplementedError

    def cached(
        self, sample: LoadedSample, ref: int | tuple[int, ...], variant: Hashable, compute: Callable[[], Any]
    ) -> Any:
        """``compute()`` once per (sample id, reference index or indices, variant, those references' pixels)."""
        refs = (ref,) if isinstance(ref, int) else tuple(ref)
        key = (sample.id, refs, variant, tuple(image_fingerprint(sample.ref_images[r]) for r in refs))
        return self.cache.get(key, compute)

    def style_map(self, sample: LoadedSample) -> StyleMap | None:
        """The colour transform shown by the sample's style reference, or None (no style ref / not a chart)."""
        ref = style_ref_index(sample)
        if ref is None:
            return None

        def fit() -> StyleMap | None:
            image = sample.ref_images[ref]
            if image.shape[-1] != image.shape[-2]:
                return None
            fitted = fit_style_map(image)
            return fitted if fitted.base_rmse <= STYLE_FIT_MAX_RMSE else None

        return self.cached(sample, ref, "style_map", fit)


def check_batch(images: torch.Tensor, samples: Sequence[LoadedSample], name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {name!r}: images must be a (B, 3, H, W) tensor in [0, 1], got {shape}")
    if images.shape[0] != len(samples):
        raise ValueError(f"reward {name!r}: {images.shape[0]} images but {len(samples)} samples")


def style_ref_index(sample: LoadedSample) -> int | None:
    """Index of the sample's style reference (RefWorld ground truth first, else the first ``style`` ref)."""
    style = sample.extra.get("style")
    if isinstance(style, dict) and style.get("ref") is not None:
        return int(style["ref"])
    refs = sample.refs_of_type("style")
    return refs[0][0] if refs else None


def has_lighting_reference(sample: LoadedSample) -> bool:
    return bool(sample.refs_of_type("lighting"))


def nan_scores(n: int) -> torch.Tensor:
    return torch.full((n,), float("nan"))
