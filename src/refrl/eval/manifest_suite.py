"""The ``manifest`` suite: any manifest ``refrl data validate`` accepts, one image per sample.

``refrl eval --suite manifest --data FILE.jsonl [--rewards ...]``. The policy is conditioned
on each sample's prompt and references and the rewards score the image against the same
sample (its references, target, mask and extras). Sample ``i`` (line order, after
``--limit``) uses noise ``(seed, i)``; images are named after the sample ids.

Default metrics: the embedded rewards (`refrl.eval.refworld.REFWORLD_METRICS`), which fit a
manifest written by ``refrl data refworld``; for other data name zoo rewards, ``remote:NAME``
or (from Python) functions. A reward that needs what a sample lacks (a target, a style
reference, RefWorld's instructed boxes) scores it NaN; ``eval.json``'s ``scored`` counts the
samples each metric did score. Results are reported per category and per number of
references like every suite (`refrl.eval.scoring.aggregate`).

A missing or unreadable image is an error naming the file and the manifest line, raised
before anything is generated.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.eval.refworld import REFWORLD_METRICS
from refrl.eval.suite import EvalItem, Suite

MANIFEST_METRICS = REFWORLD_METRICS


def _line_numbers(path: Path) -> list[int]:
    """The 1-based numbers of the manifest's non-blank lines (one sample each)."""
    text = path.read_text(encoding="utf-8")
    return [i for i, raw in enumerate(text.split("\n"), start=1) if raw.strip()]


def load_manifest_samples(path: str | os.PathLike, size: int, limit: int | None = None) -> list[LoadedSample]:
    """The first ``limit`` samples of the manifest, images resized to ``size``; every line is
    checked as ``refrl data validate`` checks it (an error names ``FILE:LINE``)."""
    from refrl.data.manifest import load_sample, read_manifest

    path = Path(path)
    samples = read_manifest(path)  # structure, paths and files of every line: FILE:LINE: ... on the first problem
    lines = _line_numbers(path)  # read_manifest accepted every line, so sample i is non-blank line i
    if limit is not None:
        samples = samples[:limit]
    loaded = []
    for sample, line in zip(samples, lines, strict=False):
        try:
            loaded.append(load_sample(sample, path.parent, size))
        except RefrlError as e:  # a file that exists but does not decode
            raise RefrlError(f"{path}:{line}: {e}") from None
    return loaded


def manifest_suite(path: str | os.PathLike, limit: int | None = None, size: int = 32) -> Suite:
    """One image per manifest sample, noise index = its position in the file."""
    path = Path(path)
    if not path.is_file():
        raise RefrlError(f"manifest not found: {path}")
    samples = load_manifest_samples(path, size, limit)
    if not samples:
        raise RefrlError(f"{path}: no samples")
    return Suite(
        name="manifest",
        items=[EvalItem(s.id, s, i) for i, s in enumerate(samples)],
        metrics={m: m for m in MANIFEST_METRICS},
        size=(size, size),
        # the manifest's bytes: editing it invalidates the cached images
        params={"manifest": str(path.resolve()), "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest()},
        n_samples=len(samples),
        protocol=f"manifest {path.name}: one image per sample, scored against the sample",
    )
