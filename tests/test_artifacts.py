"""The dot-grid metric: hand-computed cases, and the metric through `refrl eval`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from refrl.eval.artifacts import patch_grid_share


def test_a_tiled_patch_is_all_grid_and_a_constant_image_none():
    g = torch.Generator().manual_seed(0)
    tile = torch.rand(3, 4, 4, generator=g)
    tiled = tile.repeat(1, 8, 8)[None]
    flat = torch.full((1, 3, 32, 32), 0.3)
    assert patch_grid_share(tiled).item() == pytest.approx(1.0, abs=1e-6)
    assert patch_grid_share(flat).item() == 0.0


def test_a_smooth_image_has_no_grid_and_a_mix_splits_by_power():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = torch.cos(2 * torch.pi * xx / 32)  # one cycle per image: bin (0, 1)
    grid = torch.cos(2 * torch.pi * xx / 4)  # period 4: bin (0, 8), a harmonic
    assert patch_grid_share(smooth.expand(1, 1, 32, 32)).item() == pytest.approx(0.0, abs=1e-9)
    # equal amplitudes -> equal power on and off the harmonics
    assert patch_grid_share((smooth + grid).expand(1, 1, 32, 32)).item() == pytest.approx(0.5, abs=1e-6)
    # amplitude 2 on the grid -> power 4 : 1
    assert patch_grid_share((smooth + 2 * grid).expand(1, 1, 32, 32)).item() == pytest.approx(0.8, abs=1e-6)


def test_white_noise_scores_the_share_of_harmonic_bins():
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = (4 * 4 - 1) / (32 * 32 - 1)  # 15 harmonic bins of 1023
    assert patch_grid_share(noise).mean().item() == pytest.approx(expected, rel=0.1)


def test_a_size_that_is_no_multiple_of_the_period_is_refused():
    with pytest.raises(ValueError, match="multiple of the period 4"):
        patch_grid_share(torch.zeros(1, 3, 30, 30))


def test_eval_reports_patch_grid(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ev"
    r = subprocess.run([sys.executable, "-m", "refrl", "eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--n", "4",
                        "--sampling-steps", "2", "--rewards", "layout,patch_grid", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    overall = json.loads((out / "eval.json").read_text())["metrics"]["overall"]
    assert set(overall) >= {"layout", "patch_grid"}
    assert 0.0 < overall["patch_grid"]["mean"] < 1.0
