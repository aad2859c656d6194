"""Benchmark sections for training: SFT step, GRPO iteration, the whole quickstart."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
SFT_STEPS = {"full": 6, "quick": 3}


def train_section(args: argparse.Namespace) -> dict[str, Any]:
    """ms per SFT step of the shipped config, and achieved GFLOP/s of its matmuls.

    FLOPs are those the step executes: padded text/reference lengths of the batch, the
    condition stream once per condition and the image stream once per noise draw,
    forward + backward counted as 3x forward (the usual estimate).
    """
    from refrl.config import load_config
    from refrl.models.build import build_policy
    from refrl.train.data import SampleSource
    from refrl.train.sft import SFTConfig, sft_step

    cfg = load_config(SFTConfig, REPO / "configs/tiny-cpu-sft.yaml")
    policy = build_policy(cfg.model)
    policy.train()
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    source = SampleSource(cfg.data, seed=0, total_steps=cfg.steps)
    arch = policy.config
    times, flops = [], []
    for step in range(cfg.steps // 2, cfg.steps // 2 + SFT_STEPS[args.mode]):
        samples = source.batch(step, cfg.batch_size)
        ids, _ = policy.tokenizer.encode([s.prompt for s in samples], arch.max_text_len)
        n_text, n_refs = ids.shape[1], max(s.n_refs for s in samples)
        b, k = len(samples), cfg.noise_per_condition
        fwd = b * arch.flops_per_sample(n_refs, n_text, include_condition=True)
        fwd += b * (k - 1) * arch.flops_per_sample(n_refs, n_text, include_condition=False)
        start = time.perf_counter()
        loss, _ = sft_step(policy, source, cfg, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        flops.append(3 * fwd)
    best = min(range(len(times)), key=lambda i: times[i] / flops[i])
    return {
        "config": {"width": arch.width, "depth": arch.depth, "batch_size": cfg.batch_size,
                   "noise_per_condition": cfg.noise_per_condition},
        "params_m": round(arch.param_count() / 1e6, 2),
        "ms_per_step_median": round(1000 * sorted(times)[len(times) // 2], 1),
        "ms_per_step_best": round(1000 * times[best], 1),
        "achieved_gflops": round(flops[best] / times[best] / 1e9, 1),
    }


def grpo_section(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per GRPO iteration (rollout / reward / train) with configs/tiny-cpu-grpo.yaml."""
    from refrl.config import load_config
    from refrl.train.grpo import train_grpo
    from refrl.train.grpo_config import GRPOConfig

    overrides = ["iterations=2", "checkpoint_every=100"]
    if args.mode == "quick":
        overrides += ["groups_per_iteration=2", "minibatch_size=16", "gradient_accumulation=1"]
    cfg = load_config(GRPOConfig, REPO / "configs/tiny-cpu-grpo.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        train_grpo(cfg, tmp)
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    last = recs[-1]  # the first iteration includes one-time warm-up
    keys = ("seconds/rollout", "seconds/reward", "seconds/train", "samples_per_second")
    return {"samples_per_iteration": cfg.groups_per_iteration * cfg.group_size,
            "rollout_steps": cfg.sampling.steps, **{k.split("/")[-1]: round(last[k], 3) for k in keys}}


def grpo_signal_section(args: argparse.Namespace) -> dict[str, Any]:
    """Signal-to-noise of a GRPO config before training (``refrl.train.signal``): the cosine between the
    gradients of two independent half-batches and the share of within-group reward variance the
    trained SDE steps cause. ``--config`` picks the config (default configs/tiny-cpu-grpo.yaml),
    ``--set KEY=VALUE`` overrides it."""
    from refrl.config import load_config
    from refrl.train.grpo import GRPOTrainer
    from refrl.train.grpo_config import GRPOConfig
    from refrl.train.signal import measure_signal

    cfg = load_config(GRPOConfig, args.config or REPO / "configs/tiny-cpu-grpo.yaml", list(args.set))
    iterations = 1 if args.mode == "quick" else args.signal_iterations
    with tempfile.TemporaryDirectory() as tmp:
        result = measure_signal(GRPOTrainer(cfg, tmp), iterations=iterations)
    return {"config": str(args.config or "configs/tiny-cpu-grpo.yaml"), "overrides": list(args.set), **result}


def quickstart_section(args: argparse.Namespace) -> dict[str, Any]:
    """Wall seconds and peak RSS of ``refrl quickstart`` in a fresh folder (full mode only)."""
    if args.mode == "quick":
        return {"skipped": "runs only without --quick (it takes minutes)"}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "refrl", "quickstart", "--out", tmp], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}
