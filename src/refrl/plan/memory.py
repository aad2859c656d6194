"""`refrl plan`: the memory a training config needs per GPU, before launch (docs/guides/memory-plan.md).

For data-parallel (``distributed.strategy=ddp``) and FSDP2 (``fsdp2``), each with a full
fine-tune and with LoRA, per GPU:

* weights, gradients, AdamW state, EMA, KL reference: from the parameters of the model
  built on the meta device (the shipped real architecture, `refrl.plan.architectures`),
  exact; under FSDP2 each parameter is split along dim 0 as FSDP2 does (the largest
  shard), plus the largest sharding unit gathered twice (the one running and the next,
  prefetched);
* activations of one micro-batch, with and without gradient checkpointing: traced
  (`refrl.plan.trace`), not a formula;
* rollout buffers (RL): the latents of every denoising step of this GPU's samples,
  float32 (their shapes, times 4 bytes);
* text encoder and VAE: their parameters, when the pipeline is a local folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refrl.plan.trace import Trace, trace_step

GIB = 1024**3
HEADROOM = 0.9  # of --gpu-memory: the rest for the CUDA context and allocator fragmentation
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATCH_PIXELS = 16  # pixels per transformer token of every supported diffusers family (VAE 8 x 2x2 patches)


@dataclass
class ModelSpec:
    """What the plan needs of a model: a builder (any device) and one loss step for tracing."""

    label: str
    build: Callable[..., nn.Module]  # (lora_rank, **depth) -> model (trained network; LoRA applied when > 0)
    units: Callable[[nn.Module], list[nn.Module]]  # FSDP2 sharding units, root last
    step: Callable[[nn.Module, int], torch.Tensor]  # (model, micro-batch) -> loss
    latent_numel: int  # numbers in one latent (rollout buffers)
    frozen_bytes: dict[str, int | None] = field(default_factory=dict)  # text encoder, VAE (None: unknown)
    checkpointing: Callable[[nn.Module], None] | None = None  # enables gradient checkpointing, if the model has it
    depth: dict[str, int] = field(default_factory=dict)  # block-count keys of ``build`` and their real values


def param_bytes(params: list[nn.Parameter], world: int = 1) -> int:
    """Bytes of ``params`` on the process holding the largest FSDP2 shard (dim 0 split in
    ``world`` chunks of ceil(dim0 / world) rows); ``world`` = 1: the full bytes."""
    total = 0
    for p in params:
        if p.dim() == 0 or world == 1:
            total += p.numel() * p.element_size()
        else:
            rows = math.ceil(p.shape[0] / world)
            total += rows * (p.numel() // p.shape[0]) * p.element_size()
    return total


def state_bytes(model: nn.Module, world: int, kl_copy: bool) -> dict[str, int]:
    """Weights, gradients, AdamW state, EMA and KL reference bytes of one process."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    # AdamW: exp_avg and exp_avg_sq in the parameter's dtype, a float32 step count per tensor
    optimizer = 2 * param_bytes(trainable, world) + 4 * len(trainable)
    ema_params = [torch.empty(p.shape, dtype=torch.float32, device="meta") for p in trainable]  # EMA is float32
    frozen_base = [p for p in params if not p.requires_grad or kl_copy]
    return {
        "weights": param_bytes(params, world),
        "gradients": param_bytes(trainable, world),
        "optimizer": optimizer,
        "ema": param_bytes(ema_params, world),
        "kl_reference": param_bytes(frozen_base, world) if kl_copy else 0,
    }


def gathered_unit_bytes(model: nn.Module, units: list[nn.Module]) -> int:
    """FSDP2: the largest unit's full weights, twice (running + prefetched)."""
    seen: set[int] = set()
    sizes = []
    for unit in units:  # a unit's own parameters are those not in an earlier unit
        own = [p for p in unit.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        sizes.append(param_bytes(own))
    return 2 * max(sizes, default=0)


def trace_spec(spec: ModelSpec, lora_rank: int, micro_batch: int, checkpointing: bool,
               extrapolate: bool = True) -> Trace | None:
    """The traced step of the model with its real depth. Blocks of one kind are identical, so
    memory is affine in the block counts: with ``extrapolate`` the model is traced with one block
    of each kind and with two of one kind, and the real depth follows exactly (far faster than
    tracing every block; tests/test_plan.py checks it against the direct trace)."""
    if checkpointing and spec.checkpointing is None:
        return None

    def run(depth: dict[str, int]) -> Trace:
        def build() -> nn.Module:
            model = spec.build(lora_rank, **depth)
            if checkpointing:
                spec.checkpointing(model)
            return model

        return trace_step(build, lambda m: spec.step(m, micro_batch))

    if not extrapolate or not spec.depth:
        return run(dict(spec.depth))
    ones = dict.fromkeys(spec.depth, 1)
    base = run(ones)
    fields = base.as_dict()
    for key, real in spec.depth.items():
        more = run({**ones, key: 2}).as_dict()
        for f in fields:
            fields[f] += (more[f] - base.as_dict()[f]) * (real - 1)
    return Trace(**fields)


def make_plan(cfg: Any, spec: ModelSpec, gpus: int, gpu_memory_gib: float, rl: bool) -> dict[str, Any]:
    """The plan of ``cfg`` on ``gpus`` GPUs of ``gpu_memory_gib`` GiB (see module docstring)."""
    lora_rank = cfg.model.lora_rank or 32
    if rl:
        micro, samples = max(1, cfg.minibatch_size // gpus), math.ceil(cfg.groups_per_iteration * cfg.group_size / gpus)
        steps = cfg.sampling.steps or 0
        rollout = samples * (steps + 1) * spec.latent_numel * 4
        kl_full = cfg.beta_kl > 0 and cfg.kl_reference != "adapter"
    else:
        micro = max(1, cfg.batch_size * cfg.noise_per_condition // gpus)
        rollout, kl_full = 0, False
    with torch.device("meta"):
        models = {"full": spec.build(0), "lora": spec.build(lora_rank)}
    traces = {(ft, gc): trace_spec(spec, 0 if ft == "full" else lora_rank, micro, gc)
              for ft in models for gc in (False, True)}
    use_gc = bool(getattr(cfg.model, "gradient_checkpointing", False))
    frozen = {k: v for k, v in spec.frozen_bytes.items()}
    columns = []
    for strategy in ("ddp", "fsdp2"):
        world = gpus if strategy == "fsdp2" else 1
        for ft, model in models.items():
            parts = state_bytes(model, world, kl_copy=kl_full and ft == "full")
            if strategy == "fsdp2" and gpus > 1:
                parts["gathered_units"] = gathered_unit_bytes(model, spec.units(model))
            tr = traces[(ft, use_gc)] or traces[(ft, False)]
            parts["activations"] = tr.activations
            parts["rollout_buffers"] = rollout
            parts.update({k: v or 0 for k, v in frozen.items()})
            total = sum(parts.values())
            columns.append({
                "strategy": strategy, "finetune": ft, "lora_rank": lora_rank if ft == "lora" else 0, "bytes": parts,
                "activations_no_checkpointing": traces[(ft, False)].activations,
                "activations_checkpointing": None if traces[(ft, True)] is None else traces[(ft, True)].activations,
                "total": total, "fits": total <= HEADROOM * gpu_memory_gib * GIB,
            })
    current = next(c for c in columns if c["strategy"] == cfg.distributed.strategy
                   and c["finetune"] == ("lora" if cfg.model.lora_rank else "full"))
    return {"model": spec.label, "gpus": gpus, "gpu_memory_gib": gpu_memory_gib, "micro_batch": micro,
            "gradient_checkpointing": use_gc, "columns": columns, "config_column": current,
            "fits": current["fits"], "advice": advice(current, columns, traces, use_gc, gpu_memory_gib),
            "unknown": [k for k, v in frozen.items() if v is None]}


def advice(current: dict, columns: list[dict], traces: dict, use_gc: bool, gpu_memory_gib: float) -> str | None:
    """Which key to change when the config does not fit (None when it does)."""
    if current["fits"]:
        return None
    limit = HEADROOM * gpu_memory_gib * GIB
    ft = current["finetune"]
    if not use_gc and traces[(ft, True)] is not None:
        saved = traces[(ft, False)].activations - traces[(ft, True)].activations
        if current["total"] - saved <= limit:
            return "set model.gradient_checkpointing=true"
    for c in columns:
        if c["finetune"] == ft and c["strategy"] == "fsdp2" and current["strategy"] == "ddp" and c["fits"]:
            return "set distributed.strategy=fsdp2"
    for c in columns:
        if c["finetune"] == "lora" and ft == "full" and c["fits"]:
            return f"set model.lora_rank={c['lora_rank']} (LoRA) with distributed.strategy={c['strategy']}"
    return "lower the micro-batch (batch_size / minibatch_size) or add GPUs (--gpus)"
