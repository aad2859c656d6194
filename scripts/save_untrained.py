"""Save an untrained policy built from an SFT config: the baseline of "far above an untrained model".

    python scripts/save_untrained.py --config configs/tiny-cpu-sft.yaml --out runs/untrained
    refrl eval --ckpt runs/untrained --suite refworld --out runs/untrained/eval
"""

import argparse

import torch

from refrl.config import load_config
from refrl.models.build import build_policy
from refrl.train.sft import SFTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny-cpu-sft.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    policy = build_policy(load_config(SFTConfig, args.config).model)
    policy.save_pretrained(args.out)
    print(f"untrained policy: {args.out}")


if __name__ == "__main__":
    main()
