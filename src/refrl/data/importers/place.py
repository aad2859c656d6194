"""Placing an import's images next to its manifest (hard link, copy or symlink), so the
manifest's paths stay inside its folder."""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from refrl.data.manifest_line import resolve_image_path
from refrl.data.schema import RefSample
from refrl.errors import RefrlError
from refrl.runfolder.files import atomic_path

IMAGES_DIR = "images"
LINK_MODES = ("hardlink", "copy", "symlink")


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
