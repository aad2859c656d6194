"""``refrl compare``: the same samples and noise drawn by several checkpoints, side by side.

One row per sample: its references, then each checkpoint's output (same noise for
all: sample i uses noise ``(seed, i)``), then the target. Made for the before/after RL
pictures of docs/research/grpo.md; the samples are the RefWorld split and level ``refrl eval``
scores (test split: subjects never seen in training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from refrl.errors import RefrlError
from refrl.eval.grid import sample_row, save_grid


def compare_grid(
    ckpts: Sequence[str],
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    n: int = 8,
    seed: int = 0,
    split: str = "test",
    level: int = 2,
    steps: int | None = None,
    cfg_scale: float | None = None,
    shift: float | None = None,
    scale: int = 3,
) -> Path:
    """Draw RefWorld samples ``0..n-1`` of ``(seed, split, level)`` with every checkpoint; save one grid PNG.

    Sampler values left None are each checkpoint's own (`refrl.sampling.settings.resolve_sampler`)."""
    from refrl.data.refworld import generate
    from refrl.models.build import load_policy
    from refrl.sampling.rollout import sample_ode
    from refrl.sampling.settings import resolve_sampler

    if not ckpts:
        raise RefrlError("compare needs at least one --ckpt")
    if n < 1:
        raise RefrlError(f"--n must be >= 1, got {n}")
    labels = list(labels) if labels else [Path(str(c)).name for c in ckpts]
    if len(labels) != len(ckpts):
        raise RefrlError(f"--label: {len(labels)} labels for {len(ckpts)} checkpoints; give one per --ckpt or none")
    samples = generate(n, seed=seed, split=split, level=level)
    outputs: list[torch.Tensor] = []
    for ckpt in ckpts:
        policy = load_policy(ckpt)
        policy.eval()
        sampler = resolve_sampler(policy, steps, cfg_scale, shift)
        outputs.append(sample_ode(policy, samples, steps=sampler.steps, cfg_scale=sampler.cfg_scale,
                                  shift=sampler.shift, seed=seed))
    rows = [sample_row(s, [(label, images[i]) for label, images in zip(labels, outputs, strict=True)], s.target)
            for i, s in enumerate(samples)]
    return save_grid(rows, out, scale=scale)
