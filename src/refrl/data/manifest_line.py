"""One manifest line: the limits on untrusted JSON, path safety, and parsing into a `RefSample`.

The format itself is described in `refrl.data.manifest`; this module touches no file.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from refrl.config import env_int
from refrl.data.schema import REFERENCE_TYPES, Reference, RefSample, canonical_reference_type

DEFAULT_MAX_LINE_BYTES = 1 << 20
DEFAULT_MAX_JSON_DEPTH = 32
MAX_LINE_BYTES_ENV = "REFRL_MAX_MANIFEST_LINE_BYTES"
MAX_JSON_DEPTH_ENV = "REFRL_MAX_JSON_DEPTH"
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
RESERVED_KEYS = ("id", "prompt", "references", "target", "mask", "category")
REFERENCE_KEYS = ("image", "type", "name")


class _LineError(Exception):
    """One problem with one manifest line (message without the FILE:LINE prefix)."""


def max_line_bytes() -> int:
    """The longest manifest line accepted (UTF-8 bytes): ``$REFRL_MAX_MANIFEST_LINE_BYTES`` or 1 MiB."""
    return env_int(MAX_LINE_BYTES_ENV, DEFAULT_MAX_LINE_BYTES)


def max_json_depth() -> int:
    """The deepest nesting of a manifest line accepted: ``$REFRL_MAX_JSON_DEPTH`` or 32."""
    return env_int(MAX_JSON_DEPTH_ENV, DEFAULT_MAX_JSON_DEPTH)


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0, ``[]`` is 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def loads_bounded(text: str, max_bytes: int | None = None, max_depth: int | None = None) -> Any:
    """``json.loads`` for one line of untrusted JSON; ValueError (with the limit and how to
    change it) when it is longer than ``max_bytes`` or nested deeper than ``max_depth``."""
    max_bytes = max_line_bytes() if max_bytes is None else max_bytes
    max_depth = max_json_depth() if max_depth is None else max_depth
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise ValueError(f"line of {size} bytes exceeds the limit of {max_bytes} bytes (set {MAX_LINE_BYTES_ENV} to allow it)")
    try:
        value = json.loads(text)
    except RecursionError:  # deeper than the interpreter's stack, so deeper than any limit
        value, depth = None, max_depth + 1
    else:
        depth = json_depth(value)
    if depth > max_depth:
        raise ValueError(f"JSON nested deeper than the limit of {max_depth} levels (set {MAX_JSON_DEPTH_ENV} to allow it)")
    return value


def resolve_image_path(manifest_dir: str | os.PathLike, rel: str) -> Path:
    """Path of image ``rel`` inside ``manifest_dir``; ValueError if it is absolute or escapes.

    The check is lexical (``os.path.normpath``): ``a/../b.png`` is fine, ``../b.png`` is not.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"image path must be a non-empty string, got {rel!r}")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise ValueError(f"path {rel!r} escapes the manifest folder (absolute paths are refused; use a path relative to the manifest)")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"path {rel!r} escapes the manifest folder (paths must stay inside it)")
    return Path(manifest_dir) / norm


def _parse_reference(obj: Any, idx: int) -> Reference:
    where = f"references[{idx}]"
    if not isinstance(obj, dict):
        raise _LineError(f"{where} must be an object {{image, type, name?}}, got {type(obj).__name__}")
    if "image" not in obj:
        raise _LineError(f"{where} has no 'image' (keys: {sorted(obj)})")
    image = obj["image"]
    if not isinstance(image, str) or not image.strip():
        raise _LineError(f"{where}.image must be a non-empty path string, got {image!r}")
    if "type" not in obj:
        raise _LineError(f"{where} ({image!r}) has no 'type'; allowed: {', '.join(REFERENCE_TYPES)}")
    try:
        ref_type = canonical_reference_type(obj["type"])
    except ValueError as e:
        raise _LineError(f"{where} ({image!r}): {e}") from None
    name = obj.get("name")
    if name is not None and not isinstance(name, str):
        raise _LineError(f"{where}.name must be a string, got {name!r}")
    unknown = sorted(set(obj) - set(REFERENCE_KEYS))
    if unknown:
        raise _LineError(f"{where} ({image!r}) has unknown keys {unknown}; allowed: {', '.join(REFERENCE_KEYS)}")
    return Reference(image=image, type=ref_type, name=name)


def parse_sample(obj: Any, default_id: str) -> RefSample:
    """One decoded manifest object -> RefSample (structure only; files are not touched).

    Raises ValueError with a message naming the offending key and value.
    """
    try:
        return _parse_sample(obj, default_id)
    except _LineError as e:
        raise ValueError(str(e)) from None


def _parse_sample(obj: Any, default_id: str) -> RefSample:
    if not isinstance(obj, dict):
        raise _LineError(f"a line must be a JSON object, got {type(obj).__name__}")
    sid = obj.get("id", default_id)
    if isinstance(sid, int) and not isinstance(sid, bool):
        sid = str(sid)
    if not isinstance(sid, str) or not sid.strip():
        raise _LineError(f"'id' must be a non-empty string or an integer, got {sid!r}")
    if _CONTROL_CHARS.search(sid):
        raise _LineError(f"'id' must not contain control characters (NUL, newline, ...), got {sid!r}")
    prompt = obj.get("prompt")
    if prompt is None:
        raise _LineError("missing 'prompt'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _LineError(f"'prompt' must be a non-empty string, got {prompt!r}")
    if "references" not in obj:
        raise _LineError("missing 'references' (a list of {image, type, name?})")
    refs = obj["references"]
    if not isinstance(refs, list):
        raise _LineError(f"'references' must be a list of {{image, type, name?}}, got {type(refs).__name__}")
    references = [_parse_reference(r, i) for i, r in enumerate(refs)]
    optional: dict[str, str | None] = {}
    for key in ("target", "mask", "category"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _LineError(f"{key!r} must be a non-empty string or absent, got {value!r}")
        optional[key] = value
    extra = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    return RefSample(id=sid, prompt=prompt, references=references, extra=extra, **optional)


def image_fields(sample: RefSample) -> list[tuple[str, str]]:
    """(field label, relative path) of every image a sample names."""
    fields = [(f"references[{i}].image", r.image) for i, r in enumerate(sample.references)]
    fields += [(k, getattr(sample, k)) for k in ("target", "mask") if getattr(sample, k) is not None]
    return fields
