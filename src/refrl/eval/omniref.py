"""The ``omniref`` suite: OmniRef-Bench (DyRef) on the user's copy of its data.

Layout (DyRef's ``benchmark/metadata/benchmark.json``; the images are not shipped
with refrl — point ``--data`` at the JSON and ``--root`` at the test-set folder the
paths are relative to, default the JSON's folder)::

    [
      {"index": 0,
       "category": "subject_bg_style",
       "prompt": "A wild rabbit ... in image 1 ... matching image 3 ... backdrop shown in image 4.",
       "edit_image": ["subject_bg_style/4/0/transfer_subjects/a wild rabbit.png",
                      "subject_bg_style/4/0/transfer_subjects/a child.png",
                      "subject_bg_style/4/0/style/reference.png",
                      "subject_bg_style/4/0/background/background.png"],
       "image": "subject_bg_style/4/0/0.png"},          # the target (optional)
      ...
    ]

The metadata does not name reference roles; they follow from the folder each
reference sits in (`REFERENCE_FOLDERS`: ``transfer_subjects/`` -> subject, ``style/``
-> style, ``background/`` -> background, ``pose/`` -> layout, ``lighting/`` ->
lighting). A row may instead list them in ``edit_image_types``. Generated images are
named ``<index>.png``, as DyRef's evaluation scripts expect, so ``DIR/images`` can be
fed to them too.

Metrics (OmniRef-Bench's dimensions mapped onto the reward zoo, `OMNIREF_METRICS`):
subject fidelity as DINOv2 cosine between the segmented output and the segmented
subject references (``dino_seg``; OmniRef-Bench uses Grounded-SAM-2, the zoo CLIPSeg)
and CLIP-I against the subject references, background similarity (CLIP-I against
the background reference), style (CSD) and the VLM judge. Pose (AlphaPose keypoints)
and lighting (LAB statistics) have no zoo reward yet and are not scored. Change any
of them with ``--rewards`` / ``--reward-option``.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from refrl.data.schema import LoadedSample, Reference, RefSample, canonical_reference_type
from refrl.errors import RefrlError
from refrl.eval.suite import EvalItem, Suite

# Folder names (any path component, case-insensitive) -> reference type.
REFERENCE_FOLDERS: dict[str, str] = {
    "transfer_subjects": "subject",
    "subjects": "subject",
    "subject": "subject",
    "style": "style",
    "background": "background",
    "pose": "layout",
    "skeleton": "layout",
    "lighting": "lighting",
}
REFS_KEY = "edit_image"
TARGET_KEY = "image"
TYPES_KEY = "edit_image_types"
REQUIRED_KEYS = ("prompt", REFS_KEY)

# metric -> (zoo reward, options). Each reward scores only samples with its reference type
# (NaN otherwise), so every metric is averaged over the samples it applies to.
OMNIREF_METRICS: dict[str, tuple[str, dict[str, Any]]] = {
    "subject_dinov2": ("dino_seg", {"encoder": "dinov2", "segment_output": True}),
    "subject_clip_i": ("clip_i", {"ref_type": "subject"}),
    "background_clip_i": ("clip_i", {"ref_type": "background"}),
    "style_csd": ("csd", {}),
    "judge": ("vlm_judge", {}),
}


def reference_type_from_path(path: str) -> str:
    """The role of a reference from the folders in its path (`REFERENCE_FOLDERS`)."""
    for part in reversed(PurePosixPath(path.replace("\\", "/")).parts[:-1]):
        key = part.lower()
        if key in REFERENCE_FOLDERS:
            return REFERENCE_FOLDERS[key]
    folders = ", ".join(sorted(REFERENCE_FOLDERS))
    raise RefrlError(
        f"cannot tell the reference type of {path!r}: no folder in its path is one of {folders}; "
        f"list the types in the row's {TYPES_KEY!r}"
    )


def parse_omniref_rows(rows: list[dict[str, Any]], source: str) -> list[RefSample]:
    """OmniRef-Bench rows -> RefSamples with ids ``str(index)`` and paths as in the rows."""
    samples: list[RefSample] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        missing = [k for k in REQUIRED_KEYS if not row.get(k)]
        if missing:
            raise RefrlError(f"{where}: missing {', '.join(map(repr, missing))} (keys: {', '.join(sorted(row))})")
        refs = row[REFS_KEY]
        if isinstance(refs, str):
            refs = [refs]
        types = row.get(TYPES_KEY)
        try:
            if types is None:
                types = [reference_type_from_path(p) for p in refs]
            elif len(types) != len(refs):
                raise RefrlError(f"{len(types)} entries in {TYPES_KEY!r} for {len(refs)} references")
            types = [canonical_reference_type(t) for t in types]
        except (RefrlError, ValueError) as e:
            raise RefrlError(f"{where}: {e}") from None
        sample_id = str(row.get("index", i))
        if sample_id in seen:
            raise RefrlError(f"{where}: index {sample_id} appears twice")
        seen.add(sample_id)
        samples.append(RefSample(
            id=sample_id,
            prompt=str(row["prompt"]),
            references=[Reference(image=str(p), type=t) for p, t in zip(refs, types, strict=True)],
            target=row.get(TARGET_KEY) or None,
            category=row.get("category"),
        ))
    return samples


def load_omniref(metadata: str | os.PathLike, root: str | os.PathLike | None = None, size: int | None = None,
                 limit: int | None = None) -> list[LoadedSample]:
    """Load the first ``limit`` OmniRef-Bench samples (images resized to ``size``).

    A target that is named but absent from ``root`` is dropped (the OmniRef metrics
    compare with the references); a missing reference is an error naming the file.
    """
    from refrl.data.importers import read_rows
    from refrl.data.manifest import load_sample

    metadata = Path(metadata)
    root = Path(root) if root is not None else metadata.parent
    if not root.is_dir():
        raise RefrlError(f"OmniRef-Bench image folder not found: {root} (pass --root, the test-set folder)")
    samples = parse_omniref_rows(read_rows(metadata), str(metadata))
    if limit is not None:
        samples = samples[:limit]
    loaded = []
    for s in samples:
        if s.target is not None and not (root / s.target).is_file():
            s.target = None
        loaded.append(load_sample(s, root, size))
    return loaded


def omniref_suite(metadata: str | os.PathLike, root: str | os.PathLike | None = None, limit: int | None = None,
                  size: int = 32) -> Suite:
    """One image per OmniRef-Bench sample, noise index = the row's position."""
    samples = load_omniref(metadata, root, size=size, limit=limit)
    if not samples:
        raise RefrlError(f"{metadata}: no samples")
    return Suite(
        name="omniref",
        items=[EvalItem(s.id, s, i) for i, s in enumerate(samples)],
        metrics={m: reward for m, (reward, _) in OMNIREF_METRICS.items()},
        reward_options={m: dict(opts) for m, (_, opts) in OMNIREF_METRICS.items() if opts},
        size=(size, size),
        params={"metadata": str(Path(metadata).resolve()), "root": str(Path(root or Path(metadata).parent).resolve())},
        n_samples=len(samples),
        protocol="OmniRef-Bench (DyRef): one image per sample; metrics per category and number of references",
    )
