"""``refrl compare``: same samples and noise per checkpoint, one grid."""

import subprocess
import sys

import pytest
from PIL import Image

from refrl.errors import RefrlError
from refrl.eval.compare import compare_grid
from refrl.eval.grid import LABEL_HEIGHT, PAD


def test_compare_grid_has_a_row_per_sample_and_a_column_per_checkpoint(tmp_path):
    from refrl.data.refworld import generate

    path = compare_grid(["tiny-sft", "tiny-sft"], tmp_path / "g.png", labels=["before", "after"], n=2, steps=2,
                        level=0, scale=1)
    samples = generate(2, seed=0, split="test", level=0)
    cols = max(len(s.ref_images) for s in samples) + 2 + 1  # references, two checkpoints, target
    width, height = Image.open(path).size
    assert height == 2 * (32 + LABEL_HEIGHT + PAD) + PAD
    assert width == cols * (32 + PAD) + PAD
    # one checkpoint twice with the same noise draws the same image twice
    row = Image.open(path).crop((0, PAD + LABEL_HEIGHT, width, PAD + LABEL_HEIGHT + 32))
    n_refs = len(samples[0].ref_images)
    a = row.crop((PAD + n_refs * (32 + PAD), 0, PAD + n_refs * (32 + PAD) + 32, 32))
    b = row.crop((PAD + (n_refs + 1) * (32 + PAD), 0, PAD + (n_refs + 1) * (32 + PAD) + 32, 32))
    assert a.tobytes() == b.tobytes()


def test_compare_label_count_must_match(tmp_path):
    with pytest.raises(RefrlError, match="2 labels for 1 checkpoints"):
        compare_grid(["tiny-sft"], tmp_path / "g.png", labels=["a", "b"])


def test_compare_cli_error_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "refrl", "compare", "--ckpt", "tiny-sft", "--label", "a", "--label", "b",
                          "--out", str(tmp_path / "g.png")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert [x for x in res.stderr.splitlines() if x.startswith("error:")] == [
        "error: --label: 2 labels for 1 checkpoints; give one per --ckpt or none"]
    assert "Traceback" not in res.stderr and not (tmp_path / "g.png").exists()
