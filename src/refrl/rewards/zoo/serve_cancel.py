"""Scoring that can be called off: `CancellableRun` runs one call of the reward in its own
thread and stops it, on `cancel`, where that thread next runs Python.

Why: a reward call can take minutes (the embedded ``identity`` reward on a 1024x1024
image on a CPU); when every client that wanted its result has gone, the reward server
must not spend those minutes before it answers the next request. Python cannot kill a
thread and torch cannot interrupt a running kernel, so the stop is asynchronous but
needs nothing from the reward: `cancel` asks the interpreter to raise `ScoringCancelled`
in the scoring thread (``PyThreadState_SetAsyncExc``, the C API behind such stops),
which happens at the thread's next Python instruction boundary, i.e. as soon as the
kernel running at the time returns. It costs nothing until used (a trace function
would slow every line of the reward's Python). A lock makes sure the exception is
only ever posted while the reward's call runs, and a late one is taken back.
`ScoringCancelled` is a BaseException, so that a reward's ``except Exception`` does
not swallow it.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Callable
from typing import Any


class ScoringCancelled(BaseException):
    """Raised inside a cancelled reward call (never seen by a client)."""


def _post(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in thread ``thread_id`` at its next instruction boundary (None: take a pending one back)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class CancellableRun:
    """``fn()`` in a new daemon thread; ``await run.result`` for its value (or exception)."""

    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, name: str = "refrl-score"):
        self._fn, self._loop = fn, loop
        self.result: asyncio.Future = loop.create_future()
        self._lock = threading.Lock()
        self._in_call = False  # under _lock: the reward's call is running, so the exception may be posted
        self._cancelled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> CancellableRun:
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True until the call has returned or raised (also after `cancel`, while it unwinds)."""
        return not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the call has ended; False on time-out."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop the call where it next runs Python; its `result` becomes `ScoringCancelled` at once."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            if self._in_call and self._thread.ident is not None:
                _post(self._thread.ident, ScoringCancelled)
        if not self.result.done():
            self.result.set_exception(ScoringCancelled())

    def _run(self) -> None:
        with self._lock:
            self._in_call = not self._cancelled
        try:
            value, ok = self._call()
        except ScoringCancelled as exc:  # arrived while `_call` was handling another exception
            value, ok = exc, False
        while True:  # a cancel posted just as the call returned may still arrive in here: take it back
            try:
                with self._lock:
                    if self._in_call:
                        self._in_call = False
                        _post(threading.get_ident(), None)
                break
            except ScoringCancelled:
                continue
        self._done.set()
        try:
            self._loop.call_soon_threadsafe(self._deliver, value, ok)
        except RuntimeError:  # the loop has closed: the server is gone, nobody waits for this
            pass

    def _call(self) -> tuple[Any, bool]:
        if not self._in_call:  # cancelled before it began
            return ScoringCancelled(), False
        try:
            return self._fn(), True
        except BaseException as exc:  # handed to the event loop; a cancelled call ends here too
            return exc, False

    def _deliver(self, value: Any, ok: bool) -> None:
        if self.result.done():
            return
        if ok:
            self.result.set_result(value)
        else:
            self.result.set_exception(value)
