"""What every embedded reward shares: CPU pixels in [0, 1] and the sample's style map.

The embedded rewards score generated RefWorld images against the sample's
references and ground truth (see docs/research/refworld.md#refworld). Reference-side
work (templates, style maps, background predictions) goes through the reward's
cache (`refrl.rewards.base.BaseReward.cached`), so a GRPO group (one sample
repeated G times) costs one computation per reference.
"""

from __future__ import annotations

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import BaseReward
from refrl.rewards.embedded.stylemap import StyleMap, fit_style_map

# A style reference whose affine/curve fit to the exemplar chart leaves more error than
# this is not a RefWorld style chart (e.g. a real painting): no style adaptation then.
STYLE_FIT_MAX_RMSE = 0.08

class EmbeddedReward(BaseReward):
    """Base of the embedded rewards: subclasses set ``name`` and implement ``score``."""

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        # The embedded world is CPU-sized; references and caches live on the CPU.
        return images.detach().float().cpu().clamp(0, 1)

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


def style_ref_index(sample: LoadedSample) -> int | None:
    """Index of the sample's style reference (RefWorld ground truth first, else the first ``style`` ref)."""
    style = sample.extra.get("style")
    if isinstance(style, dict) and style.get("ref") is not None:
        return int(style["ref"])
    refs = sample.refs_of_type("style")
    return refs[0][0] if refs else None


def has_lighting_reference(sample: LoadedSample) -> bool:
    return bool(sample.refs_of_type("lighting"))
