"""RefWorld on disk: PNGs + a JSONL manifest, and reading the subject masks back.

Layout under ``out_dir``::

    <split>.jsonl                       one RefSample.to_json() line per sample
    <split>/<id>/ref_0.png ... ref_K.png
    <split>/<id>/target.png, mask.png   mask: 255 where LoadedSample.mask is 1
    <split>/<id>/labels.png             subject k has value k + 1, background 0

Manifest paths are relative to ``out_dir``. Each line carries the ground truth
of ``LoadedSample.extra`` (minus the in-memory ``subject_masks``, replaced by
``"labels": <path>``); ``attach_masks`` restores ``subject_masks``. The output
is a pure function of the arguments: files are byte-identical across runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from refrl.data.refworld.world import DEFAULT_LEVEL, RefWorld, sample_rng
from refrl.data.schema import LoadedSample, Reference, RefSample
from refrl.errors import RefrlError
from refrl.runfolder.files import atomic_write_text

PROGRESS_MIN_SAMPLES = 500  # show a progress bar from this many samples on
IN_MEMORY_ONLY_KEYS = ("subject_masks",)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, C) uint8 (exact for RefWorld's 1/255-quantised images)."""
    return np.round(image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def label_map(subject_masks: torch.Tensor) -> np.ndarray:
    """(S, H, W) bool -> (H, W) uint8 with value k+1 where subject k is (later subjects on top)."""
    labels = np.zeros(subject_masks.shape[1:], dtype=np.uint8)
    for k, mask in enumerate(subject_masks.numpy()):
        labels[mask] = k + 1
    return labels


def write_sample(sample: LoadedSample, out_dir: Path, split: str) -> RefSample:
    """Write one sample's PNGs under ``out_dir/<split>/<id>/``; return its manifest record."""
    rel = Path(split) / sample.id
    folder = out_dir / rel
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for k, (image, ref_type) in enumerate(zip(sample.ref_images, sample.ref_types, strict=True)):
        _save_png(_to_uint8(image), folder / f"ref_{k}.png")
        refs.append(Reference(image=(rel / f"ref_{k}.png").as_posix(), type=ref_type))
    _save_png(_to_uint8(sample.target), folder / "target.png")
    _save_png((sample.mask[0].numpy() > 0.5).astype(np.uint8) * 255, folder / "mask.png")
    extra = {k: v for k, v in sample.extra.items() if k not in IN_MEMORY_ONLY_KEYS}
    if "subject_masks" in sample.extra:
        _save_png(label_map(sample.extra["subject_masks"]), folder / "labels.png")
        extra["labels"] = (rel / "labels.png").as_posix()
    return RefSample(
        id=sample.id,
        prompt=sample.prompt,
        references=refs,
        target=(rel / "target.png").as_posix(),
        mask=(rel / "mask.png").as_posix(),
        category=sample.category,
        extra=extra,
    )


def _write_lines_atomic(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def generate_refworld_to_disk(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    split: str = "train",
    size: int = 32,
    categories: Sequence[str] | None = None,
    max_refs: int = 7,
    level: int | None = None,
) -> Path:
    """Generate ``n`` RefWorld samples as PNGs + ``out_dir/<split>.jsonl``; returns the manifest path.

    Sample i depends only on (seed, i, split) (see ``world.sample_rng``); ``level``
    None means the default (2, everything).
    """
    if n < 0:
        raise RefrlError(f"n must be >= 0, got {n}")
    world = RefWorld(size=size, split=split, categories=categories, max_refs=max_refs,
                     level=DEFAULT_LEVEL if level is None else level)  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(n), desc=f"refworld {split}", file=sys.stderr, disable=n < PROGRESS_MIN_SAMPLES):
        sample = world.sample(sample_rng(seed, i, world.split), index=i)
        lines.append(json.dumps(write_sample(sample, out, world.split).to_json(), sort_keys=False))
    manifest = out / f"{world.split}.jsonl"
    _write_lines_atomic(manifest, lines)
    return manifest


def attach_masks(sample: LoadedSample, manifest_dir: str | os.PathLike) -> LoadedSample:
    """Load ``extra["labels"]`` (relative to ``manifest_dir``) into ``extra["subject_masks"]`` (S, H, W) bool.

    S = len(extra["subjects"]). No-op for samples without a label map. Returns ``sample``.
    """
    rel = sample.extra.get("labels")
    if rel is None:
        return sample
    path = Path(manifest_dir) / rel
    if not path.is_file():
        raise RefrlError(f"sample {sample.id!r}: label map not found: {path}")
    labels = np.asarray(Image.open(path))
    if labels.ndim != 2:
        raise RefrlError(f"sample {sample.id!r}: label map {path} must be single-channel, got shape {labels.shape}")
    n_subjects = len(sample.extra.get("subjects", []))
    masks = np.stack([labels == k + 1 for k in range(n_subjects)]) if n_subjects else np.zeros((0, *labels.shape), bool)
    sample.extra["subject_masks"] = torch.from_numpy(masks)
    return sample
