"""Importers: other layouts -> refrl manifests, one module per format.

* ``diffsynth``: DiffSynth-Studio / DyRef metadata (``edit_image`` references,
  ``image`` target, ``prompt``) from .jsonl, .json (a list) or .csv — `import_diffsynth`.
* ``hf``: the same columns in a Hugging Face ``datasets`` dataset — `import_hf_dataset`.
* ``dreambench``: the DreamBench folder layout of google/dreambooth
  (``dataset/<subject>/*.jpg`` and ``dataset/prompts_and_classes.txt``) — `import_dreambench`.

`import_diffsynth` and `import_dreambench` return samples whose paths are relative to
the source root; `import_command` places the images next to the new manifest
(hard link, copy or symlink) so the manifest's paths stay inside its folder.
`import_hf_dataset` writes the images as PNGs under ``out_dir`` itself.

A new format is one module returning RefSamples plus one entry in `IMPORTERS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from refrl.data.importers.columns import REFS_COLUMN, Types, split_paths
from refrl.data.importers.diffsynth import import_diffsynth, read_rows
from refrl.data.importers.dreambench import (
    DreamBenchPrompts,
    format_dreambench_prompt,
    import_dreambench,
    parse_dreambench_prompts,
)
from refrl.data.importers.hf import import_hf_dataset
from refrl.data.importers.place import IMAGES_DIR, LINK_MODES, place_images
from refrl.data.manifest import ValidationReport, validate_manifest, write_manifest
from refrl.data.schema import RefSample
from refrl.errors import RefrlError

__all__ = [
    "IMAGES_DIR",
    "IMPORTERS",
    "IMPORT_KINDS",
    "LINK_MODES",
    "MANIFEST_NAME",
    "DreamBenchPrompts",
    "ImportOptions",
    "ImportResult",
    "format_dreambench_prompt",
    "import_command",
    "import_diffsynth",
    "import_dreambench",
    "import_hf_dataset",
    "parse_dreambench_prompts",
    "place_images",
    "read_rows",
    "split_paths",
]

MANIFEST_NAME = "manifest.jsonl"


@dataclass(frozen=True)
class ImportOptions:
    """The ``refrl data import`` options; each importer reads the ones of its format."""

    root: str | os.PathLike | None = None  # diffsynth
    split: str = "train"  # hf
    image_columns: Sequence[str] = (REFS_COLUMN,)  # hf
    types: Types = None  # diffsynth, hf
    k: int | None = None  # dreambench
    unique_token: str = ""  # dreambench
    link: str = "hardlink"  # diffsynth, dreambench
    max_rows: int | None = None  # hf


def _diffsynth(src: str | os.PathLike, out: Path, opts: ImportOptions) -> list[RefSample]:
    src_root = Path(opts.root) if opts.root is not None else Path(src).parent
    return place_images(import_diffsynth(src, root=src_root, types=opts.types), src_root, out, opts.link)


def _hf(src: str | os.PathLike, out: Path, opts: ImportOptions) -> list[RefSample]:
    return import_hf_dataset(src, opts.split, opts.image_columns, out_dir=out, types=opts.types,
                             max_rows=opts.max_rows)


def _dreambench(src: str | os.PathLike, out: Path, opts: ImportOptions) -> list[RefSample]:
    return place_images(import_dreambench(src, k=opts.k, unique_token=opts.unique_token), src, out, opts.link)


# kind -> (source, output folder, options) -> samples with paths relative to the output folder.
IMPORTERS: dict[str, Callable[[str | os.PathLike, Path, ImportOptions], list[RefSample]]] = {
    "diffsynth": _diffsynth,
    "hf": _hf,
    "dreambench": _dreambench,
}
IMPORT_KINDS = tuple(IMPORTERS)


@dataclass
class ImportResult:
    """What `import_command` wrote."""

    manifest: Path
    n_samples: int
    report: ValidationReport | None


def import_command(kind: str, src: str | os.PathLike, out: str | os.PathLike, *,
                   root: str | os.PathLike | None = None, split: str = "train",
                   image_columns: Sequence[str] = (REFS_COLUMN,), types: Types = None,
                   k: int | None = None, unique_token: str = "", link: str = "hardlink",
                   max_rows: int | None = None, overwrite: bool = False,
                   validate: bool = True) -> ImportResult:
    """``refrl data import diffsynth|hf|dreambench SRC --out DIR``: write ``DIR/manifest.jsonl``
    with its images under ``DIR``, then (``validate``) check it with `validate_manifest`.

    ``root``: diffsynth only, the folder image paths are relative to (default: SRC's folder).
    Refuses to replace an existing manifest unless ``overwrite``.
    """
    if kind not in IMPORTERS:
        raise RefrlError(f"unknown import kind {kind!r}; allowed: {', '.join(IMPORT_KINDS)}")
    out = Path(out)
    manifest = out / MANIFEST_NAME
    if manifest.exists() and not overwrite:
        raise RefrlError(f"{manifest} already exists; pass overwrite (--force) to replace it")
    opts = ImportOptions(root=root, split=split, image_columns=image_columns, types=types, k=k,
                         unique_token=unique_token, link=link, max_rows=max_rows)
    samples = IMPORTERS[kind](src, out, opts)
    if not samples:
        raise RefrlError(f"{kind} import of {src} produced no samples")
    write_manifest(manifest, samples)
    report = validate_manifest(manifest) if validate else None
    return ImportResult(manifest=manifest, n_samples=len(samples), report=report)
