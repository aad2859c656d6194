"""The reward server under a burst: peak memory, and how soon a normal request is answered.

    python benchmarks/reward_server.py            # prints JSON

Starts ``refrl serve-reward identity --port 0`` (default limits: queue 16, body 64 MiB,
1024x1024 pixels) and scores one 16x16 request to warm it up. Then, twice, sends 16
concurrent requests of one 1024x1024 image and one 1024x1024 subject reference in
float16 (12 MiB each, within every limit) on raw connections, and

* ``give_up``: closes them all once the server has received them (clients that time
  out), then times a normal 16x16 request from that moment;
* ``wait``: keeps them open for ``WAIT_S`` seconds (the server decodes all 16 and
  scores one), then closes them and times a normal request the same way.

The server's resident memory is sampled every 10 ms with psutil: ``peak_rss_mib`` and
its growth over the warm server (``growth_mib``). The figures are quoted in
docs/guides/reliability.md.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import torch

from refrl.data.schema import LoadedSample
from refrl.rewards.zoo.remote import RemoteReward, encode_request

WAIT_S = 20.0
BURST = 16
MIB = 2**20


def normal(size: int, seed: int = 0) -> tuple[torch.Tensor, list[LoadedSample]]:
    g = torch.Generator().manual_seed(seed)
    sample = LoadedSample(id=f"s{seed}", prompt="p", ref_images=[torch.rand(3, size, size, generator=g)],
                          ref_types=["subject"])
    return torch.rand(1, 3, size, size, generator=g), [sample]


def stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/info", timeout=60) as resp:
        return json.loads(resp.read())["stats"]


def wait_for(url: str, condition) -> None:
    deadline = time.monotonic() + 300
    while not condition(stats(url)):
        if time.monotonic() > deadline:
            raise SystemExit(f"the server never got there: {stats(url)}")
        time.sleep(0.02)


def burst(url: str, port: int, proc: psutil.Process, hold_s: float) -> dict:
    body = encode_request(*normal(1024), torch.float16)
    header = (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode())
    base = proc.memory_info().rss
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    socks = []
    for _ in range(BURST):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(header + body)
        socks.append(sock)
    wait_for(url, lambda st: st["admitted"] == BURST)
    time.sleep(hold_s)
    for sock in socks:
        sock.close()
    end = time.monotonic()
    scores = RemoteReward("identity", url, timeout=120, retries=5, backoff=0.25)(*normal(16, seed=1))
    answered = time.monotonic() - end
    wait_for(url, lambda st: st["admitted"] == 0)
    stop.set()
    sampler.join()
    return {"request_mib": round(len(body) / MIB, 1), "normal_answered_after_s": round(answered, 2),
            "normal_score": float(scores.scores[0]), "rss_before_mib": base // MIB, "peak_rss_mib": peak[0] // MIB,
            "growth_mib": (peak[0] - base) // MIB}


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "refrl", "serve-reward", "identity", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        while "serving reward" not in line:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                raise SystemExit("refrl serve-reward did not start")
        url = line.split(" on ")[1].split()[0]
        port = int(url.rsplit(":", 1)[1])
        RemoteReward("identity", url)(*normal(16))
        proc = psutil.Process(server.pid)
        results = {"give_up": burst(url, port, proc, 0.0), "wait": burst(url, port, proc, WAIT_S)}
        results["stats"] = stats(url)
        results["wait_s"] = WAIT_S
        print(json.dumps(results, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
