"""The reward server behind ``refrl serve-reward``: uvicorn and starlette around one reward.

One model scores one batch at a time, so the server is a queue in front of one
scoring worker:

* a request is admitted only while fewer than ``max_queue`` are (being received,
  waiting or being scored); one more gets 503 with ``Retry-After`` before its
  body is read. Bodies are read under ``max_body_bytes`` (413: by the declared
  Content-Length before reading, else by counting while streaming) and within
  ``read_timeout`` seconds (408); every image tensor must have at most
  ``max_pixels`` pixels (413, checked from the safetensors header before any
  tensor is copied). So memory holds at most ``max_queue`` bodies.
* the worker takes the oldest waiting request and every other waiting request
  whose images have the same size, up to ``max_batch`` images, scores them as one
  batch in a thread (torch releases the GIL, so the event loop keeps accepting and
  refusing meanwhile) and answers each. If a joined batch fails, each request is
  scored alone so only the broken one gets the 500.
* a request waits for the worker at most ``queue_timeout`` seconds, then gets 503
  with ``Retry-After`` (once its scoring has started it waits for the result).
* a client that disconnects is noticed at once: its waiting request is dropped, and
  when every request of the batch being scored is gone, the scoring is called off
  (`serve_cancel.CancellableRun`: where the reward next runs Python; a call still
  inside a torch kernel is left to unwind in its thread while the next batch starts,
  at most one such call at a time).
* every refused request (malformed body, limits, queue) gets its status and one log
  line, without a traceback; on shutdown (SIGTERM, Ctrl-C) every waiting or
  receiving request gets 503 at once, so none is cancelled mid-way.
* uvicorn closes idle keep-alive connections after ``idle_timeout`` and answers
  503 beyond ``max_connections`` open connections; `DeadlineH11` adds the one
  timeout it lacks, for a connection that never completes its request headers.
  The limits, the counters and that deadline are in ``serve_limits.py``.

What the server holds is bounded: at most ``max_queue`` requests, each as its body
while it is read and decoded, then as tensors in the wire's dtype (float16 stays float16;
converted to float32 only when its batch is scored); plus the batch being scored, whose
working memory is the reward's. The
measured peak under a burst is in docs/guides/reliability.md.

The wire protocol, the non-finite rule (null) and the client are in ``remote.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.zoo.remote import (
    PROTOCOL,
    decode_request,
    image_sizes,
    read_header,
    samples_float32,
    to_json_list,
)
from refrl.rewards.zoo.serve_cancel import CancellableRun, ScoringCancelled
from refrl.rewards.zoo.serve_limits import DeadlineH11, ServerLimits, ServerStats

ENDPOINTS = "endpoints: GET /info, POST /score"
LOG = logging.getLogger("refrl.serve")
# Status logged for a request whose client went away before its answer (nginx's "client closed request").
GONE = 499
# Cancelled reward calls still running (inside a kernel) beside the one scoring the next batch.
MAX_UNWINDING = 1
T = TypeVar("T")


@dataclass(eq=False)  # a job is itself (`deque.remove`, `in`), never equal to another by its tensors
class _Job:
    images: torch.Tensor
    samples: list[LoadedSample]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)
    started: bool = False  # taken into a batch by the worker
    gone: bool = False  # its client disconnected


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, which tells the app that shutdown began before it waits for open requests."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]):
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets)


class _Reject(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class RewardServer:
    """An HTTP server around one reward; `serve_forever` in the foreground or `start`/`stop` in a thread."""

    def __init__(self, reward: Any, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None):
        self.reward, self.limits, self.stats = reward, limits or ServerLimits(), ServerStats()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:  # bound here so that port 0 has its real number in `url` before serving
            self.socket = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise RefrlError(f"serve-reward: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self.host, self.port = host, self.socket.getsockname()[1]
        self._pending: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._closing = asyncio.Event()  # set when shutdown begins
        self._scoring: tuple[list[_Job], CancellableRun] | None = None  # the batch being scored
        self._unwinding: list[CancellableRun] = []  # cancelled calls that may still be in a kernel
        self._thread: threading.Thread | None = None
        app = Starlette(routes=[Route("/info", self._info, methods=["GET"]),
                                Route("/score", self._score_endpoint, methods=["POST"])],
                        exception_handlers={HTTPException: _http_error}, lifespan=self._lifespan)
        config = uvicorn.Config(app, http=DeadlineH11, ws="none", loop="asyncio", lifespan="on", log_config=None,
                                log_level="warning", access_log=False, timeout_keep_alive=self.limits.idle_timeout,
                                limit_concurrency=self.limits.max_connections, timeout_graceful_shutdown=5)
        self._server = _Uvicorn(config, self._begin_shutdown)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def requests_scored(self) -> int:
        return self.stats.requests_scored

    def info(self) -> dict[str, Any]:
        lim = self.limits
        st = self.stats
        return {"name": self.reward.name, "needs": list(getattr(self.reward, "needs", ())),
                "protocol": PROTOCOL,
                "limits": {"max_body_bytes": lim.max_body_bytes, "max_pixels": lim.max_pixels,
                           "max_batch": lim.max_batch, "max_queue": lim.max_queue,
                           "queue_timeout": lim.queue_timeout},
                "stats": {"requests_scored": st.requests_scored, "batches": st.batches, "admitted": st.admitted,
                          "waiting": len(self._pending), "scoring": len(self._scoring[0]) if self._scoring else 0,
                          "dropped": st.dropped, "cancelled": st.cancelled, "expired": st.expired,
                          "rejected": {str(k): v for k, v in sorted(st.rejected.items())}}}

    # ------------------------------------------------------------------ running

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C, SIGTERM) or `stop`."""
        self._server.run(sockets=[self.socket])

    def start(self) -> RewardServer:
        """Serve in a daemon thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self.serve_forever, name="refrl-reward-server", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RefrlError(f"serve-reward: the server on {self.url} stopped while starting")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self.socket.close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._wake = asyncio.Event()
        worker = asyncio.create_task(self._work())
        try:
            yield
        finally:
            self._begin_shutdown()
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    def _begin_shutdown(self) -> None:
        """Every request still receiving or waiting answers 503 now (see `_or_closing`); scoring stops."""
        self._closing.set()
        if self._scoring is not None:
            self._scoring[1].cancel()

    # ------------------------------------------------------------------ endpoints

    async def _info(self, request: Request) -> JSONResponse:
        return JSONResponse(self.info())

    async def _score_endpoint(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(await self._admit(request))
        except _Reject as exc:
            status, message, headers = exc.status, str(exc), exc.headers
        except Exception as exc:  # a bug of the server's: still one line and a JSON answer, never a traceback
            status, message, headers = 500, _one_line(f"server error: {type(exc).__name__}: {exc}"), None
        self.stats.rejected[status] = self.stats.rejected.get(status, 0) + 1
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        LOG.warning("POST /score from %s: %d %s", client, status, message)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def _admit(self, request: Request) -> dict[str, Any]:
        lim, stats = self.limits, self.stats
        declared = request.headers.get("content-length")  # h11 has already refused a malformed one
        if declared is not None and int(declared) > lim.max_body_bytes:
            raise _Reject(413, f"body of {int(declared)} bytes is over this server's limit of {lim.max_body_bytes} "
                               "bytes (refrl serve-reward --max-body-mb)")
        if self._closing.is_set():
            raise _Reject(503, "the server is shutting down", headers={"Retry-After": "1"})
        if stats.admitted >= lim.max_queue:
            raise _Reject(503, f"server busy: {lim.max_queue} requests are queued (refrl serve-reward --max-queue); "
                               "retry later", headers={"Retry-After": "1"})
        stats.admitted += 1
        stats.peak_admitted = max(stats.peak_admitted, stats.admitted)
        held = [0]  # bytes of this body counted in stats.held_bytes
        try:
            body = await self._or_closing(self._read_body(request, held))
            images, samples = await self._or_closing(self._decode(body))
            del body  # a waiting request holds its tensors only
            if self._closing.is_set():
                raise _Reject(503, "the server is shutting down", headers={"Retry-After": "1"})
            job = _Job(images, samples, asyncio.get_running_loop().create_future())
            self._pending.append(job)
            self._wake.set()
            result = await self._wait_for(job, request)
        finally:
            stats.admitted -= 1
            stats.held_bytes -= held[0]
        if isinstance(result, Exception):
            raise _Reject(500, _one_line(f"{type(result).__name__}: {result}"))
        return result

    async def _read_body(self, request: Request, held: list[int]) -> bytes:
        lim, stats = self.limits, self.stats
        chunks = []
        try:
            async with asyncio.timeout(lim.read_timeout):
                async for chunk in request.stream():
                    held[0] += len(chunk)
                    stats.held_bytes += len(chunk)
                    stats.peak_held_bytes = max(stats.peak_held_bytes, stats.held_bytes)
                    if held[0] > lim.max_body_bytes:
                        raise _Reject(413, f"body is over this server's limit of {lim.max_body_bytes} bytes "
                                           "(refrl serve-reward --max-body-mb)")
                    chunks.append(chunk)
        except TimeoutError:
            raise _Reject(408, f"the body did not arrive within {lim.read_timeout:g} s "
                               "(refrl serve-reward --read-timeout)") from None
        except ClientDisconnect:
            raise _Reject(400, "the client disconnected while sending the body") from None
        body = b"".join(chunks)
        chunks.clear()
        return body

    async def _or_closing(self, work: Awaitable[T]) -> T:
        """``await work``, or 503 as soon as shutdown begins (so uvicorn never has to cancel a request)."""
        task = asyncio.ensure_future(work)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise _Reject(503, "the server is shutting down", headers={"Retry-After": "1"})
        return task.result()

    async def _wait_for(self, job: _Job, request: Request) -> dict[str, Any] | Exception:
        """The job's result; 503 past ``queue_timeout`` unscored or at shutdown; `GONE` once its client left."""
        gone = asyncio.create_task(_disconnected(request))
        closing = asyncio.create_task(self._closing.wait())
        deadline = job.queued_at + self.limits.queue_timeout
        try:
            while True:
                timeout = None if job.started else max(0.0, deadline - time.monotonic())
                await asyncio.wait({job.future, gone, closing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if job.future.done():
                    return job.future.result()
                if gone.done():
                    self._forget(job, gone=True)
                    self.stats.dropped += 1
                    raise _Reject(GONE, "the client went away; its request was dropped")
                if closing.done():
                    self._forget(job)
                    raise _Reject(503, "the server is shutting down", headers={"Retry-After": "1"})
                if not job.started:
                    self._forget(job)
                    self.stats.expired += 1
                    raise _Reject(503, f"server busy: the request waited {self.limits.queue_timeout:g} s in the queue "
                                       "(refrl serve-reward --queue-timeout); retry later", headers={"Retry-After": "1"})
        finally:
            gone.cancel()
            closing.cancel()

    def _forget(self, job: _Job, gone: bool = False) -> None:
        """Take a job out of the queue; a gone one in the batch being scored may call that scoring off."""
        job.gone = job.gone or gone
        with contextlib.suppress(ValueError):
            self._pending.remove(job)
        if gone and self._scoring is not None:
            batch, run = self._scoring
            if job in batch and all(j.gone for j in batch):
                run.cancel()

    async def _decode(self, body: bytes) -> tuple[torch.Tensor, list[LoadedSample]]:
        if not body:
            raise _Reject(400, "empty body: POST /score takes a safetensors request (refrl.rewards.zoo.remote)")
        try:
            sizes = image_sizes(read_header(body))
        except Exception as exc:  # whatever the bytes (RecursionError for a deeply nested header): the client's
            raise _Reject(400, _one_line(f"malformed request: {type(exc).__name__}: {exc}")) from None
        for name, h, w in sizes:
            if h * w > self.limits.max_pixels:
                raise _Reject(413, f"{name} is {h}x{w} = {h * w} pixels, over this server's limit of "
                                   f"{self.limits.max_pixels} per image (refrl serve-reward --max-pixels)")
        try:  # a thread: copying a large body would stall the event loop
            # Tensors stay in the wire's dtype while they wait (half the memory for float16); float32 when scored.
            return await asyncio.to_thread(decode_request, body, False)
        except Exception as exc:  # a malformed request is the client's error, not the server's
            raise _Reject(400, _one_line(f"malformed request: {type(exc).__name__}: {exc}")) from None

    # ------------------------------------------------------------------ scoring

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self._closing.is_set():
                await self._wait_unwinding()
                await asyncio.sleep(0)  # the disconnects already seen are handled before a batch is taken
                if not self._pending:  # every waiting client left meanwhile
                    break
                batch = self._take_batch()
                for job in batch:
                    job.started = True
                run = CancellableRun(functools.partial(self._score_jobs, batch), loop).start()
                self._scoring = (batch, run)
                try:
                    results: list[Any] = await run.result
                except ScoringCancelled:  # every client of the batch went away, or shutdown
                    self.stats.cancelled += 1
                    self._unwinding.append(run)
                    continue
                except Exception as exc:  # the worker must outlive any failure, or every later request would hang
                    results = [exc] * len(batch)
                finally:
                    self._scoring = None
                for job, result in zip(batch, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(result)

    async def _wait_unwinding(self) -> None:
        """At most `MAX_UNWINDING` cancelled calls may still run (in a kernel) beside a new one."""
        while True:
            self._unwinding = [r for r in self._unwinding if r.running]
            if len(self._unwinding) <= MAX_UNWINDING or self._closing.is_set():
                return
            await asyncio.sleep(0.05)

    def _take_batch(self) -> list[_Job]:
        """The oldest waiting request and the later ones of its image size, up to ``max_batch`` images."""
        first = self._pending.popleft()
        batch, n, rest = [first], first.images.shape[0], deque()
        while self._pending:
            job = self._pending.popleft()
            if job.images.shape[1:] == first.images.shape[1:] and n + job.images.shape[0] <= self.limits.max_batch:
                batch.append(job)
                n += job.images.shape[0]
            else:
                rest.append(job)
        self._pending = rest
        return batch

    def _score_jobs(self, jobs: list[_Job]) -> list[dict[str, Any] | Exception]:
        if len(jobs) > 1:
            try:
                return self._score_together(jobs)
            except Exception:
                pass  # one request may have broken the batch: score each alone so only it fails
        results: list[dict[str, Any] | Exception] = []
        for job in jobs:
            try:
                results.extend(self._score_together([job]))
            except Exception as exc:
                results.append(exc)
        return results

    def _score_together(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        images = (torch.cat([j.images for j in jobs]) if len(jobs) > 1 else jobs[0].images).float()
        samples = samples_float32([s for j in jobs for s in j.samples])
        before = getattr(self.reward, "encoder_calls", 0)
        scores, extras = [], {}
        step = self.limits.max_batch  # a single request may be larger than a batch
        for i in range(0, len(samples), step):
            out = self.reward(images[i : i + step], samples[i : i + step])
            n = len(samples[i : i + step])
            if tuple(out.scores.shape) != (n,):
                raise ValueError(f"reward {self.reward.name!r} returned scores of shape {tuple(out.scores.shape)} "
                                 f"for {n} images")
            scores.append(out.scores.detach().float().cpu())
            for key, value in out.extras.items():
                extras.setdefault(key, []).append(value.detach().float().cpu())
        all_scores = torch.cat(scores)
        all_extras = {k: torch.cat(v) for k, v in extras.items()}
        # Reference encodings of a joined batch cannot be told apart by request; the first answer carries
        # them all, so a client's running total stays the server's.
        calls = int(getattr(self.reward, "encoder_calls", 0) - before)
        results, start = [], 0
        for k, job in enumerate(jobs):
            stop = start + job.images.shape[0]
            results.append({"scores": to_json_list(all_scores[start:stop]), "encoder_calls": calls if k == 0 else 0,
                            "extras": {key: to_json_list(v[start:stop]) for key, v in all_extras.items()}})
            start = stop
        self.stats.batches += 1
        self.stats.requests_scored += len(jobs)
        return results


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}; {ENDPOINTS}"},
                        status_code=exc.status_code)


async def _disconnected(request: Request) -> None:
    """Returns when the client of ``request`` (whose body has been read) disconnects."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # nothing else is expected after the body; never spin on it


def _one_line(text: str) -> str:
    return " ".join(text.split())[:1000]


def serve_reward(name: str, options: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 8500,
                 limits: ServerLimits | None = None, announce: Callable[[str], Any] = print) -> None:
    """Build reward ``name`` and serve it until interrupted (``refrl serve-reward``)."""
    from refrl.rewards import build

    limits = limits or ServerLimits()  # checked before the (maybe slow) model load
    if not LOG.handlers:  # one line per refused request on stderr, with the time
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        LOG.addHandler(handler)
        LOG.propagate = False
    reward = build(name, **(options or {}))
    server = RewardServer(reward, host, port, limits)
    announce(f"serving reward {name!r} on {server.url}  (GET /info, POST /score)")
    announce(server.limits.describe())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.socket.close()
