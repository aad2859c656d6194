"""Worker of tests/test_cli_faults_more.py, run as 2 CPU processes under torchrun: a NaN loss
on rank 1 alone must make both ranks skip the same step (one all-reduce of the finiteness flag),
and with ``optim.nonfinite_limit=1`` stop both ranks with the same one-line error.

Usage: torchrun --nproc_per_node 2 tests/nan_rank_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from refrl.config import load_config
from refrl.errors import RunFailure
from refrl.train.sft import SFTConfig, SFTTrainer

TINY = ["model.width=32", "model.depth=1", "model.heads=2", "batch_size=2", "noise_per_condition=1",
        "data.max_refs=2", "optim.warmup_steps=0", "log_every=1", "checkpoint_every=10", "validation.every=0",
        "validation.keep_best=null", "steps=3"]


class OneRankNaN(SFTTrainer):
    """Step 2's loss is NaN on rank 1 only; the averaged gradients stay finite."""

    def optimizer_step(self, loss=None):
        if self.scheduler.last_epoch == 1 and self.dist.rank == 1:
            loss = float("nan")
        return super().optimizer_step(loss)

    def step(self, i):
        before = [p.detach().clone() for p in self.params]
        record = super().step(i)
        self.changed.append(not all(torch.equal(a, b) for a, b in zip(before, self.params, strict=True)))
        return record


def main(out: Path) -> None:
    cfg = load_config(SFTConfig, "configs/tiny-cpu-sft.yaml", TINY)
    trainer = OneRankNaN(cfg, out / "skip")
    trainer.changed = []
    trainer.train()
    rank = trainer.dist.rank
    result = {"changed": trainer.changed, "skipped": [r["skipped_nonfinite"] for r in trainer.history],
              "weights": [p.detach().tolist() for p in trainer.params]}
    stopper = OneRankNaN(load_config(SFTConfig, "configs/tiny-cpu-sft.yaml", [*TINY, "optim.nonfinite_limit=1"]),
                         out / "stop")
    stopper.changed = []
    try:
        stopper.train()
        result["stopped"] = None
    except RunFailure as e:
        result["stopped"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
