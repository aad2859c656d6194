"""One process of the FSDP2 tests (tests/test_sharding.py), started by torchrun with 2 CPU processes (gloo).

``python fsdp_worker.py MODE OUT``; rank 0 writes ``OUT/MODE.json``:

* ``units``: sharding of the tiny DiT and a tiny FLUX.2 klein twin against an unsharded
  replica in the same process: local shard sizes, gradients, one SGD step, full export,
  LoRA adapter export;
* ``train``: SFT with ``distributed.strategy=fsdp2`` uninterrupted, then the same run killed
  (SIGKILL in every process) at step 3, after the step-2 checkpoint;
* ``resume``: a new launch resumes the killed run; then one iteration of each RL objective
  (full fine-tune with a KL copy, LoRA);
* ``node``: the uninterrupted SFT run alone (launched as a 2-node job).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import json
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

SFT = ["model.width=32", "model.depth=2", "model.heads=2", "batch_size=4", "noise_per_condition=2", "log_every=1",
       "checkpoint_every=2", "keep_last=5", "optim.warmup_steps=1", "data.max_refs=3", "steps=4",
       "distributed.strategy=fsdp2", "validation.every=0", "validation.guard=[]", "validation.keep_best=null"]


def sft_config(*extra: str):
    from refrl.config import load_config
    from refrl.train.sft import SFTConfig

    return load_config(SFTConfig, "configs/tiny-cpu-sft.yaml", [*SFT, *extra])


def compare(name: str, build, samples, lora: bool, folder: Path) -> dict:
    """Shard ``build()`` and step it and an unsharded replica on the same global batch."""
    from safetensors.torch import load_file

    from refrl.train.sharding import Sharding, fsdp_units

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    policy = build()
    replica = copy.deepcopy(policy)
    sharding = Sharding(world, torch.device("cpu"))
    root = sharding.shard(policy)
    twin_root = fsdp_units(replica)[-1]
    out: dict = {"shards": {}}
    for n, p in root.named_parameters():
        local = torch.tensor([p.to_local().numel()])
        sizes = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(sizes, local)
        out["shards"][n] = {"numel": p.numel(), "local": [int(s) for s in sizes], "dim0": p.shape[0] if p.dim() else 1}
    half = len(samples) // world
    # each process: the mean over its half; FSDP averages gradients over processes = the full-batch mean
    # (the same per-sample noise: the batch is drawn in full, each process keeps its rows)
    sharded_loss = batch_loss_rows(policy, samples, range(rank * half, (rank + 1) * half), seed=1)
    sharded_loss.backward()
    batch_loss_rows(replica, samples, batch_rows=range(len(samples)), seed=1).backward()
    twin = dict(twin_root.named_parameters())
    diffs = [float((p.grad.full_tensor() - twin[n].grad).abs().max()) for n, p in root.named_parameters()
             if p.grad is not None]
    out["grad_max_diff"] = max(diffs)
    out["grads_compared"] = len(diffs)
    out["grad_abs_max"] = max(float(twin[n].grad.abs().max()) for n, p in root.named_parameters() if p.grad is not None)
    for params in ([p for p in policy.trainable_parameters()], [p for p in replica.trainable_parameters()]):
        torch.optim.SGD(params, lr=0.5).step()
    with torch.no_grad():
        out["step_max_diff"] = max(float((p.full_tensor() - twin[n]).abs().max()) for n, p in root.named_parameters())
    with sharding.full_weights(main=rank == 0):
        if rank == 0:
            kw = {"merge_lora": False} if name == "tiny-dit" else {}
            policy.save_pretrained(folder / f"{name}-sharded", **kw)
            replica.save_pretrained(folder / f"{name}-replica", **kw)
            files = {}
            for f in sorted((folder / f"{name}-replica").rglob("*.safetensors")):
                a, b = load_file(str(f)), load_file(str(folder / f"{name}-sharded" / f.relative_to(folder / f"{name}-replica")))
                files[f.name] = {"tensors": len(a), "same_keys": a.keys() == b.keys(),
                                 "max_diff": max(float((a[k].float() - b[k].float()).abs().max()) for k in a),
                                 "nonzero": sum(int(v.count_nonzero()) for v in b.values())}
            out["files"] = files
    sharding.close()
    return out


def batch_loss_rows(policy, samples, batch_rows, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = samples[0].target.shape[-1]
    shape = policy.latent_shape(size, size)
    n = len(samples)
    x, sigma, target = torch.randn(n, *shape, generator=g), torch.rand(n, generator=g), torch.randn(n, *shape, generator=g)
    rows = list(batch_rows)
    v = policy.velocity(x[rows], sigma[rows], policy.encode_condition([samples[i] for i in rows]))
    return ((v - target[rows]) ** 2).mean()


def units(out: Path) -> dict:
    from refrl.data.refworld import RefWorld
    from refrl.models.build import ModelConfig, build_policy
    from refrl.models.diffusers import tiny

    world = RefWorld(size=32, level=0, max_refs=2, categories=["subject", "subject_bg"])
    # reference counts 1, 1 | 1, 2: the second process runs the diffusers transformer twice
    # (once per count), the first once and then once more, padded (refrl.models.diffusers.common)
    samples = [tiny.quantize_sample(world.sample(np.random.default_rng(i)), n_refs=1 if i < 3 else 2) for i in range(4)]
    pipe = out / "pipe"
    if dist.get_rank() == 0:
        tiny.save_tiny_pipeline("flux2-klein", pipe)
    dist.barrier()
    tiny_dit = dict(kind="tiny-dit", width=32, depth=2, heads=2, max_refs=2)

    def tiny_lora():  # zero-initialised head and LoRA B: perturb, or every LoRA gradient is 0
        policy = build_policy(ModelConfig(**tiny_dit, lora_rank=2))
        with torch.no_grad():
            for p in policy.net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return policy

    return {
        "tiny-dit-full": compare("tiny-dit-full", lambda: build_policy(ModelConfig(**tiny_dit)), samples, False, out),
        "tiny-dit": compare("tiny-dit", tiny_lora, samples, True, out),
        "flux2-klein-full": compare("flux2-klein-full", lambda: build_policy(
            tiny.tiny_model_config("flux2-klein", pipe, lora_rank=0)), samples, False, out),
        "flux2-klein": compare("flux2-klein", lambda: build_policy(
            tiny.tiny_model_config("flux2-klein", pipe, lora_rank=2)), samples, True, out),
    }


def train(out: Path, mode: str) -> dict:
    from refrl.config import load_config
    from refrl.train import sft as sft_mod
    from refrl.train.grpo import GRPOConfig, train_grpo

    if mode in ("train", "node"):
        sft_mod.train_sft(sft_config(), out / "full")
    if mode == "node":
        return {}
    if mode == "train":
        real, calls = sft_mod.sft_step, {"n": 0}

        def kill_in_step_three(*args, **kwargs):  # a real kill: no checkpoint after step 2, no clean-up
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            calls["n"] += 1
            return real(*args, **kwargs)

        sft_mod.sft_step = kill_in_step_three
        sft_mod.train_sft(sft_config(), out / "part")
        raise AssertionError("the run was to be killed in step 3")
    sft_mod.train_sft(sft_config(), out / "part", resume=True)  # mode == "resume": a new launch
    init = str(out / "full" / "checkpoints" / "step-4" / "policy")
    # Adam with eps=1 on gradients far below 1 steps like SGD (lr * g): the sharded and replicated
    # runs agree to float rounding; at the default eps the first Adam step amplifies it (sign of ~0)
    rl = [f"model.init={init}", "iterations=1", "groups_per_iteration=2", "group_size=4", "gradient_accumulation=1",
          "minibatch_size=4", "sampling.steps=3", "data.max_refs=3", "optim.lr=1.0", "optim.eps=1.0",
          "optim.weight_decay=0", "ema_decay=0", "validation.every=0",
          "validation.guard=[]", "validation.keep_best=null"]
    objectives = {"grpo-full-kl-copy": ["beta_kl=0.1", "model.lora_rank=0"],
                  "nft-lora-kl-adapter": ["objective=nft", "sampling.sde_steps=none", "sampling.same_noise_in_group=false",
                                          "matching.k=2", "beta_kl=0.1", "model.lora_rank=2", "model.frozen=[]"],
                  "awm-full-ema-old": ["objective=awm", "sampling.sde_steps=none", "sampling.same_noise_in_group=false",
                                       "matching.k=2", "matching.old_policy=ema", "model.lora_rank=0"]}
    runs = {f"{name}-{strategy}": [*extra, f"distributed.strategy={strategy}"]
            for name, extra in objectives.items() for strategy in ("fsdp2", "ddp")}
    rl_configs = {name: load_config(GRPOConfig, "configs/tiny-cpu-grpo.yaml", rl + extra)
                  for name, extra in runs.items()}  # validated before any training
    for name, cfg in rl_configs.items():
        train_grpo(cfg, out / name)
    return {}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    result = units(out) if mode == "units" else train(out, mode)
    if dist.get_rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
