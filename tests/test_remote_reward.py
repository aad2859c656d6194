"""Remote rewards: a real HTTP server on 127.0.0.1, the client's batching, retries, time-outs and errors.

The server's limits, batching and load test are in test_reward_server.py.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.base import RewardOutput
from refrl.rewards.zoo import build_zoo
from refrl.rewards.zoo.remote import RemoteReward, decode_request, encode_request
from refrl.rewards.zoo.serve import RewardServer
from refrl.rewards.zoo.tiny import save_tiny


class MeanDiff:
    """A small exact reward: -mean |image - first subject reference|, NaN without one; counts calls."""

    name = "meandiff"
    needs = ("references:subject",)

    def __init__(self, fail_first: int = 0, delay: float = 0.0):
        self.calls, self.fail_first, self.delay, self.encoder_calls = 0, fail_first, delay, 0

    def __call__(self, images, samples):
        self.calls += 1
        time.sleep(self.delay)
        if self.calls <= self.fail_first:
            raise RuntimeError("transient failure")
        scores = torch.full((images.shape[0],), float("nan"))
        for b, s in enumerate(samples):
            refs = s.refs_of_type("subject")
            if refs:
                scores[b] = -(images[b] - refs[0][1]).abs().mean()
                self.encoder_calls += 1
        return RewardOutput(scores=scores, extras={"double": 2 * scores})


def _sample(seed: int, with_subject: bool = True) -> LoadedSample:
    g = torch.Generator().manual_seed(seed)
    refs = [torch.rand(3, 16, 16, generator=g)]
    types = ["subject" if with_subject else "style"]
    return LoadedSample(id=f"s{seed}", prompt=f"prompt {seed}", ref_images=refs, ref_types=types,
                        target=torch.rand(3, 16, 16, generator=g), mask=torch.ones(1, 16, 16), category="subject",
                        extra={"boxes": [[0, 0, 4, 4]], "subject_masks": torch.zeros(1, 16, 16, dtype=torch.bool),
                               "not_sent": object()})


@pytest.fixture
def serve():
    servers = []

    def start(reward) -> RewardServer:
        server = RewardServer(reward, "127.0.0.1", 0).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wire_round_trip_keeps_values_and_shares_samples():
    a, b = _sample(1), _sample(2)
    images = torch.rand(3, 3, 16, 16)
    body = encode_request(images, [a, a, b])
    got_images, got = decode_request(body)
    assert torch.equal(got_images, images)
    assert got[0] is got[1] and got[0] is not got[2]  # a group's sample travels once
    assert torch.equal(got[2].ref_images[0], b.ref_images[0]) and torch.equal(got[2].target, b.target)
    assert got[0].prompt == "prompt 1" and got[0].ref_types == ["subject"] and got[0].category == "subject"
    assert got[0].extra["boxes"] == [[0, 0, 4, 4]] and got[0].extra["subject_masks"].dtype == torch.bool
    assert "not_sent" not in got[0].extra


def test_remote_scores_equal_local_with_batching_and_nan(serve):
    reward = MeanDiff()
    server = serve(reward)
    client = RemoteReward("meandiff", server.url, batch_size=2)
    assert client.name == "remote:meandiff" and client.needs == ("references:subject",)
    samples = [_sample(1), _sample(1), _sample(2, with_subject=False), _sample(3), _sample(3)]
    images = torch.rand(5, 3, 16, 16)
    out = client(images, samples)
    local = MeanDiff()(images, samples)
    assert server.requests_scored == 3  # 5 images in requests of 2
    torch.testing.assert_close(out.scores, local.scores, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(out.scores[2]) and torch.isnan(out.extras["double"][2])
    torch.testing.assert_close(out.extras["double"], 2 * local.scores, equal_nan=True)
    assert client.encoder_calls == 4


def test_retries_after_server_errors_then_succeeds(serve):
    reward = MeanDiff(fail_first=2)
    client = RemoteReward("meandiff", serve(reward).url, retries=2, backoff=0.01)
    out = client(torch.rand(1, 3, 16, 16), [_sample(1)])
    assert reward.calls == 3 and torch.isfinite(out.scores).all()


def test_server_error_after_all_retries_is_one_line(serve):
    client = RemoteReward("meandiff", serve(MeanDiff(fail_first=99)).url, retries=1, backoff=0.01)
    with pytest.raises(RefrlError, match=r"failed after 2 tries \(server error 500: RuntimeError: transient failure\)") as e:
        client(torch.rand(1, 3, 16, 16), [_sample(1)])
    assert "\n" not in str(e.value)


def test_timeout_is_reported(serve):
    client = RemoteReward("meandiff", serve(MeanDiff(delay=1.0)).url, timeout=0.2, retries=0)
    with pytest.raises(RefrlError, match="timed out"):
        client(torch.rand(1, 3, 16, 16), [_sample(1)])


def test_unreachable_server_is_a_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(RefrlError) as e:
        RemoteReward("hpsv3", url, retries=1, backoff=0.01, timeout=2)
    msg = str(e.value)
    assert url in msg and "refrl serve-reward hpsv3" in msg and "\n" not in msg


def test_wrong_reward_name_and_bad_options(serve):
    url = serve(MeanDiff()).url
    with pytest.raises(RefrlError, match="serves 'meandiff', not 'dino'"):
        RemoteReward("dino", url)
    with pytest.raises(RefrlError, match="must start with http"):
        RemoteReward("meandiff", "127.0.0.1:1")
    with pytest.raises(RefrlError, match="wire_dtype"):
        RemoteReward("meandiff", url, wire_dtype="int8")


def test_build_remote_through_zoo_and_bad_request(serve):
    server = serve(MeanDiff())
    client = build_zoo("remote:meandiff", url=server.url, wire_dtype="float16")
    assert isinstance(client, RemoteReward) and client.wire_dtype == torch.float16
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server.url + "/score", data=b"not safetensors", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 400 and b"malformed request" in e.value.read()


@pytest.mark.slow
def test_zoo_reward_served_by_the_cli(tmp_path: Path):
    """`refrl serve-reward dino checkpoint=... --port 0` in a subprocess, scored through `remote:dino`."""
    options = save_tiny("dino", tmp_path / "dino")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "refrl", "serve-reward", "dino", f"checkpoint={options['checkpoint']}",
                             "device=cpu", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        line = ""
        deadline = time.time() + 120
        while "serving reward" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "serving reward 'dino'" in line, line
        url = line.split(" on ")[1].split()[0]
        client = RemoteReward("dino", url)
        samples = [_sample(1), _sample(2)]
        images = torch.stack([samples[0].ref_images[0], torch.rand(3, 16, 16)])
        remote = client(images, samples)
        local = build_zoo("dino", device="cpu", **options)(images, samples)
        torch.testing.assert_close(remote.scores, local.scores, rtol=0, atol=1e-6)
        assert abs(float(remote.scores[0]) - 1.0) < 1e-5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
