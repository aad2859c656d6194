"""One writer per run folder: `lock_run_folder`, an ``flock`` on ``FOLDER/.refrl.lock``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from refrl.errors import RefrlError
from refrl.runfolder.files import default_file_mode, prepare_out_dir

LOCK_FILE = ".refrl.lock"

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
    created = not Path(path).exists()
    folder = prepare_out_dir(path, option)
    lock_path = (folder / LOCK_FILE).resolve()
    _acquire(lock_path, folder)
    try:
        yield folder
    except BaseException:
        _release(lock_path)
        if created:  # a command that failed before writing anything leaves no empty folder behind
            _remove_if_empty(folder)
        raise
    else:
        _release(lock_path)


def _remove_if_empty(folder: Path) -> None:
    """Delete ``folder`` if it holds nothing but the lock file (best effort: never raises)."""
    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
            (folder / LOCK_FILE).unlink(missing_ok=True)
            folder.rmdir()
