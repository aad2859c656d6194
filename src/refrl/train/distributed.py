"""Multi-process helpers over accelerate: gather rollouts, average gradients.

refrl does not wrap the policy in DDP: a `Policy` calls several sub-modules
(condition encoder, velocity network), not one ``forward``, so gradients are
averaged explicitly after ``backward`` (one flat all-reduce). With one process
every helper is the identity.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Dist:
    """The process layout of a run (accelerate when launched with it, else one process)."""

    def __init__(self, trackers: list[str] | None = None, project_dir: str | None = None):
        import importlib.util

        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        from refrl.errors import RefrlError

        for name in trackers or []:
            if importlib.util.find_spec(name) is None:
                raise RefrlError(f"tracker {name!r} is not installed: pip install 'refrl[trackers]' (or {name})")

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None,
                                       project_dir=project_dir)
        kind = self.accelerator.distributed_type
        if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
            # Gradients are averaged by hand over full replicas (see above): under a sharding
            # config every process would silently hold and update the whole model.
            raise RefrlError(f"accelerate config distributed_type={kind.value} is not supported: refrl keeps a full "
                             f"replica per process and averages gradients itself; use MULTI_GPU / MULTI_CPU")
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped per-rank tensors along dim 0 in rank order."""
        if self.world == 1:
            return t
        return self.accelerator.gather(t.contiguous().to(self.device)).cpu()

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        params = [p for p in params if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def max_across(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    def mean_across(self, value: float) -> float:
        """The mean of a per-process value over all processes (e.g. a local loss)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()
