"""GPU smoke benchmark of the diffusers backends with full-size, random-weight transformers.

    python benchmarks/gpu_smoke.py [--model flux2-klein|qwen-edit-plus|all] [--out gpu_smoke.json]

Builds FLUX.2 [klein] base 4B's transformer (the published config: 5 double + 20 single
blocks, 24 heads x 128, text width 7680) and, if memory allows, Qwen-Image-Edit-2511's
(60 MMDiT blocks, the diffusers defaults), with random bf16 weights, plus each VAE at its
default (full-size) config. No text encoder: random text embeddings stand in for
precomputed ones (``model.text_cache``), so the numbers are the transformer + VAE cost.
The adapters are the ones training uses (`Flux2KleinPolicy`, `QwenEditPlusPolicy`).

At ``--size`` 512 px, ``--refs`` 4 references and ``--group`` 8 it measures:

* rollout seconds per image: one GRPO group (G samples of one condition) denoised in
  ``--steps`` steps, SDE on all but the last (CFG off), plus condition encoding and
  VAE decoding, divided by G; FLUX.2 with full reference attention and with the causal
  reference key/value cache;
* LoRA train step seconds: rank 32 LoRA, gradient checkpointing, condition encoding +
  velocity for the G samples at one noise level + backward + AdamW step;
* peak GPU memory of each phase (``torch.cuda.max_memory_allocated``);
* achieved TFLOP/s: FLOPs counted by ``torch.utils.flop_counter`` on a separate,
  untimed pass of the same work, divided by the timed seconds.

Prints one JSON object (also written to ``--out``). Without CUDA it stops with one line.
``--check`` runs the same code on CPU with the tiny test components (no meaningful
numbers; it only proves the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# FLUX.2 [klein] base 4B transformer, as published (black-forest-labs/FLUX.2-klein-base-4B, transformer/config.json).
FLUX2_KLEIN_4B = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "guidance_embeds": False,
}
FLUX2_TEXT_TOKENS = 512  # Flux2KleinPipeline pads the prompt to 512 tokens
QWEN_TEXT_TOKENS = 300  # a typical instruction + 4 "Picture i" blocks after the template is dropped
LORA_RANK = 32
REPEATS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["flux2-klein", "qwen-edit-plus", "all"], default="all")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--refs", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="gpu_smoke.json")
    p.add_argument("--check", action="store_true", help="run on CPU with tiny components (script check only)")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def counted_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- building the adapters -------------------------------------------------------------------------
def build_policy(kind: str, args: argparse.Namespace, device: torch.device, **options: Any):
    """A full-size random-weight adapter of ``kind`` (tiny components with --check)."""
    from refrl.models.build import ModelConfig
    from refrl.models.diffusers import tiny
    from refrl.models.diffusers.persistence import backend_class

    if args.check:
        pipe = tiny.tiny_pipeline(kind)
        cfg = tiny.tiny_model_config(kind, "random", diffusers={"load_text_encoder": False, **options},
                                     gradient_checkpointing=True)
    else:
        pipe = full_size_pipeline(kind, device)
        cfg = ModelConfig(kind=kind, pretrained="random", dtype="bfloat16", device=str(device), image_size=args.size,
                          ref_size=args.size, gradient_checkpointing=True,
                          diffusers={"load_text_encoder": False, **options})
    for name in ("text_encoder", "tokenizer", "processor"):
        if hasattr(pipe, name):
            setattr(pipe, name, None)
    return backend_class(kind)(pipe, cfg)


def full_size_pipeline(kind: str, device: torch.device):
    """The diffusers pipeline with full-size random bf16 transformer and VAE, no text encoder."""
    import diffusers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build directly in bf16 on the GPU (no fp32 copy)
    try:
        with torch.device(device):
            if kind == "flux2-klein":
                transformer = diffusers.Flux2Transformer2DModel(**FLUX2_KLEIN_4B)
                vae = diffusers.AutoencoderKLFlux2()
                cls = diffusers.Flux2KleinPipeline
            else:
                transformer = diffusers.QwenImageTransformer2DModel(zero_cond_t=True)  # Qwen-Image-Edit-2511
                vae = diffusers.AutoencoderKLQwenImage()
                cls = diffusers.QwenImageEditPlusPipeline
    finally:
        torch.set_default_dtype(previous)
    components = {"transformer": transformer, "vae": vae, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
                  "text_encoder": None, "tokenizer": None}
    if kind == "qwen-edit-plus":
        components["processor"] = None
    return cls(**components)


def random_sample(args: argparse.Namespace, size: int):
    from refrl.data.schema import LoadedSample

    g = torch.Generator().manual_seed(0)
    refs = [torch.rand(3, size, size, generator=g) for _ in range(args.refs)]
    prompt = "Put the subject of image 1 on the left and the subject of image 2 on the right."
    return LoadedSample("bench", prompt, refs, ["subject"] * args.refs, target=torch.rand(3, size, size, generator=g))


def seed_text_embedding(policy, sample, tokens: int) -> None:
    """Random text embeddings in the text cache, as precomputed ones would be."""
    width = policy.transformer.config.joint_attention_dim
    refs = [r for r in sample.ref_images]
    from refrl.models.inputs import resize_square

    refs = [resize_square(r, policy.cfg.ref_size, "ref") for r in refs]
    for prompt, kept in ((sample.prompt, refs), (policy.opts.negative_prompt, refs)):
        policy.text_cache.put(policy._text_key(prompt, kept), {"embeds": torch.randn(tokens, width).to(policy.dtype)})


# -- measurements -----------------------------------------------------------------------------------
def rollout_once(policy, sample, args: argparse.Namespace) -> torch.Tensor:
    from refrl.sampling.rollout import rollout_sde
    from refrl.sampling.schedules import sigma_schedule

    shape = policy.latent_shape(args.size, args.size)
    with torch.no_grad():
        cond = policy.select_condition(policy.encode_condition([sample]), torch.zeros(args.group, dtype=torch.long))
        x = torch.randn(args.group, *shape)
        sde_steps = list(range(args.steps - 1))
        noise = torch.randn(len(sde_steps), args.group, *shape)
        traj = rollout_sde(policy, cond, None, x, sigma_schedule(args.steps, shift=3.0), sde_steps, "flow-sde", 0.7,
                           1.0, noise)
        return policy.decode(traj.final)


def measure_rollout(policy, sample, args, device) -> dict[str, float | None]:
    reset_peak(device)
    seconds = timed(lambda: rollout_once(policy, sample, args), device, REPEATS)
    flops = counted_flops(lambda: rollout_once(policy, sample, args))
    return {"rollout_s_per_image": seconds / args.group, "rollout_group_s": seconds,
            "rollout_tflops_per_s": flops / seconds / 1e12, "rollout_peak_gib": peak_gib(device)}


def measure_train_step(policy, sample, args, device) -> dict[str, float | None]:
    policy.enable_lora(LORA_RANK, LORA_RANK)
    policy.train()
    params = list(policy.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    shape = policy.latent_shape(args.size, args.size)
    x = torch.randn(args.group, *shape)
    sigma = torch.full((args.group,), 0.7)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        cond = policy.encode_condition([sample] * args.group)
        loss = policy.velocity(x, sigma, cond).pow(2).mean()  # same graph as the PPO loss of one SDE step
        loss.backward()
        optimizer.step()

    reset_peak(device)
    seconds = timed(step, device, REPEATS)
    flops = counted_flops(step)
    return {"train_step_s": seconds, "train_tflops_per_s": flops / seconds / 1e12, "train_peak_gib": peak_gib(device),
            "lora_params_m": sum(p.numel() for p in params) / 1e6}


def run_model(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    sample = random_sample(args, 32 if args.check else args.size)
    tokens = 8 if args.check else (FLUX2_TEXT_TOKENS if kind == "flux2-klein" else QWEN_TEXT_TOKENS)
    variants = {"full": {"ref_attention": "full"}, "kv_cache": {"ref_attention": "causal"}} \
        if kind == "flux2-klein" else {"default": {}}
    result: dict[str, Any] = {}
    try:
        for name, options in variants.items():
            policy = build_policy(kind, args, device, **options)
            seed_text_embedding(policy, sample, tokens)
            policy.eval()
            result[name] = measure_rollout(policy, sample, args, device)
            if name in ("full", "default"):
                result[name].update(measure_train_step(policy, sample, args, device))
            result["transformer_params_b"] = sum(p.numel() for p in policy.transformer.parameters()) / 1e9
            del policy
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except torch.cuda.OutOfMemoryError as e:
        result["skipped"] = f"out of GPU memory: {' '.join(str(e).split())[:200]}"
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.check and not torch.cuda.is_available():
        print("gpu_smoke.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --check to only test the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.check else torch.device("cuda", torch.cuda.current_device())
    if args.check:
        args.size, args.group, args.steps = 32, 2, 3
    kinds = ["flux2-klein", "qwen-edit-plus"] if args.model == "all" else [args.model]
    report: dict[str, Any] = {
        "device": "cpu (--check)" if args.check else torch.cuda.get_device_name(device),
        "torch": torch.__version__, "size": args.size, "refs": args.refs, "group": args.group, "steps": args.steps,
        "dtype": "float32" if args.check else "bfloat16",
    }
    for kind in kinds:
        print(f"[gpu_smoke] {kind} ...", file=sys.stderr)
        report[kind] = run_model(kind, args, device)
    text = json.dumps(report, indent=2)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
