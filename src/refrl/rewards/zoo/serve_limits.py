"""What a reward server accepts and holds (`ServerLimits`, `ServerStats`), and the
connection-level deadline uvicorn lacks (`DeadlineH11`). The server is in ``serve.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass, field

from uvicorn.protocols.http.h11_impl import H11Protocol

from refrl.errors import RefrlError

MIB = 2**20


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts and holds; each is a ``refrl serve-reward`` option (see its --help)."""

    max_body_bytes: int = 64 * MIB
    max_pixels: int = 1024 * 1024  # per image tensor (generated image, reference, target, mask)
    max_batch: int = 64  # images per call of the reward
    max_queue: int = 16  # requests admitted at once
    max_connections: int = 64  # open connections (uvicorn's limit_concurrency)
    idle_timeout: float = 5.0  # s without a complete request on an open connection
    read_timeout: float = 60.0  # s to receive one request's body
    queue_timeout: float = 30.0  # s a received request may wait for the worker (503 beyond)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value > 0):
                option = "--max-body-mb" if f.name == "max_body_bytes" else "--" + f.name.replace("_", "-")
                unit = " bytes" if f.name == "max_body_bytes" else ""
                raise RefrlError(f"serve-reward: {option} must be a number > 0, got {value}{unit}")

    def describe(self) -> str:
        return (f"limits: body {self.max_body_bytes / MIB:g} MiB, {self.max_pixels} pixels per image, batches of "
                f"{self.max_batch} images, queue {self.max_queue} requests, {self.max_connections} connections, "
                f"idle {self.idle_timeout:g} s, body read {self.read_timeout:g} s, queue wait {self.queue_timeout:g} s")


@dataclass
class ServerStats:
    """Counters of the work the server holds and did (read by tests and for monitoring)."""

    requests_scored: int = 0
    batches: int = 0
    admitted: int = 0
    peak_admitted: int = 0
    held_bytes: int = 0
    peak_held_bytes: int = 0
    rejected: dict[int, int] = field(default_factory=dict)
    dropped: int = 0  # requests whose client went away before the answer
    cancelled: int = 0  # batches whose scoring was called off (every client gone, or shutdown)
    expired: int = 0  # requests that waited longer than queue_timeout (503)


class DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers.

    uvicorn times a connection out only after a response (keep-alive); one that
    connects and never completes a request would hold a connection for ever, and
    ``max_connections`` of them would shut every client out with 503.
    """

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        # A request whose headers arrived is the app's: it times out its body itself, and scoring may take long.
        in_app = self.cycle is not None and not self.cycle.response_complete
        if not in_app and not self.transport.is_closing():
            self.transport.close()
