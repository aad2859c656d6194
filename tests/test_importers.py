"""Importers: DiffSynth/DyRef metadata, DreamBench folders, Hugging Face datasets."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub / datasets
os.environ["HF_DATASETS_OFFLINE"] = "1"

import csv  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from refrl.data.importers import (  # noqa: E402
    MANIFEST_NAME,
    format_dreambench_prompt,
    import_command,
    import_diffsynth,
    import_dreambench,
    import_hf_dataset,
    parse_dreambench_prompts,
    split_paths,
)
from refrl.data.manifest import load_manifest, read_manifest  # noqa: E402
from refrl.errors import RefrlError  # noqa: E402


def _img(path: Path, color=(255, 0, 0), size=(4, 4), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def test_split_paths_handles_every_cell_form() -> None:
    assert split_paths(["a.png", " b.png ", ""]) == ["a.png", "b.png"]
    assert split_paths("a.png") == ["a.png"]
    assert split_paths("a.png, b.png") == ["a.png", "b.png"]
    assert split_paths('["a.png", "b,c.png"]') == ["a.png", "b,c.png"]
    assert split_paths("['a.png', 'b.png']") == ["a.png", "b.png"]
    assert split_paths(None) == split_paths("") == split_paths(float("nan")) == []


# ------------------------------------------------------------------ DiffSynth / DyRef


@pytest.fixture
def diffsynth_root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    _img(root / "edit" / "a.jpg", fmt="JPEG")
    _img(root / "edit" / "b.png", color=(0, 255, 0))
    _img(root / "target" / "t1.png", color=(0, 0, 255))
    return root


def test_import_diffsynth_jsonl_json_csv_agree(diffsynth_root: Path) -> None:
    rows = [
        {"edit_image": ["edit/a.jpg", "edit/b.png"], "image": "target/t1.png", "prompt": "put them together",
         "edit_image_types": ["subject", "style"], "score": 0.5},
        {"edit_image": "edit/b.png", "image": "target/t1.png", "prompt": "edit it", "category": "edit"},
    ]
    (diffsynth_root / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (diffsynth_root / "meta.json").write_text(json.dumps(rows))
    with (diffsynth_root / "meta.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["edit_image", "image", "prompt", "edit_image_types", "category"])
        writer.writeheader()
        writer.writerow({"edit_image": "edit/a.jpg,edit/b.png", "image": "target/t1.png", "prompt": "put them together",
                         "edit_image_types": "subject,style", "category": ""})
        writer.writerow({"edit_image": '["edit/b.png"]', "image": "target/t1.png", "prompt": "edit it",
                         "edit_image_types": "", "category": "edit"})
    for name in ("meta.jsonl", "meta.json", "meta.csv"):
        s1, s2 = import_diffsynth(diffsynth_root / name)
        assert [r.image for r in s1.references] == ["edit/a.jpg", "edit/b.png"], name
        assert [r.type for r in s1.references] == ["subject", "style"], name
        assert s1.target == "target/t1.png" and s1.prompt == "put them together"
        assert [r.type for r in s2.references] == ["subject"]  # no types: the default
        assert (s1.id, s2.id) == ("0", "1") and s2.category == "edit" and s1.category is None
    assert import_diffsynth(diffsynth_root / "meta.jsonl")[0].extra == {"score": 0.5}


def test_import_diffsynth_types_argument_and_errors(diffsynth_root: Path) -> None:
    rows = [{"edit_image": ["edit/a.jpg", "edit/b.png"], "image": "", "prompt": "p"}]
    (s,) = import_diffsynth(rows, root=diffsynth_root, types=["background", "pose"])
    assert [r.type for r in s.references] == ["background", "layout"] and s.target is None
    (s,) = import_diffsynth(rows, root=diffsynth_root, types=[["style", "style"]])  # a list per row
    assert [r.type for r in s.references] == ["style", "style"]
    with pytest.raises(RefrlError, match=r"row 0: unknown reference type 'texture'.*allowed"):
        import_diffsynth(rows, root=diffsynth_root, types="texture")
    (s,) = import_diffsynth(rows, root=diffsynth_root, types=["style", "draft", "source"])  # first entries
    assert [r.type for r in s.references] == ["style", "draft"]
    with pytest.raises(RefrlError, match="row 0: 3 reference types"):
        import_diffsynth(rows, root=diffsynth_root, types=[["style", "style", "style"]])
    with pytest.raises(RefrlError, match="row 0: 2 reference types"):
        import_diffsynth([{**rows[0], "edit_image": "edit/a.jpg,edit/b.png,edit/a.jpg"}], root=diffsynth_root,
                         types=["style", "draft"])
    with pytest.raises(RefrlError, match="row 0: missing or empty 'prompt'"):
        import_diffsynth([{"edit_image": "edit/a.jpg"}], root=diffsynth_root)
    with pytest.raises(RefrlError, match="pass root"):
        import_diffsynth(rows)
    with pytest.raises(RefrlError, match="unsupported metadata format '.txt'"):
        import_diffsynth(_img(diffsynth_root / "x.txt", fmt="PNG"))


def test_import_command_diffsynth_places_images_and_validates(diffsynth_root: Path, tmp_path: Path) -> None:
    outside = _img(tmp_path / "elsewhere" / "abs.png", color=(9, 9, 9))
    rows = [
        {"edit_image": ["edit/a.jpg", str(outside)], "image": "target/t1.png", "prompt": "p1"},
        {"edit_image": ["edit/b.png"], "image": "target/t1.png", "prompt": "p2"},
    ]
    meta = diffsynth_root / "meta.json"
    meta.write_text(json.dumps(rows))
    out = tmp_path / "out"
    result = import_command("diffsynth", meta, out)
    assert result.manifest == out / MANIFEST_NAME and result.n_samples == 2
    assert result.report.ok and result.report.n_valid == 2
    s1, s2 = read_manifest(result.manifest)
    assert s1.references[0].image == "images/edit/a.jpg"
    assert s1.references[1].image.startswith("images/external/") and s1.references[1].image.endswith("-abs.png")
    assert os.path.samefile(out / "images/edit/b.png", diffsynth_root / "edit/b.png")  # hard link, not a copy
    loaded = load_manifest(result.manifest)
    assert torch.allclose(loaded[1].ref_images[0][:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(RefrlError, match="already exists"):
        import_command("diffsynth", meta, out)
    # writing the manifest into the source root keeps its paths as they are
    in_place = import_command("diffsynth", meta, diffsynth_root, link="copy")
    assert read_manifest(in_place.manifest)[1].references[0].image == "edit/b.png"
    with pytest.raises(RefrlError, match="unknown import kind 'zip'"):
        import_command("zip", meta, out, overwrite=True)


# ------------------------------------------------------------------ DreamBench

# The layout of google/dreambooth's dataset/prompts_and_classes.txt (shortened lists).
PROMPTS_FILE = """Classes

subject_name,class
backpack,backpack
dog2,dog
bear_plushie,stuffed animal

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""


@pytest.fixture
def dreambench(tmp_path: Path) -> Path:
    root = tmp_path / "dreambooth"
    for subject, n in (("backpack", 3), ("dog2", 2), ("bear_plushie", 1)):
        for i in range(n):
            _img(root / "dataset" / subject / f"{i:02d}.jpg", color=(10 * i, 0, 0), fmt="JPEG")
    (root / "dataset" / "prompts_and_classes.txt").write_text(PROMPTS_FILE)
    return root


def test_parse_dreambench_prompts() -> None:
    parsed = parse_dreambench_prompts(PROMPTS_FILE)
    assert parsed.classes == {"backpack": "backpack", "dog2": "dog", "bear_plushie": "stuffed animal"}
    assert parsed.object_prompts == ["a {0} {1} in the snow", "a red {0} {1}"]
    assert len(parsed.live_prompts) == 3 and parsed.live_prompts[1] == "a {0} {1} wearing a hat"
    assert format_dreambench_prompt("a red {0} {1}", "stuffed animal") == "a red stuffed animal"
    assert format_dreambench_prompt("a {unique_token} {class} here", "dog", "sks") == "a sks dog here"
    with pytest.raises(RefrlError, match="bad DreamBench prompt template"):
        format_dreambench_prompt("a {2}", "dog")


def test_import_dreambench_layout(dreambench: Path) -> None:
    samples = import_dreambench(dreambench)
    by_subject = {}
    for s in samples:
        by_subject.setdefault(s.extra["subject"], []).append(s)
    assert {k: len(v) for k, v in by_subject.items()} == {"backpack": 2, "bear_plushie": 2, "dog2": 3}  # dog: live list
    dog = by_subject["dog2"][2]
    assert dog.id == "dog2-02" and dog.prompt == "a dog in a chef outfit" and dog.category == "dreambench"
    assert dog.extra == {"subject": "dog2", "class": "dog", "live": True, "prompt_index": 2}
    assert [r.image for r in dog.references] == ["dataset/dog2/00.jpg", "dataset/dog2/01.jpg"]
    assert {r.type for s in samples for r in s.references} == {"subject"}
    first_k = import_dreambench(dreambench / "dataset", k=1, unique_token="sks", subjects=["backpack"])
    assert [s.prompt for s in first_k] == ["a sks backpack in the snow", "a red sks backpack"]
    assert [r.image for r in first_k[0].references] == ["backpack/00.jpg"]  # relative to the root given
    custom = import_dreambench(dreambench, prompts=["{1} at night"], subjects=["dog2"])
    assert [s.prompt for s in custom] == ["dog at night"]
    with pytest.raises(RefrlError, match=r"subjects \['cat'\] have no folder"):
        import_dreambench(dreambench, subjects=["cat"])


def test_import_dreambench_errors(dreambench: Path) -> None:
    _img(dreambench / "dataset" / "mystery" / "00.jpg", fmt="JPEG")
    with pytest.raises(RefrlError, match="subject 'mystery' has no class"):
        import_dreambench(dreambench)
    (dreambench / "dataset" / "prompts_and_classes.txt").unlink()
    with pytest.raises(RefrlError, match="prompts file not found"):
        import_dreambench(dreambench)


def test_import_command_dreambench(dreambench: Path, tmp_path: Path) -> None:
    result = import_command("dreambench", dreambench, tmp_path / "db", k=2, link="symlink")
    assert result.report.ok and result.n_samples == 7
    loaded = load_manifest(result.manifest, size=8)
    assert loaded[0].n_refs == 2 and loaded[0].ref_images[0].shape == (3, 8, 8)
    assert (tmp_path / "db" / "images" / "dataset" / "backpack" / "00.jpg").is_symlink()


# ------------------------------------------------------------------ Hugging Face datasets


def _tiny_dataset():
    import datasets

    red, blue = Image.new("RGB", (4, 2), (255, 0, 0)), Image.new("RGBA", (4, 2), (0, 0, 255, 255))
    features = datasets.Features({
        "edit_image": datasets.Sequence(datasets.Image()),
        "image": datasets.Image(),
        "prompt": datasets.Value("string"),
        "score": datasets.Value("float32"),
    })
    return datasets.Dataset.from_dict(
        {"edit_image": [[red, blue], [blue]], "image": [blue, red], "prompt": ["two refs", "one ref"], "score": [0.5, 1.0]},
        features=features,
    )


def test_import_hf_dataset_from_save_to_disk(tmp_path: Path) -> None:
    import datasets

    _tiny_dataset().save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": _tiny_dataset()}).save_to_disk(str(tmp_path / "saved_dict"))
    out = tmp_path / "out"
    samples = import_hf_dataset(tmp_path / "saved", out_dir=out, types=["subject", "style"])
    assert [s.n_refs for s in samples] == [2, 1]
    s0 = samples[0]
    assert s0.id == "train-000000" and s0.prompt == "two refs" and s0.extra == {"score": 0.5}
    assert [r.type for r in s0.references] == ["subject", "style"]
    assert [r.type for r in samples[1].references] == ["subject"]  # the first of the positional list
    assert (out / s0.references[1].image).is_file() and (out / s0.target).is_file()

    result = import_command("hf", tmp_path / "saved_dict", tmp_path / "out2", split="test")
    assert result.report.ok and result.n_samples == 2
    (l0, l1) = load_manifest(result.manifest)
    assert torch.allclose(l0.ref_images[0][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(l0.ref_images[1][:, 1, 3], torch.tensor([0.0, 0.0, 1.0]))
    assert l0.target.shape == (3, 2, 4) and l1.extra == {"score": 1.0}
    with pytest.raises(RefrlError, match=r"split 'train' not in .*available: test"):
        import_hf_dataset(tmp_path / "saved_dict", out_dir=tmp_path / "o3")
    with pytest.raises(RefrlError, match=r"columns \['refs'\] not found"):
        import_hf_dataset(tmp_path / "saved", image_columns=["refs"], out_dir=tmp_path / "o4")


def test_hub_id_offline_fails_fast_with_clear_message(tmp_path: Path) -> None:
    with pytest.raises(RefrlError) as err:
        import_hf_dataset("some-org/some-dataset", out_dir=tmp_path / "o")
    message = str(err.value)
    assert "'some-org/some-dataset'" in message and "offline" in message and "local path" in message
    with pytest.raises(RefrlError, match="dataset folder not found"):
        import_hf_dataset("./no/such/folder", out_dir=tmp_path / "o")
