"""``refrl report RUN1 RUN2 ...``: several runs in one page (curves against rollouts, evaluations
side by side), its pure parts against hand values, its errors through the CLI, and the page in a
real headless Chromium."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refrl.config import dump_config
from refrl.errors import RefrlError
from refrl.eval.overlay import (
    OVERLAY_FILE,
    TRAINED_MEAN_KEY,
    rollouts_per_iteration,
    run_labels,
    seconds_per_iteration,
    trained_reward_mean,
    write_overlay_report,
)
from refrl.eval.plots import moving_average
from refrl.train.grpo_config import GRPOConfig, RewardSpec

sys.path.insert(0, str(Path(__file__).parent))
from test_report import open_in_chromium, run_dir  # noqa: E402,F401,F811


@pytest.fixture(scope="module")
def runs(run_dir, tmp_path_factory) -> list[Path]:  # noqa: F811
    """The GRPO run of test_report and an NFT run with a different batch (2 x 4 rollouts per
    iteration), its own metrics and a copy of the first run's after-evaluation."""
    nft = tmp_path_factory.mktemp("cmp") / "nft"
    nft.mkdir()
    dump_config(GRPOConfig(objective="nft", iterations=6, groups_per_iteration=2, group_size=4, minibatch_size=8, sampling={"sde_steps": "none"},
                           rewards=[RewardSpec(name="identity")]), nft / "config.yaml")
    with (nft / "metrics.jsonl").open("w") as f:
        for step in range(1, 7):
            f.write(json.dumps({"step": step, "reward/identity": 0.5 + 0.05 * step, "loss": 0.2,
                                "seconds/rollout": 1.0, "seconds/reward": 0.5, "seconds/train": 1.25 * step}) + "\n")
    shutil.copytree(run_dir / "eval_after", nft / "eval")
    return [run_dir, nft]


def test_moving_average_and_summaries_by_hand():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([1.0, 2.0, 6.0], 5) == [1.0, 1.5, 3.0]
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)
    assert rollouts_per_iteration({"groups_per_iteration": 8, "group_size": 8}) == 64
    assert rollouts_per_iteration({"steps": 100, "batch_size": 16}) is None  # an SFT run
    rec = {"reward/identity": 0.2, "reward/layout": 0.6, "reward/style": float("nan"), "reward/other": 9.0}
    assert trained_reward_mean(rec, ["identity", "layout", "style"]) == pytest.approx(0.4)  # NaN left out
    assert trained_reward_mean(rec, ["missing"]) is None
    timing = [{"seconds/rollout": 1.0, "seconds/reward": 0.5, "seconds/train": t} for t in (1.0, 2.0, 10.0)]
    assert seconds_per_iteration(timing) == 3.5  # median of 2.5, 3.5, 11.5
    assert seconds_per_iteration([{"step": 1}]) is None


def test_run_labels_are_unique_paths_below_the_common_parent(tmp_path):
    a, b = tmp_path / "x" / "s1", tmp_path / "y" / "s1"
    assert list(run_labels([a, b])) == ["x/s1", "y/s1"]
    with pytest.raises(RefrlError, match="the same run folder is given twice"):
        run_labels([a, tmp_path / "x" / ".." / "x" / "s1"])


def test_overlay_contents(runs):
    out = write_overlay_report(runs, smooth=3)
    assert out == Path(os.path.commonpath([p.resolve() for p in runs])) / OVERLAY_FILE
    page = out.read_text()
    grpo_label, nft_label = run_labels(runs)
    assert "GRPO: 12 iterations" in page and "NFT: 6 iterations of 2 prompts x 4 samples" in page
    # rollouts in all: 12 iterations x 8 x 8 (GRPOConfig defaults) and 6 x 2 x 4
    cfg = GRPOConfig()
    assert f"<td class=\"\">{12 * cfg.groups_per_iteration * cfg.group_size}</td>" in page
    assert "<td class=\"\">48</td>" in page
    assert "<td class=\"\">5.875</td>" in page  # NFT median s/iteration: 1 + 0.5 + median(1.25 x (1..6))
    assert ">Training curves</h2>" in page and ">Evaluation: refworld</h2>" in page
    for label in (f"{grpo_label}/eval_before", f"{grpo_label}/eval_after", f"{nft_label}/eval"):
        assert label in page
    after = json.loads((runs[0] / "eval_after" / "eval.json").read_text())["metrics"]["overall"]
    before = json.loads((runs[0] / "eval_before" / "eval.json").read_text())["metrics"]["overall"]
    # change column: the last evaluation (the NFT run's copy of eval_after) minus the first
    assert f"{after['mean_colour']['mean'] - before['mean_colour']['mean']:+.3g}</span>" in page
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) == 1
    img = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert img.size[0] > 600  # three columns of panels: trained mean, identity, layout


def test_overlay_curves_are_against_rollouts_with_the_trained_mean_first(runs, monkeypatch):
    from refrl.eval import plots

    seen = {}

    def spy(series, keys, x_label, smooth=1, title=None):
        seen.update(series=series, keys=keys, x_label=x_label, smooth=smooth)
        return None

    monkeypatch.setattr(plots, "overlay_curves_png", spy)
    write_overlay_report(runs, smooth=4)
    cfg = GRPOConfig()
    assert seen["keys"] == [TRAINED_MEAN_KEY, "reward/identity", "reward/layout"] and seen["smooth"] == 4
    assert seen["x_label"].startswith("rollouts")
    grpo, nft = seen["series"].values()
    assert [x for x, _ in nft] == [8 * s for s in range(1, 7)]
    assert grpo[0][0] == cfg.groups_per_iteration * cfg.group_size
    # GRPO trains identity (w 1) and layout (w 0.5): the plain mean of the two at step 1
    assert grpo[0][1][TRAINED_MEAN_KEY] == pytest.approx((0.42 + 0.31) / 2)
    assert nft[2][1][TRAINED_MEAN_KEY] == pytest.approx(0.65)


def test_overlay_errors(runs, tmp_path):
    with pytest.raises(RefrlError, match="at least two run folders"):
        write_overlay_report(runs[:1])
    with pytest.raises(RefrlError, match="run folder not found"):
        write_overlay_report([runs[0], tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefrlError, match="no metrics.jsonl and no eval.json"):
        write_overlay_report([runs[0], tmp_path / "empty"])
    with pytest.raises(RefrlError, match="smooth must be >= 1"):
        write_overlay_report(runs, smooth=0)


def _refrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def test_overlay_cli(runs, tmp_path):
    out = tmp_path / "o.html"
    res = _refrl("report", *map(str, runs), "--out", str(out), "--smooth", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {out}" and out.read_text().startswith("<!DOCTYPE html>")
    # one error through the command (the others are the same RefrlError path: test_overlay_errors)
    res = _refrl("report", str(runs[0]), str(tmp_path / "nope"), cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "run folder not found" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_overlay_in_headless_chromium(runs, tmp_path):
    page_path = write_overlay_report(runs, tmp_path / "overlay.html")
    state, shot, errors = open_in_chromium(
        page_path, tmp_path,
        "{title: document.title, images: document.images.length,"
        " broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length,"
        " rows: document.querySelectorAll('table tr').length}")
    assert errors == []
    assert state["title"] == "refrl report: 2 runs" and state["images"] == 1 and state["broken"] == 0
    assert state["rows"] >= 3 + 4  # runs table (header + 2) and the evaluation tables
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), dtype=np.float32)
    assert pixels.std() > 10.0 and (pixels < 200).mean() > 0.01  # text and plots, not a blank page
