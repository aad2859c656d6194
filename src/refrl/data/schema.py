"""The sample schema shared by every part of refrl.

Two forms of one sample:

* `RefSample` — what a JSONL manifest line holds: image *paths* (relative to the
  manifest's folder) plus prompt, category and free-form ground-truth extras.
* `LoadedSample` — the in-memory form that policies, rewards and trainers use:
  images as float32 tensors in [0, 1], shape (3, H, W). RefWorld produces these
  directly (no disk round trip); manifests are loaded into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

REFERENCE_TYPES: tuple[str, ...] = (
    "subject",
    "style",
    "background",
    "layout",
    "lighting",
    "draft",
    "source",
)
# Other names in use in the field for the same reference roles.
REFERENCE_TYPE_ALIASES: dict[str, str] = {"pose": "layout", "bg": "background", "edit": "source"}


def canonical_reference_type(name: str) -> str:
    """Map a reference type (or an alias such as ``pose``) to its canonical name.

    Raises ValueError naming the allowed values.
    """
    key = str(name).strip().lower()
    key = REFERENCE_TYPE_ALIASES.get(key, key)
    if key not in REFERENCE_TYPES:
        allowed = ", ".join(REFERENCE_TYPES)
        raise ValueError(f"unknown reference type {name!r}; allowed: {allowed} (alias pose=layout)")
    return key


@dataclass
class Reference:
    """One reference image of a sample: a path and its role."""

    image: str
    type: str
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.image, "type": self.type}
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass
class RefSample:
    """One manifest line. Paths are relative to the manifest's folder."""

    id: str
    prompt: str
    references: list[Reference]
    target: str | None = None
    mask: str | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "category": self.category,
            "prompt": self.prompt,
            "references": [r.to_json() for r in self.references],
        }
        if self.target is not None:
            d["target"] = self.target
        if self.mask is not None:
            d["mask"] = self.mask
        d.update(self.extra)
        return d

    @property
    def n_refs(self) -> int:
        return len(self.references)


@dataclass
class LoadedSample:
    """A sample with its images in memory: float32 tensors (3, H, W) in [0, 1].

    ``mask`` is (1, H, W) in [0, 1] (the region that matters, e.g. OmniRefiner's
    edited region). ``extra`` carries ground truth beyond the target (RefWorld:
    subject boxes, per-subject masks, instructed cells and sizes, style and light
    names). Rewards may compare generated pixels *against* this ground truth; they
    must never score a sample from it alone.
    """

    id: str
    prompt: str
    ref_images: list[torch.Tensor]
    ref_types: list[str]
    target: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_refs(self) -> int:
        return len(self.ref_images)

    def refs_of_type(self, ref_type: str) -> list[tuple[int, torch.Tensor]]:
        """(index, image) of every reference of one type, in prompt order."""
        return [(i, im) for i, (im, t) in enumerate(zip(self.ref_images, self.ref_types, strict=True)) if t == ref_type]
