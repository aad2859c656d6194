"""Manifests and image loading: validation messages, skip_invalid, path safety, image modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refrl.data.images import from_pil, load_image, load_mask, read_image_size, save_image, to_pil
from refrl.data.manifest import (
    format_report,
    load_manifest,
    load_sample,
    read_manifest,
    resolve_image_path,
    validate_manifest,
    write_manifest,
)
from refrl.data.schema import Reference, RefSample
from refrl.errors import RefrlError

RED = (255, 0, 0)


def _png(path: Path, color=RED, size=(4, 3), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _png(tmp_path / "refs" / "a.png")
    _png(tmp_path / "refs" / "b.png", color=(0, 0, 255), size=(5, 5))
    _png(tmp_path / "t.png")
    # a noisy image so the truncation cuts real pixel data, not just trailing chunks
    noise = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "refs" / "trunc.png")
    Image.fromarray(noise).save(tmp_path / "refs" / "trunc.jpg", quality=90)
    _truncate(tmp_path / "refs" / "trunc.png")
    _truncate(tmp_path / "refs" / "trunc.jpg")
    return tmp_path


def _line(**kw) -> str:
    obj = {"prompt": "a red square", "references": [{"image": "refs/a.png", "type": "subject"}]}
    obj.update(kw)
    return json.dumps(obj)


def _write(folder: Path, lines: list[str], name: str = "m.jsonl") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = _line(id="good")

# (third line of the manifest, text every error line must contain)
BAD_LINES = {
    "missing image": (_line(references=[{"image": "refs/missing.png", "type": "style"}]), ["'refs/missing.png'", "file not found"]),
    "truncated png": (_line(references=[{"image": "refs/trunc.png", "type": "subject"}]), ["'refs/trunc.png'", "cannot decode"]),
    "truncated jpeg": (_line(target="refs/trunc.jpg"), ["'refs/trunc.jpg'", "cannot decode"]),
    "bad json": ('{"prompt": "x", "references": [', ["bad JSON"]),
    "dotdot escape": (_line(references=[{"image": "../x.png", "type": "subject"}]), ["'../x.png'", "escapes the manifest folder"]),
    "absolute path": (_line(mask="/etc/passwd"), ["'/etc/passwd'", "escapes the manifest folder"]),
    "empty prompt": (_line(prompt="  "), ["'prompt' must be a non-empty string"]),
    "missing prompt": (json.dumps({"references": []}), ["missing 'prompt'"]),
    "unknown type": (_line(references=[{"image": "refs/a.png", "type": "texture"}]), ["'refs/a.png'", "texture", "subject, style, background"]),
    "refs not a list": (_line(references="refs/a.png"), ["'references' must be a list"]),
    "ref without image": (_line(references=[{"type": "subject"}]), ["references[0] has no 'image'"]),
    "duplicate id": (_line(id="good"), ["duplicate id 'good' (first on line 1)"]),
    "not an object": ("[1, 2]", ["must be a JSON object"]),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_each_bad_line_is_one_error_naming_file_and_line(folder: Path, case: str) -> None:
    bad, must_contain = BAD_LINES[case]
    path = _write(folder, [GOOD, "", bad])  # blank line 2: numbering is the file's own
    report = validate_manifest(path)
    assert report.n_lines == 2 and report.n_valid == 1
    assert len(report.errors) == 1, report.errors
    error = report.errors[0]
    assert error.startswith(f"{path}:3: "), error
    assert "\n" not in error
    for text in must_contain:
        assert text in error, (text, error)
    assert not report.ok
    if case.startswith("truncated"):  # read_manifest checks existence only; decoding is validate's job
        assert len(read_manifest(path)) == 2
        return
    with pytest.raises(RefrlError, match=f"{path.name}:3: "):
        read_manifest(path)


def test_skip_invalid_keeps_valid_lines_and_counts_skipped(folder: Path) -> None:
    lines = [GOOD, BAD_LINES["bad json"][0], _line(id="second"), BAD_LINES["missing image"][0]]
    path = _write(folder, lines)
    samples = read_manifest(path, skip_invalid=True)
    assert [s.id for s in samples] == ["good", "second"]
    report = validate_manifest(path, skip_invalid=True)
    assert (report.n_lines, report.n_valid, report.skipped) == (4, 2, 2)
    assert report.ok  # loadable under skip_invalid
    assert not validate_manifest(path).ok
    assert "2 skipped" in format_report(report)
    # nothing valid at all still raises
    only_bad = _write(folder, [BAD_LINES["bad json"][0]], name="bad.jsonl")
    with pytest.raises(RefrlError, match="no valid lines"):
        read_manifest(only_bad, skip_invalid=True)


def test_load_manifest_skip_invalid_drops_undecodable_images(folder: Path) -> None:
    path = _write(folder, [GOOD, BAD_LINES["truncated png"][0]])
    with pytest.raises(RefrlError, match="trunc.png"):
        load_manifest(path)
    loaded = load_manifest(path, skip_invalid=True)
    assert [s.id for s in loaded] == ["good"]


def test_path_escape_refused() -> None:
    for bad in ("../x.png", "a/../../x.png", "/abs/x.png", "C:\\x.png"):
        with pytest.raises(ValueError, match="escapes the manifest folder"):
            resolve_image_path("/data", bad)
    assert resolve_image_path("/data", "a/../b.png") == Path("/data/b.png")


def test_read_load_defaults_extra_and_aliases(folder: Path) -> None:
    lines = [
        json.dumps({"prompt": "p1", "references": [{"image": "refs/a.png", "type": "pose", "name": "n"}],
                    "boxes": [[0, 0, 2, 2]], "light": "warm"}),
        json.dumps({"id": 7, "prompt": "p2", "category": "multi", "target": "t.png", "mask": "t.png",
                    "references": [{"image": "refs/a.png", "type": "subject"}, {"image": "refs/b.png", "type": "bg"}]}),
    ]
    path = _write(folder, lines)
    s1, s2 = read_manifest(path)
    assert s1.id == "1" and s2.id == "7"  # default id = line number; int ids stringified
    assert s1.references[0].type == "layout" and s2.references[1].type == "background"
    assert s1.extra == {"boxes": [[0, 0, 2, 2]], "light": "warm"}
    l1, l2 = load_manifest(path)
    assert l1.extra == {"boxes": [[0, 0, 2, 2]], "light": "warm"}
    assert l2.ref_types == ["subject", "background"] and l2.category == "multi"
    assert l2.ref_images[0].shape == (3, 3, 4) and l2.ref_images[1].shape == (3, 5, 5)
    assert torch.allclose(l2.ref_images[1][:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert l2.mask.shape == (1, 3, 4)
    assert l2.mask[0, 0, 0].item() == pytest.approx(0.299, abs=1e-6)  # luma of pure red
    resized = load_sample(s2, folder, size=(2, 6))
    assert all(t.shape == (3, 2, 6) for t in [*resized.ref_images, resized.target])
    assert resized.mask.shape == (1, 2, 6)
    assert torch.allclose(resized.ref_images[0], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 2, 6))


def test_write_manifest_round_trip_and_report(folder: Path) -> None:
    samples = [
        RefSample(id="a", prompt="one", references=[Reference("refs/a.png", "subject", "dog")], category="single",
                  extra={"boxes": [1, 2, 3, 4]}),
        RefSample(id="b", prompt="two\u2028lines", target="t.png",
                  references=[Reference("refs/a.png", "subject"), Reference("refs/b.png", "style")]),
    ]
    path = write_manifest(folder / "out.jsonl", samples)
    assert read_manifest(path) == samples
    assert not list(folder.glob(".out.jsonl*"))  # no temp file left behind
    report = validate_manifest(path)
    assert report.ok and report.n_valid == 2 and report.errors == []
    assert report.n_refs == {1: 1, 2: 1}
    assert report.image_sizes == {(4, 3): 2, (5, 5): 1}  # distinct files: a.png, t.png, b.png
    text = format_report(report)
    assert "2 lines, 2 valid, 0 invalid" in text
    assert "single: 1" in text and "(none): 1" in text
    assert "1: 1, 2: 1" in text and "subject: 2" in text and "4x3: 2" in text


@pytest.mark.parametrize(
    "sample, match",
    [
        (RefSample(id="x", prompt="p", references=[Reference("/abs.png", "subject")]), "escapes"),
        (RefSample(id="x", prompt="p", references=[Reference("a.png", "texture")]), "unknown reference type"),
        (RefSample(id="x", prompt="", references=[]), "empty prompt"),
        (RefSample(id="x", prompt="p", references=[], extra={"prompt": "y"}), "clash"),
        (RefSample(id="x", prompt="p", references=[], extra={"t": object()}), "not JSON serializable"),
    ],
)
def test_write_manifest_refuses_unreadable_samples(tmp_path: Path, sample: RefSample, match: str) -> None:
    with pytest.raises(RefrlError, match=match):
        write_manifest(tmp_path / "m.jsonl", [sample])
    assert not (tmp_path / "m.jsonl").exists()


def test_write_manifest_refuses_duplicate_ids(tmp_path: Path) -> None:
    s = RefSample(id="x", prompt="p", references=[])
    with pytest.raises(RefrlError, match="duplicate id 'x'"):
        write_manifest(tmp_path / "m.jsonl", [s, s])


def test_empty_manifest_and_missing_file(tmp_path: Path) -> None:
    path = _write(tmp_path, ["", "  "])
    assert read_manifest(path) == []
    report = validate_manifest(path)
    assert not report.ok and "no samples" in report.errors[0]
    with pytest.raises(RefrlError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------ image modes


def _mode_image(mode: str) -> tuple[Image.Image, list[float]]:
    """A 3x2 image of ``mode`` whose pixel (x=1, y=0) has a known RGB value."""
    if mode == "1":
        im = Image.new("1", (3, 2), 0)
        im.putpixel((1, 0), 1)
        return im, [1.0, 1.0, 1.0]
    if mode == "L":
        return Image.new("L", (3, 2), 51), [0.2] * 3
    if mode == "LA":  # grey 100 at alpha 128 over white
        a = 128 / 255
        return Image.new("LA", (3, 2), (100, 128)), [100 / 255 * a + (1 - a)] * 3
    if mode == "P":
        im = Image.new("P", (3, 2), 0)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.putpixel((1, 0), 1)
        return im, [1.0, 0.0, 0.0]
    if mode == "PA":  # palette red, fully transparent -> white
        im = Image.new("PA", (3, 2), (1, 0))
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        return im, [1.0, 1.0, 1.0]
    if mode == "RGBA":
        im = Image.new("RGBA", (3, 2), (255, 0, 0, 0))  # transparent -> white
        im.putpixel((1, 0), (0, 0, 255, 255))
        return im, [0.0, 0.0, 1.0]
    if mode == "CMYK":  # C=0, M=Y=255, K=0 is red
        return Image.new("CMYK", (3, 2), (0, 255, 255, 0)), [1.0, 0.0, 0.0]
    if mode == "I;16":
        return Image.fromarray(np.full((2, 3), 13107, dtype=np.uint16)), [0.2] * 3
    if mode == "I":
        return Image.fromarray(np.full((2, 3), 32768, dtype=np.int32)), [32768 / 65535] * 3
    if mode == "F":
        return Image.fromarray(np.full((2, 3), 0.25, dtype=np.float32)), [0.25] * 3
    raise AssertionError(mode)


# Pillow writes these modes as PNG; the rest go through TIFF (lossless, keeps the mode).
PNG_WRITABLE = {"1", "L", "LA", "P", "RGBA", "I;16"}


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_loads_as_rgb_float(tmp_path: Path, mode: str) -> None:
    image, expected = _mode_image(mode)
    path = tmp_path / ("x.png" if mode in PNG_WRITABLE else "x.tiff")
    image.save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode  # the file really holds that mode
    tensor = load_image(path)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 2, 3)
    assert 0.0 <= tensor.min().item() and tensor.max().item() <= 1.0
    assert tensor[:, 0, 1].tolist() == pytest.approx(expected, abs=1e-6)


def test_out_of_range_int_and_float_are_min_max_scaled() -> None:
    ints = Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32))
    assert from_pil(ints)[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    floats = Image.fromarray(np.array([[0.0, 2.5, 10.0]], dtype=np.float32))
    assert from_pil(floats)[0, 0].tolist() == pytest.approx([0.0, 0.25, 1.0])


def test_save_load_round_trip_and_pil_helpers(tmp_path: Path) -> None:
    values = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5) / 255.0
    path = save_image(values, tmp_path / "sub" / "x.png")
    assert torch.equal(load_image(path), values)
    assert read_image_size(path) == (5, 4)
    assert to_pil(values).size == (5, 4) and to_pil(values[:1]).mode == "L"
    assert torch.equal(from_pil(to_pil(values)), values)
    assert load_mask(save_image(values[0], tmp_path / "m.png")).shape == (1, 4, 5)
    with pytest.raises(ValueError, match="shape"):
        to_pil(torch.zeros(4, 2, 2))


def test_resize_constant_image_and_bad_size(tmp_path: Path) -> None:
    path = _png(tmp_path / "c.png", color=(51, 102, 204), size=(8, 8))
    out = load_image(path, size=3)
    assert out.shape == (3, 3, 3)
    assert torch.allclose(out, torch.tensor([0.2, 0.4, 0.8]).view(3, 1, 1).expand(3, 3, 3), atol=1e-6)
    with pytest.raises(ValueError, match="size must be"):
        load_image(path, size=(0, 2))


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 2), RED)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW" — a phone photo taken in portrait
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").shape == (3, 4, 2)
