"""RefWorld: determinism, categories, splits, ground truth, prompts, disk round trip."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from refrl.data.refworld import (
    CATEGORIES,
    COMPOSITION_EXTRAS,
    WORDS,
    RefWorld,
    attach_masks,
    decode_identity,
    generate,
    generate_refworld_to_disk,
    identity_split,
    write_preview_grid,
)
from refrl.data.refworld.effects import apply_style, light_gain, style_chart
from refrl.data.refworld.identities import PATTERNS, SHAPES, identity_pools
from refrl.data.refworld.placement import LEVEL_SIZE_WORDS, box_side, boxes_overlap
from refrl.data.refworld.render import box_coords, pattern_mask, shape_mask
from refrl.data.refworld.vocab import BACKGROUND_COLOURS, NEUTRAL_GREY, cell_name, prompt_words
from refrl.errors import RefrlError

GREY_Q = round(NEUTRAL_GREY * 255) / 255  # the grey canvas after 8-bit quantisation


def _q(rgb) -> torch.Tensor:
    return torch.tensor([round(c * 255) / 255 for c in rgb], dtype=torch.float32)


def _same(a, b) -> bool:
    return (
        a.id == b.id and a.prompt == b.prompt and a.ref_types == b.ref_types and a.category == b.category
        and all(torch.equal(x, y) for x, y in zip(a.ref_images, b.ref_images, strict=True))
        and torch.equal(a.target, b.target) and torch.equal(a.mask, b.mask)
        and torch.equal(a.extra["subject_masks"], b.extra["subject_masks"])
    )  # fmt: skip


# ----------------------------------------------------------------- pure drawing math


def test_shape_and_pattern_masks_hand_computed():
    u, v = box_coords((0, 0, 4, 4))
    assert np.allclose(u.ravel(), [-0.75, -0.25, 0.25, 0.75]) and np.allclose(v.ravel(), u.ravel())
    # |u| + |v| <= 1 leaves out only the 4 corners of a 4x4 box.
    assert shape_mask("diamond", u, v).sum() == 12
    u8, v8 = box_coords((3, 5, 11, 13))
    assert shape_mask("square", u8, v8).all()  # all pixel centres within 0.9 of the centre
    # Horizontal stripes on an 8 px box: 1 px bands, primary colour first.
    stripes = pattern_mask("stripes_h", u8, v8)
    assert stripes.shape == (8, 8) and stripes[:, 0].tolist() == [False, True] * 4 and (stripes == stripes[:, :1]).all()
    assert not pattern_mask("solid", u8, v8).any()
    for shape in SHAPES:
        m = shape_mask(shape, u8, v8)
        assert 10 < m.sum() <= 64, shape


def test_style_transforms_hand_computed():
    px = np.asarray([[[0.1, 0.2, 0.3]]], dtype=np.float32)
    assert np.allclose(apply_style(px, "invert"), [0.9, 0.8, 0.7])
    assert np.allclose(apply_style(px, "channel_swap"), [0.3, 0.1, 0.2])
    assert np.allclose(apply_style(px, "posterize"), [0.0, 0.0, 0.5])
    red = np.asarray([[[1.0, 0.0, 0.0]]], dtype=np.float32)
    assert np.allclose(apply_style(red, "grayscale"), [0.299] * 3)
    assert np.allclose(apply_style(red, "sepia"), [0.393, 0.349, 0.272])
    with pytest.raises(ValueError, match="allowed: warm"):
        apply_style(px, "vaporwave")


def test_light_gain_rises_towards_the_light():
    gain = light_gain(32, "east")[..., 0]
    assert gain[:, 0] == pytest.approx(0.55, abs=1e-5) and gain[:, -1] == pytest.approx(1.25, abs=1e-5)
    north = light_gain(32, "north")[..., 0]
    assert north[0, 5] > north[-1, 5]


# ------------------------------------------------------------------------ determinism


def test_same_seed_identical_different_seed_differs():
    a, b = generate(6, seed=3), generate(6, seed=3)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert [x.extra["subjects"] for x in a] == [y.extra["subjects"] for y in b]
    c = generate(6, seed=4)
    assert any(not torch.equal(x.target, y.target) for x, y in zip(a, c, strict=True))
    # Sample i depends only on (seed, i): regenerate it alone.
    alone = RefWorld().generate(1, seed=3, start=4)[0]
    assert _same(alone, a[4])


def test_val_and_test_splits_do_not_replay_train_draws():
    train, val = generate(4, seed=0, split="train"), generate(4, seed=0, split="val")
    assert all(t.prompt != v.prompt or not torch.equal(t.target, v.target) for t, v in zip(train, val, strict=True))


# ------------------------------------------------------------------------- categories


@pytest.mark.parametrize("category", CATEGORIES)
def test_category_reference_types_and_indices(category):
    for s in RefWorld(categories=[category]).generate(6, seed=11):
        assert s.category == category and 1 <= s.n_refs <= 7
        types = Counter(s.ref_types)
        truth = s.extra
        if category == "refine":
            assert s.ref_types == ["draft", "subject"] and truth["draft_ref"] == 0 and truth["subjects"][0]["ref"] == 1
        elif category == "edit":
            assert s.ref_types == ["source"] and truth["source_ref"] == 0 and truth["subjects"][0]["ref"] is None
        else:
            extras = COMPOSITION_EXTRAS[category]
            assert 1 <= types.pop("subject") <= 3 and types == Counter(extras)
            assert sorted(sub["ref"] for sub in truth["subjects"]) == [i for i, t in enumerate(s.ref_types) if t == "subject"]
            for name, key in (("background", "background"), ("style", "style"), ("lighting", "lighting")):
                entry = truth[key]
                if name in extras:
                    assert s.ref_types[entry["ref"]] == name
                else:
                    assert entry is None or entry.get("ref") is None
            assert (truth["layout_ref"] is not None) == ("layout" in extras)
        assert len(truth["subjects"]) == truth["subject_masks"].shape[0]


def test_max_refs_drops_subjects_and_filters_categories():
    for s in RefWorld(categories=["subject_all"], max_refs=5).generate(8, seed=1):
        assert s.n_refs == 5 and s.ref_types.count("subject") == 1
    world = RefWorld(max_refs=3)
    assert "subject_all" not in world.categories and "subject_style_bg" in world.categories
    assert max(s.n_refs for s in world.generate(40, seed=2)) <= 3
    seen = Counter(s.n_refs for s in RefWorld().generate(150, seed=5))
    assert set(seen) == set(range(1, 8))  # every count 1..7 occurs
    with pytest.raises(RefrlError, match="'subject_all' needs at least 5 references but max_refs=3"):
        RefWorld(categories=["subject_all"], max_refs=3)


def test_bad_arguments_name_the_allowed_values():
    with pytest.raises(RefrlError, match=r"unknown RefWorld category 'sky'.*allowed: subject, "):
        RefWorld(categories=["sky"])
    with pytest.raises(RefrlError, match="allowed: train, val, test"):
        RefWorld(split="dev")
    with pytest.raises(RefrlError, match="allowed: 0, 1, 2"):
        RefWorld(level=5)
    with pytest.raises(RefrlError, match="max_refs must be in 1..7"):
        RefWorld(max_refs=0)


# --------------------------------------------------------------------------- splits


def test_identity_split_is_disjoint_and_level0_keeps_plenty():
    pools = {split: identity_pools(split) for split in ("train", "val", "test")}
    ids = {split: set(np.concatenate(list(p.values())).tolist()) for split, p in pools.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    # Level 0 draws solids only: both train and test keep many, across many shapes.
    train_solid, test_solid = pools["train"]["solid"], pools["test"]["solid"]
    assert len(train_solid) >= 40 and len(test_solid) >= 8
    assert len({decode_identity(int(i)).shape for i in test_solid}) >= 5


def test_test_identities_never_appear_in_train_samples():
    def identities(split, level):
        return {sub["identity"] for s in RefWorld(split=split, level=level).generate(120, seed=9)
                for sub in s.extra["subjects"]}  # fmt: skip

    for level in (0, 1):
        train, test = identities("train", level), identities("test", level)
        assert train and test and not train & test
        assert {identity_split(i) for i in train} == {"train"} and {identity_split(i) for i in test} == {"test"}


# ---------------------------------------------------------------------- ground truth


def test_boxes_masks_and_plain_background_pixels():
    for s in RefWorld(categories=["subject", "subject_layout"], level=1).generate(30, seed=21):
        size = s.extra["size"]
        boxes = [sub["box"] for sub in s.extra["subjects"]]
        for i, (sub, mask) in enumerate(zip(s.extra["subjects"], s.extra["subject_masks"], strict=True)):
            x0, y0, x1, y1 = sub["box"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert x1 - x0 == y1 - y0 == box_side(sub["size_word"], size)
            inside = torch.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert mask.any() and not (mask & ~inside).any()
            for other in boxes[i + 1 :]:
                assert not boxes_overlap(tuple(sub["box"]), tuple(other))
        union = s.extra["subject_masks"].any(0)
        assert torch.equal(s.mask[0] > 0, union)
        bg = _q(BACKGROUND_COLOURS[s.extra["background"]["name"]])
        assert torch.equal(s.target[:, ~union], bg[:, None].expand(3, int((~union).sum())))


def test_layout_reference_draws_the_target_boxes():
    for s in RefWorld(categories=["subject_layout"]).generate(5, seed=2):
        layout = s.ref_images[s.extra["layout_ref"]]
        for sub in s.extra["subjects"]:
            x0, y0, x1, y1 = sub["box"]
            assert layout[:, y0, x0:x1].sum(0).min() > 0 and layout[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].sum() == 0


def test_subject_reference_on_grey_with_varying_scale_and_offset():
    sides, offsets = set(), set()
    for s in RefWorld(categories=["subject"]).generate(25, seed=8):
        for sub in s.extra["subjects"]:
            ref = s.ref_images[sub["ref"]]
            x0, y0, x1, y1 = sub["ref_box"]
            outside = torch.ones(ref.shape[1:], dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert torch.all(ref[:, outside] == GREY_Q)
            assert (ref[:, y0:y1, x0:x1] != GREY_Q).any(0).float().mean() > 0.3
            assert 0.45 * 32 - 1 <= x1 - x0 <= 0.8 * 32 + 1
            sides.add(x1 - x0)
            offsets.add((x0, y0))
    assert len(sides) >= 5 and len(offsets) >= 10


def test_style_reference_is_the_fixed_chart_transformed():
    for s in RefWorld(categories=["subject_style"]).generate(4, seed=6):
        style = s.extra["style"]
        expected = np.round(apply_style(style_chart(32), style["name"]) * 255) / 255
        assert torch.allclose(s.ref_images[style["ref"]], torch.from_numpy(expected).permute(2, 0, 1).float())


def test_refine_draft_differs_only_in_mask():
    for s in RefWorld(categories=["refine"], level=1).generate(6, seed=4):
        draft = s.ref_images[0]
        changed = (draft != s.target).any(0)
        assert changed.any() and not (changed & (s.mask[0] == 0)).any()
        assert not (s.extra["subject_masks"][0] & (s.mask[0] == 0)).any()


def test_edit_changes_what_the_instruction_says():
    ops = Counter()
    for s in RefWorld(categories=["edit"]).generate(24, seed=7):
        edit, sub = s.extra["edit"], s.extra["subjects"][0]
        ops[edit["op"]] += 1
        if edit["op"] == "move":
            assert edit["source_cell"] != sub["cell"] and edit["source_size_word"] == sub["size_word"]
        elif edit["op"] == "resize":
            assert edit["source_size_word"] != sub["size_word"] and edit["source_cell"] == sub["cell"]
        else:
            assert edit["source_background"] != s.extra["background"]["name"]
            assert s.extra["background"]["name"] in s.prompt
        assert not torch.equal(s.ref_images[0], s.target)
    assert set(ops) == {"move", "resize", "background"}


def test_level0_is_solid_large_and_plain():
    for s in RefWorld(level=0).generate(40, seed=13):
        for sub in s.extra["subjects"]:
            assert PATTERNS[decode_identity(sub["identity"]).pattern] == "solid"
            assert sub["size_word"] in LEVEL_SIZE_WORDS[0]
        assert s.extra["background"]["kind"] == "plain"


# ------------------------------------------------------------------------------ prompts


def test_prompt_words_in_vocab_and_every_image_named():
    vocab = set(WORDS)
    assert all(w == w.lower() for w in WORDS)
    for s in RefWorld().generate(60, seed=17):
        assert set(prompt_words(s.prompt)) <= vocab, s.prompt
        for k in range(1, s.n_refs + 1):
            assert f"image {k}" in s.prompt
        assert f"image {s.n_refs + 1}" not in s.prompt


def test_prompt_binds_image_indices_to_the_ground_truth():
    for s in RefWorld(categories=[c for c in CATEGORIES if c.startswith("subject")]).generate(40, seed=23):
        t = s.extra
        for sub in t["subjects"]:
            k = sub["ref"] + 1
            if t["layout_ref"] is None:
                assert f"subject of image {k} at the {cell_name(*sub['cell'])}, {sub['size_word']}." in s.prompt
            else:
                assert f"subject of image {k} in the {sub['box_color']} box of image {t['layout_ref'] + 1}." in s.prompt
        bg = t["background"]
        assert (f"background of image {bg['ref'] + 1}." if bg["ref"] is not None else f"a {bg['name']} background.") in s.prompt
        if t["style"]:
            assert f"style of image {t['style']['ref'] + 1}." in s.prompt
        if t["lighting"]:
            assert f"as in image {t['lighting']['ref'] + 1}." in s.prompt


# ------------------------------------------------------------------------------ on disk


def test_disk_round_trip_and_byte_identical(tmp_path: Path):
    manifest = generate_refworld_to_disk(tmp_path / "a", n=10, seed=5, split="val")
    assert manifest == tmp_path / "a" / "val.jsonl"
    memory = generate(10, seed=5, split="val")
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(lines) == 10
    for line, s in zip(lines, memory, strict=True):
        assert (line["id"], line["category"], line["prompt"]) == (s.id, s.category, s.prompt)
        assert [r["type"] for r in line["references"]] == s.ref_types
        for key in ("size", "level", "subjects", "background", "style", "lighting", "layout_ref", "draft_ref", "source_ref"):
            assert line[key] == s.extra[key], key
        for ref, image in zip(line["references"], s.ref_images, strict=True):
            png = np.asarray(Image.open(tmp_path / "a" / ref["image"]), dtype=np.float32) / 255.0
            assert torch.equal(torch.from_numpy(png).permute(2, 0, 1), image)
        # Masks come back through the label PNG.
        loaded = attach_masks(type(s)(s.id, s.prompt, [], [], extra=dict(line)), tmp_path / "a")
        assert torch.equal(loaded.extra["subject_masks"], s.extra["subject_masks"])
        mask = np.asarray(Image.open(tmp_path / "a" / line["mask"])) > 0
        assert torch.equal(torch.from_numpy(mask), s.mask[0] > 0)
    again = generate_refworld_to_disk(tmp_path / "b", n=10, seed=5, split="val")
    assert again.read_bytes() == manifest.read_bytes()
    for path in sorted((tmp_path / "a" / "val").rglob("*.png")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_manifest_loader_reads_refworld_output(tmp_path: Path):
    manifest_mod = pytest.importorskip("refrl.data.manifest")
    manifest = generate_refworld_to_disk(tmp_path, n=4, seed=1, level=1)
    loaded = manifest_mod.load_manifest(manifest)
    memory = generate(4, seed=1, level=1)
    for a, b in zip(loaded, memory, strict=True):
        attach_masks(a, tmp_path)
        assert _same(a, b) and a.extra["subjects"] == b.extra["subjects"]


def test_64px_and_preview(tmp_path: Path):
    samples = [RefWorld(size=64, categories=[c]).generate(1, seed=3)[0] for c in CATEGORIES]
    for s in samples:
        assert s.target.shape == (3, 64, 64) and all(im.shape == (3, 64, 64) for im in s.ref_images)
        assert s.extra["subject_masks"].shape[1:] == (64, 64)
        for sub in s.extra["subjects"]:
            x0, y0, x1, y1 = sub["box"]
            assert x1 - x0 == box_side(sub["size_word"], 64) and x1 <= 64 and y1 <= 64
    out = write_preview_grid(samples[:3], tmp_path / "p.png")
    with Image.open(out) as im:
        assert im.width > 3 * 64 * 3 and im.height > 3 * 64 * 3
