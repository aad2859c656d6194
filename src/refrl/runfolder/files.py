"""The files and folders refrl writes: every atomic write goes through here.

* `atomic_path`: the one implementation. A fresh temp name next to the target; what the
  caller writes there (any way: ``open``, a library's own save, a link) is fsync'd and
  then ``os.replace``-d over the target, so a reader, a crash or a power cut never sees
  half a file. On an exception the temp is removed and the target left as it was.
* `atomic_writer` / `atomic_write_text` / `atomic_write_bytes` / `save_safetensors`: files
  written through `atomic_path`, with the permissions a plain ``open()`` would give
  (``0o666 & ~umask``; safetensors alone would create 0600).
* `atomic_dir`: the same for a folder (a checkpoint): every file in it fsync'd, then renamed.
* `safe_filename`: a file name made from data (a sample id, a benchmark index) that can
  never leave its folder.
* `prepare_out_dir`: an output folder created, or refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from refrl.errors import RefrlError, RunFailure, clip_text

# Characters kept in file names made from data; anything else (path separators, "..",
# control characters, spaces) becomes "_" and the name gets a hash of the original.
_UNSAFE_CHARS = re.compile(r"[^\w.\-]", re.ASCII)
# Bytes of the readable part of such a name; file systems allow 255 per name.
_MAX_NAME_BYTES = 120
_HASH_CHARS = 10
# What a hashed name ends with; a name that already does is hashed too, so a kept name
# can never equal the hashed name of another.
_HASHED = re.compile(rf"-[0-9a-f]{{{_HASH_CHARS}}}$")


def _current_umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere it can only be read by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_current_umask()


def _fsync(path: Path) -> None:
    """Force a written file's data to disk. Without it a file system that delays allocation
    (ext4, xfs) can show the renamed file empty after a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.is_symlink():  # a link's data is its target's, already on disk
            _fsync(f)


# The parent folder is not fsync'd after a rename: a crash may then show the old file
# (or none), never a torn one, which is all a reader of refrl's files relies on.


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh, not yet existing temp path next to ``path``; when the block ends
    normally, the file the caller wrote there is fsync'd and replaces ``path``. On any
    exception the temp is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if not tmp.is_symlink():
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a new file for `atomic_path`: on success it replaces ``path`` (with the umask's
    permissions), on any exception it is removed and ``path`` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, "x" + mode[1:], encoding=encoding if mode == "w" else None) as f:
        yield f


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see `atomic_writer`."""
    with atomic_writer(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; see `atomic_writer`."""
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return Path(path)


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` written atomically (`atomic_path`), with the permissions
    of an ordinary file (it creates 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, default_file_mode())
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder ``<name>.tmp`` next to ``path`` (a stale one, left by a
    crash, is removed first); when the block ends normally every file in it is fsync'd
    and it takes the place of ``path``. On any exception it is removed.

    An existing ``path`` is first renamed to ``<name>.old`` and deleted after the swap, so
    a crash at any moment leaves either the old folder or the new one complete under
    ``path`` (or neither), never a half-deleted one.
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_failure_reason(exc: BaseException) -> str | None:
    """Why a write failed, for the errors that libraries raise instead of ``OSError``:
    safetensors' ``SafetensorError`` (``IoError(Os { code: 28, ... message: "No space left on
    device" })``) and torch.save's ``RuntimeError`` (``PytorchStreamWriter failed writing
    file ...: file write failed``, or ``[enforce fail at inline_container.cc] . unexpected
    pos``, without an errno). None: not a write failure."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    torch_writer = isinstance(exc, RuntimeError) and any(k in text for k in ("StreamWriter", "inline_container"))
    if type(exc).__name__ == "SafetensorError" or torch_writer:
        found = re.search(r'message: "([^"]+)"', text)
        code = re.search(r"(?:code: |os error )(\d+)", text)
        if found:
            return found.group(1)
        if code:
            return os.strerror(int(code.group(1)))
        return f"the write failed ({clip_text(text.splitlines()[0] if text else type(exc).__name__, 160)}; is the disk full?)"
    return None


@contextlib.contextmanager
def checkpoint_write_errors(folder: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write of the checkpoint ``folder`` (disk full, quota, I/O error; raised by
    safetensors and torch as their own errors) into one `RunFailure` line (exit 1). Wrap it
    around `atomic_dir`, which has removed the half-written folder by then, so the earlier
    checkpoints stay the latest (docs/guides/reliability.md)."""
    try:
        yield
    except Exception as exc:
        reason = _write_failure_reason(exc)
        if reason is None:
            raise
        from refrl.runfolder.layout import latest_checkpoint

        folder = Path(folder)
        latest = latest_checkpoint(folder.parent)
        kept = f"{latest} is still the latest checkpoint" if latest else "no earlier checkpoint exists"
        raise RunFailure(f"could not write checkpoint {folder}: {reason}; nothing of it was kept and {kept}; "
                         "free space (or fix the folder) and continue with --resume") from None


def safe_filename(name: str, reserved: Collection[str] = ()) -> str:
    """A file name (without extension) for ``name`` that stays inside its folder.

    Names of letters, digits, ``_``, ``-`` and inner dots are kept as they are (so
    ``rw-000001`` stays ``rw-000001``). Any other name (``/``, ``\\``, ``..``, a leading
    dot, spaces, control characters, non-ASCII, more than 120 bytes, a name in
    ``reserved``, a name ending like a hashed one) has those characters replaced by
    ``_``, outer dots dropped, and ``-<hash of the original>`` appended; kept names never
    end that way, so two different names never share a file.
    """
    text = str(name)
    stem = _UNSAFE_CHARS.sub("_", text).strip(".")[:_MAX_NAME_BYTES]
    if stem and stem == text and stem not in reserved and not _HASHED.search(stem):
        return stem
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    return f"{stem or '_'}-{digest}"


def prepare_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents); a one-line RefrlError when it
    is a file, lies under a file or cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RefrlError(f"{option} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RefrlError(f"{option} {path}: a part of this path is a file, not a folder") from None
    except OSError as e:
        raise RefrlError(f"{option} {path}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RefrlError(f"{option} {path}: the folder is not writable")
    return path
