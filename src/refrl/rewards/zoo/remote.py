"""Remote rewards: serve any reward over HTTP, and call it from a training run.

Why: a reward whose package pins old libraries (``hpsv3`` needs transformers
4.45) runs in its own environment or on its own GPU, behind
``refrl serve-reward NAME --port P``; the trainer names it ``remote:NAME`` with
``options: {url: http://host:P}``.

Wire protocol (version 1), standard library only on both sides:

* ``GET /info`` -> JSON ``{"name", "role", "needs", "protocol"}``.
* ``POST /score`` with a safetensors body: ``images`` (B,3,H,W) in [0,1] plus, per
  distinct sample ``j`` of the batch, ``s{j}.ref{i}``, ``s{j}.target``, ``s{j}.mask``
  and tensor-valued extras ``s{j}.extra.{key}``; the header's metadata
  ``request`` is JSON ``{"index": [sample of each image], "samples": [...]}`` (id,
  prompt, ref_types, category, JSON-able extras). A GRPO group's G images share
  one sample, so its references travel once. Images are float32 by default
  (no PNG quantisation of what is scored).
* The answer is JSON ``{"scores": [...], "extras": {...}, "encoder_calls": n}``
  with ``null`` for NaN; errors are JSON ``{"error": "..."}`` with status 400 (bad
  request) or 500 (the reward failed).

The client splits a batch into requests of ``batch_size`` images, retries
connection errors, time-outs and 5xx answers ``retries`` times with
exponential back-off, and fails with one `RefrlError` line naming the URL.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import RewardOutput

PROTOCOL = 1
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5
DEFAULT_REMOTE_BATCH = 64
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MAX_BODY_BYTES = 2**31  # refuse absurd requests instead of reading them into memory


# --------------------------------------------------------------------------- encoding


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def encode_request(images: torch.Tensor, samples: Sequence[LoadedSample], wire_dtype: torch.dtype = torch.float32) -> bytes:
    """One safetensors body for a batch; distinct sample objects are sent once."""
    tensors: dict[str, torch.Tensor] = {"images": images.detach().to("cpu", wire_dtype).contiguous()}
    order: dict[int, int] = {}
    index, meta = [], []
    for sample in samples:
        if id(sample) not in order:
            j = order[id(sample)] = len(meta)
            for i, ref in enumerate(sample.ref_images):
                tensors[f"s{j}.ref{i}"] = ref.detach().to("cpu", wire_dtype).contiguous()
            if sample.target is not None:
                tensors[f"s{j}.target"] = sample.target.detach().to("cpu", wire_dtype).contiguous()
            if sample.mask is not None:
                tensors[f"s{j}.mask"] = sample.mask.detach().to("cpu", torch.float32).contiguous()
            extra = {}
            for key, value in sample.extra.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"s{j}.extra.{key}"] = value.detach().cpu().contiguous()
                elif _jsonable(value):
                    extra[key] = value  # anything else (objects, numpy) is not sent
            meta.append({"id": sample.id, "prompt": sample.prompt, "ref_types": list(sample.ref_types),
                         "category": sample.category, "extra": extra})
        index.append(order[id(sample)])
    request = json.dumps({"protocol": PROTOCOL, "index": index, "samples": meta})
    return st_save(tensors, metadata={"request": request})


def decode_request(body: bytes) -> tuple[torch.Tensor, list[LoadedSample]]:
    """Inverse of `encode_request`: the images (float32) and one sample per image."""
    tensors = st_load(body)
    header_len = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + header_len])
    request = json.loads(header["__metadata__"]["request"])
    if "images" not in tensors:
        raise ValueError("request has no 'images' tensor")
    samples = []
    for j, m in enumerate(request["samples"]):
        refs = [tensors[f"s{j}.ref{i}"].float() for i in range(len(m["ref_types"]))]
        extra = dict(m.get("extra", {}))
        prefix = f"s{j}.extra."
        extra.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        target, mask = tensors.get(f"s{j}.target"), tensors.get(f"s{j}.mask")
        samples.append(LoadedSample(id=m["id"], prompt=m["prompt"], ref_images=refs, ref_types=list(m["ref_types"]),
                                    target=None if target is None else target.float(), mask=mask,
                                    category=m.get("category"), extra=extra))
    index = request["index"]
    images = tensors["images"].float()
    if len(index) != images.shape[0]:
        raise ValueError(f"request has {images.shape[0]} images but {len(index)} sample indices")
    return images, [samples[j] for j in index]


def _to_json_list(t: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in t.detach().float().cpu().tolist()]


def _from_json_list(values: list[float | None]) -> torch.Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


# --------------------------------------------------------------------------- server


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one reward. Scoring is serialised by a lock (one model, one batch at a time)."""

    daemon_threads = True

    def __init__(self, reward: Any, host: str = "127.0.0.1", port: int = 0):
        self.reward = reward
        self.lock = threading.Lock()
        self.requests_scored = 0
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict[str, Any]:
        return {"name": self.reward.name, "role": self.reward.role, "needs": list(getattr(self.reward, "needs", ())),
                "protocol": PROTOCOL}

    def score(self, images: torch.Tensor, samples: list[LoadedSample]) -> dict[str, Any]:
        with self.lock:
            before = getattr(self.reward, "encoder_calls", 0)
            out = self.reward(images, samples)
            calls = getattr(self.reward, "encoder_calls", 0) - before
            self.requests_scored += 1
        return {"scores": _to_json_list(out.scores), "encoder_calls": calls,
                "extras": {k: _to_json_list(v) for k, v in out.extras.items()}}


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass  # one line per request would drown the trainer's log

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.rstrip("/") == "/info":
            self._send(200, self.server.info())
        else:
            self._send(404, {"error": f"no endpoint {self.path}; endpoints: GET /info, POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"no endpoint {self.path}; endpoints: GET /info, POST /score"})
            return
        length = int(self.headers.get("Content-Length", 0))
        if not 0 < length <= MAX_BODY_BYTES:
            self._send(400, {"error": f"bad Content-Length {length}"})
            return
        body = self.rfile.read(length)
        try:
            images, samples = decode_request(body)
        except Exception as exc:  # a malformed request is the client's error, not the server's
            self._send(400, {"error": f"malformed request: {type(exc).__name__}: {exc}"})
            return
        try:
            self._send(200, self.server.score(images, samples))
        except Exception as exc:  # report the reward's failure to the client instead of dropping the connection
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["checkpoint=/models/dino", "batch_size=32"]`` -> options (values parsed as in config overrides)."""
    from refrl.config import parse_override

    options: dict[str, Any] = {}
    for item in items:
        keys, value = parse_override(item)
        options[".".join(keys)] = value
    return options


def serve_reward(name: str, options: dict[str, Any] | None = None, host: str = "127.0.0.1", port: int = 8500,
                 announce: Any = print) -> None:
    """Build reward ``name`` and serve it until interrupted (``refrl serve-reward``)."""
    from refrl.rewards import build

    reward = build(name, **(options or {}))
    try:
        server = RewardServer(reward, host, port)
    except OSError as exc:
        raise RefrlError(f"serve-reward: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    announce(f"serving reward {name!r} (role {reward.role}) on {server.url}  (GET /info, POST /score)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# --------------------------------------------------------------------------- client


class RemoteReward:
    """A reward computed by a ``refrl serve-reward`` server (config name ``remote:NAME``)."""

    needs: tuple[str, ...] = ()

    def __init__(self, remote_name: str, url: str, timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF_S, batch_size: int = DEFAULT_REMOTE_BATCH,
                 wire_dtype: str = "float32"):
        self.name = f"remote:{remote_name}"
        if not url.startswith(("http://", "https://")):
            raise RefrlError(f"reward {self.name!r}: url={url!r} must start with http:// or https://")
        if wire_dtype not in WIRE_DTYPES:
            raise RefrlError(f"reward {self.name!r}: wire_dtype={wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        if batch_size < 1 or retries < 0 or timeout <= 0:
            raise RefrlError(f"reward {self.name!r}: need batch_size >= 1, retries >= 0, timeout > 0")
        self.remote_name, self.url = remote_name, url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.batch_size, self.wire_dtype = int(batch_size), WIRE_DTYPES[wire_dtype]
        self.encoder_calls = 0
        info = self._request("GET", "/info")
        if info.get("name") != remote_name:
            raise RefrlError(f"reward {self.name!r}: the server at {self.url} serves {info.get('name')!r}, "
                             f"not {remote_name!r}")
        self.role = info["role"]
        self.needs = tuple(info.get("needs", ()))

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        url = self.url + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=body, method=method,
                                         headers={"Content-Type": "application/octet-stream"} if body else {})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = _error_text(exc)
                if exc.code < 500:
                    raise RefrlError(f"reward {self.name!r}: {url} refused the request ({exc.code}): {detail}") from None
                last = f"server error {exc.code}: {detail}"
            except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, time-out
                reason = getattr(exc, "reason", exc)
                last = "timed out" if isinstance(reason, TimeoutError) else str(reason)
        raise RefrlError(
            f"reward {self.name!r}: {url} failed after {self.retries + 1} tries ({last}); is "
            f"`refrl serve-reward {self.remote_name} --port P` running there? (options: url, timeout, retries)"
        )

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        if images.shape[0] != len(samples):
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(samples)} samples")
        scores, extras = [], {}
        for i in range(0, images.shape[0], self.batch_size):
            answer = self._request("POST", "/score",
                                   encode_request(images[i : i + self.batch_size], samples[i : i + self.batch_size],
                                                  self.wire_dtype))
            scores.append(_from_json_list(answer["scores"]))
            for k, v in answer.get("extras", {}).items():
                extras.setdefault(k, []).append(_from_json_list(v))
            self.encoder_calls += int(answer.get("encoder_calls", 0))
        return RewardOutput(scores=torch.cat(scores), extras={k: torch.cat(v) for k, v in extras.items()})


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", ""))[:300]
    except (ValueError, OSError):
        return exc.reason if isinstance(exc.reason, str) else ""
