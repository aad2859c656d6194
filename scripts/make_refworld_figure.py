"""Make the picture of RefWorld in docs/research/refworld.md: one sample per category, references -> target.

    python scripts/make_refworld_figure.py --out docs/images/refworld.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from refrl.data.refworld import CATEGORIES, RefWorld, write_preview_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/refworld.png"), help="PNG to write")
    parser.add_argument("--seed", type=int, default=0, help="sample i of the figure uses default_rng([seed, i])")
    parser.add_argument("--size", type=int, default=32, help="image size (32 or 64)")
    parser.add_argument("--level", type=int, default=2, choices=(0, 1, 2), help="curriculum level")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    args = parser.parse_args()

    world = RefWorld(size=args.size, split=args.split, level=args.level)
    samples = [
        world.sample(np.random.default_rng([args.seed, i]), index=i, category=category)
        for i, category in enumerate(CATEGORIES)
    ]
    path = write_preview_grid(samples, args.out, max_rows=len(samples))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
