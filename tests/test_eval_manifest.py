"""The ``manifest`` suite: ``refrl eval --suite manifest --data FILE.jsonl`` on any valid manifest,
with embedded, remote and plain-function rewards; NaN where a reward does not apply; one error
line for a missing image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from refrl.data.images import load_image
from refrl.errors import RefrlError
from refrl.eval.config import eval_command
from refrl.eval.manifest_suite import manifest_suite
from refrl.eval.runner import EVAL_FILE, IMAGES_DIR, SAMPLES_FILE

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CATEGORY = {"p1": "portrait", "p2": "styled", "p3": "styled", "p4": None}


def refrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=300)


def write_manifest(folder: Path, missing: str | None = None) -> Path:
    """A user's manifest (no RefWorld ground truth): 4 samples, 1-2 references, targets on two,
    a style reference on one, categories on three."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (64, 64), (20, 180, 40)).save(folder / "green.png")
    Image.new("RGB", (32, 32), (30, 30, 220)).save(folder / "blue.png")
    lines = [
        {"id": "p1", "prompt": "a red thing", "references": [{"image": "red.png", "type": "subject"}],
         "target": "red.png"},
        {"id": "p2", "prompt": "a red thing in the style of image 2",
         "references": [{"image": "red.png", "type": "subject"}, {"image": "green.png", "type": "style"}]},
        {"id": "p3", "prompt": "a red thing on a blue background",
         "references": [{"image": missing or "red.png", "type": "subject"}, {"image": "blue.png", "type": "background"}],
         "target": "blue.png"},
        {"id": "p4", "prompt": "something blue", "references": [{"image": "blue.png", "type": "subject"}]},
    ]
    for line in lines:
        if CATEGORY[line["id"]] is not None:
            line["category"] = CATEGORY[line["id"]]
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_manifest_eval_through_the_cli_buckets_counts_caches_and_reports(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    assert refrl("data", "validate", str(manifest), cwd=tmp_path).returncode == 0
    args = ["eval", "--ckpt", "tiny-sft", "--suite", "manifest", "--data", str(manifest), "--out", "ev",
            "--sampling-steps", "2", "--batch-size", "3", "--rewards", "style,fidelity,psnr_outside"]
    res = refrl(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    ev = json.loads((tmp_path / "ev" / EVAL_FILE).read_text())
    assert (ev["suite"], ev["n"], ev["n_images"], ev["generated"]) == ("manifest", 4, 4, 4)
    assert ev["sampling"] == {"steps": 2, "cfg_scale": 2.0, "shift": 1.0}  # the tiny DiT's guidance and shift
    # style needs a style reference (p2), fidelity a target (p1, p3), psnr_outside a target and a mask (none)
    assert ev["scored"] == {"style": 1, "fidelity": 2, "psnr_outside": 0}
    assert "style " in res.stdout and "(1/4 scored)" in res.stdout and "psnr_outside - (0/4 scored)" in res.stdout
    m = ev["metrics"]
    assert set(m["by_category"]) == {"portrait", "styled", "(none)"}
    assert m["by_category"]["styled"]["n_samples"] == 2 and m["by_category"]["styled"]["fidelity"]["n"] == 1
    assert {k: v["n_samples"] for k, v in m["by_n_refs"].items()} == {"1": 2, "2": 2}
    assert m["by_bucket"]["1-2"]["n_samples"] == 4
    records = [json.loads(line) for line in (tmp_path / "ev" / SAMPLES_FILE).read_text().splitlines()]
    assert [r["image_id"] for r in records] == ["p1", "p2", "p3", "p4"]
    assert [r["style"] is None for r in records] == [True, False, True, True]  # NaN, written as null
    assert [r["noise_index"] for r in records] == [0, 1, 2, 3]

    again = refrl(*args, cwd=tmp_path)  # cached: nothing generated, the same numbers
    assert again.returncode == 0 and "(0 generated)" in again.stdout
    assert json.loads((tmp_path / "ev" / EVAL_FILE).read_text())["metrics"] == m
    rep = refrl("report", "ev", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-2000:]
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "manifest" in html and "portrait" in html


@pytest.mark.parametrize("broken", ["missing", "corrupt"])
def test_a_missing_or_broken_image_is_one_error_line_and_no_eval_json(tmp_path, broken):
    data = tmp_path / "data"
    name = "gone.png" if broken == "missing" else "bad.png"
    manifest = write_manifest(data, missing=name)
    if broken == "corrupt":
        (data / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    res = refrl("eval", "--ckpt", "tiny-sft", "--suite", "manifest", "--data", str(manifest), "--out", "ev",
                "--sampling-steps", "1", cwd=tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "eval.jsonl:3:" in errors[0] and name in errors[0]  # the manifest line and the file
    assert not (tmp_path / "ev" / EVAL_FILE).exists() and not (tmp_path / "ev" / IMAGES_DIR).exists()


def test_plain_functions_and_reward_objects_from_python(tmp_path):
    manifest = write_manifest(tmp_path / "data")

    def brightness_where_target(images, samples):
        return [float(im.mean()) if s.target is not None else None for im, s in zip(images, samples, strict=True)]

    import refrl

    res = refrl.eval_command("tiny-sft", "manifest", tmp_path / "ev", data=str(manifest), sampling={"steps": 2},
                             rewards=[brightness_where_target, "style"], batch_size=4)
    assert res["rewards"] == {"style": "style", "brightness_where_target": "python:FunctionReward"}
    assert res["scored"] == {"style": 1, "brightness_where_target": 2}
    # the mean over the two samples with a target, computed by hand from the written PNGs
    by_hand = [float(load_image(tmp_path / "ev" / IMAGES_DIR / f"{i}.png").mean()) for i in ("p1", "p3")]
    overall = res["metrics"]["overall"]["brightness_where_target"]
    assert overall["mean"] == pytest.approx(sum(by_hand) / 2, abs=1e-6) and overall["n"] == 2
    with pytest.raises(RefrlError, match="given twice"):
        eval_command("tiny-sft", "manifest", tmp_path / "ev2", data=str(manifest), rewards=["style", _named("style")])


def _named(name):
    def fn(images, samples):
        return [1.0] * len(samples)

    fn.__name__ = name
    return fn


def test_a_remote_reward_scores_as_the_local_one(tmp_path):
    """``remote:NAME`` through a reward server on 127.0.0.1 gives the embedded reward's numbers."""
    from refrl.rewards import build
    from refrl.rewards.zoo.serve import RewardServer

    manifest = write_manifest(tmp_path / "data")
    server = RewardServer(build("style"), "127.0.0.1", 0).start()
    try:
        res = eval_command("tiny-sft", "manifest", tmp_path / "ev", data=str(manifest), sampling={"steps": 1},
                           rewards=["style", "served=remote:style"], reward_options={"served": {"url": server.url}})
    finally:
        server.stop()
    records = [json.loads(line) for line in (tmp_path / "ev" / SAMPLES_FILE).read_text().splitlines()]
    for r in records:
        assert (r["served"] is None) == (r["style"] is None)
        if r["style"] is not None:
            assert r["served"] == pytest.approx(r["style"], abs=1e-3)  # float16 on the wire
    assert res["scored"]["served"] == res["scored"]["style"] == 1


def test_suite_items_follow_the_manifest_and_limit(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    suite = manifest_suite(manifest, limit=3, size=32)
    assert [it.image_id for it in suite.items] == ["p1", "p2", "p3"] and suite.n_samples == 3
    assert [it.noise_index for it in suite.items] == [0, 1, 2]
    s = suite.items[0].sample
    assert s.ref_images[0].shape == (3, 32, 32) and s.target is not None and s.category == "portrait"
    torch.testing.assert_close(s.ref_images[0][:, 10, 10], torch.tensor([200, 30, 30]) / 255.0, atol=1e-3, rtol=0)
    assert suite.params["manifest"] == str(manifest.resolve()) and len(suite.params["manifest_sha256"]) == 64
    with pytest.raises(RefrlError, match="needs --data"):
        from refrl.eval.runner import build_suite

        build_suite("manifest")
