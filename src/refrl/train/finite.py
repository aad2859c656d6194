"""The non-finite guard of training: no NaN or inf ever reaches the weights or a checkpoint.

A diverging run (too high a learning rate, an overflowing reward, a corrupt ``model.init``)
used to train on: the first NaN gradient turned every weight into NaN and the run saved
such checkpoints, pushing the last good ones out under ``keep_last``. Here
(docs/guides/reliability.md):

* before each optimizer step, the loss (where the trainer passes it), the gradient norm
  (non-finite iff a gradient is, or their norm overflows) and the weights are checked.
  Processes agree through one all-reduce of one number per step (`Dist.max_across`), so
  every process skips or stops at the same step;
* a step with a non-finite loss or gradient is skipped (no optimizer or EMA update) and
  counted (the ``skipped_nonfinite`` metric); after ``optim.nonfinite_limit`` skipped
  steps in a row the run stops with one line (`refrl.errors.RunFailure`, exit 1);
* non-finite weights cannot be repaired (the step that made them is gone), so they stop
  the run at once;
* `check_saveable`, before every checkpoint: weights and EMA finite, or nothing is written,
  so a non-finite checkpoint never replaces a finite one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from refrl.errors import RunFailure
from refrl.runfolder.layout import latest_checkpoint

HELP = "lower optim.lr, check model.init and the rewards, then continue with --resume"

# A skipped first step calls the LR schedule without an optimizer step, on purpose (the schedule
# counts steps, skipped or not, so a resumed run keeps its place): not the misuse torch warns of.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's local part (a DTensor shard under FSDP2; the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every (local part of a) tensor is finite (one device sync)."""
    flags = [torch.isfinite(_local(t)).all() for t in tensors if _local(t).numel()]
    return bool(torch.stack(flags).all()) if flags else True


class FiniteGuard:
    """Per-run state of the guard: skipped steps in a row, skipped steps since the last metrics line."""

    def __init__(self, dist, limit: int, ckpt_root: str | Path):
        self.dist = dist
        self.limit = limit
        self.ckpt_root = Path(ckpt_root)
        self.in_a_row = 0
        self.skipped = 0

    def _where(self) -> str:
        last = latest_checkpoint(self.ckpt_root)
        return f"the latest checkpoint {last} holds finite weights" if last else "no checkpoint was written"

    def step_ok(self, grad_norm: torch.Tensor | float, loss: float | None, params: list[torch.Tensor],
                step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, for messages) may update the weights. False: skip
        it (counted). RunFailure on non-finite weights or `limit` skipped steps in a row."""
        bad_grad = not math.isfinite(float(grad_norm)) or (loss is not None and not math.isfinite(loss))
        bad_weights = not all_finite(params)
        code = self.dist.max_across(2.0 * bad_weights + (1.0 if bad_grad else 0.0))  # one all-reduce
        if code >= 2:
            raise RunFailure(f"training stopped at step {step}: the weights hold NaN or inf values (a non-finite "
                             f"model.init, or an overflow); nothing of them was saved and {self._where()}; {HELP}")
        if code >= 1:
            self.in_a_row += 1
            self.skipped += 1
            if self.in_a_row >= self.limit:
                steps = "1 optimizer step" if self.in_a_row == 1 else f"{self.in_a_row} optimizer steps"
                raise RunFailure(f"training stopped at step {step}: {steps} in a row had a "
                                 f"non-finite loss or gradient (each was skipped; optim.nonfinite_limit="
                                 f"{self.limit}); {self._where()}; {HELP}")
            return False
        self.in_a_row = 0
        return True

    def pop_skipped(self) -> int:
        """Steps skipped since the last call (the ``skipped_nonfinite`` of a metrics record)."""
        n, self.skipped = self.skipped, 0
        return n

    def check_saveable(self, params: Iterable[torch.Tensor], ema_shadow: Iterable[torch.Tensor], step: int) -> None:
        """RunFailure unless the weights and their EMA are finite on every process: a checkpoint
        of them would replace (under keep_last, delete) the finite ones."""
        bad = not (all_finite(params) and all_finite(ema_shadow))
        if self.dist.max_across(float(bad)) > 0:
            raise RunFailure(f"training stopped at step {step}: the weights or their EMA hold NaN or inf values, "
                             f"so checkpoint step-{step} was not written and {self._where()}; {HELP}")
