"""``identity``: is each reference subject in the image? (the DINO-Seg role, Customized-GRPO's ``d``).

Per subject reference, the detector (``template.py``, ``detect.py``) finds the window of the image
most similar to the reference subject cut out of its canvas (the "segmented"
reference of DINO-Seg) and its similarity is the subject's identity score:

    identity = mean over the sample's subject references of max over windows sim(window, subject)

Position does not enter: a subject drawn in the wrong cell keeps its identity
score (prompt following is ``layout``'s job). With ``style_adapt`` the reference is
first rendered in the style the sample's style reference shows (``stylemap.py``),
so a correctly styled subject is not penalised for its changed colours.
NaN for samples without a subject reference (e.g. RefWorld ``edit``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput, nan_scores
from refrl.rewards.cache import DEFAULT_MAX_ENTRIES
from refrl.rewards.embedded.base import EmbeddedReward, style_ref_index
from refrl.rewards.embedded.detect import detect
from refrl.rewards.embedded.template import (
    COLOUR_WEIGHT,
    CONTRAST_FLOOR,
    N_SIZES,
    SIZE_RANGE,
    DetectorConfig,
    SubjectTemplate,
    build_template,
)


class SubjectDetectorReward(EmbeddedReward):
    """Shared by ``identity`` and ``layout``: detector options and cached subject templates."""

    def __init__(
        self,
        style_adapt: bool = True,
        colour_weight: float = COLOUR_WEIGHT,
        contrast_floor: float = CONTRAST_FLOOR,
        size_range: tuple[float, float] = SIZE_RANGE,
        n_sizes: int = N_SIZES,
        cache_size: int = DEFAULT_MAX_ENTRIES,
    ):
        super().__init__(cache_size)
        if not 0.0 <= colour_weight <= 1.0:
            raise ValueError(f"colour_weight must be in [0, 1], got {colour_weight}")
        lo, hi = size_range
        if not 0.0 < lo < hi <= 1.0 or n_sizes < 1:
            raise ValueError(f"size_range must satisfy 0 < lo < hi <= 1 and n_sizes >= 1, got {size_range}, {n_sizes}")
        self.style_adapt = style_adapt
        self.config = DetectorConfig(
            size_range=(float(lo), float(hi)), n_sizes=int(n_sizes), colour_weight=float(colour_weight),
            contrast_floor=float(contrast_floor),
        )  # fmt: skip

    def template(
        self, sample: LoadedSample, ref: int, canvas: int, region: tuple[int, int, int, int] | None = None
    ) -> SubjectTemplate | None:
        """The subject of reference ``ref`` (inside ``region`` when given), rendered for a ``canvas``-px image."""
        style_map = self.style_map(sample) if self.style_adapt else None

        def build() -> SubjectTemplate | None:
            return build_template(sample.ref_images[ref], canvas, self.config, region=region, style_map=style_map)

        refs = (ref, style_ref_index(sample)) if style_map is not None else (ref,)
        return self.cached(sample, refs, ("template", canvas, region), build)


def square_size(images: torch.Tensor, name: str) -> int:
    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(f"reward {name!r} needs square images, got {h}x{w}")
    return int(h)


def per_sample_stats(values: torch.Tensor, owner: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Mean, min and count of per-subject ``values`` grouped by ``owner`` sample index; NaN where a sample has none."""
    count = torch.zeros(n).index_add_(0, owner, torch.ones_like(values))
    total = torch.zeros(n).index_add_(0, owner, values)
    low = torch.full((n,), float("inf")).scatter_reduce(0, owner, values, reduce="amin")
    mean = torch.where(count > 0, total / count.clamp(min=1), nan_scores(n))
    low = torch.where(count > 0, low, nan_scores(n))
    return mean, low, count


class IdentityReward(SubjectDetectorReward):
    """Best-window similarity between the image and each subject reference (see module docstring)."""

    name = "identity"

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        canvas = square_size(images, self.name)
        queries, owner = [], []
        for b, sample in enumerate(samples):
            for ref, _ in sample.refs_of_type("subject"):
                template = self.template(sample, ref, canvas)
                if template is not None:
                    queries.append((b, template))
                    owner.append(b)
        found = detect(images, queries, self.config)
        mean, low, count = per_sample_stats(found.similarity, torch.tensor(owner, dtype=torch.long), len(samples))
        return RewardOutput(mean, {"n_subjects": count, "min_subject_identity": low})
