"""Eval and generate on N processes (``accelerate launch --num_processes N -m refrl eval ...``).

Work is split by batches: batch ``k`` of a list goes to process ``k mod N``, so every batch
holds the same items, in the same order, as in a one-process run, and gives the same
numbers (an image depends only on its noise ``(seed, noise_index)``; a batch's arithmetic
only on its own items). The main process alone writes the output folder's files.

No process may wait forever for one that failed: every step that can fail ends in
`Processes.check`, which shares each process's error, and every process then raises the
first one. With one process every helper is the identity and nothing is initialised.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from refrl.errors import RefrlError

T = TypeVar("T")


class Processes:
    """This process's rank among ``world`` (accelerate's environment), with object collectives."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @classmethod
    def from_environment(cls) -> Processes:
        """The processes `accelerate launch` started (``WORLD_SIZE`` > 1), else this one alone."""
        if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU, nccl on GPUs
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, k: int) -> bool:
        """Whether batch ``k`` of a split list is this process's."""
        return k % self.world == self.rank

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def check(self, error: BaseException | None) -> None:
        """Share each process's failure of the step just done; raise the first one everywhere
        (a RefrlError keeps its message; on the failing process the original is raised)."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        messages = self.gather(None if error is None else _one_line(error))
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message is not None:
                raise RefrlError(f"process {rank} failed: {message}")

    def run(self, fn: Callable[[], T], *, main_only: bool = False) -> T | None:
        """``fn()`` (on the main process only with ``main_only``), then `check`."""
        result, error = None, None
        if self.is_main or not main_only:
            try:
                result = fn()
            except Exception as e:  # shared, then re-raised by `check`
                error = e
        self.check(error)
        return result

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


    def close(self, wait: bool = True) -> None:
        """End the process group: after a barrier (``wait``, on success) so that no process exits
        while another still talks to it (gloo aborts a process that does), then tear it down."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def _one_line(error: BaseException) -> str:
    text = str(error) if isinstance(error, RefrlError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def batches(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """``items`` cut into batches of ``batch_size`` (the last may be shorter)."""
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


_CURRENT: Processes | None = None


def current() -> Processes:
    """The processes of this command (`Processes.from_environment`, initialised once). Only
    commands that every launched process runs (``refrl eval``, ``refrl generate``) split work
    with it; a caller on one process alone (validation during training) passes ``Processes()``."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Processes.from_environment()
    return _CURRENT


@contextlib.contextmanager
def processes_closed() -> Iterator[Processes]:
    """`current` for one command, its process group closed at the end (waiting for the others
    only when the command succeeded: a failed one has already told them, `Processes.check`)."""
    procs = current()
    try:
        yield procs
    except BaseException:
        procs.close(wait=False)
        raise
    procs.close(wait=True)
