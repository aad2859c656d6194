"""JSONL manifests: read, validate, write, load.

One line per sample::

    {"id": "s1", "prompt": "...", "category": "...",
     "references": [{"image": "refs/a.png", "type": "subject", "name": "dog"}],
     "target": "targets/s1.png", "mask": "masks/s1.png", "boxes": [...]}

* ``id``: str (an int is accepted and stringified); default: the line number.
* ``prompt``: non-empty str. ``references``: a list of {image, type, name?}; ``type``
  is one of REFERENCE_TYPES or an alias (stored canonical). May be empty.
* ``target``, ``mask``, ``category``: optional. Any other key goes to
  ``RefSample.extra`` and on to ``LoadedSample.extra`` untouched (ground truth).
* Image paths are relative to the manifest's folder. Absolute paths and paths whose
  ``..`` lead out of the folder are refused. The check is on the path text, so a
  symlink placed *inside* the folder is followed (that is how a large image store
  is linked in without copying).
* Blank lines are ignored; line numbers in messages are the file's own (1-based).
* Duplicate ids are an **error** (on the later line): results, rewards and eval
  tables are keyed by id, and a duplicate would silently overwrite one of them.
  Ids must not hold control characters (NUL, newline, ...).
* Limits, so that a hostile or broken file cannot exhaust memory or the stack: a line
  is at most `max_line_bytes()` (default 1 MiB, ``REFRL_MAX_MANIFEST_LINE_BYTES``) and
  its JSON nests at most `max_json_depth()` levels (default 32, ``REFRL_MAX_JSON_DEPTH``);
  images are bounded by `refrl.data.images.max_image_pixels`.

Parsing one line (limits, path safety, fields) is `refrl.data.manifest_line`; this
module reads, validates, writes and loads whole manifests.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from refrl.data.images import (
    MISSING_FILE,
    ImageReadError,
    Size,
    load_image,
    load_mask,
    read_image_size,
)
from refrl.data.manifest_line import (
    RESERVED_KEYS,
    image_fields,
    loads_bounded,
    max_json_depth,
    max_line_bytes,
    parse_sample,
    resolve_image_path,
)
from refrl.data.schema import LoadedSample, RefSample, canonical_reference_type
from refrl.errors import RefrlError
from refrl.runfolder.files import atomic_write_text

log = logging.getLogger(__name__)

# How many errors `format_report` and `read_manifest` spell out before "... and N more".
MAX_ERRORS_SHOWN = 20
NO_CATEGORY = "(none)"


@dataclass
class ValidationReport:
    """What `validate_manifest` found. ``errors`` are one line each: ``FILE:LINE: message``."""

    path: str
    n_lines: int = 0
    n_valid: int = 0
    errors: list[str] = field(default_factory=list)
    skipped: int = 0
    skip_invalid: bool = False
    categories: Counter = field(default_factory=Counter)
    n_refs: Counter = field(default_factory=Counter)
    ref_types: Counter = field(default_factory=Counter)
    image_sizes: Counter = field(default_factory=Counter)  # (width, height) -> distinct files

    @property
    def n_invalid(self) -> int:
        return self.n_lines - self.n_valid

    @property
    def ok(self) -> bool:
        """True when the manifest loads under its policy (skip_invalid: at least one valid line)."""
        if self.skip_invalid:
            return self.n_valid > 0
        return not self.errors


def _scan(path: str | os.PathLike, check_files: bool, decode_images: bool) -> tuple[list[RefSample], ValidationReport]:
    """Check every line; returns the valid samples and the report (skipped left at 0)."""
    mpath = Path(path)
    report = ValidationReport(path=str(path))
    if not mpath.is_file():
        raise RefrlError(f"manifest not found: {path}")
    try:
        text = mpath.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RefrlError(f"manifest {path} is not UTF-8 text: {e}") from e
    mdir = mpath.parent
    samples: list[RefSample] = []
    first_line_of: dict[str, int] = {}
    checked: dict[Path, tuple[int, int] | str] = {}  # one decode per file, many lines may share it
    sized: set[Path] = set()  # files already counted in image_sizes
    max_bytes, max_depth = max_line_bytes(), max_json_depth()
    # split on "\n" only: str.splitlines() would also split on U+2028 inside JSON strings
    for line_no, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        report.n_lines += 1
        problems: list[str] = []
        sample = None
        try:
            sample = parse_sample(loads_bounded(raw, max_bytes, max_depth), default_id=str(line_no))
        except json.JSONDecodeError as e:
            problems.append(f"bad JSON ({e.msg} at column {e.colno})")
        except ValueError as e:
            problems.append(str(e))
        sizes: dict[Path, tuple[int, int]] = {}
        if sample is not None:
            for label, rel in image_fields(sample):
                try:
                    full = resolve_image_path(mdir, rel)
                except ValueError as e:
                    problems.append(f"{label}: {e}")
                    continue
                if not check_files:
                    continue
                if full not in checked:
                    if not decode_images:
                        checked[full] = (0, 0) if full.is_file() else MISSING_FILE
                    else:
                        try:
                            checked[full] = read_image_size(full)
                        except ImageReadError as e:
                            checked[full] = e.reason
                if isinstance(checked[full], str):
                    where = f" (looked at {full})" if checked[full] == MISSING_FILE else ""
                    problems.append(f"{label} {rel!r}: {checked[full]}{where}")
                elif decode_images:
                    sizes[full] = checked[full]
            if sample.id in first_line_of:
                problems.append(f"duplicate id {sample.id!r} (first on line {first_line_of[sample.id]})")
            else:
                first_line_of[sample.id] = line_no
        if problems:
            report.errors += [f"{path}:{line_no}: {p}" for p in problems]
            continue
        report.n_valid += 1
        samples.append(sample)
        report.categories[sample.category or NO_CATEGORY] += 1
        report.n_refs[sample.n_refs] += 1
        report.ref_types.update(r.type for r in sample.references)
        for full, wh in sizes.items():
            if full not in sized:
                sized.add(full)
                report.image_sizes[wh] += 1
    return samples, report


def validate_manifest(path: str | os.PathLike, skip_invalid: bool = False) -> ValidationReport:
    """Check every line of a manifest, decoding every image fully.

    Catches bad JSON, missing/empty prompt, bad ``references``, unknown reference types,
    paths escaping the folder, missing and truncated/corrupt images, duplicate ids.
    With ``skip_invalid`` the invalid lines are counted as ``skipped`` and the report is
    ``ok`` when at least one line is valid. Raises RefrlError only if the file is unreadable.
    """
    samples, report = _scan(path, check_files=True, decode_images=True)
    report.skip_invalid = skip_invalid
    if report.n_lines == 0:
        report.errors.append(f"{path}: no samples (the file has no non-blank lines)")
    if skip_invalid:
        report.skipped = report.n_invalid
    return report


def _counter_line(counter: Counter, key=None) -> str:
    items = sorted(counter.items(), key=key or (lambda kv: (-kv[1], str(kv[0]))))
    return ", ".join(f"{k}: {v}" for k, v in items) or "-"


def format_report(report: ValidationReport, max_errors: int | None = MAX_ERRORS_SHOWN) -> str:
    """A human summary: counts, categories, references per sample, types, image sizes, and the
    first ``max_errors`` errors (None: all of them)."""
    status = "OK" if report.ok else "INVALID"
    lines = [f"{report.path}: {status} — {report.n_lines} lines, {report.n_valid} valid, {report.n_invalid} invalid"
             + (f" ({report.skipped} skipped)" if report.skipped else "")]
    lines.append(f"  categories: {_counter_line(report.categories)}")
    lines.append(f"  references per sample: {_counter_line(report.n_refs, key=lambda kv: kv[0])}")
    lines.append(f"  reference types: {_counter_line(report.ref_types)}")
    sizes = Counter({f"{w}x{h}": n for (w, h), n in report.image_sizes.items()})
    lines.append(f"  image sizes (WxH, distinct files): {_counter_line(sizes)}")
    if report.errors:
        lines.append(f"  errors ({len(report.errors)}):")
        lines += [f"    {e}" for e in report.errors[:max_errors]]
        if max_errors is not None and len(report.errors) > max_errors:
            lines.append(f"    ... and {len(report.errors) - max_errors} more")
    return "\n".join(lines)


def read_manifest(path: str | os.PathLike, skip_invalid: bool = False, check_files: bool = True) -> list[RefSample]:
    """Read a manifest's samples (structure, path safety and file existence; no decoding).

    Raises RefrlError on the first invalid line (``FILE:LINE: message``), unless
    ``skip_invalid``: then invalid lines are dropped and their count logged as a warning;
    it still raises when no line at all is valid.
    """
    samples, report = _scan(path, check_files=check_files, decode_images=False)
    if not report.errors:
        return samples
    if not skip_invalid:
        more = len(report.errors) - 1
        hint = f" (and {more} more problems; run `refrl data validate {path}`)" if more else ""
        raise RefrlError(report.errors[0] + hint)
    if not samples:
        raise RefrlError(f"{path}: no valid lines among {report.n_lines}; first problem: {report.errors[0]}")
    log.warning("%s: skipped %d invalid of %d lines; first: %s", path, report.n_invalid, report.n_lines, report.errors[0])
    return samples


def _check_writable(sample: RefSample) -> None:
    if not sample.prompt or not sample.prompt.strip():
        raise ValueError(f"sample {sample.id!r}: empty prompt")
    clash = sorted(set(sample.extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"sample {sample.id!r}: extra keys {clash} clash with manifest fields {RESERVED_KEYS}")
    for label, rel in image_fields(sample):
        try:
            resolve_image_path(".", rel)
        except ValueError as e:
            raise ValueError(f"sample {sample.id!r} {label}: {e}") from None
    for r in sample.references:
        canonical_reference_type(r.type)


def write_manifest(path: str | os.PathLike, samples: Iterable[RefSample]) -> Path:
    """Write samples as JSONL, atomically (`refrl.runfolder.files.atomic_write_text`).

    Refuses (RefrlError) duplicate ids, empty prompts, unknown reference types, paths that
    are absolute or escape the folder, extras that clash with manifest keys or are not JSON.
    """
    path = Path(path)
    lines: list[str] = []
    seen: set[str] = set()
    for s in samples:
        try:
            _check_writable(s)
            if s.id in seen:
                raise ValueError(f"duplicate id {s.id!r}")
            seen.add(s.id)
            lines.append(json.dumps(s.to_json(), ensure_ascii=False))
        except (ValueError, TypeError) as e:
            raise RefrlError(f"cannot write manifest {path}: {e}") from e
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def load_sample(sample: RefSample, manifest_dir: str | os.PathLike, size: Size | None = None) -> LoadedSample:
    """Load a sample's images (float32 (3, H, W) in [0, 1]; mask (1, H, W)), resized if ``size``.

    Raises RefrlError naming the sample and the file when an image is missing, corrupt or
    its path escapes ``manifest_dir``.
    """
    def path_of(rel: str) -> Path:
        try:
            return resolve_image_path(manifest_dir, rel)
        except ValueError as e:
            raise RefrlError(f"sample {sample.id!r}: {e}") from None

    try:
        ref_types = [canonical_reference_type(r.type) for r in sample.references]
    except ValueError as e:
        raise RefrlError(f"sample {sample.id!r}: {e}") from None
    try:
        refs = [load_image(path_of(r.image), size) for r in sample.references]
        target = None if sample.target is None else load_image(path_of(sample.target), size)
        mask = None if sample.mask is None else load_mask(path_of(sample.mask), size)
    except ImageReadError as e:
        raise RefrlError(f"sample {sample.id!r}: {e}") from e
    return LoadedSample(
        id=sample.id,
        prompt=sample.prompt,
        ref_images=refs,
        ref_types=ref_types,
        target=target,
        mask=mask,
        category=sample.category,
        extra=dict(sample.extra),
    )


def load_manifest(path: str | os.PathLike, size: Size | None = None, skip_invalid: bool = False) -> list[LoadedSample]:
    """`read_manifest` then `load_sample` for each line. With ``skip_invalid``, lines whose
    images fail to decode are dropped too (logged); otherwise the first failure raises."""
    mdir = Path(path).parent
    loaded: list[LoadedSample] = []
    failures: list[str] = []
    for sample in read_manifest(path, skip_invalid=skip_invalid):
        try:
            loaded.append(load_sample(sample, mdir, size))
        except RefrlError as e:
            if not skip_invalid:
                raise RefrlError(f"{path}: {e}") from e
            failures.append(str(e))
    if failures:
        if not loaded:
            raise RefrlError(f"{path}: no sample could be loaded; first problem: {failures[0]}")
        log.warning("%s: skipped %d samples whose images failed to load; first: %s", path, len(failures), failures[0])
    return loaded
