"""``refrl generate``: sample a checkpoint on a manifest, write PNGs and a grid."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refrl.data.schema import LoadedSample
from refrl.eval.grid import save_grid
from refrl.models.build import load_policy
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
    from refrl.data.images import save_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = load_policy(ckpt)
    policy.eval()
    paths: list[Path] = []
    outputs: list[torch.Tensor] = []
    for start in tqdm(range(0, len(samples), batch_size), desc="generate", unit="batch"):
        chunk = samples[start : start + batch_size]
        images = sample_ode(policy, chunk, steps=steps, cfg_scale=cfg_scale, shift=shift, seed=seed,
                            indices=range(start, start + len(chunk)))
        for s, im in zip(chunk, images, strict=True):
            p = out_dir / f"{s.id}.png"
            save_image(im, p)
            paths.append(p)
            outputs.append(im)
    rows = []
    for s, im in list(zip(samples, outputs, strict=True))[:16]:
        row = [(f"{i + 1}:{t}", r) for i, (r, t) in enumerate(zip(s.ref_images, s.ref_types, strict=True))]
        row.append(("output", im))
        if s.target is not None:
            row.append(("target", s.target))
        rows.append(row)
    save_grid(rows, out_dir / "grid.png")
    (out_dir / "generate.json").write_text(
        json.dumps({"ckpt": str(ckpt), "steps": steps, "cfg": cfg_scale, "seed": seed, "n": len(samples)}, indent=2)
    )
    return paths
