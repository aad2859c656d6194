"""Evaluation suites and the eval runner: masked metrics, the generation cache / resume,
the OmniRef-Bench layout, the DreamBench protocol and the ``refrl eval`` command."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refrl.data.refworld.vocab import WORDS
from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.eval.dreambench import dreambench_suite
from refrl.eval.metrics import build_metrics, parse_metric_specs, parse_reward_options
from refrl.eval.omniref import (
    load_omniref,
    omniref_suite,
    parse_omniref_rows,
    reference_type_from_path,
)
from refrl.eval.refworld import refine_suite, refworld_suite
from refrl.eval.runner import EVAL_FILE, IMAGES_DIR, META_FILE, SAMPLES_FILE, build_suite, run_eval
from refrl.eval.scoring import MaskedPSNR, psnr, region_mse
from refrl.models.tiny_dit import TinyDiTConfig
from refrl.models.tiny_dit_policy import TinyDiTPolicy
from refrl.models.tokenizer import WordTokenizer
from refrl.rewards.base import RewardOutput

TINY = dict(image_size=32, patch=8, ref_size=16, ref_patch=8, width=32, depth=1, heads=2, mlp_ratio=2, max_refs=8,
            max_text_len=48, prediction="v")
STEPS = 2


def make_policy(seed: int = 0) -> TinyDiTPolicy:
    """Tiny policy with perturbed weights: the zero-initialised head would make every output the noise."""
    torch.manual_seed(seed)
    policy = TinyDiTPolicy(WordTokenizer.from_words(WORDS), TinyDiTConfig(**TINY))
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval()


class MeanColour:
    """Test reward: 1 - mean |channel mean of the output - channel mean of the target|."""

    name = "mean_colour"

    def __call__(self, images, samples):
        vals = [1 - (im.mean((1, 2)) - s.target.mean((1, 2))).abs().mean() if s.target is not None else float("nan")
                for im, s in zip(images, samples, strict=True)]
        return RewardOutput(torch.tensor([float(v) for v in vals]))


class Counting:
    """A policy loader that counts how often it is called."""

    def __init__(self, policy=None):
        self.policy, self.calls = policy, 0

    def __call__(self):
        self.calls += 1
        if self.policy is None:
            raise AssertionError("the policy must not be loaded when every image is cached")
        return self.policy


# --------------------------------------------------------------------------- masked metrics


def test_region_mse_and_psnr_hand_computed():
    image = torch.zeros(3, 2, 2)
    target = torch.zeros(3, 2, 2)
    target[:, 0, 0] = 0.5  # inside: error 0.25 on 3 channels of 1 pixel
    target[:, 1, 1] = 0.1  # outside
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert region_mse(image, target, mask, "inside") == pytest.approx(3 * 0.25 / (3 * 2))
    assert region_mse(image, target, mask, "outside") == pytest.approx(3 * 0.01 / (3 * 2))
    assert psnr(0.01) == pytest.approx(20.0)
    assert psnr(0.0) == 100.0
    assert math.isnan(region_mse(image, target, torch.zeros(1, 2, 2), "inside"))
    with pytest.raises(ValueError, match="allowed: inside, outside"):
        region_mse(image, target, mask, "edge")


def test_masked_psnr_reward_nan_without_mask():
    target = torch.full((3, 4, 4), 0.5)
    mask = torch.zeros(1, 4, 4)
    mask[:, :2] = 1
    with_mask = LoadedSample("a", "", [], [], target=target, mask=mask)
    without = LoadedSample("b", "", [], [], target=target)
    images = torch.stack([torch.full((3, 4, 4), 0.4), torch.full((3, 4, 4), 0.4)])
    out = MaskedPSNR("inside")(images, [with_mask, without])
    assert out.scores[0].item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert math.isnan(out.scores[1].item())


def test_metric_specs_and_options():
    assert parse_metric_specs("identity, subject=dino_seg") == {"identity": "identity", "subject": "dino_seg"}
    with pytest.raises(RefrlError, match="given twice"):
        parse_metric_specs("a,a=b")
    assert parse_reward_options(["subject.ref_type=background", "subject.batch_size=4"], ["subject"]) == {
        "subject": {"ref_type": "background", "batch_size": 4}}
    with pytest.raises(RefrlError, match="metrics: subject"):
        parse_reward_options(["other.k=1"], ["subject"])
    with pytest.raises(RefrlError, match="takes no options"):
        build_metrics({"p": "psnr_inside"}, {"p": {"x": 1}})


# --------------------------------------------------------------------------- runner + cache


def _run(policy, suite, out, **kw):
    metrics = {"mean_colour": MeanColour(), **build_metrics({"psnr_inside": "psnr_inside"})}
    return run_eval(policy, suite, out, metrics=metrics, ckpt="tiny-random", steps=kw.pop("steps", STEPS), cfg_scale=2.0,
                    shift=1.0, batch_size=2, progress=False, **kw)


def test_refworld_eval_writes_results_and_resumes(tmp_path):
    suite = refworld_suite(n=3, seed=5)
    assert [it.sample.id for it in suite.items] == ["test-000000", "test-000001", "test-000002"]
    policy = make_policy()
    res = _run(policy, suite, tmp_path)
    saved = json.loads((tmp_path / EVAL_FILE).read_text())
    assert saved == json.loads(json.dumps(res))
    for key in ("suite", "ckpt", "seed", "n", "sampling", "scored", "metrics"):
        assert key in saved
    assert (saved["suite"], saved["n"], saved["generated"], saved["processes"]) == ("refworld", 3, 3, 1)
    assert saved["sampling"] == {"steps": STEPS, "cfg_scale": 2.0, "shift": 1.0}
    assert saved["scored"] == {"mean_colour": 3, "psnr_inside": saved["metrics"]["overall"]["psnr_inside"]["n"]}
    assert (saved["params"]["data_seed"], saved["seed"]) == (5, 0)  # samples from seed 5, noise from seed 0
    m = saved["metrics"]
    assert set(m) == {"overall", "by_category", "by_n_refs", "by_bucket"}
    assert m["overall"]["n_samples"] == 3 and m["overall"]["mean_colour"]["n"] == 3
    records = [json.loads(line) for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [r["image_id"] for r in records] == [it.image_id for it in suite.items]
    assert [r["noise_index"] for r in records] == [0, 1, 2]
    assert sum(m["by_n_refs"][k]["n_samples"] for k in m["by_n_refs"]) == 3
    expected_mean = float(np.mean([r["mean_colour"] for r in records]))
    assert m["overall"]["mean_colour"]["mean"] == pytest.approx(expected_mean)
    first = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / IMAGES_DIR).glob("*.png")}
    assert len(first) == 3 and (tmp_path / "grid.png").is_file()

    # interrupted: one image missing -> only that one is generated, identical results
    (tmp_path / IMAGES_DIR / "test-000001.png").unlink()
    loader = Counting(policy)
    res2 = _run(loader, suite, tmp_path)
    assert loader.calls == 1 and (res2["generated"], res2["cached"]) == (1, 2)
    assert res2["metrics"] == res["metrics"]
    again = np.asarray(Image.open(tmp_path / IMAGES_DIR / "test-000001.png"))
    assert np.array_equal(again, first["test-000001.png"])
    # everything cached: the policy is not even loaded
    assert _run(Counting(None), suite, tmp_path)["generated"] == 0


def test_eval_refuses_other_settings_unless_forced(tmp_path):
    suite = refworld_suite(n=2, seed=0)
    _run(make_policy(), suite, tmp_path)
    with pytest.raises(RefrlError, match=r"steps: 2 -> 3.*another --out, or --force"):
        _run(Counting(None), suite, tmp_path, steps=3)
    res = _run(make_policy(), suite, tmp_path, steps=3, force=True)
    assert res["generated"] == 2
    assert json.loads((tmp_path / META_FILE).read_text())["steps"] == 3


def test_images_do_not_depend_on_batch_or_suite_size(tmp_path):
    policy = make_policy()
    _run(policy, refworld_suite(n=3, seed=1), tmp_path / "a")
    res = _run(policy, refworld_suite(n=2, seed=1), tmp_path / "b")
    for name in ("test-000000.png", "test-000001.png"):
        a = np.asarray(Image.open(tmp_path / "a" / IMAGES_DIR / name))
        b = np.asarray(Image.open(tmp_path / "b" / IMAGES_DIR / name))
        assert np.array_equal(a, b)
    assert res["n"] == 2


def test_refworld_default_metrics_are_the_embedded_rewards(tmp_path):
    suite = refworld_suite(n=3, seed=0)
    metrics = build_metrics(suite.metrics)
    assert {m: r.name for m, r in metrics.items()} == {
        "identity": "identity", "layout": "layout", "style": "style", "background": "background",
        "fidelity": "fidelity", "patch": "patch"}
    run_eval(make_policy(), suite, tmp_path, metrics=metrics, steps=STEPS, progress=False)
    records = [json.loads(line) for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    for it, rec in zip(suite.items, records, strict=True):
        # not applicable -> NaN in memory, null in the file; never a made-up 0
        assert (rec["style"] is None) == ("style" not in it.sample.ref_types)
        assert rec["identity"] is not None and 0.0 <= rec["fidelity"] <= 1.0


def test_refine_suite_is_only_refine_with_masked_metrics():
    suite = refine_suite(n=4, seed=0, limit=2)
    assert suite.n_samples == 2 and {it.sample.category for it in suite.items} == {"refine"}
    assert set(suite.metrics) == {"patch", "psnr_inside", "psnr_outside"}
    assert all(it.sample.mask is not None for it in suite.items)


# --------------------------------------------------------------------------- OmniRef-Bench


def _png(path: Path, colour: tuple[int, int, int], size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _omniref_tree(root: Path) -> Path:
    rows = [
        {"image": "subject_bg_style/3/0/0.png", "prompt": "A cat in image 1 in the style of image 2 on image 3.",
         "edit_image": ["subject_bg_style/3/0/transfer_subjects/a cat.png", "subject_bg_style/3/0/style/reference.png",
                        "subject_bg_style/3/0/background/background.png"], "index": 0, "category": "subject_bg_style"},
        {"image": "subject_pose/2/0/0.jpeg", "prompt": "A man in image 1 posed like image 2.",
         "edit_image": ["subject_pose/2/0/transfer_subjects/a man.png", "subject_pose/2/0/pose/skeleton/a_man.jpg"],
         "index": 1, "category": "subject_pose"},
    ]
    for i, row in enumerate(rows):
        for j, rel in enumerate(row["edit_image"]):
            _png(root / rel, (40 * j, 200 - 50 * i, 90))
    _png(root / rows[0]["image"], (120, 30, 30))  # the second target is absent
    meta = root / "metadata" / "benchmark.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps(rows))
    return meta


def test_omniref_layout_types_targets_and_errors(tmp_path):
    meta = _omniref_tree(tmp_path)
    assert reference_type_from_path("x/4/1/pose/skeleton/a_b.jpg") == "layout"
    with pytest.raises(RefrlError, match="edit_image_types"):
        reference_type_from_path("x/4/1/misc/a.png")
    samples = load_omniref(meta, root=tmp_path, size=32)
    assert [s.id for s in samples] == ["0", "1"]
    assert samples[0].ref_types == ["subject", "style", "background"]
    assert samples[1].ref_types == ["subject", "layout"]
    assert samples[0].target is not None and samples[0].target.shape == (3, 32, 32)
    assert samples[1].target is None
    with pytest.raises(RefrlError, match="row 0: missing 'edit_image'"):
        parse_omniref_rows([{"prompt": "p"}], "meta.json")
    with pytest.raises(RefrlError, match="not found"):
        load_omniref(meta, root=tmp_path / "nowhere")


def test_omniref_suite_eval_names_images_by_index(tmp_path):
    meta = _omniref_tree(tmp_path / "bench")
    suite = omniref_suite(meta, root=tmp_path / "bench", size=32)
    assert {"subject_dinov2", "subject_clip_i", "background_clip_i", "style_csd", "judge"} == set(suite.metrics)
    from refrl.rewards.zoo import ZOO, option_names, zoo_class

    assert set(suite.metrics.values()) <= set(ZOO)  # every default is a zoo reward, with options it takes
    for metric, opts in suite.reward_options.items():
        assert set(opts) <= option_names(zoo_class(suite.metrics[metric]))
    assert suite.reward_options["background_clip_i"] == {"ref_type": "background"}
    res = run_eval(make_policy(), suite, tmp_path / "out", metrics={"mean_colour": MeanColour()}, steps=STEPS,
                   progress=False)
    assert sorted(p.name for p in (tmp_path / "out" / IMAGES_DIR).iterdir()) == ["0.png", "1.png"]
    assert res["metrics"]["by_category"]["subject_pose"]["mean_colour"]["n"] == 0  # no target: NaN, not 0
    assert set(res["metrics"]["by_n_refs"]) == {"2", "3"}


# --------------------------------------------------------------------------- DreamBench


def _dreambench_tree(root: Path) -> Path:
    data = root / "dataset"
    for subject, colour in (("dog", (200, 120, 40)), ("backpack", (30, 60, 200))):
        for k in range(3):
            _png(data / subject / f"{k:02d}.jpg", tuple(min(255, c + 20 * k) for c in colour), size=48)
    (data / "prompts_and_classes.txt").write_text(
        "subject_name,class\ndog,dog\nbackpack,backpack\n\nObject Prompts\n"
        "'a {0} {1} in the jungle',\n'a {0} {1} in the snow',\n\nLive Subject Prompts\n'a {0} {1} on the beach',\n"
    )
    return root


def test_dreambench_suite_follows_the_protocol(tmp_path):
    root = _dreambench_tree(tmp_path)
    suite = dreambench_suite(root, size=32, condition_refs=2)
    # backpack: 2 object prompts, dog: 1 live prompt; 4 images each
    assert suite.n_samples == 3 and len(suite.items) == 12
    assert [it.noise_index for it in suite.items] == list(range(12))
    assert suite.items[0].image_id == "backpack-00-0" and suite.items[3].image_id == "backpack-00-3"
    first = suite.items[0]
    assert first.sample.n_refs == 2 and first.scored.n_refs == 3  # scored against every real image
    assert first.scored.prompt == "a backpack in the jungle"
    assert set(suite.metrics) == {"dino", "clip_i", "clip_t"}
    limited = dreambench_suite(root, size=32, limit=1, images_per_prompt=2)
    assert len(limited.items) == 2


def test_dreambench_eval_with_tiny_zoo_rewards(tmp_path):
    pytest.importorskip("transformers")
    from refrl.rewards.zoo import build_zoo
    from refrl.rewards.zoo.base import cosine
    from refrl.rewards.zoo.tiny import save_tiny

    suite = dreambench_suite(_dreambench_tree(tmp_path / "db"), size=32, limit=1, images_per_prompt=2)
    metrics = {name: build_zoo(name, **save_tiny(name, tmp_path / name)) for name in ("dino", "clip_t")}
    res = run_eval(make_policy(), suite, tmp_path / "out", metrics=metrics, steps=STEPS, progress=False)
    m = res["metrics"]
    assert res["images_per_sample"] == 2 and m["overall"]["n_samples"] == 2
    assert set(m["by_subject"]) == {"backpack"} and m["by_subject"]["backpack"]["dino"]["n"] == 2
    assert m["overall"]["clip_t"]["n"] == 2
    # DINO of one image = mean cosine to every real subject image (the protocol's pairwise mean)
    rec = json.loads((tmp_path / "out" / SAMPLES_FILE).read_text().splitlines()[0])
    from refrl.data.images import load_image

    dino = metrics["dino"]
    out = dino.embed(load_image(tmp_path / "out" / IMAGES_DIR / f"{rec['image_id']}.png")[None])
    reals = dino.embed(torch.stack(suite.items[0].scored.ref_images))
    expected = cosine(out.expand(reals.shape[0], *out.shape[1:]), reals).mean().item()
    assert rec["dino"] == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- CLI


def _main(monkeypatch, argv: list[str]) -> int:
    from refrl import cli

    monkeypatch.setattr(sys, "argv", ["refrl", *argv])
    try:
        cli.main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_eval_cli_runs_and_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ckpt"
    make_policy().save_pretrained(ckpt)
    out = tmp_path / "eval"
    argv = ["eval", "--ckpt", str(ckpt), "--suite", "refine", "--out", str(out), "--limit", "2",
            "--sampling-steps", "2", "--rewards", "psnr_inside,psnr_outside"]
    assert _main(monkeypatch, argv) == 0
    ev = json.loads((out / EVAL_FILE).read_text())
    assert (ev["suite"], ev["n"], ev["rewards"]) == ("refine", 2, {"psnr_inside": "psnr_inside", "psnr_outside": "psnr_outside"})
    assert ev["metrics"]["by_category"]["refine"]["psnr_inside"]["n"] == 2
    assert _main(monkeypatch, [*argv[:4], "bogus", *argv[5:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown suite 'bogus'; allowed: refworld, manifest, omniref, dreambench, refine")


def test_refworld_split_and_level_choose_the_samples():
    train = build_suite("refworld", n=4, seed=3, split="train", level=0)
    test = build_suite("refworld", n=4, seed=3)
    assert [it.sample.id.split("-")[0] for it in train.items] == ["train"] * 4
    assert (train.params["split"], train.params["level"]) == ("train", 0)
    assert (test.params["split"], test.params["level"]) == ("test", 2)
    assert {it.sample.extra["level"] for it in train.items} == {0}
    train_ids = {s["identity"] for it in train.items for s in it.sample.extra.get("subjects") or []}
    test_ids = {s["identity"] for it in test.items for s in it.sample.extra.get("subjects") or []}
    assert train_ids and test_ids and not train_ids & test_ids  # test identities are unseen
    with pytest.raises(RefrlError, match="allowed: train, val, test"):
        build_suite("refworld", n=2, split="dev")
    with pytest.raises(RefrlError, match="unknown RefWorld level 3; allowed: 0, 1, 2"):
        build_suite("refworld", n=2, level=3)
    with pytest.raises(RefrlError, match="refworld suite only"):
        build_suite("refine", n=2, split="train")


def test_a_corrupt_cached_image_is_generated_again(tmp_path):
    suite = refworld_suite(n=2, seed=0)
    policy = make_policy()
    res = _run(policy, suite, tmp_path)
    path = tmp_path / IMAGES_DIR / suite.items[1].file_name
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # the eval was killed while writing it
    again = _run(policy, suite, tmp_path)
    assert (again["generated"], again["cached"]) == (1, 1)
    assert path.read_bytes() == good and again["metrics"] == res["metrics"]
