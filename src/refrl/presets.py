"""The shipped presets (package data, ``refrl/configs/*.yaml``) and what ``--config`` names.

``--config`` takes a preset's bare name (``tiny-cpu-grpo``, with or without ``.yaml``),
found in the installed package whatever the current folder, or a path to a YAML file.
`resolve_config` is the one place that decides which; `refrl.config.read_yaml` calls it,
so every command and the Python API (`refrl.load_config`) accept both. docs/guides/presets.md
lists the presets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from refrl.errors import ConfigError

SUFFIXES = (".yaml", ".yml")
SUMMARY_CHARS = 110  # `refrl configs` prints one line per preset


def presets_dir() -> Path:
    """The folder of the shipped presets (inside the installed package)."""
    return Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted (``tiny-cpu-grpo``, ...)."""
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def preset_path(name: str) -> Path | None:
    """The file of preset ``name`` (``.yaml`` optional), or None if there is no such preset."""
    stem = name[: -len(suffix)] if (suffix := next((s for s in SUFFIXES if name.endswith(s)), "")) else name
    path = presets_dir() / f"{stem}.yaml"
    return path if stem and "/" not in stem and path.is_file() else None


def looks_like_path(text: str) -> bool:
    """A value meant as a file path (a folder separator, or starting with ``.`` or ``~``), not a preset name."""
    return "/" in text or (os.sep != "/" and os.sep in text) or text.startswith((".", "~"))


def resolve_config(value: str | os.PathLike) -> Path:
    """The YAML file that ``--config value`` means.

    An existing file is that file; a value that looks like a path must exist; otherwise
    the value is a preset name. ConfigError (one line) for a missing file or an unknown
    preset, naming the presets."""
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config {text} is a folder; give a YAML file or a preset name ({_listing()})")
    if looks_like_path(text):
        hint = f"; the preset of that name is --config {path.stem}" if preset_path(path.name) else ""
        raise ConfigError(f"config file not found: {text}{hint}")
    found = preset_path(text)
    if found is None:
        raise ConfigError(f"unknown preset {text!r} (and no such file); presets: {_listing()}")
    return found


def _listing() -> str:
    names = preset_names()
    return ", ".join(names) + " (see `refrl configs`)" if names else "none installed"


def preset_summary(path: str | os.PathLike) -> str:
    """The one-line description of a preset: the first sentence of its leading ``# `` comment
    (command lines such as ``#   refrl grpo ...`` skipped), shortened to `SUMMARY_CHARS`."""
    words: list[str] = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text or text.startswith(("refrl ", "accelerate ")):
            if words:
                break
            continue
        words += text.split()
        if text.endswith("."):
            break
    summary = " ".join(words)
    match = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\. ", summary)  # the first sentence ("et al." goes on)
    if match:
        summary = summary[: match.start() + 1]
    if len(summary) > SUMMARY_CHARS:  # long: the clause before a colon, else cut at a word
        colon = summary.find(": ")
        summary = summary[:colon] if 0 < colon < SUMMARY_CHARS else summary[: SUMMARY_CHARS - 3].rsplit(" ", 1)[0] + "..."
    return summary
