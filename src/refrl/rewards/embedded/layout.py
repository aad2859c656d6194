"""``layout``: is each subject where and as large as the prompt says? (the HPS / prompt-following role).

Per instructed subject (``extra["subjects"][k]["box"]``) two boxes are compared
with the instructed one, by ``A(box) = exp(−d²/(2σ_c²)) · exp(−max(0, |log(side/side_box)| − tol)²/(2σ_s²))``
(``d`` the distance between box centres over the canvas side, ``side`` the longest
box side; RefWorld subjects fill 85-100 % of their box, hence the tolerance):

* the **detected** box: where the detector (``detect.py``) finds the window most
  similar to the subject's reference, weighted by ``min(1, ncc/ncc_object)`` (the
  window's structure term: an object was found at all);
* the **foreground** box at the instructed place: pixels around the box that differ
  from the local background (median of a ring just outside the box), weighted by
  how uniform that ring is (so noise or clutter does not count as "an object there")
  and by ``object_weight``.

    layout_k = max(A(detected)·min(1, ncc/ncc_object), object_weight · A(foreground)·ring_uniformity)

So the right subject in the right place scores ~1; a wrong subject in the right
place keeps most of ``layout`` (an object of the right size is there: the
``object_weight`` term, or the detector lands on it); the right subject in the
wrong place loses it (the detector finds it elsewhere and the instructed place is
empty); an empty background scores ~0. Mean over subjects; NaN when no subject has
a box and a reference to detect it with (the subject reference, or for RefWorld
``edit`` the subject's box in the source image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.base import RewardOutput
from refrl.rewards.embedded.detect import detect
from refrl.rewards.embedded.identity import SubjectDetectorReward, per_sample_stats, square_size

CENTRE_SIGMA = 0.06  # of the canvas: 2 px at 32; the 3x3 grid's cells are 0.33 apart
SIZE_TOLERANCE = 0.15  # |log side ratio| allowed for free: subjects fill 85-100 % of their box
SIZE_SIGMA = 0.15  # small vs medium (x1.375) scores ~0.4, small vs large ~0.01
OBJECT_NCC = 0.5  # structure similarity at which a window surely holds an object
OBJECT_WEIGHT = 0.8  # credit for "an object of the instructed size is there" when it is not the subject
RING_PX = 2  # width of the background ring around an instructed box
FOREGROUND_THRESHOLD = 0.1  # max |pixel − local background| over channels that counts as an object


def box_agreement(
    detected: torch.Tensor,
    instructed: torch.Tensor,
    canvas: int,
    centre_sigma: float = CENTRE_SIGMA,
    size_tolerance: float = SIZE_TOLERANCE,
    size_sigma: float = SIZE_SIGMA,
) -> torch.Tensor:
    """(N,) ``exp(−d²/(2σ_c²))·exp(−max(0, |log(side_d/side_i)| − tol)²/(2σ_s²))`` for boxes (N, 4) x0, y0, x1, y1.

    ``d`` = centre distance / canvas; ``side`` = the longest side of a box.
    """
    centre_d = (detected[:, :2] + detected[:, 2:]) / 2
    centre_i = (instructed[:, :2] + instructed[:, 2:]) / 2
    dist2 = ((centre_d - centre_i) / canvas).pow(2).sum(-1)
    side_d = (detected[:, 2:] - detected[:, :2]).amax(-1).clamp(min=1e-6)
    side_i = (instructed[:, 2:] - instructed[:, :2]).amax(-1).clamp(min=1e-6)
    excess = ((side_d / side_i).log().abs() - size_tolerance).clamp(min=0)
    return torch.exp(-dist2 / (2 * centre_sigma**2)) * torch.exp(-excess.pow(2) / (2 * size_sigma**2))


def objectness(structure: torch.Tensor, object_ncc: float = OBJECT_NCC) -> torch.Tensor:
    """``min(1, ncc / ncc_object)``: how surely the detected window holds an object at all."""
    return (structure / object_ncc).clamp(0.0, 1.0)


def box_foreground(
    images: torch.Tensor, owner: torch.Tensor, boxes: torch.Tensor, ring_px: int = RING_PX,
    threshold: float = FOREGROUND_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Foreground around each instructed box: (fg box (Q, 4), found (Q,) bool, ring uniformity (Q,)).

    The local background is the median colour of the ring of ``ring_px`` pixels just
    outside box q of image ``owner[q]``; foreground is every pixel of the box grown
    by ``ring_px`` that differs from it by more than ``threshold`` (max over channels);
    ring uniformity is the fraction of ring pixels that do not.
    """
    n_q = boxes.shape[0]
    _, _, h, w = images.shape
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    x0, y0, x1, y1 = (boxes[:, i].view(n_q, 1, 1) for i in range(4))
    inside = (xs > x0) & (xs < x1) & (ys > y0) & (ys < y1)
    grown = (xs > x0 - ring_px) & (xs < x1 + ring_px) & (ys > y0 - ring_px) & (ys < y1 + ring_px)
    ring = grown & ~inside
    pixels = images[owner].flatten(2)  # (Q, 3, HW)
    ring_flat = ring.flatten(1)[:, None].expand_as(pixels)
    background = torch.where(ring_flat, pixels, torch.nan).nanmedian(dim=2).values  # (Q, 3)
    differs = (pixels - background[..., None]).abs().amax(dim=1).view(n_q, h, w) > threshold
    fg = differs & grown
    uniform = ((~differs & ring).flatten(1).sum(1) / ring.flatten(1).sum(1).clamp(min=1)).float()
    uniform = torch.where(ring.flatten(1).any(1), uniform, torch.zeros_like(uniform))
    rows, cols = fg.any(2), fg.any(1)
    found = rows.any(1)
    idx_h, idx_w = torch.arange(h), torch.arange(w)
    top = torch.where(rows, idx_h, h).amin(1)
    bottom = torch.where(rows, idx_h + 1, 0).amax(1)
    left = torch.where(cols, idx_w, w).amin(1)
    right = torch.where(cols, idx_w + 1, 0).amax(1)
    return torch.stack([left, top, right, bottom], dim=1).float(), found, uniform


class LayoutReward(SubjectDetectorReward):
    """Detected subject boxes vs instructed boxes (see module docstring)."""

    name = "layout"
    role = "prompt"

    def __init__(
        self,
        centre_sigma: float = CENTRE_SIGMA,
        size_tolerance: float = SIZE_TOLERANCE,
        size_sigma: float = SIZE_SIGMA,
        object_ncc: float = OBJECT_NCC,
        object_weight: float = OBJECT_WEIGHT,
        **detector_options,
    ):
        super().__init__(**detector_options)
        if min(centre_sigma, size_sigma, object_ncc) <= 0 or size_tolerance < 0:
            raise ValueError(
                f"layout needs centre_sigma, size_sigma, object_ncc > 0 and size_tolerance >= 0; got "
                f"{centre_sigma}, {size_sigma}, {object_ncc}, {size_tolerance}"
            )
        self.centre_sigma, self.size_tolerance, self.size_sigma = centre_sigma, size_tolerance, size_sigma
        if not 0.0 <= object_weight <= 1.0:
            raise ValueError(f"object_weight must be in [0, 1], got {object_weight}")
        self.object_ncc, self.object_weight = object_ncc, object_weight

    def _subject_template(self, sample: LoadedSample, subject: dict, canvas: int):
        if subject.get("ref") is not None:
            return self.template(sample, int(subject["ref"]), canvas)
        source, edit = sample.extra.get("source_ref"), sample.extra.get("edit") or {}
        if source is not None and edit.get("source_box") is not None:
            return self.template(sample, int(source), canvas, region=tuple(int(v) for v in edit["source_box"]))
        return None

    def score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        canvas = square_size(images, self.name)
        queries, owner, boxes = [], [], []
        for b, sample in enumerate(samples):
            for subject in sample.extra.get("subjects") or []:
                if subject.get("box") is None:
                    continue
                template = self._subject_template(sample, subject, canvas)
                if template is not None:
                    queries.append((b, template))
                    owner.append(b)
                    boxes.append([float(v) for v in subject["box"]])
        found = detect(images, queries, self.config)
        instructed = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        agreement = box_agreement(
            found.box, instructed, canvas, self.centre_sigma, self.size_tolerance, self.size_sigma
        )
        detected = agreement * objectness(found.structure, self.object_ncc)
        owner_t = torch.tensor(owner, dtype=torch.long)
        fg_box, fg_found, uniform = box_foreground(images, owner_t, instructed)
        at_place = box_agreement(fg_box, instructed, canvas, self.centre_sigma, self.size_tolerance, self.size_sigma)
        at_place = torch.where(fg_found, at_place * uniform, torch.zeros_like(at_place))
        per_subject = torch.maximum(detected, self.object_weight * at_place)
        mean, low, count = per_sample_stats(per_subject, owner_t, len(samples))
        centre_err = ((found.box[:, :2] + found.box[:, 2:]) / 2 - (instructed[:, :2] + instructed[:, 2:]) / 2).norm(dim=-1)
        err_mean, _, _ = per_sample_stats(centre_err, owner_t, len(samples))
        detected_mean, _, _ = per_sample_stats(detected, owner_t, len(samples))
        extras = {"n_subjects": count, "min_subject_layout": low, "centre_error_px": err_mean, "detected": detected_mean}
        return RewardOutput(mean, extras)
