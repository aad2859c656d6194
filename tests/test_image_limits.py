"""Image memory: the pixel limit (ours and Pillow's), and the reduction of large images when loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refrl.data import images
from refrl.data.images import load_image, load_mask, reduce_factor

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def refrl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, cwd=cwd,
                          env={**ENV, **(env or {})}, timeout=300)


@pytest.fixture(scope="module")
def giant(tmp_path_factory) -> Path:
    """A 14000x14000 one-bit PNG (196 M pixels, past Pillow's own 179 M-pixel refusal; a few KB on disk)."""
    d = tmp_path_factory.mktemp("giant")
    Image.new("1", (14000, 14000)).save(d / "giant.png")
    line = {"id": "g", "prompt": "p", "references": [{"image": "giant.png", "type": "subject"}]}
    (d / "giant.jsonl").write_text(json.dumps(line) + "\n")
    return d


def test_the_default_limit_refuses_past_pillows_guard_in_one_line(giant):
    res = refrl("data", "validate", "giant.jsonl", cwd=giant)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "196,000,000 pixels exceed the limit of 50,000,000 pixels (set REFRL_MAX_IMAGE_PIXELS" in res.stdout + \
        res.stderr
    assert "DecompressionBomb" not in res.stdout + res.stderr


def test_refrl_max_image_pixels_raises_pillows_guard_too(giant):
    """Pillow refuses over 2 x 89.5 M pixels by itself; the variable must lift that as well."""
    res = refrl("data", "validate", "giant.jsonl", cwd=giant, env={"REFRL_MAX_IMAGE_PIXELS": "200000000"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "DecompressionBomb" not in res.stderr


def test_reduce_factor_is_the_smallest_that_fits():
    assert reduce_factor(4096, 4096) == 1
    assert reduce_factor(4097, 4096) == 2
    assert reduce_factor(7071, 7071) == 2  # the largest square the default allows: 3536 x 3536
    assert reduce_factor(30, 20, 100) == 3  # 10 x 7 = 70 <= 100; by 2: 15 x 10 = 150
    for w, h, limit in [(8660, 5773, 4096**2), (14000, 14000, 4096**2), (31, 17, 50), (1, 10**6, 1000)]:
        f = reduce_factor(w, h, limit)
        assert -(-w // f) * -(-h // f) <= limit
        assert f == 1 or -(-w // (f - 1)) * -(-h // (f - 1)) > limit


def test_a_large_image_is_reduced_by_box_averages(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_LOADED_PIXELS", 100)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(21, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (3, 7, 10) and out.dtype == torch.float32  # reduced by 3
    block = pixels[3:6, 6:9].reshape(-1, 3).mean(0) / 255  # output pixel (1, 2): a 3x3 box average
    torch.testing.assert_close(out[:, 1, 2], torch.tensor(block, dtype=torch.float32), atol=1 / 255, rtol=0)
    small = np.array(Image.fromarray(pixels[:10, :10], "RGB"))
    Image.fromarray(small, "RGB").save(tmp_path / "b.png")  # 100 pixels: at the limit, kept exactly
    assert torch.equal(load_image(tmp_path / "b.png"), torch.from_numpy(small).permute(2, 0, 1).float() / 255)


def test_a_large_mask_stays_binary_and_a_palette_image_keeps_its_colours(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_LOADED_PIXELS", 100)
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[:, 13:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    m = load_mask(tmp_path / "m.png")
    assert m.shape == (1, 7, 10) and set(m.unique().tolist()) == {0.0, 1.0}
    pal = Image.new("P", (30, 20))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 30, 10))  # top half colour 1 (blue), bottom colour 0 (red)
    pal.save(tmp_path / "p.png")
    p = load_image(tmp_path / "p.png")
    assert p.shape == (3, 7, 10)
    torch.testing.assert_close(p[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(p[:, -1, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_LOADED_PIXELS", 64 * 64)
    Image.new("RGB", (512, 256), (30, 120, 200)).save(tmp_path / "a.jpg", quality=95)
    out = load_image(tmp_path / "a.jpg")
    assert out.shape[1:] == (43, 86)  # 512x256 reduced by 6, as a PNG would be (decoded at 1/4, then boxed)
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor([30, 120, 200]) / 255, atol=3 / 255, rtol=0)
