"""The files and folders refrl writes.

* `atomic_writer` / `atomic_write_text` / `atomic_write_bytes`: temp file in the same
  folder + ``os.replace``, so a reader (or a crash) never sees half a file. The result
  has the permissions a plain ``open()`` would give (``0o666 & ~umask``), not the 0600
  of ``tempfile.mkstemp``. `save_safetensors` gives safetensors files those permissions
  (it is not atomic itself: callers that need it write a temp name and rename).
* `safe_filename`: a file name made from data (a sample id, a benchmark index) that can
  never leave its folder.
* `prepare_out_dir`: an output folder created, or refused with a one-line error.
* `lock_run_folder`: one writer per run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from refrl.errors import RefrlError

LOCK_FILE = ".refrl.lock"
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


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", fsync: bool = False,
                  encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file next to ``path``; on success it replaces ``path`` (with the umask's
    permissions), on any exception it is removed and ``path`` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_writer mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see `atomic_writer`."""
    with atomic_writer(path, "w", fsync=fsync, encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; see `atomic_writer`."""
    with atomic_writer(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with the permissions of an ordinary file (it creates 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, default_file_mode())
    return Path(path)


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


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not locked there
    fcntl = None  # type: ignore[assignment]

# Locks this process holds: lock file -> (descriptor, depth). A command that calls another
# (quickstart runs GRPO in its own folder) takes the same lock again without blocking itself.
_held: dict[Path, tuple[int, int]] = {}


def _acquire(lock_path: Path, folder: Path) -> None:
    if lock_path in _held:
        fd, depth = _held[lock_path]
        _held[lock_path] = (fd, depth + 1)
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, default_file_mode())
    except OSError as e:
        raise RefrlError(f"{folder}: cannot create the lock file {LOCK_FILE} ({e.strerror})") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RefrlError(
                f"{folder} is in use by another refrl process; wait for it to finish or choose another folder"
            ) from None
    _held[lock_path] = (fd, 1)


def _release(lock_path: Path) -> None:
    fd, depth = _held[lock_path]
    if depth > 1:
        _held[lock_path] = (fd, depth - 1)
        return
    del _held[lock_path]
    os.close(fd)  # closing the descriptor drops the flock


@contextlib.contextmanager
def lock_run_folder(path: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Create ``path`` (`prepare_out_dir`) and hold an exclusive lock on it, or raise a
    one-line RefrlError when another process holds it.

    The lock is ``flock`` on the empty file ``path/.refrl.lock`` (never written, so a
    refused process changes nothing): the operating system drops it when the process
    ends in any way (``kill -9`` included), so a leftover lock file never blocks
    ``--resume``. Re-entrant within a process.
    """
    folder = prepare_out_dir(path, option)
    lock_path = (folder / LOCK_FILE).resolve()
    _acquire(lock_path, folder)
    try:
        yield folder
    finally:
        _release(lock_path)
