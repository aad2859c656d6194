"""Peak memory of loading the largest image the default pixel limit allows.

    python benchmarks/image_memory.py            # prints JSON

Each case writes one image of `SIDE` x `SIDE` pixels (just under the 50 M-pixel
default of ``REFRL_MAX_IMAGE_PIXELS``) and reports the peak resident memory
(``ru_maxrss``, exact, from the kernel) of a child process that loads it with
`refrl.data.images.load_image` (what every command that reads a manifest's images
uses), beside the same child loading a 16x16 image: the difference is what the large
image costs. ``refrl data validate`` (which decodes every image to check it) is
measured the same way. The figures are quoted in docs/guides/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from refrl.data.images import MAX_LOADED_PIXELS

SIDE = 7071  # 7071 x 7071 = 49,999,041 pixels, the largest square under the default
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
MIB = 2**20

# The peak of one child process, measured in a grandchild-free wrapper: RUSAGE_CHILDREN of a
# fresh interpreter that ran only that command is that command's own peak.
_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def make_image(mode: str, side: int) -> Image.Image:
    """Gradients and noise (made by Pillow in C, in seconds): decoded to every pixel like any photo."""
    grad = Image.linear_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    noise = Image.effect_noise((side, side), 40)
    if mode == "I;16":
        return Image.fromarray(np.asarray(grad).astype(np.uint16) * 257)
    image = Image.merge("RGB", (grad, grad.transpose(Image.Transpose.ROTATE_90), noise))
    if mode == "RGBA":
        image.putalpha(200)
    return image


def peak_of(args: list[str], cwd: Path) -> tuple[int, float]:
    """(peak RSS in MiB, seconds) of ``args`` run in a fresh wrapper process."""
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, cwd=cwd,
                         env=ENV, timeout=1800)
    rc, kib = res.stdout.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(args)} failed ({rc}): {res.stderr[-2000:]}")
    return int(kib) // 1024, time.perf_counter() - start


def case(tmp: Path, name: str, image: Image.Image | None, fmt: str) -> dict:
    folder = tmp / name
    folder.mkdir()
    file = f"ref.{fmt.lower()}"
    extra = {"compress_level": 1} if fmt == "PNG" else {"quality": 90}
    (image or Image.new("RGB", (16, 16), (200, 20, 20))).save(folder / file, format=fmt, **extra)
    line = {"id": "s1", "prompt": "the red square of image 1", "references": [{"image": file, "type": "subject"}]}
    (folder / "m.jsonl").write_text(json.dumps(line) + "\n")
    load = f"from refrl.data.images import load_image; t = load_image({file!r}); print(tuple(t.shape))"
    load_peak, seconds = peak_of([sys.executable, "-c", load], folder)
    validate, _ = peak_of([sys.executable, "-m", "refrl", "data", "validate", "m.jsonl"], folder)
    size = image.size if image is not None else (16, 16)
    return {"image": f"{size[0]}x{size[1]} {image.mode if image else 'RGB'} {fmt}",
            "file_mib": round((folder / file).stat().st_size / MIB, 1), "load_image_peak_mib": load_peak,
            "load_image_s": round(seconds, 1), "data_validate_peak_mib": validate}


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["small_16x16_png"] = case(root, "small", None, "PNG")
        for mode, fmt in (("RGB", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("RGB", "JPEG")):
            name = f"{mode.replace(';', '')}_{fmt}".lower()
            results[name] = case(root, name, make_image(mode, SIDE), fmt)
    small = results["small_16x16_png"]
    for r in results.values():
        r["load_image_over_small_mib"] = r["load_image_peak_mib"] - small["load_image_peak_mib"]
        r["data_validate_over_small_mib"] = r["data_validate_peak_mib"] - small["data_validate_peak_mib"]
    print(json.dumps({"side": SIDE, "pixels": SIDE * SIDE, "max_loaded_pixels": MAX_LOADED_PIXELS,
                      "cases": results}, indent=2))


if __name__ == "__main__":
    main()
