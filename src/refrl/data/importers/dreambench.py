"""The DreamBench folder layout of google/dreambooth (``dataset/<subject>/*.jpg`` and
``dataset/prompts_and_classes.txt``) -> RefSamples (`import_dreambench`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from refrl.data.schema import Reference, RefSample
from refrl.errors import RefrlError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# DreamBench (Ruiz et al., DreamBooth, CVPR 2023): 30 subjects; the 9 pets use the
# "live subject" prompt list, the 21 objects the "object" list.
DREAMBENCH_PROMPTS_FILE = "prompts_and_classes.txt"
DREAMBENCH_LIVE_CLASSES = ("cat", "dog")
DREAMBENCH_CATEGORY = "dreambench"


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
