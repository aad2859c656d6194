"""The reward server's limits, queue and batching, on a real uvicorn server on 127.0.0.1.

Nothing here is timed: a test that waits for the server polls a condition and
fails only if it is never reached.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save as st_save

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import RewardOutput
from refrl.rewards.zoo.remote import RemoteReward, encode_request
from refrl.rewards.zoo.serve import RewardServer, ServerLimits


class MeanDiff:
    """-mean |image - first reference| per image; records each call's batch size. ``gate`` holds calls."""

    name, needs = "meandiff", ()

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.entered, self.batch_sizes, self.encoder_calls = gate, threading.Event(), [], 0

    def __call__(self, images, samples):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        self.batch_sizes.append(images.shape[0])
        if any(s.prompt == "poison" for s in samples):
            raise RuntimeError("poisoned sample")
        self.encoder_calls += 1
        scores = torch.stack([-(im - s.ref_images[0]).abs().mean() for im, s in zip(images, samples, strict=True)])
        return RewardOutput(scores=scores, extras={"double": 2 * scores})


def sample(seed: int, size: int = 16, prompt: str = "p") -> LoadedSample:
    g = torch.Generator().manual_seed(seed)
    return LoadedSample(id=f"s{seed}", prompt=prompt, ref_images=[torch.rand(3, size, size, generator=g)],
                        ref_types=["subject"])


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def serve():
    servers = []

    def start(reward, **limits) -> RewardServer:
        server = RewardServer(reward, "127.0.0.1", 0, ServerLimits(**limits)).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(autouse=True)
def no_tracebacks(caplog):
    """Whatever a client sends, the server's log gets no traceback."""
    caplog.set_level(logging.WARNING)
    yield
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Traceback" not in caplog.text


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def post(server: RewardServer, body: bytes) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of POST /score."""
    req = urllib.request.Request(server.url + "/score", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def raw(server: RewardServer, data: bytes) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def strict_json(text: bytes):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------- body and pixel limits


def test_declared_body_over_limit_is_413_before_reading(serve):
    reward = MeanDiff()
    server = serve(reward, max_body_bytes=1000)
    answer = raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"over this server's limit of 1000 bytes (refrl serve-reward --max-body-mb)" in answer
    assert server.stats.peak_held_bytes == 0 and server.stats.peak_admitted == 0 and reward.batch_sizes == []


def test_streamed_body_over_limit_is_413_while_counting(serve):
    """A chunked body (no Content-Length) of 1 MiB against a 100 kB limit: refused once the count passes it."""
    reward = MeanDiff()
    server = serve(reward, max_body_bytes=100_000, idle_timeout=0.2)
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    # No `Connection: close`: uvicorn reads and drops the rest of the body, so the client sees the answer.
    answer = raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + chunk * 64 + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"--max-body-mb" in answer
    # What the app held: the limit plus what uvicorn had read at once (its 64 KiB buffer, one 256 KiB read).
    assert 100_000 < server.stats.peak_held_bytes <= 100_000 + 320 * 1024 < 2**20
    assert reward.batch_sizes == [] and server.stats.admitted == 0 and server.stats.held_bytes == 0


def test_client_splits_requests_to_fit_the_body_limit(serve):
    one = len(encode_request(images(1), [sample(0)]))
    reward = MeanDiff()
    server = serve(reward, max_body_bytes=3 * one)
    client = RemoteReward("meandiff", server.url)
    assert client.max_body_bytes == 3 * one
    samples = [sample(i) for i in range(8)]
    out = client(images(8), samples)
    torch.testing.assert_close(out.scores, MeanDiff()(images(8), samples).scores, rtol=0, atol=0)
    assert server.requests_scored >= 4 and server.stats.rejected == {}  # 8 images in requests of <= 2

    small = serve(MeanDiff(), max_body_bytes=one // 2)
    with pytest.raises(RefrlError, match=r"one image's request is .* MiB, over the limit .*--max-body-mb") as e:
        RemoteReward("meandiff", small.url)(images(1), [sample(0)])
    assert "\n" not in str(e.value)


def test_pixel_limit_is_413_for_images_and_references(serve):
    reward = MeanDiff()
    server = serve(reward, max_pixels=15 * 15)
    status, answer, _ = post(server, encode_request(images(2), [sample(0), sample(1)]))
    assert status == 413
    assert answer["error"].endswith("16x16 = 256 pixels, over this server's limit of 225 per image "
                                    "(refrl serve-reward --max-pixels)")
    status, answer, _ = post(server, encode_request(images(1, size=8), [sample(0, size=64)]))
    assert status == 413 and answer["error"].startswith("s0.ref0 is 64x64 = 4096 pixels")
    assert reward.batch_sizes == [] and server.stats.rejected == {413: 2}

    client = RemoteReward("meandiff", server.url, retries=3, backoff=0.01)
    with pytest.raises(RefrlError, match=r"refused the request \(413\): .*--max-pixels") as e:
        client(images(1), [sample(0)])
    assert "\n" not in str(e.value) and server.stats.rejected == {413: 3}  # a 413 is not retried
    out = client(images(1, size=15), [sample(0, size=15)])  # at the limit is fine
    assert out.scores.shape == (1,)


# --------------------------------------------------------------------------- malformed requests


def test_malformed_content_length_is_400_and_the_server_goes_on(serve):
    server = serve(MeanDiff())
    answer = raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert RemoteReward("meandiff", server.url).name == "remote:meandiff"


@pytest.mark.parametrize("case", ["bad json", "no images", "not safetensors", "empty", "wrong index"])
def test_malformed_request_is_400(serve, case):
    reward = MeanDiff()
    server = serve(reward)
    body = {
        "bad json": st_save({"images": images(1)}, metadata={"request": "{not json"}),
        "no images": st_save({"x": images(1)}, metadata={"request": json.dumps({"index": [], "samples": []})}),
        "not safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00 not a header at all",
        "empty": b"",
        "wrong index": st_save({"images": images(2)}, metadata={"request": json.dumps({"index": [0], "samples": [
            {"id": "a", "prompt": "p", "ref_types": []}]})}),
    }[case]
    status, answer, _ = post(server, body)
    assert status == 400 and ("malformed request" in answer["error"] or "empty body" in answer["error"])
    assert "\n" not in answer["error"] and reward.batch_sizes == []


def test_unknown_endpoint_is_a_json_error(serve):
    server = serve(MeanDiff())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/nope", timeout=60)
    assert e.value.code == 404 and "endpoints: GET /info, POST /score" in json.loads(e.value.read())["error"]


# --------------------------------------------------------------------------- time-outs and connections


def test_idle_and_half_sent_connections_are_closed(serve):
    server = serve(MeanDiff(), idle_timeout=0.2)
    assert raw(server, b"") == b""  # connected, sent nothing
    assert raw(server, b"POST /score HTTP/1.1\r\nHost:") == b""  # headers never completed
    kept = raw(server, b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")  # a keep-alive request, then idle
    assert kept.startswith(b"HTTP/1.1 200 ") and b'"name":"meandiff"' in kept


def test_slow_body_is_408_and_frees_its_place(serve):
    server = serve(MeanDiff(), read_timeout=0.2, idle_timeout=60)
    answer = raw(server, b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100\r\n\r\n"
                 + b"x" * 10)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"--read-timeout" in answer
    assert server.stats.admitted == 0 and server.stats.held_bytes == 0


def test_connections_over_the_limit_get_503(serve):
    server = serve(MeanDiff(), max_connections=2, idle_timeout=60)
    idle = [socket.create_connection((server.host, server.port)) for _ in range(2)]
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + "/info", timeout=60)
        assert e.value.code == 503
    finally:
        for sock in idle:
            sock.close()

    def info_ok() -> bool:
        try:
            return urllib.request.urlopen(server.url + "/info", timeout=60).status == 200
        except urllib.error.HTTPError:
            return False

    wait_for(info_ok, "the server serves again once the idle connections are gone")


# --------------------------------------------------------------------------- non-finite scores


class FirstPixel:
    """Scores each image by its first pixel, so NaN/inf pixels give NaN/inf scores."""

    name, needs = "firstpixel", ()

    def __call__(self, images, samples):
        return RewardOutput(scores=images[:, 0, 0, 0].clone(), extras={"neg": -images[:, 0, 0, 0]})


def test_non_finite_scores_are_null_on_the_wire_and_nan_in_the_client(serve):
    server = serve(FirstPixel())
    x = images(4)
    x[:, 0, 0, 0] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5])
    req = urllib.request.Request(server.url + "/score", data=encode_request(x, [sample(0)] * 4), method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer = strict_json(resp.read())  # no NaN / Infinity tokens
    assert answer["scores"] == [None, None, None, 0.5] and answer["extras"]["neg"] == [None, None, None, -0.5]
    out = RemoteReward("firstpixel", server.url)(x, [sample(0)] * 4)
    assert torch.isnan(out.scores[:3]).all() and float(out.scores[3]) == 0.5
    assert torch.isnan(out.extras["neg"][:3]).all()


# --------------------------------------------------------------------------- queue and batching


def test_full_queue_is_503_and_the_client_says_so(serve):
    gate = threading.Event()
    reward = MeanDiff(gate)
    server = serve(reward, max_queue=2)
    client = RemoteReward("meandiff", server.url, retries=1, backoff=0.01)  # /info is never queued
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(post, server, encode_request(images(1, seed=i), [sample(i)])) for i in range(2)]
        wait_for(lambda: server.stats.admitted == 2, "two requests admitted")
        status, answer, headers = post(server, encode_request(images(1), [sample(0)]))
        assert status == 503 and headers["retry-after"] == "1" and "--max-queue" in answer["error"]
        with pytest.raises(RefrlError, match=r"failed after 2 tries \(server busy 503: .*a larger --max-queue") as e:
            client(images(1), [sample(0)])
        assert "\n" not in str(e.value)
        gate.set()
        assert [f.result()[0] for f in held] == [200, 200]
    assert server.stats.peak_admitted == 2 and server.stats.rejected == {503: 3}


def test_waiting_requests_of_one_size_are_scored_as_one_batch(serve):
    gate = threading.Event()
    reward = MeanDiff(gate)
    server = serve(reward, max_batch=2)
    requests = {"a": (images(1, seed=1), [sample(1)]), "b": (images(1, seed=2), [sample(2)]),
                "c": (images(1, seed=3), [sample(3)]), "d": (images(1, 24, seed=4), [sample(4, 24)]),
                "e": (images(1, seed=5), [sample(5)])}
    with ThreadPoolExecutor(5) as pool:
        futures = {"a": pool.submit(post, server, encode_request(*requests["a"]))}
        wait_for(reward.entered.is_set, "a is being scored")
        for n, key in enumerate("bcde", start=1):  # one at a time, so that the queue's order is known
            futures[key] = pool.submit(post, server, encode_request(*requests[key]))
            wait_for(lambda n=n: len(server._pending) == n, f"{key} queued")
        gate.set()
        answers = {k: f.result() for k, f in futures.items()}
    # a alone (it was being scored); b+c joined; d has another size; e would make the batch 3 > max_batch.
    assert reward.batch_sizes == [1, 2, 1, 1]
    assert server.stats.batches == 4 and server.requests_scored == 5
    for key, (x, s) in requests.items():
        status, answer, _ = answers[key]
        assert status == 200 and answer["scores"] == MeanDiff()(x, s).scores.tolist()
    assert sum(a[1]["encoder_calls"] for a in answers.values()) == 4  # per batch, carried by its first request


def test_a_failing_request_does_not_fail_its_batch(serve):
    gate = threading.Event()
    reward = MeanDiff(gate)
    server = serve(reward)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, server, encode_request(images(1), [sample(0)]))
        wait_for(reward.entered.is_set, "the first request is being scored")
        bad = pool.submit(post, server, encode_request(images(1), [sample(1, prompt="poison")]))
        wait_for(lambda: len(server._pending) == 1, "the bad request queued")
        good = pool.submit(post, server, encode_request(images(1, seed=2), [sample(2)]))
        wait_for(lambda: len(server._pending) == 2, "the good request queued")
        gate.set()
        assert first.result()[0] == 200
        status, answer, _ = bad.result()
        assert status == 500 and answer["error"] == "RuntimeError: poisoned sample"
        status, answer, _ = good.result()
        assert status == 200 and answer["scores"] == MeanDiff()(images(1, seed=2), [sample(2)]).scores.tolist()
    assert reward.batch_sizes == [1, 2, 1, 1]  # the joined batch failed, then each alone


def test_load_50_requests_8_at_a_time_equals_serial_and_stays_bounded(serve):
    """Concurrent clients against a queue smaller than their number: same scores, bounded held work."""
    reward = MeanDiff()
    server = serve(reward, max_queue=4)
    jobs = []
    for i in range(50):  # two image sizes, 1-4 images, GRPO-like repeated samples
        n, size = 1 + i % 4, (16, 24)[i % 2]
        s = sample(i, size)
        jobs.append((images(n, size, seed=i), [s] * n))
    biggest = max(len(encode_request(x, s)) for x, s in jobs)

    def score(job):
        client = RemoteReward("meandiff", server.url, retries=10, backoff=0.005)
        return client(*job).scores

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(score, jobs))
    assert server.stats.peak_admitted <= 4 and server.stats.peak_held_bytes <= 4 * biggest
    serial = [score(job) for job in jobs]
    for a, b, job in zip(concurrent, serial, jobs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, MeanDiff()(*job).scores, rtol=0, atol=0)
    assert server.requests_scored == 100 and server.stats.batches <= 100
    assert server.stats.admitted == 0 and server.stats.held_bytes == 0 and not server._pending


# --------------------------------------------------------------------------- the command


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max-queue", "0", "--max-queue must be a number > 0, got 0"),
    ("--max-body-mb", "nan", "--max-body-mb must be a number > 0, got nan"),
])
def test_cli_refuses_a_bad_limit_in_one_line(option, value, message):
    res = subprocess.run([sys.executable, "-m", "refrl", "serve-reward", "dino", option, value],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines == [f"error: serve-reward: {message}"]


# --------------------------------------------------------------------------- queue time-out, cancelling


def test_a_request_waits_at_most_queue_timeout_then_503(serve):
    gate = threading.Event()
    reward = MeanDiff(gate)
    server = serve(reward, queue_timeout=0.3)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, server, encode_request(images(1), [sample(0)]))
        wait_for(reward.entered.is_set, "the first request is being scored")
        status, answer, headers = post(server, encode_request(images(1, seed=1), [sample(1)]))
        assert status == 503 and headers["retry-after"] == "1"
        assert answer["error"] == ("server busy: the request waited 0.3 s in the queue "
                                   "(refrl serve-reward --queue-timeout); retry later")
        gate.set()
        assert first.result()[0] == 200  # scoring had started: it is not timed out
    assert server.stats.expired == 1 and server.stats.rejected == {503: 1} and not server._pending
    assert server.info()["stats"]["expired"] == 1 and server.info()["limits"]["queue_timeout"] == 0.3


def test_zero_images_and_a_deep_header_are_400(serve):
    reward = MeanDiff()
    server = serve(reward)
    zero = st_save({"images": images(1)[:0]}, metadata={"request": json.dumps({"index": [], "samples": []})})
    depth = 100_000
    deep = len(b"[" * depth + b"]" * depth).to_bytes(8, "little") + b"[" * depth + b"]" * depth
    for body, message in ((zero, "request has no images"), (deep, "RecursionError")):
        status, answer, _ = post(server, body)
        assert status == 400 and message in answer["error"] and "\n" not in answer["error"]
    assert reward.batch_sizes == [] and server.stats.rejected == {400: 2}


def test_a_cancelled_call_stops_at_its_next_line():
    import asyncio

    from refrl.rewards.zoo.serve_cancel import CancellableRun, ScoringCancelled

    progress, started = [], threading.Event()

    def loop_for_ever():
        started.set()
        while True:  # Python between short C calls: stopped at the next instruction boundary
            progress.append(1)
            time.sleep(0.001)

    def swallow_everything():
        try:
            loop_for_ever()
        except Exception:  # a reward's broad except does not catch the cancel
            return "swallowed"

    async def main():
        loop = asyncio.get_running_loop()
        for fn in (loop_for_ever, swallow_everything):
            run = CancellableRun(fn, loop).start()
            while not started.is_set():
                await asyncio.sleep(0.001)
            run.cancel()
            with pytest.raises(ScoringCancelled):
                await run.result
            while run.running:
                await asyncio.sleep(0.001)
            count = len(progress)
            await asyncio.sleep(0.05)
            assert len(progress) == count  # the thread really stopped
            started.clear()
        assert await CancellableRun(lambda: 42, loop).start().result == 42
        failing = CancellableRun(lambda: 1 / 0, loop).start()
        with pytest.raises(ZeroDivisionError):
            await failing.result

    asyncio.run(main())
