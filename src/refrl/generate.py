"""``refrl generate``: sample a checkpoint on a manifest, write PNGs and a grid.

Each image is ``OUT/<id>.png`` with the id made safe by `refrl.runfolder.files.safe_filename`
(an id such as ``../x`` or ``a/b`` becomes ``.._x-<hash>``-style names that stay in OUT).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.eval.grid import sample_row, save_grid
from refrl.models.build import load_policy
from refrl.runfolder.files import atomic_write_text, safe_filename
from refrl.runfolder.lock import lock_run_folder
from refrl.sampling.rollout import sample_ode


def generate(
    ckpt: str,
    samples: list[LoadedSample],
    out_dir: str | Path,
    steps: int = 20,
    cfg_scale: float = 2.0,
    seed: int = 0,
    batch_size: int = 32,
    shift: float = 1.0,
) -> list[Path]:
    """Generate one image per sample (noise from ``(seed, index)``), save PNGs and ``grid.png``."""
    if not samples:
        raise RefrlError("no samples to generate for (the manifest is empty)")
    with lock_run_folder(out_dir):
        return _generate(ckpt, samples, Path(out_dir), steps, cfg_scale, seed, batch_size, shift)


# Names generate writes itself; a sample id equal to one gets a hashed file name instead.
_OWN_FILES = ("grid",)


def _generate(ckpt: str, samples: list[LoadedSample], out_dir: Path, steps: int, cfg_scale: float, seed: int,
              batch_size: int, shift: float) -> list[Path]:
    from refrl.data.images import save_image

    policy = load_policy(ckpt)
    policy.eval()
    paths: list[Path] = []
    outputs: list[torch.Tensor] = []
    for start in tqdm(range(0, len(samples), batch_size), desc="generate", unit="batch"):
        chunk = samples[start : start + batch_size]
        images = sample_ode(policy, chunk, steps=steps, cfg_scale=cfg_scale, shift=shift, seed=seed,
                            indices=range(start, start + len(chunk)))
        for s, im in zip(chunk, images, strict=True):
            p = out_dir / f"{safe_filename(s.id, reserved=_OWN_FILES)}.png"
            save_image(im, p)
            paths.append(p)
            outputs.append(im)
    rows = [sample_row(s, [("output", im)], s.target) for s, im in list(zip(samples, outputs, strict=True))[:16]]
    save_grid(rows, out_dir / "grid.png")
    atomic_write_text(out_dir / "generate.json", json.dumps(
        {"ckpt": str(ckpt), "steps": steps, "cfg": cfg_scale, "seed": seed, "n": len(samples),
         "files": {s.id: p.name for s, p in zip(samples, paths, strict=True)}}, indent=2))
    return paths
