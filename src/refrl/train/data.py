"""Where training samples come from: RefWorld on the fly, or a manifest.

A batch is a pure function of ``(seed, step)``: RefWorld renders sample ``i`` of
step ``s`` from its own seed, a manifest source draws indices from a generator
seeded by ``(seed, step)``. This is what makes resume exact without saving a
data-loader state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from refrl.config import StrictModel
from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.limits import MAX_IMAGE_SIZE


class DataConfig(StrictModel):
    source: Literal["refworld", "manifest"] = Field("refworld", description="the embedded world, or your manifest")
    manifest: str | None = Field(None, description="JSONL manifest when source=manifest")
    split: Literal["train", "val", "test"] = Field("train", description="refworld: test has unseen subject identities")
    size: int = Field(32, ge=1, le=MAX_IMAGE_SIZE, description="image size the samples are rendered / resized to")
    categories: list[str] | None = Field(None, max_length=1024, description="refworld: only these categories")
    max_refs: int = Field(7, ge=1, le=8, description="most references per sample")
    # (fraction of training done, RefWorld level): simple solid-colour scenes first,
    # patterns and textured backgrounds later (docs/research/refworld.md#why-the-world-looks-the-way-it-does).
    curriculum: list[tuple[float, int]] = Field([(0.0, 0), (0.2, 1), (0.45, 2)], max_length=1024,
                                                description="refworld: [fraction of training, level 0-2] pairs")

    @field_validator("curriculum")
    @classmethod
    def _sorted(cls, v: list[tuple[float, int]]) -> list[tuple[float, int]]:
        if not v or v[0][0] != 0.0:
            raise ValueError("curriculum must start at fraction 0.0, e.g. [[0.0, 0], [0.5, 2]]")
        if any(b[0] < a[0] for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("curriculum fractions must increase")
        return v


class SampleSource:
    """Deterministic batches of `LoadedSample` for step ``s``."""

    def __init__(self, cfg: DataConfig, seed: int, total_steps: int, need_target: str | None = None,
                 samples: list[LoadedSample] | None = None):
        """``need_target``: why every sample needs a target (then a manifest sample without
        one is an error naming it), or None. ``samples``: draw from these (loaded by the
        caller, e.g. through the Python API) instead of ``cfg``'s source."""
        self.cfg = cfg
        self.seed = seed
        self.total_steps = max(1, total_steps)
        self._worlds: dict[int, object] = {}
        self._samples: list[LoadedSample] | None = None
        where = "the given dataset"
        if samples is not None:
            self._samples = list(samples)
            if not self._samples:
                raise RefrlError("the given dataset holds no samples")
        elif cfg.source == "manifest":
            if not cfg.manifest:
                raise RefrlError("data.source=manifest needs data.manifest=PATH")
            from refrl.data.manifest import load_manifest

            where = cfg.manifest
            self._samples = load_manifest(Path(cfg.manifest), size=cfg.size)
            if not self._samples:
                raise RefrlError(f"{cfg.manifest}: no valid samples")
        if self._samples is not None:
            lacking = [s.id for s in self._samples if s.target is None]
            if need_target and lacking:
                raise RefrlError(f"{where}: {len(lacking)} of {len(self._samples)} samples have no 'target' "
                                 f"(first: {lacking[0]!r}); {need_target}")

    def level_at(self, step: int) -> int:
        frac = step / self.total_steps
        level = self.cfg.curriculum[0][1]
        for start, lv in self.cfg.curriculum:
            if frac >= start:
                level = lv
        return level

    def _world(self, level: int):
        if level not in self._worlds:
            from refrl.data.refworld import RefWorld

            self._worlds[level] = RefWorld(
                size=self.cfg.size, split=self.cfg.split, categories=self.cfg.categories,
                max_refs=self.cfg.max_refs, level=level,
            )
        return self._worlds[level]

    def batch(self, step: int, n: int) -> list[LoadedSample]:
        if self._samples is not None:
            rng = np.random.default_rng([self.seed, step])
            return [self._samples[i] for i in rng.integers(0, len(self._samples), size=n)]
        world = self._world(self.level_at(step))
        return [world.sample(np.random.default_rng([self.seed, step, i])) for i in range(n)]
