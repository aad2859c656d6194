"""FSDP2 sharding of a policy's trainable network (``distributed.strategy: fsdp2``).

With ``strategy: ddp`` (the default) every process holds a full replica and
`refrl.train.distributed.Dist.average_gradients` averages gradients by hand. With
``fsdp2`` the network is split with ``torch.distributed.fsdp.fully_shard`` (FSDP2,
"Getting started with FSDP2", pytorch.org tutorials) on a 1-D DeviceMesh over all
processes: each process keeps 1/world of every parameter, of its gradient, of the
optimizer state and of the EMA; a block's full weights exist only while it runs.

accelerate still launches the processes and owns the process group; its own FSDP plugin
is not used (on CPU it silently falls back to replicas), ``fully_shard`` is applied
directly, on CPU (gloo) and GPU (NCCL) alike.

A policy states its sharding units with ``fsdp_units()``: the modules to shard one by one,
the last being the root that holds every trainable parameter (the tiny DiT: each block of
``cond_blocks``, ``cond_last``, each of ``blocks``, then the network; diffusers FLUX-type
transformers: each of ``transformer_blocks`` and ``single_transformer_blocks``, then the
transformer). The root's ``encode_condition`` / ``velocity`` methods, called instead of
``forward``, are registered with ``register_fsdp_forward_method``.
"""

from __future__ import annotations

import atexit
import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from refrl.config import StrictModel
from refrl.errors import RefrlError

FORWARD_METHODS = ("encode_condition", "velocity")


class DistributedConfig(StrictModel):
    """How the processes of a run share the model."""

    # ddp: a full replica per process, gradients averaged; fsdp2: parameters, gradients,
    # optimizer state and EMA sharded over the processes (docs/guides/multi-gpu.md)
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    # free each block's gathered weights after its forward (less memory, one more all-gather in backward)
    reshard_after_forward: bool = True


def fsdp_units(policy: Any) -> list[nn.Module]:
    """The policy's sharding units, root last; a RefrlError when the policy states none."""
    units = getattr(policy, "fsdp_units", None)
    if units is None:
        raise RefrlError(f"distributed.strategy=fsdp2: {type(policy).__name__} does not state its sharding units "
                         "(fsdp_units); use distributed.strategy=ddp")
    units = list(units())
    if not units:
        raise RefrlError(f"distributed.strategy=fsdp2: {type(policy).__name__} has no sharding units")
    return units


class Sharding:
    """The DeviceMesh and the FSDP2-sharded modules of one run (see module docstring)."""

    def __init__(self, world: int, device: torch.device, reshard_after_forward: bool = True):
        from torch.distributed.device_mesh import init_device_mesh

        self.world = world
        self.reshard_after_forward = reshard_after_forward
        self.mesh = init_device_mesh(device.type, (world,))
        self.roots: list[nn.Module] = []  # the trained policy's sharded root
        self.frozen_roots: list[nn.Module] = []  # those of frozen copies

    def shard(self, policy: Any) -> nn.Module:
        """Shard ``policy``'s units in place; returns its root."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        units = fsdp_units(policy)
        kw: dict[str, Any] = {"mesh": self.mesh, "reshard_after_forward": self.reshard_after_forward}
        # The condition stream returns views (split keys/values) that are never changed in place;
        # the sharded-vs-replicated gradient test (tests/test_sharding.py) checks the gradients.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for unit in units:
            fully_shard(unit, **kw)
        root = units[-1]
        for name in FORWARD_METHODS:
            if callable(getattr(root, name, None)):
                register_fsdp_forward_method(root, name)
        self.roots.append(root)
        return root

    def shard_frozen_copy(self, policy: Any) -> Any:
        """A frozen copy of the (not yet sharded) policy, sharded the same way (a KL reference)."""
        import copy

        ref = copy.deepcopy(policy)
        for p in ref.trainable_parameters():
            p.requires_grad_(False)
        root = fsdp_units(ref)[-1]
        self.shard(ref)
        self.roots.remove(root)
        self.frozen_roots.append(root)
        return ref

    @property
    def root(self) -> nn.Module:
        return self.roots[0]

    def reshard(self) -> None:
        """Free gathered weights a forward without backward (rollouts, the root) left behind."""
        from torch.distributed.fsdp import FSDPModule

        for root in self.roots + self.frozen_roots:
            for m in root.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    @contextmanager
    def full_weights(self, main: bool) -> Iterator[None]:
        """All processes gather every sharded parameter of the trained policy; in the main
        process they stand, as plain CPU tensors, in place of the shards until the block
        exits (so ``save_pretrained`` writes full weights); elsewhere nothing changes."""
        from torch.distributed.tensor import DTensor

        self.reshard()
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        gathered: dict[int, nn.Parameter | None] = {}  # tied parameters are gathered once
        try:
            with torch.no_grad():
                for module in self.root.modules():  # the same order in every process: the gathers pair up
                    for name, p in list(module._parameters.items()):
                        if not isinstance(p, DTensor):
                            continue
                        if id(p) not in gathered:
                            full = p.full_tensor().cpu()
                            gathered[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad) if main else None
                        if main:
                            module._parameters[name] = gathered[id(p)]
                            swapped.append((module, name, p))
            yield
        finally:
            for module, name, p in reversed(swapped):
                module._parameters[name] = p

    def close(self) -> None:
        """Drop the mesh and the roots (call before the process group is destroyed)."""
        self.roots.clear()
        self.frozen_roots.clear()
        self.mesh = None


def build_sharding(cfg: Any, dist: Any) -> Sharding | None:
    """The run's `Sharding` under ``distributed.strategy=fsdp2`` with more than one process, else None."""
    section = getattr(cfg, "distributed", None)
    if section is None or section.strategy != "fsdp2" or dist.world == 1:
        return None
    return Sharding(dist.world, dist.device, section.reshard_after_forward)


def _destroy_process_group() -> None:
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def release(owner: Any, keep: tuple[str, ...] = ()) -> None:
    """A clean exit after sharded training: drop every attribute of ``owner`` (model, optimizer,
    EMA, mesh) but ``keep`` and collect garbage; the process group is destroyed at interpreter
    exit, after that (another run may still use it). A DeviceMesh or sharded module still
    alive when the process group goes makes processes abort at random at exit."""
    sharding = getattr(owner, "sharding", None)
    if sharding is not None:
        sharding.close()
    for key in [k for k in vars(owner) if k not in keep]:
        delattr(owner, key)
    gc.collect()
    if not _EXIT_HOOK:
        atexit.register(_destroy_process_group)
        _EXIT_HOOK.append(True)


_EXIT_HOOK: list[bool] = []
