"""Remote rewards: the wire protocol and the client of ``refrl serve-reward``.

Why: a reward whose package pins old libraries (``hpsv3`` needs transformers
4.45) runs in its own environment or on its own GPU, behind
``refrl serve-reward NAME --port P`` (the server is in ``serve.py``); the trainer
names it ``remote:NAME`` with ``options: {url: http://host:P}``.

Wire protocol (version 1):

* ``GET /info`` -> JSON ``{"name", "needs", "protocol", "limits"}``; servers
  before rewards lost their ``role`` also send one, which the client ignores;
  ``limits`` (added without a version change; older servers lack it) holds the
  server's ``max_body_bytes``, ``max_pixels``, ``max_batch``, ``max_queue`` and
  ``queue_timeout``; ``stats`` (likewise) its counters (requests scored, dropped
  because their client left, batches cancelled, requests expired in the queue,
  refusals by status), for monitoring.
* ``POST /score`` with a safetensors body: ``images`` (B,3,H,W) in [0,1] plus, per
  distinct sample ``j`` of the batch, ``s{j}.ref{i}``, ``s{j}.target``, ``s{j}.mask``
  and tensor-valued extras ``s{j}.extra.{key}``; the header's metadata
  ``request`` is JSON ``{"index": [sample of each image], "samples": [...]}`` (id,
  prompt, ref_types, category, JSON-able extras). A GRPO group's G images share
  one sample, so its references travel once. Images are float32 by default
  (no PNG quantisation of what is scored).
* The answer is JSON ``{"scores": [...], "extras": {...}, "encoder_calls": n}``.
  JSON has no NaN or infinity: every non-finite score or extra (NaN, +inf, -inf)
  is ``null``, which the client reads back as NaN, a missing reward (the trainer
  then applies ``advantage.nan_rule``). Errors are JSON ``{"error": "..."}`` with
  status 400 (malformed request), 408 (body not received in time), 413 (body or
  an image over the server's limits), 503 (queue full, waited longer than the
  server's queue time-out, or shutting down; ``Retry-After``) or 500 (the reward
  failed). Every answer the client reads is checked (`parse_answer`).

The client splits a batch into requests of ``batch_size`` images, and further
so that each body fits the server's ``max_body_bytes``; it retries connection
errors, time-outs, 408 and 5xx answers ``retries`` times with exponential
back-off, and fails with one `RefrlError` line naming the URL (a 4xx such as 413
fails at once, with the server's reason).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
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
# A request's header is tensor names, shapes and sample metadata: far less than this.
MAX_HEADER_BYTES = 16 * 2**20
# An answer holds a few numbers per image; anything longer is not from a reward server.
MAX_ANSWER_BYTES = 16 * 2**20
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# The tensors of a request that are images, whose height x width the server's pixel limit bounds.
IMAGE_TENSOR = re.compile(r"images|s\d+\.(ref\d+|target|mask)")


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


def read_header(body: bytes) -> dict[str, Any]:
    """The safetensors header of a request body (each tensor's dtype and shape, ``__metadata__``).

    Reading it first lets the server check image sizes before any tensor is copied.
    """
    if len(body) < 8:
        raise ValueError(f"body of {len(body)} bytes is not safetensors")
    size = int.from_bytes(body[:8], "little")
    if size > len(body) - 8:
        raise ValueError(f"safetensors header of {size} bytes is longer than the body")
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"safetensors header of {size} bytes is over the limit of {MAX_HEADER_BYTES}")
    header = json.loads(body[8 : 8 + size])
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    return header


def image_sizes(header: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, height, width) of every image tensor (images, references, targets, masks) of a request."""
    sizes = []
    for name, entry in header.items():
        if IMAGE_TENSOR.fullmatch(name) and isinstance(entry, dict):
            shape = entry.get("shape")
            if not isinstance(shape, list) or len(shape) < 2 or not all(isinstance(d, int) for d in shape):
                raise ValueError(f"tensor {name!r} has shape {shape!r}, not an image's")
            sizes.append((name, shape[-2], shape[-1]))
    return sizes


def decode_request(body: bytes, as_float32: bool = True) -> tuple[torch.Tensor, list[LoadedSample]]:
    """Inverse of `encode_request`: the images (float32) and one sample per image.

    With ``as_float32=False`` images, references and targets keep the wire's dtype (a
    float16 request then takes half the memory while it waits; `samples_float32`)."""
    header = read_header(body)
    tensors = st_load(body)
    request = json.loads(header["__metadata__"]["request"])
    if "images" not in tensors:
        raise ValueError("request has no 'images' tensor")
    samples = []
    for j, m in enumerate(request["samples"]):
        refs = [_as(tensors[f"s{j}.ref{i}"], as_float32) for i in range(len(m["ref_types"]))]
        extra = dict(m.get("extra", {}))
        prefix = f"s{j}.extra."
        extra.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        target, mask = tensors.get(f"s{j}.target"), tensors.get(f"s{j}.mask")
        samples.append(LoadedSample(id=m["id"], prompt=m["prompt"], ref_images=refs, ref_types=list(m["ref_types"]),
                                    target=None if target is None else _as(target, as_float32), mask=mask,
                                    category=m.get("category"), extra=extra))
    index = request["index"]
    images = _as(tensors["images"], as_float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images have shape {tuple(images.shape)}, not (B, 3, H, W)")
    if images.shape[0] == 0:
        raise ValueError("request has no images")
    if len(index) != images.shape[0]:
        raise ValueError(f"request has {images.shape[0]} images but {len(index)} sample indices")
    return images, [samples[j] for j in index]


def _as(t: torch.Tensor, float32: bool) -> torch.Tensor:
    return t.float() if float32 else t


def samples_float32(samples: Sequence[LoadedSample]) -> list[LoadedSample]:
    """``samples`` with float32 references and targets; each distinct sample converted once (a GRPO
    group's images share their sample, and keep sharing it)."""
    done: dict[int, LoadedSample] = {}
    for s in samples:
        if id(s) not in done:
            done[id(s)] = dataclasses.replace(s, ref_images=[r.float() for r in s.ref_images],
                                              target=None if s.target is None else s.target.float())
    return [done[id(s)] for s in samples]


def to_json_list(t: torch.Tensor) -> list[float | None]:
    """Values for JSON, which has no NaN or infinity: every non-finite value becomes null."""
    return [v if math.isfinite(v) else None for v in t.detach().float().cpu().tolist()]


def from_json_list(values: list[float | None]) -> torch.Tensor:
    """Inverse of `to_json_list`: null is NaN (a missing reward)."""
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)


def _json_scores(values: Any, n: int, what: str, who: str) -> torch.Tensor:
    """`from_json_list` of a list of ``n`` numbers or null; a one-line `RefrlError` for anything else
    (a string such as ``"1111"`` is not four scores)."""
    ok = isinstance(values, list) and len(values) == n and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
    if not ok:
        shown = " ".join(repr(values)[:80].split())
        raise RefrlError(f"{who} answered {what} {type(values).__name__} {shown}; expected a list of {n} numbers "
                         "or null (is it a refrl serve-reward server?)")
    return from_json_list(values)


def parse_answer(answer: Any, n: int, who: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(scores, extras, encoder_calls) of a ``POST /score`` answer for ``n`` images, every field checked."""
    if not isinstance(answer, dict):
        raise RefrlError(f"{who} answered {type(answer).__name__}, not a JSON object with 'scores'")
    scores = _json_scores(answer.get("scores"), n, "scores", who)
    extras = answer.get("extras", {})
    if not isinstance(extras, dict):
        raise RefrlError(f"{who} answered extras of type {type(extras).__name__}, not a JSON object")
    calls = answer.get("encoder_calls", 0)
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 0:
        raise RefrlError(f"{who} answered encoder_calls={str(calls)[:40]!r}, not a count")
    return scores, {str(k): _json_scores(v, n, f"extra {str(k)[:40]!r}", who) for k, v in extras.items()}, calls


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["checkpoint=/models/dino", "batch_size=32"]`` -> options (values parsed as in config overrides)."""
    from refrl.config import parse_override

    options: dict[str, Any] = {}
    for item in items:
        keys, value = parse_override(item)
        options[".".join(keys)] = value
    return options


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
        if not isinstance(info, dict):
            raise RefrlError(f"reward {self.name!r}: {self.url}/info answered {type(info).__name__}, not a JSON "
                             "object; is it a refrl serve-reward server?")
        if info.get("name") != remote_name:
            raise RefrlError(f"reward {self.name!r}: the server at {self.url} serves {info.get('name')!r}, "
                             f"not {remote_name!r}")
        self.needs = tuple(info.get("needs", ()))
        self.max_body_bytes: int | None = (info.get("limits") or {}).get("max_body_bytes")

    def _request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        url = self.url + path
        last, busy = "", False
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=body, method=method,
                                         headers={"Content-Type": "application/octet-stream"} if body else {})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    text = resp.read(MAX_ANSWER_BYTES + 1)
                try:
                    if len(text) > MAX_ANSWER_BYTES:
                        raise ValueError(f"over {MAX_ANSWER_BYTES} bytes")
                    return json.loads(text)
                except ValueError as exc:  # answered, but not by a reward server: retrying will not help
                    raise RefrlError(f"reward {self.name!r}: {url} answered something that is not JSON "
                                     f"({' '.join(str(exc).split())[:100]}); is it a refrl serve-reward server?") from None
            except urllib.error.HTTPError as exc:
                detail = _error_text(exc)
                # 408: the body arrived too slowly, which a retry may not repeat.
                if exc.code < 500 and exc.code != 408:
                    raise RefrlError(f"reward {self.name!r}: {url} refused the request ({exc.code}): {detail}") from None
                busy = exc.code == 503
                last = f"{'server busy' if busy else 'server error'} {exc.code}: {detail}"
            except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, time-out
                reason = getattr(exc, "reason", exc)
                last, busy = ("timed out" if isinstance(reason, TimeoutError) else str(reason)), False
        hint = ("the server stays busy: start it with a larger --max-queue (or --max-connections), or give this "
                "reward more retries/backoff"
                if busy else
                f"is `refrl serve-reward {self.remote_name} --port P` running there? (options: url, timeout, retries)")
        raise RefrlError(f"reward {self.name!r}: {url} failed after {self.retries + 1} tries ({last}); {hint}")

    def _score(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> list[tuple[Any, int]]:
        """(answer, images it scores) for one chunk, split further while its body exceeds the server's limit."""
        body = encode_request(images, samples, self.wire_dtype)
        if self.max_body_bytes is None or len(body) <= self.max_body_bytes:
            return [(self._request("POST", "/score", body), images.shape[0])]
        if images.shape[0] == 1:
            raise RefrlError(
                f"reward {self.name!r}: one image's request is {len(body) / 2**20:.1f} MiB, over the limit of the "
                f"server at {self.url} ({self.max_body_bytes / 2**20:.1f} MiB; refrl serve-reward --max-body-mb)"
            )
        half = images.shape[0] // 2
        return self._score(images[:half], samples[:half]) + self._score(images[half:], samples[half:])

    def __call__(self, images: torch.Tensor, samples: Sequence[LoadedSample]) -> RewardOutput:
        if images.shape[0] != len(samples):
            raise ValueError(f"reward {self.name!r}: {images.shape[0]} images but {len(samples)} samples")
        scores, extras = [], {}
        for i in range(0, images.shape[0], self.batch_size):
            for answer, n in self._score(images[i : i + self.batch_size], samples[i : i + self.batch_size]):
                got, got_extras, calls = parse_answer(answer, n, f"reward {self.name!r}: {self.url}/score")
                scores.append(got)
                for k, v in got_extras.items():
                    extras.setdefault(k, []).append(v)
                self.encoder_calls += calls
        return RewardOutput(scores=torch.cat(scores), extras={k: torch.cat(v) for k, v in extras.items()})


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", ""))[:300]
    except (ValueError, OSError, AttributeError):
        return exc.reason if isinstance(exc.reason, str) else ""
