"""What a reward hands back is checked: a Python reward function's return value, and a
remote reward server's answer. A string such as ``"1111"`` is a sequence, but not four scores."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards.function import FunctionReward
from refrl.rewards.zoo.remote import RemoteReward

SAMPLES = [LoadedSample(id=f"s{i}", prompt="p", ref_images=[torch.zeros(3, 8, 8)], ref_types=["subject"])
           for i in range(4)]
IMAGES = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def returning(value):
    def fixed(images, samples):
        return value

    return FunctionReward(fixed, name="fixed")


@pytest.mark.parametrize(("value", "expected"), [
    ([0.5, None, 2, float("nan")], [0.5, math.nan, 2.0, math.nan]),
    ((1, 2, 3, 4), [1.0, 2.0, 3.0, 4.0]),
    (torch.tensor([0.25, -1.0, 3.0, 0.0], dtype=torch.float64), [0.25, -1.0, 3.0, 0.0]),
    (np.array([1, 2, 3, 4], dtype=np.int64), [1.0, 2.0, 3.0, 4.0]),
    ([np.float32(0.5)] * 4, [0.5] * 4),
])
def test_a_function_returning_scores_is_taken(value, expected):
    out = returning(value)(IMAGES, SAMPLES)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (4,)
    torch.testing.assert_close(out.scores, torch.tensor(expected), equal_nan=True)


@pytest.mark.parametrize(("value", "message"), [
    ("1111", "returned str '1111'; expected one score per sample: a list of 4 floats or None, "
             "or a 1-D tensor/array of length 4"),
    (b"1111", "returned bytes b'1111'; expected one score per sample"),
    ({"a": 1, "b": 2, "c": 3, "d": 4}, "returned dict {'a': 1, 'b': 2, 'c': 3, 'd': 4}; expected one score"),
    (1.0, "returned float 1.0; expected one score per sample"),
    (None, "returned NoneType None; expected one score per sample"),
    (["1", "1", "1", "1"], "returned a score str '1' in list ['1', '1', '1', '1']; expected a float or None"),
    ([True, False, True, True], "returned a score bool True in list [True, False, True, True]; expected a float"),
    ([[1.0]] * 4, "returned a score list [1.0] in list"),
    (torch.ones(4, 1), "returned a Tensor of shape 4x1 and dtype torch.float32; expected one score per sample"),
    (torch.ones(4, dtype=torch.bool), "returned a Tensor of shape 4 and dtype torch.bool; expected"),
    (np.array(["1"] * 4), "returned a ndarray of shape 4 and dtype <U1; expected"),
    (list(range(1000)), "returned 1000 scores for 4 samples; expected one score per sample"),
])
def test_a_function_returning_anything_else_is_one_line_naming_it(value, message):
    with pytest.raises(RefrlError) as e:
        returning(value)(IMAGES, SAMPLES)
    text = str(e.value)
    assert text.startswith("reward 'fixed' returned") and message in text, text
    assert "\n" not in text and len(text) < 300


class _Rogue(BaseHTTPRequestHandler):
    """Says it serves ``rogue`` and answers every POST with ``self.server.answer`` (bytes)."""

    def do_GET(self):
        self._send(json.dumps({"name": "rogue", "needs": [], "protocol": 1}).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send(self.server.answer)

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def rogue():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Rogue)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("answer", "message"), [
    ({"scores": "1111"}, "answered scores str '1111'; expected a list of 4 numbers or null"),
    ({"scores": [1, 2, 3]}, "answered scores list [1, 2, 3]; expected a list of 4 numbers or null"),
    ({"scores": [1, 2, "3", 4]}, "answered scores list [1, 2, '3', 4]; expected a list of 4 numbers"),
    ({"scores": [True, 1, 1, 1]}, "answered scores list [True, 1, 1, 1]; expected"),
    ({"scores": [1, 2, 3, 4], "extras": {"x": "abcd"}}, "answered extra 'x' str 'abcd'; expected a list of 4"),
    ({"scores": [1, 2, 3, 4], "encoder_calls": "2"}, "answered encoder_calls='2', not a count"),
    (["1111"], "answered list, not a JSON object with 'scores'"),
    ("not json", "answered something that is not JSON"),
])
def test_a_remote_answer_that_is_not_scores_is_one_line(rogue, answer, message):
    rogue.answer = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
    client = RemoteReward("rogue", f"http://127.0.0.1:{rogue.server_address[1]}", retries=0)
    with pytest.raises(RefrlError) as e:
        client(IMAGES, SAMPLES)
    text = str(e.value)
    assert text.startswith("reward 'remote:rogue': http://127.0.0.1:") and message in text, text
    assert "\n" not in text


def test_a_remote_answer_of_scores_and_nulls_is_taken(rogue):
    rogue.answer = json.dumps({"scores": [1, None, 0.5, -2], "extras": {"x": [0, 0, 0, None]},
                               "encoder_calls": 3}).encode()
    client = RemoteReward("rogue", f"http://127.0.0.1:{rogue.server_address[1]}", retries=0)
    out = client(IMAGES, SAMPLES)
    torch.testing.assert_close(out.scores, torch.tensor([1.0, math.nan, 0.5, -2.0]), equal_nan=True)
    torch.testing.assert_close(out.extras["x"], torch.tensor([0.0, 0.0, 0.0, math.nan]), equal_nan=True)
    assert client.encoder_calls == 3
