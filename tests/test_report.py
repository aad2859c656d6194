"""``refrl report``: contents of report.html, the before/after grid, and the page in a real
headless Chromium (loads with no console errors or failed images; the screenshot is not blank).

Chromium comes from the Debian packages: the test installs it with apt-get when it is
missing and it runs as root, and is skipped (saying why) only when that is impossible.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import base64
import io
import json
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refrl.config import dump_config
from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.eval.grid import LABEL_HEIGHT, PAD
from refrl.eval.metrics import build_metrics
from refrl.eval.refworld import refworld_suite
from refrl.eval.report import BEFORE_AFTER_FILE, GRIDS_DIR, before_after_grid, write_report
from refrl.eval.runner import run_eval
from refrl.train.grpo_config import GRPOConfig, RewardSpec

sys.path.insert(0, str(Path(__file__).parent))
from test_eval import MeanColour, make_policy  # noqa: E402

WINDOW = (1200, 2000)
CDP_TIMEOUT_S = 90
BLANK_STD = 10.0  # grey levels; a white page with a little text is well above 0, a blank one is 0
ERROR_LEVELS = ("error",)


# --------------------------------------------------------------------------- a small run folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """config.yaml, metrics.jsonl, eval_before/ and eval_after/ (2 samples, two tiny random
    policies, written by `run_eval`), and an ablation note."""
    run = tmp_path_factory.mktemp("run")
    dump_config(GRPOConfig(iterations=12, rewards=[RewardSpec(name="identity"), RewardSpec(name="layout", weight=0.5)]),
                run / "config.yaml")
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(1, 13):
            f.write(json.dumps({"step": step, "reward/identity": 0.4 + 0.02 * step, "reward/layout": 0.3 + 0.01 * step,
                                "loss": 0.1 / step, "kl": 0.001 * step, "ratio_mean": 1.0, "ratio_max": 1.0 + 0.002 * step,
                                "clipfrac": 0.01, "lr": 5e-5}) + "\n")
    suite = refworld_suite(n=2, seed=3)
    for name, seed in (("eval_before", 0), ("eval_after", 1)):
        metrics = {"mean_colour": MeanColour(), **build_metrics({"psnr_inside": "psnr_inside"})}
        run_eval(make_policy(seed), suite, run / name, metrics=metrics, ckpt=f"policy-{seed}", steps=2, progress=False)
    (run / "ablation.md").write_text("# Ablation\n\n| variant | identity |\n|---|---|\n| gdpo | 0.61 |\n| sum | 0.55 |\n")
    write_report(run)
    return run


def test_before_after_grid_layout_and_order(tmp_path):
    colours = {"ref": 0.2, "sft": 0.4, "rl": 0.6, "target": 0.8}
    samples = [LoadedSample(f"s{i}", "p", [torch.full((3, 32, 32), colours["ref"])] * (i + 2), ["subject"] * (i + 2),
                            target=torch.full((3, 32, 32), colours["target"])) for i in range(2)]
    sft = [torch.full((3, 32, 32), colours["sft"])] * 2
    rl = [torch.full((3, 32, 32), colours["rl"])] * 2
    img = np.asarray(Image.open(before_after_grid(samples, sft, rl, tmp_path / "g.png")))
    cell, cols = 32 * 3, 3 + 3  # widest row: 3 references, SFT, RL, target
    assert img.shape == (2 * (cell + LABEL_HEIGHT + PAD) + PAD, cols * (cell + PAD) + PAD, 3)
    y = PAD + LABEL_HEIGHT + cell // 2  # first row, middle of the images
    row = [int(img[y, PAD + c * (cell + PAD) + cell // 2, 0]) for c in range(5)]
    assert row == [round(255 * v) for v in (0.2, 0.2, 0.4, 0.6, 0.8)]  # refs -> SFT -> RL -> target
    with pytest.raises(ValueError, match="one of each per sample"):
        before_after_grid(samples, sft[:1], rl, tmp_path / "h.png")


def test_report_contents(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "GRPO: 12 iterations" in page and "identity (w=1.0), layout (w=0.5)" in page
    for heading in ("Evaluation: refworld", "Samples", "Training curves", "Ablation", "Configuration"):
        assert f">{heading}</h2>" in page
    before = json.loads((run_dir / "eval_before" / "eval.json").read_text())["metrics"]["overall"]
    after = json.loads((run_dir / "eval_after" / "eval.json").read_text())["metrics"]["overall"]
    for m in ("mean_colour", "psnr_inside"):
        assert f"{before[m]['mean']:.4g} <span class='muted'>(n=2)</span>" in page
        assert f"{after[m]['mean']:.4g} <span class='muted'>(n=2)</span>" in page
        assert f"{after[m]['mean'] - before[m]['mean']:+.3g}</span>" in page
    assert "<td class=\"l\">gdpo</td><td class=\"\">0.61</td>" in page
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) >= 6 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:  # every embedded image decodes
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    assert (run_dir / GRIDS_DIR / BEFORE_AFTER_FILE).is_file()


def test_report_errors(tmp_path):
    with pytest.raises(RefrlError, match="run folder not found"):
        write_report(tmp_path / "missing")
    with pytest.raises(RefrlError, match="nothing to report"):
        write_report(tmp_path)


# --------------------------------------------------------------------------- headless Chromium


def chromium_or_skip() -> str:
    """/usr/bin/chromium, installed from the Debian packages when missing (root only)."""
    path = shutil.which("chromium")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is missing and cannot be installed here (needs root and apt-get: apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        log.append(proc.stderr[-300:])
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip(f"installing chromium with apt-get failed: {' | '.join(log)}")


class CDP:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, chromium: str, user_data_dir: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds() -> None:  # the browser reads commands on fd 3 and answers on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "about:blank"]
        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=child_fds, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + CDP_TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + CDP_TIMEOUT_S
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def console_errors(events: list[dict]) -> list[str]:
    """Uncaught exceptions, console.error/assert calls and browser log errors (failed loads)."""
    out = []
    for ev in events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            out.append(f"exception: {details.get('text')} {details.get('exception', {}).get('description', '')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") in ERROR_LEVELS:
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


def open_in_chromium(page: Path, tmp_path: Path, probe: str) -> tuple[dict, bytes, list[str]]:
    """Load ``page`` in headless Chromium (WINDOW size); returns the JSON value of the ``probe``
    expression, a PNG screenshot and the console / load errors."""
    chromium = chromium_or_skip()
    cdp = CDP(chromium, tmp_path / "profile")
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            cdp.send(method, session=session)
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False}, session=session)
        cdp.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        cdp.wait_for("Page.loadEventFired")
        state = json.loads(cdp.send("Runtime.evaluate", {"expression": f"JSON.stringify({probe})", "returnByValue": True},
                                    session=session)["result"]["value"])
        shot = base64.b64decode(cdp.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
        return state, shot, console_errors(cdp.events)
    finally:
        cdp.close()


def test_report_in_headless_chromium(run_dir, tmp_path):
    state, shot, errors = open_in_chromium(
        run_dir / "report.html", tmp_path,
        "{title: document.title, images: document.images.length,"
        " broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length,"
        " height: document.body.scrollHeight}")
    assert errors == []
    assert state["title"].startswith("refrl report") and state["images"] >= 6 and state["broken"] == 0
    assert state["height"] > WINDOW[1]  # more than one screen of content
    png_path = tmp_path / "report.png"
    png_path.write_bytes(shot)
    pixels = np.asarray(Image.open(png_path).convert("L"), dtype=np.float32)
    assert pixels.shape == (WINDOW[1], WINDOW[0])
    assert pixels.std() > BLANK_STD and (pixels < 200).mean() > 0.01  # text and plots, not a blank page
    shutil.copy(png_path, run_dir / "report_screenshot.png")  # for a person to look at


def test_report_cli(run_dir, tmp_path, monkeypatch):
    from test_eval import _main

    out = tmp_path / "r.html"
    assert _main(monkeypatch, ["report", str(run_dir), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert _main(monkeypatch, ["report", str(tmp_path / "nope")]) == 2
