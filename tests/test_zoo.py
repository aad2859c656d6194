"""The reward zoo, offline: tiny random-weight checkpoints built from config in code, loaded through the real
loading code; scores checked for shape, finiteness, determinism, maximal self-similarity and hand-computed values."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards import available, build
from refrl.rewards.zoo import ZOO, zoo_class
from refrl.rewards.zoo.base import IMAGENET_MEAN, IMAGENET_STD, normalize
from refrl.rewards.zoo.tiny import save_tiny

B = 4
SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> build options of a tiny checkpoint (written once per module)."""
    root = tmp_path_factory.mktemp("zoo")
    made: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in made:
            made[name] = save_tiny(name, root / name)
        return dict(made[name])

    return get


def _sample(seed: int, types=("subject", "style"), target: bool = True, prompt: str = "put the red disc at the top left"):
    g = torch.Generator().manual_seed(seed)
    refs = [torch.rand(3, SIZE, SIZE, generator=g) for _ in types]
    masks = [torch.ones(SIZE, SIZE) for _ in types]
    return LoadedSample(id=f"s{seed}", prompt=prompt, ref_images=refs, ref_types=list(types),
                        target=torch.rand(3, SIZE, SIZE, generator=g) if target else None,
                        extra={"reference_masks": masks})


@pytest.fixture(scope="module")
def batch():
    """A group of the same sample (first two) plus a second sample without subject reference or target."""
    a, b = _sample(1), _sample(2, types=("style",), target=False, prompt="a blue star")
    images = torch.stack([a.ref_images[0], a.target, torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)])
    return images, [a, a, a, b]


# name, options on top of the tiny checkpoint's, what the output is compared with ("ref0" = first subject ref)
SIMILARITY = [
    ("dino", {}, "ref0"),
    ("dinov2", {}, "ref0"),
    ("clip_i", {}, "ref0"),
    ("siglip", {}, "target"),
    ("siglip", {"mode": "pooled", "against": "references"}, "ref0"),
    ("siglip2", {}, "target"),
    ("lpips", {}, "target"),
    ("dino_seg", {"segmenter": "mask"}, "ref0"),
    ("dino_seg", {"segment_output": True}, None),
    ("csd", {}, "style"),
]


def _build(tiny, name: str, **extra):
    options = tiny(name)
    if name == "dino_seg" and extra.get("segmenter") == "mask":
        options.pop("segmenter_checkpoint")
    return build("siglip" if name == "siglip2" else name, device="cpu", **options, **extra)


@pytest.mark.parametrize("name,extra,same", SIMILARITY, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SIMILARITY)])
def test_similarity_rewards(tiny, batch, name, extra, same):
    images, samples = batch
    reward = _build(tiny, name, **extra)
    assert reward.needs
    out = reward(images, samples)
    assert out.scores.shape == (B,) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores[:3]).all()
    if reward.against == "target" or reward.ref_type == "subject":
        assert torch.isnan(out.scores[3])  # no target / no subject reference: NaN, never 0
    again = reward(images, samples)
    torch.testing.assert_close(again.scores, out.scores, equal_nan=True, rtol=0, atol=0)
    assert (out.scores[:3] <= 1 + 1e-5).all()
    if same is not None:  # the output identical to what it is compared with scores the maximum, 1
        a = samples[0]
        twin = {"ref0": a.ref_images[0], "target": a.target, "style": a.ref_images[1]}[same]
        got = reward(twin[None], [a]).scores
        assert abs(float(got) - 1.0) < 1e-5, float(got)


def test_reference_side_is_cached_per_group(tiny, batch):
    images, samples = batch
    reward = _build(tiny, "dino")
    reward(images, samples)
    assert reward.encoder_calls == 1  # one subject reference, shared by the three images of the group
    reward(images, samples)
    assert reward.encoder_calls == 1
    seg = _build(tiny, "dino_seg")
    cut_outs = []
    cut_out = seg.cut_out
    seg.cut_out = lambda *args: cut_outs.append(args[1]) or cut_out(*args)
    seg(images, samples)
    seg(images, samples)
    assert seg.encoder_calls == 1 and len(cut_outs) == 1  # the reference is cut out once, with its embedding


def test_dino_is_the_cls_cosine_of_the_loaded_model(tiny, batch):
    from transformers import ViTModel

    images, samples = batch
    options = tiny("dino")
    model = ViTModel.from_pretrained(options["checkpoint"], add_pooling_layer=False).eval()
    with torch.no_grad():
        cls = model(pixel_values=normalize(images, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
        ref = model(pixel_values=normalize(samples[0].ref_images[0][None], IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
    expected = F.cosine_similarity(cls[:3], ref.expand(3, -1))
    got = build("dino", device="cpu", **options)(images, samples).scores
    torch.testing.assert_close(got[:3], expected, rtol=0, atol=1e-6)


def test_clip_t_pickscore_and_hpsv2_agree_with_the_clip_model(tiny, batch):
    from transformers import AutoTokenizer, CLIPModel

    images, samples = batch
    options = tiny("clip_t")
    model = CLIPModel.from_pretrained(options["checkpoint"]).eval()
    tok = AutoTokenizer.from_pretrained(options["checkpoint"])
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=normalize(
            images, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))).pooler_output)
        t = tok([s.prompt for s in samples], padding=True, return_tensors="pt")
        txt = model.text_projection(model.text_model(**t).pooler_output)
    cos = F.cosine_similarity(img, txt)
    clip_t = build("clip_t", device="cpu", **options)
    out = clip_t(images, samples)
    torch.testing.assert_close(out.scores, cos, rtol=0, atol=1e-6)
    assert clip_t.encoder_calls == 2  # two distinct prompts
    pick = build("pickscore", device="cpu", **tiny("pickscore"))(images, samples)
    scale = CLIPModel.from_pretrained(tiny("pickscore")["checkpoint"]).logit_scale.exp().item()
    torch.testing.assert_close(pick.scores, scale * pick.extras["cosine"], rtol=1e-6, atol=1e-6)
    # HPSv2's original open_clip file, converted to transformers names, gives the same model.
    h = tiny("hpsv2")
    hps = build("hpsv2", device="cpu", **h)(images, samples)
    ref = build("clip_t", device="cpu", checkpoint=h["processor"])(images, samples)
    torch.testing.assert_close(hps.scores, ref.scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["image_reward", "hpsv3"])
def test_preference_models_score_and_round_trip(tiny, batch, tmp_path, name):
    images, samples = batch
    reward = build(name, device="cpu", **tiny(name))
    assert reward.needs == ("prompt",)
    out = reward(images, samples)
    assert out.scores.shape == (B,) and torch.isfinite(out.scores).all()
    torch.testing.assert_close(reward(images, samples).scores, out.scores, rtol=0, atol=0)
    if name == "image_reward":
        reward.model.save_pretrained(tmp_path / "rt")
        reward.tokenizer.save_pretrained(tmp_path / "rt")
        again = build(name, device="cpu", checkpoint=str(tmp_path / "rt"))
    else:
        reward.save_pretrained(tmp_path / "rt")
        again = build(name, device="cpu", checkpoint=str(tmp_path / "rt"), pixels=SIZE * SIZE)
    torch.testing.assert_close(again(images, samples).scores, out.scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["lpips", "csd"])
def test_save_pretrained_round_trip(tiny, batch, tmp_path, name):
    images, samples = batch
    reward = build(name, device="cpu", **tiny(name))
    reward.save_pretrained(tmp_path / name)
    # refrl's own weights file goes through its atomic writer: ordinary permissions, not
    # safetensors' 0600 (csd's backbone model.safetensors is transformers' save_pretrained)
    from refrl.rewards.zoo.perceptual import WEIGHTS_FILE
    from refrl.rewards.zoo.style import HEAD_FILE
    from refrl.runfolder.files import default_file_mode

    ours = tmp_path / name / (WEIGHTS_FILE if name == "lpips" else HEAD_FILE)
    assert ours.stat().st_mode & 0o777 == default_file_mode(), oct(ours.stat().st_mode)
    extra = {"size": SIZE} if name == "lpips" else {}
    again = build(name, device="cpu", checkpoint=str(tmp_path / name), **extra)
    torch.testing.assert_close(again(images, samples).scores, reward(images, samples).scores, equal_nan=True,
                               rtol=0, atol=1e-6)


def test_lpips_loads_the_published_file_layouts(tiny, batch, tmp_path):
    """torchvision's AlexNet file (``features.N`` + classifier) and lpips' head file load unchanged."""
    images, samples = batch
    reward = build("lpips", device="cpu", **tiny("lpips"))
    state = reward.model.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
    torch.save(backbone, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, tmp_path / "alex.pth")
    from_files = build("lpips", device="cpu", backbone_weights=str(tmp_path / "alexnet-owt-7be5be79.pth"),
                       lin_weights=str(tmp_path / "alex.pth"), size=SIZE)
    out = from_files(images, samples)
    torch.testing.assert_close(out.scores, reward(images, samples).scores, equal_nan=True, rtol=0, atol=0)
    assert (out.scores[:3] <= 1).all()  # non-negative heads: distance >= 0


def test_dreamsim_wraps_a_model_with_embed(batch):
    from refrl.rewards.zoo.perceptual import DreamSimReward

    class MeanColour(torch.nn.Module):
        def embed(self, x):
            return x.mean(dim=(2, 3)) - 0.5

    images, samples = batch
    reward = DreamSimReward.from_model(MeanColour(), device="cpu")
    out = reward(images, samples)
    resized = F.interpolate(torch.stack([images[0], samples[0].target]), size=(224, 224), mode="bicubic",
                            antialias=True, align_corners=False).clamp(0, 1)
    e = resized.mean(dim=(2, 3)) - 0.5
    assert abs(float(out.scores[0]) - float(F.cosine_similarity(e[:1], e[1:]))) < 1e-6
    assert abs(float(out.scores[1]) - 1.0) < 1e-6 and torch.isnan(out.scores[3])


def test_judge_parses_answers_and_never_invents_scores(tiny, batch):
    from refrl.rewards.zoo.judge import judge_dimensions, parse_judge_answer

    images, samples = batch
    applies = judge_dimensions(samples[0])  # subject + style references
    assert applies["subject"] and applies["style"] and not applies["background"]
    ok = 'Sure. {"subject": 8, "style": 6, "background": -1, "layout": -1, "lighting": -1, "prompt": 7, "quality": 9}'
    assert parse_judge_answer(ok, applies) == {"subject": 8.0, "style": 6.0, "prompt": 7.0, "quality": 9.0}
    assert parse_judge_answer("subject: 8, style = 6, prompt: 7, quality: 9", applies)["style"] == 6.0
    assert parse_judge_answer('{"subject": 8, "style": 6, "prompt": 7}', applies) is None  # quality missing
    assert parse_judge_answer('{"subject": 11, "style": 6, "prompt": 7, "quality": 9}', applies) is None
    assert parse_judge_answer("I cannot rate this image.", applies) is None

    judge = build("vlm_judge", device="cpu", **tiny("vlm_judge"))
    assert judge.needs == ("prompt",)
    out = judge.score_answers([ok, "no idea", ok, '{"style": 4, "prompt": 2, "quality": 3}'], samples)
    assert float(out.scores[0]) == pytest.approx(7.5) and math.isnan(float(out.scores[1]))
    assert float(out.scores[3]) == pytest.approx(3.0)  # sample without subject ref: 3 rated dimensions
    assert float(out.extras["background"][0]) == -1 and math.isnan(float(out.extras["subject"][1]))
    assert out.extras["parsed"].tolist() == [1, 0, 1, 1] and judge.unparseable == 1
    # The tiny random judge answers gibberish: NaN scores, every answer counted as unparseable.
    real = judge(images, samples)
    assert real.scores.shape == (B,) and judge.answers_total == 2 * B
    n_bad = int((real.extras["parsed"] == 0).sum())
    assert judge.unparseable == 1 + n_bad and torch.isnan(real.scores[real.extras["parsed"] == 0]).all()
    assert len(judge.last_answers) == B


def test_qwen_patches_match_the_transformers_image_processor():
    import numpy as np
    from transformers import Qwen2VLImageProcessorPil

    from refrl.rewards.zoo.qwen_vl import QwenImagePrep

    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 32, 48, generator=g) * 255).round() / 255  # sizes already multiples of 16: no resize
    prep = QwenImagePrep(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16, max_pixels=32 * 48)
    ours, grid = prep.patchify(image)
    theirs = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16,
                                      max_pixels=32 * 48)(
        [(image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)], return_tensors="pt")
    assert tuple(theirs["image_grid_thw"][0].tolist()) == grid == (1, 4, 6)
    torch.testing.assert_close(ours, theirs["pixel_values"].float(), rtol=0, atol=1e-5)


MISSING = "refrl-test-org/not-a-real-model"


@pytest.mark.parametrize("name", ["dino", "dinov2", "clip_i", "clip_t", "siglip", "pickscore", "hpsv2",
                                  "image_reward", "hpsv3", "vlm_judge", "dino_seg"])
def test_missing_weights_fail_with_one_line(name):
    with pytest.raises(RefrlError) as err:
        build(name, checkpoint=MISSING, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and MISSING in msg and "checkpoint=/path/to/folder" in msg and "HF_HUB_CACHE" in msg


def test_missing_files_of_non_hub_rewards(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torchvision cache here
    with pytest.raises(RefrlError, match="backbone_weights=.*lin_weights="):
        build("lpips")
    # csd's default weights (a hub id) are not in the cache: the line names them and the command that fetches them
    with pytest.raises(RefrlError, match=r"reward 'csd': weights 'yuxi-liu-wired/CSD' are not available locally "
                                         r"and HF_HUB_OFFLINE is set.*`refrl weights download --config CONFIG`"):
        build("csd")
    with pytest.raises(RefrlError, match="checkpoint=.*nowhere.pth is neither a checkpoint.pth file nor a folder"):
        build("csd", checkpoint=str(tmp_path / "nowhere.pth"))
    with pytest.raises(RefrlError, match="does not exist"):
        build("dino", checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(RefrlError, match="segmenter_checkpoint"):
        build("dino_seg", segmenter_checkpoint=MISSING, checkpoint=tiny("dino_seg")["checkpoint"])
    try:
        import dreamsim  # noqa: F401
    except ImportError:
        with pytest.raises(RefrlError, match="pip install dreamsim"):
            build("dreamsim")


@pytest.mark.slow
def test_registry_lists_every_zoo_reward_without_importing_transformers():
    assert set(ZOO) <= set(available())
    code = ("import sys, refrl.rewards as r; names = r.available(); "
            "assert 'dino' in names and 'hpsv3' in names; assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for name in ZOO:
        cls = zoo_class(name)
        assert cls.name == name


def test_bad_options_name_the_allowed_values(tiny):
    with pytest.raises(RefrlError, match="unknown option.*allowed:.*checkpoint"):
        build("dino", chekpoint="x")
    with pytest.raises(RefrlError, match="against='output'.*references, target"):
        build("dino", against="output", **tiny("dino"))
    with pytest.raises(RefrlError, match="mode='all'"):
        build("siglip", mode="all", **tiny("siglip"))
    with pytest.raises(RefrlError, match="segmenter='sam'"):
        build("dino_seg", segmenter="sam")


def test_grpo_runs_one_iteration_with_zoo_rewards(tiny, tmp_path):
    """The GRPO engine with a mix of zoo rewards (tiny random weights, passed by local path)."""
    from refrl.config import load_config
    from refrl.data.refworld.vocab import WORDS
    from refrl.models.tiny_dit import TinyDiTConfig
    from refrl.models.tiny_dit_policy import TinyDiTPolicy
    from refrl.models.tokenizer import WordTokenizer
    from refrl.train.grpo import train_grpo
    from refrl.train.grpo_config import GRPOConfig, RewardSpec

    torch.manual_seed(0)
    tok = WordTokenizer.from_words(WORDS)
    policy_dir = tmp_path / "policy"
    TinyDiTPolicy(tok, TinyDiTConfig(vocab_size=tok.vocab_size, width=32, depth=1, heads=2, prediction="v")).save_pretrained(policy_dir)
    cfg = load_config(GRPOConfig, "configs/tiny-cpu-grpo.yaml", [
        f"model.init={policy_dir}", "iterations=1", "groups_per_iteration=2", "group_size=2", "minibatch_size=4",
        "gradient_accumulation=1",
        "sampling.steps=3", "data.max_refs=2", "checkpoint_every=1", "validation.every=0",
    ])
    cfg.rewards = [
        RewardSpec(name="dino", weight=1.0, options={**tiny("dino"), "device": "cpu"}),
        RewardSpec(name="siglip", weight=0.5, options={**tiny("siglip"), "device": "cpu"}),
        RewardSpec(name="clip_t", weight=0.5, options={**tiny("clip_t"), "device": "cpu"}),
    ]
    train_grpo(cfg, tmp_path / "run")
    (record,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in ("dino", "siglip", "clip_t"):
        assert math.isfinite(record[f"reward/{name}"]), record
