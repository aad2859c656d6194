"""Importers: other layouts -> refrl manifests.

* DiffSynth-Studio / DyRef metadata (``edit_image`` references, ``image`` target,
  ``prompt``) from .jsonl, .json (a list) or .csv — `import_diffsynth`.
* The same columns in a Hugging Face ``datasets`` dataset — `import_hf_dataset`.
* The DreamBench folder layout of google/dreambooth (``dataset/<subject>/*.jpg`` and
  ``dataset/prompts_and_classes.txt``) — `import_dreambench`.

`import_diffsynth` and `import_dreambench` return samples whose paths are relative to
the source root; `import_command` places the images next to the new manifest
(hard link, copy or symlink) so the manifest's paths stay inside its folder.
`import_hf_dataset` writes the images as PNGs under ``out_dir`` itself.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from refrl.data.images import check_image_pixels, save_pil_png
from refrl.data.manifest import (
    RESERVED_KEYS,
    ValidationReport,
    loads_bounded,
    max_json_depth,
    resolve_image_path,
    validate_manifest,
    write_manifest,
)
from refrl.data.schema import Reference, RefSample, canonical_reference_type
from refrl.errors import RefrlError
from refrl.runfolder.files import atomic_path

MANIFEST_NAME = "manifest.jsonl"
IMAGES_DIR = "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMPORT_KINDS = ("diffsynth", "hf", "dreambench")
LINK_MODES = ("hardlink", "copy", "symlink")

# DiffSynth-Studio metadata columns (its UnifiedDataset: `edit_image` = reference(s),
# `image` = target). The layout has no reference roles, hence the default type.
REFS_COLUMN = "edit_image"
TARGET_COLUMN = "image"
PROMPT_COLUMN = "prompt"
TYPES_COLUMN = "edit_image_types"
DEFAULT_REFERENCE_TYPE = "subject"
# Columns that map to RefSample fields of the same name.
PASSTHROUGH_FIELDS = ("id", "category", "mask")

# DreamBench (Ruiz et al., DreamBooth, CVPR 2023): 30 subjects; the 9 pets use the
# "live subject" prompt list, the 21 objects the "object" list.
DREAMBENCH_PROMPTS_FILE = "prompts_and_classes.txt"
DREAMBENCH_LIVE_CLASSES = ("cat", "dog")
DREAMBENCH_CATEGORY = "dreambench"

Types = str | Sequence[str] | Sequence[Sequence[str]] | None


# ---------------------------------------------------------------- shared helpers


def split_paths(value: Any) -> list[str]:
    """A cell holding image paths -> list: a list, one path, a JSON/Python list literal
    (``'["a.jpg", "b.jpg"]'``) or a comma-separated string (``"a.jpg,b.jpg"``)."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (pandas)
        return []
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if v is not None and str(v).strip()]
    text = str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list):
                return split_paths(parsed)
    return [p.strip() for p in text.split(",") if p.strip()]


def _row_types(types: Types, row: Mapping[str, Any], row_idx: int, n_refs: int, types_column: str,
               default_type: str) -> list[str]:
    """Reference types of one row: ``types`` (a list per row; or one positional list for all
    rows — a row with fewer references takes its first entries — or a comma string), else
    the row's ``types_column``, else ``default_type``. A single entry broadcasts."""
    if types is not None and not isinstance(types, str) and types and not isinstance(types[0], str):
        if row_idx >= len(types):
            raise ValueError(f"types has {len(types)} per-row lists but there are more rows")
        names = list(types[row_idx])
    elif types is not None:
        names = split_paths(types)
        if len(names) > n_refs:
            names = names[:n_refs]
    elif split_paths(row.get(types_column)):
        names = split_paths(row.get(types_column))
    else:
        names = [default_type]
    if len(names) == 1:
        names = names * n_refs
    if len(names) != n_refs:
        raise ValueError(f"{len(names)} reference types {names} for {n_refs} references")
    return [canonical_reference_type(t) for t in names]


def _extra(row: Mapping[str, Any], used: set[str]) -> dict[str, Any]:
    extra = {k: v for k, v in row.items() if k not in used and k not in PASSTHROUGH_FIELDS}
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"columns {clash} clash with manifest fields; rename them")
    return extra


def _opt_str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        return None
    return str(value)


# ---------------------------------------------------------------- DiffSynth / DyRef


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (a list of objects) or .csv metadata file."""
    path = Path(path)
    if not path.is_file():
        raise RefrlError(f"metadata file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
                if line.strip():
                    try:
                        rows.append(loads_bounded(line))
                    except json.JSONDecodeError as e:
                        raise RefrlError(f"{path}:{n}: bad JSON ({e.msg})") from e
                    except ValueError as e:
                        raise RefrlError(f"{path}:{n}: {e}") from e
        elif suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:  # a list of rows: one level more than a manifest line
                rows = loads_bounded(text, max_bytes=len(text.encode("utf-8", "surrogatepass")),
                                     max_depth=max_json_depth() + 1)
            except json.JSONDecodeError:
                raise
            except ValueError as e:
                raise RefrlError(f"{path}: {e}") from e
            if not isinstance(rows, list):
                raise RefrlError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        elif suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        else:
            raise RefrlError(f"{path}: unsupported metadata format {suffix!r}; allowed: .jsonl, .json, .csv")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefrlError(f"{path}: cannot parse ({e})") from e
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise RefrlError(f"{path}: row {bad[0]} is not an object")
    return rows


def import_diffsynth(path_or_rows: str | os.PathLike | Sequence[Mapping[str, Any]],
                     root: str | os.PathLike | None = None, types: Types = None,
                     types_column: str = TYPES_COLUMN,
                     default_type: str = DEFAULT_REFERENCE_TYPE) -> list[RefSample]:
    """DiffSynth-Studio / DyRef rows (``edit_image``, ``image``, ``prompt``) -> RefSamples.

    ``root`` is the folder the rows' image paths are relative to (DiffSynth's
    ``dataset_base_path``); default: the metadata file's folder. The samples keep the
    rows' paths (relative to ``root``, or absolute). Other columns go to ``extra``;
    ``id``, ``category`` and ``mask`` columns fill those fields. Default id: row index.
    """
    if isinstance(path_or_rows, str | os.PathLike):
        source = str(path_or_rows)
        rows = read_rows(path_or_rows)
    else:
        if root is None:
            raise RefrlError("import_diffsynth: pass root (the folder image paths are relative to) with in-memory rows")
        source, rows = "rows", list(path_or_rows)
    used = {REFS_COLUMN, TARGET_COLUMN, PROMPT_COLUMN, types_column}
    samples = []
    for i, row in enumerate(rows):
        try:
            prompt = _opt_str(row.get(PROMPT_COLUMN))
            if prompt is None:
                raise ValueError(f"missing or empty {PROMPT_COLUMN!r}")
            refs = split_paths(row.get(REFS_COLUMN))
            ref_types = _row_types(types, row, i, len(refs), types_column, default_type)
            targets = split_paths(row.get(TARGET_COLUMN))
            if len(targets) > 1:
                raise ValueError(f"{TARGET_COLUMN!r} must be one path, got {targets}")
            samples.append(RefSample(
                id=_opt_str(row.get("id")) or str(i),
                prompt=prompt,
                references=[Reference(image=p, type=t) for p, t in zip(refs, ref_types, strict=True)],
                target=targets[0] if targets else None,
                mask=_opt_str(row.get("mask")),
                category=_opt_str(row.get("category")),
                extra=_extra(row, used),
            ))
        except ValueError as e:
            raise RefrlError(f"{source}: row {i}: {e}") from None
    return samples


# ---------------------------------------------------------------- DreamBench


@dataclass
class DreamBenchPrompts:
    """The contents of DreamBench's prompts_and_classes.txt."""

    classes: dict[str, str]
    object_prompts: list[str]
    live_prompts: list[str]


_QUOTED = re.compile(r"""^\s*(['"])(.*?)\1""")


def parse_dreambench_prompts(text: str) -> DreamBenchPrompts:
    """Parse prompts_and_classes.txt: a ``subject_name,class`` table, then an "Object
    Prompts" and a "Live Subject Prompts" list of quoted templates (``{0}`` = unique
    token, ``{1}`` = class). A file with a single prompt list uses it for both."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        low = stripped.lower()
        if low.replace(" ", "") == "subject_name,class":
            section = "classes"
        elif "live" in low and "prompt" in low and not _QUOTED.match(line):
            section = "live"
        elif "prompt" in low and not _QUOTED.match(line) and "prompt_list" not in low:
            section = "object"
        elif section == "classes" and "," in stripped:
            subject, cls = stripped.split(",", 1)
            classes[subject.strip()] = cls.strip()
        elif section in lists and (m := _QUOTED.match(line)):
            lists[section].append(m.group(2))
    if not lists["object"] and not lists["live"]:
        raise ValueError("no prompt templates found (expected quoted lines under 'Object Prompts' / 'Live Subject Prompts')")
    return DreamBenchPrompts(classes, lists["object"] or lists["live"], lists["live"] or lists["object"])


def format_dreambench_prompt(template: str, class_name: str, unique_token: str = "") -> str:
    """Fill a template: ``{0}``/``{unique_token}`` -> token, ``{1}``/``{class}``/``{class_token}``
    -> class; whitespace collapsed (an empty token leaves "a dog in the jungle")."""
    try:
        text = template.format(unique_token, class_name, unique_token=unique_token,
                               class_token=class_name, **{"class": class_name})
    except (KeyError, IndexError, ValueError) as e:
        raise RefrlError(f"bad DreamBench prompt template {template!r}: {e}; use {{0}} (token) and {{1}} (class)") from e
    return " ".join(text.split())


def import_dreambench(root: str | os.PathLike, prompts: str | os.PathLike | Sequence[str] | None = None,
                      k: int | None = None, unique_token: str = "",
                      subjects: Sequence[str] | None = None,
                      classes: Mapping[str, str] | None = None) -> list[RefSample]:
    """One RefSample per (subject, prompt) of a DreamBench tree, paths relative to ``root``.

    ``root`` is the repo folder holding ``dataset/`` or ``dataset/`` itself. ``prompts``:
    None -> ``dataset/prompts_and_classes.txt``; a file of that format; or a list of
    templates for every subject. ``k``: keep the first k images (by name) per subject.
    Live subjects (class cat/dog) get the live prompt list. ``classes`` overrides the table.
    """
    root = Path(root)
    data_dir = root / "dataset" if (root / "dataset").is_dir() else root
    if not data_dir.is_dir():
        raise RefrlError(f"DreamBench folder not found: {root}")
    if k is not None and k < 1:
        raise RefrlError(f"k must be >= 1, got {k}")
    table_file = data_dir / DREAMBENCH_PROMPTS_FILE
    if prompts is None or isinstance(prompts, str | os.PathLike):
        pfile = table_file if prompts is None else Path(prompts)
        if not pfile.is_file():
            raise RefrlError(f"DreamBench prompts file not found: {pfile} (pass prompts= a file or a list of templates)")
        try:
            parsed = parse_dreambench_prompts(pfile.read_text(encoding="utf-8"))
        except ValueError as e:
            raise RefrlError(f"{pfile}: {e}") from e
    else:
        templates = list(prompts)
        table = parse_dreambench_prompts(table_file.read_text(encoding="utf-8")).classes if table_file.is_file() else {}
        parsed = DreamBenchPrompts(table, templates, templates)
    class_of = {**parsed.classes, **(classes or {})}
    folders = {p.name: p for p in sorted(data_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    wanted = list(subjects) if subjects is not None else list(folders)
    missing = [s for s in wanted if s not in folders]
    if missing:
        raise RefrlError(f"DreamBench subjects {missing} have no folder in {data_dir}; found: {', '.join(folders)}")
    samples = []
    for subject in wanted:
        images = sorted(p for p in folders[subject].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:k]
        if not images:
            raise RefrlError(f"DreamBench subject folder {folders[subject]} has no images ({', '.join(IMAGE_SUFFIXES)})")
        if subject not in class_of:
            raise RefrlError(f"DreamBench subject {subject!r} has no class in {table_file} (pass classes=)")
        cls = class_of[subject]
        live = cls in DREAMBENCH_LIVE_CLASSES
        refs = [Reference(image=p.relative_to(root).as_posix(), type="subject", name=subject) for p in images]
        for j, template in enumerate(parsed.live_prompts if live else parsed.object_prompts):
            samples.append(RefSample(
                id=f"{subject}-{j:02d}",
                prompt=format_dreambench_prompt(template, cls, unique_token),
                references=list(refs),
                category=DREAMBENCH_CATEGORY,
                extra={"subject": subject, "class": cls, "live": live, "prompt_index": j},
            ))
    return samples


# ---------------------------------------------------------------- Hugging Face datasets


def _hub_offline() -> bool:
    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(f in ("1", "ON", "YES", "TRUE") for f in flags):
        return True
    hub = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(hub, "HF_HUB_OFFLINE", False))


def _load_hf(name_or_path: str | os.PathLike, split: str) -> tuple[Any, Path | None]:
    """The dataset split and the folder its string image paths are relative to (None: hub)."""
    try:
        import datasets
    except ImportError as e:
        raise RefrlError("importing a Hugging Face dataset needs the `datasets` package: pip install 'refrl[hf]'") from e
    path = Path(name_or_path)
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise RefrlError(f"split {split!r} not in {path}; available: {', '.join(ds)}")
            ds = ds[split]
        return ds, path
    if path.exists():
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
        try:
            if path.is_dir():
                return datasets.load_dataset(str(path), split=split), path
            if path.suffix.lower() not in builder:
                raise RefrlError(f"{path}: unsupported data file; allowed: {', '.join(builder)} or a folder")
            return datasets.load_dataset(builder[path.suffix.lower()], data_files=str(path), split="train"), path.parent
        except (ValueError, OSError, KeyError) as e:  # datasets raises these for bad folders/splits
            raise RefrlError(f"cannot load dataset {path} split {split!r}: {e}") from e
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RefrlError(f"dataset folder not found: {name}")
    if _hub_offline():
        raise RefrlError(f"{name!r} is not a local folder and the Hugging Face hub is offline (HF_HUB_OFFLINE=1); "
                         "pass a local path (a folder saved with save_to_disk, or a data folder)")
    try:
        return datasets.load_dataset(name, split=split), None
    except Exception as e:  # network, auth, missing repo: all mean "cannot import this id"
        raise RefrlError(f"cannot load {name!r} (split {split!r}) from the Hugging Face hub: {type(e).__name__}: {e}; "
                         "pass a local path instead") from e


def _to_pil_images(value: Any, base: Path | None, where: str) -> list[Image.Image]:
    """A dataset cell -> PIL images: PIL, {"bytes", "path"} dicts, bytes, paths, or lists of them."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [im for v in value for im in _to_pil_images(v, base, where)]
    if isinstance(value, Image.Image):
        return [value]
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, bytes):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value.strip():
            p = Path(value)
            if not p.is_absolute():
                if base is None:
                    raise RefrlError(f"{where}: relative image path {value!r} in a hub dataset cannot be resolved")
                p = base / p
            image = Image.open(p)
        else:
            return []
        check_image_pixels(*image.size, source=where)
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise RefrlError(f"{where}: cannot decode image: {e}") from e
    return [image]


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def import_hf_dataset(name_or_path: str | os.PathLike, split: str = "train",
                      image_columns: Sequence[str] = (REFS_COLUMN,), *, out_dir: str | os.PathLike,
                      target_column: str = TARGET_COLUMN, prompt_column: str = PROMPT_COLUMN,
                      types: Types = None, types_column: str = TYPES_COLUMN,
                      default_type: str = DEFAULT_REFERENCE_TYPE,
                      max_rows: int | None = None) -> list[RefSample]:
    """A ``datasets`` dataset with DiffSynth-style columns -> RefSamples, images as PNGs.

    ``name_or_path``: a folder saved with ``save_to_disk``, a local data folder or file,
    or a hub id (only when online; offline it fails at once naming the id). References
    come from ``image_columns`` in order (each a single image or a list), the target
    from ``target_column``. Images are written to ``out_dir/images/`` and the samples'
    paths are relative to ``out_dir`` (write the manifest there). Columns that are
    JSON values go to ``extra``.
    """
    ds, base = _load_hf(name_or_path, split)
    columns = set(ds.column_names)
    missing = [c for c in (*image_columns, prompt_column) if c not in columns]
    if missing:
        raise RefrlError(f"dataset {name_or_path}: columns {missing} not found; available: {', '.join(sorted(columns))}")
    out_dir = Path(out_dir)
    used = {*image_columns, target_column, prompt_column, types_column}
    samples = []
    for i, row in enumerate(ds):
        if max_rows is not None and i >= max_rows:
            break
        where = f"dataset {name_or_path} row {i}"
        prompt = _opt_str(row.get(prompt_column))
        if prompt is None:
            raise RefrlError(f"{where}: missing or empty {prompt_column!r}")
        refs = [im for col in image_columns for im in _to_pil_images(row.get(col), base, f"{where} column {col!r}")]
        try:
            ref_types = _row_types(types, row, i, len(refs), types_column, default_type)
        except ValueError as e:
            raise RefrlError(f"{where}: {e}") from None
        ref_paths = []
        for j, image in enumerate(refs):
            rel = f"{IMAGES_DIR}/{i:06d}-ref{j}.png"
            save_pil_png(image, out_dir / rel)
            ref_paths.append(rel)
        target = None
        target_images = _to_pil_images(row.get(target_column), base, f"{where} column {target_column!r}")
        if target_images:
            target = f"{IMAGES_DIR}/{i:06d}-target.png"
            save_pil_png(target_images[0], out_dir / target)
        mask = None
        mask_images = _to_pil_images(row.get("mask"), base, f"{where} column 'mask'")
        if mask_images:
            mask = f"{IMAGES_DIR}/{i:06d}-mask.png"
            save_pil_png(mask_images[0], out_dir / mask)
        extra = {k: v for k, v in row.items()
                 if k not in used and k not in PASSTHROUGH_FIELDS and k not in RESERVED_KEYS and _json_safe(v)}
        samples.append(RefSample(
            id=_opt_str(row.get("id")) or f"{split}-{i:06d}",
            prompt=prompt,
            references=[Reference(image=p, type=t) for p, t in zip(ref_paths, ref_types, strict=True)],
            target=target,
            mask=mask,
            category=_opt_str(row.get("category")),
            extra=extra,
        ))
    return samples


# ---------------------------------------------------------------- placing images, the CLI entry


def _place(src: Path, dest: Path, link: str) -> None:
    """Put ``src`` at ``dest`` (hard link falling back to copy across devices, copy, or symlink)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and dest.resolve() == src.resolve():
        return
    with atomic_path(dest) as tmp:
        if link == "symlink":
            os.symlink(src.resolve(), tmp)
        elif link == "hardlink":
            try:
                os.link(src, tmp)
            except OSError:  # another device, or a file system without hard links
                shutil.copy2(src, tmp)
        else:
            shutil.copy2(src, tmp)


def place_images(samples: Sequence[RefSample], src_root: str | os.PathLike, out_dir: str | os.PathLike,
                 link: str = "hardlink") -> list[RefSample]:
    """Make every image of ``samples`` (paths relative to ``src_root`` or absolute) available
    under ``out_dir`` and return the samples with paths relative to ``out_dir``.

    Paths inside ``src_root`` keep their layout under ``out_dir/images/``; others go to
    ``out_dir/images/external/<hash>-<name>``. When ``out_dir`` is ``src_root`` the
    in-folder paths are used as they are.
    """
    if link not in LINK_MODES:
        raise RefrlError(f"unknown link mode {link!r}; allowed: {', '.join(LINK_MODES)}")
    src_root, out_dir = Path(src_root), Path(out_dir)
    in_place = out_dir.resolve() == src_root.resolve()
    placed: dict[str, str] = {}

    def move(sample_id: str, path: str) -> str:
        if path in placed:
            return placed[path]
        try:
            inside = resolve_image_path(src_root, path)
            rel = posixpath.normpath(path.replace("\\", "/"))
        except ValueError:
            inside, rel = None, None
        if in_place and inside is not None:
            new = rel
        else:
            src = inside if inside is not None else (src_root / path)
            if rel is not None:
                new = f"{IMAGES_DIR}/{rel}"
            else:
                digest = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:10]
                new = f"{IMAGES_DIR}/external/{digest}-{src.name}"
            if not src.is_file():
                raise RefrlError(f"sample {sample_id!r}: image not found: {src}")
            _place(src, out_dir / new, link)
        placed[path] = new
        return new

    out = []
    for s in samples:
        refs = [replace(r, image=move(s.id, r.image)) for r in s.references]
        target = None if s.target is None else move(s.id, s.target)
        mask = None if s.mask is None else move(s.id, s.mask)
        out.append(replace(s, references=refs, target=target, mask=mask, extra=dict(s.extra)))
    return out


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
    if kind not in IMPORT_KINDS:
        raise RefrlError(f"unknown import kind {kind!r}; allowed: {', '.join(IMPORT_KINDS)}")
    out = Path(out)
    manifest = out / MANIFEST_NAME
    if manifest.exists() and not overwrite:
        raise RefrlError(f"{manifest} already exists; pass overwrite (--force) to replace it")
    if kind == "diffsynth":
        src_root = Path(root) if root is not None else Path(src).parent
        samples = place_images(import_diffsynth(src, root=src_root, types=types), src_root, out, link)
    elif kind == "dreambench":
        samples = place_images(import_dreambench(src, k=k, unique_token=unique_token), src, out, link)
    else:
        samples = import_hf_dataset(src, split, image_columns, out_dir=out, types=types, max_rows=max_rows)
    if not samples:
        raise RefrlError(f"{kind} import of {src} produced no samples")
    write_manifest(manifest, samples)
    report = validate_manifest(manifest) if validate else None
    return ImportResult(manifest=manifest, n_samples=len(samples), report=report)
