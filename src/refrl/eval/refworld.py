"""The embedded suites, generated in memory from RefWorld: ``refworld`` and ``refine``.

``refworld``: the RefWorld test split (unseen identities), every category, scored with
every embedded reward. ``refine``: RefWorld ``refine`` tasks only, scored with the
OmniRefiner patch reward and PSNR inside / outside the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

from refrl.errors import RefrlError
from refrl.eval.suite import DEFAULT_IMAGE_SIZE, EvalItem, Suite

DEFAULT_N = {"refworld": 96, "refine": 48}
REFWORLD_SPLIT = "test"  # unseen subject identities
REFWORLD_LEVEL = 2  # the full world: patterns, textured and photo backgrounds
REFWORLD_METRICS = ("identity", "layout", "style", "background", "fidelity", "patch")
REFINE_METRICS = ("patch", "psnr_inside", "psnr_outside")


def _limited(n: int, limit: int | None) -> int:
    if n < 1 or (limit is not None and limit < 1):
        raise RefrlError(f"the number of samples must be >= 1, got n={n}, limit={limit}")
    return min(n, limit) if limit is not None else n


def refworld_suite(
    n: int = DEFAULT_N["refworld"], seed: int = 0, limit: int | None = None, size: int = DEFAULT_IMAGE_SIZE,
    level: int = REFWORLD_LEVEL, categories: Sequence[str] | None = None, name: str = "refworld",
    metrics: Sequence[str] = REFWORLD_METRICS, split: str = REFWORLD_SPLIT,
) -> Suite:
    """RefWorld test split (unseen identities), sample i a pure function of ``(seed, i)``.

    ``split="train"`` scores on identities seen in training instead: the gap to the test
    split separates what a run learned about its training subjects from what generalises.
    """
    from refrl.data.refworld import generate

    n = _limited(n, limit)
    samples = generate(n, seed, split=split, size=size, categories=categories, level=level)
    return Suite(
        name=name,
        items=[EvalItem(s.id, s, i) for i, s in enumerate(samples)],
        metrics={m: m for m in metrics},
        size=(size, size),
        params={"split": split, "level": level, "categories": list(categories) if categories else None,
                "data_seed": seed},
        n_samples=n,
        protocol=f"RefWorld {split} split{' (unseen identities)' if split == 'test' else ''}, level {level}, one image per sample",
    )


def refine_suite(n: int = DEFAULT_N["refine"], seed: int = 0, limit: int | None = None,
                 size: int = DEFAULT_IMAGE_SIZE, level: int = REFWORLD_LEVEL) -> Suite:
    """RefWorld ``refine`` tasks (OmniRefiner): patch reward and PSNR inside / outside the mask."""
    return refworld_suite(n, seed, limit, size, level, categories=["refine"], name="refine", metrics=REFINE_METRICS)
