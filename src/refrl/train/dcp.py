"""Sharded checkpoints (``distributed.strategy: fsdp2``) with torch.distributed.checkpoint.

The folder ``checkpoints/step-N/`` of a sharded run holds what a replicated run's does
(`refrl.train.checkpoint`), except that the trainable weights, the optimizer state and the
EMA are in ``dcp/`` (every process writes its own shards; "Getting Started with
Distributed Checkpoint", pytorch.org tutorials) instead of ``trainable.safetensors``,
``trainer.pt``'s optimizer and ``ema.safetensors``. ``policy/`` is still the full,
unsharded policy (EMA weights, LoRA adapters gathered from every process), loadable by
eval and generate. ``trainer.pt`` keeps the LR schedule, the RNG states and the trainer's
extra state (e.g. the data position); ``state.json`` the step.

Every process writes its shards into ``checkpoints/.dcp-step-N`` first; the main process
then moves that folder into the checkpoint it writes atomically, so a crash leaves no
half checkpoint. Multi-node runs need the run folder on a shared file system.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from refrl.errors import RefrlError
from refrl.train.checkpoint import rng_state, save_checkpoint

if TYPE_CHECKING:
    from refrl.train.ema import EMA
    from refrl.train.loop import TrainLoop

DCP_DIR = "dcp"


def _state(root: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(root, optimizer)
    return {"model": model, "optim": optim, "ema": ema.state_dict()}


def save_sharded(folder: str | Path, root: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> None:
    """Every process writes its shards of the model, the optimizer state and the EMA into ``folder``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(root, optimizer, ema), checkpoint_id=str(folder))


def load_sharded(ckpt: str | Path, root: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA) -> None:
    """Read a checkpoint's ``dcp/`` back into the sharded model, optimizer and EMA (any process count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = Path(ckpt) / DCP_DIR
    if not (folder / ".metadata").is_file():
        raise RefrlError(f"{ckpt}: no sharded weights ({DCP_DIR}/); it was written with distributed.strategy=ddp, "
                         "resume it with distributed.strategy=ddp")
    state = _state(root, optimizer, ema)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])


def save_sharded_checkpoint(loop: TrainLoop, done: int) -> Path | None:
    """`refrl.train.loop.TrainLoop.checkpoint` for a sharded run (called by every process)."""
    sharding, dist = loop.sharding, loop.dist
    stage = loop.ckpt_root / f".dcp-step-{done}"
    if dist.is_main:
        shutil.rmtree(stage, ignore_errors=True)  # left by a crash
    dist.barrier()
    sharding.reshard()
    save_sharded(stage, sharding.root, loop.optimizer, loop.ema)
    dist.barrier()
    state = {"scheduler": loop.scheduler.state_dict(), "rng": rng_state(), **loop.extra_state()}
    path = None
    with loop.ema.swapped_in(), sharding.full_weights(dist.is_main):  # gathers in every process
        if dist.is_main:
            def export(folder: Path) -> None:
                loop.policy.save_pretrained(folder)
                shutil.move(str(stage), str(folder.parent / DCP_DIR))

            path = save_checkpoint(
                loop.ckpt_root, done, export, state, None,
                {"data_position": done, "kind": loop.spec.kind, "init_sha256": loop.init_sha,
                 "strategy": "fsdp2", "processes": dist.world},
                keep_last=loop.spec.keep_last,
            )
    dist.barrier()
    return path
