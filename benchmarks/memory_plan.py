"""The activation estimate of `refrl plan` against the memory one real CPU training step uses.

For the tiny DiT and the tiny FLUX.2 klein twin (full fine-tune and LoRA): one forward +
backward of the plan's loss step, run for real under ``torch.profiler`` (profile_memory);
the peak of its memory timeline above the memory at the start (the weights) is compared
with what `refrl.plan.trace.trace_step` traces under fake tensors for the same step.
Prints one JSON object (docs/guides/memory-plan.md quotes it).

    python benchmarks/memory_plan.py
"""

from __future__ import annotations

import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def measured_peak_above_start(module: torch.nn.Module, step) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(module).backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    total = np.array(sizes).sum(axis=1)
    return int(total.max() - total[0])


def case(name: str, spec, lora_rank: int, batch: int) -> dict:
    from refrl.plan.trace import trace_step

    traced = trace_step(lambda: spec.build(lora_rank), lambda m: spec.step(m, batch))
    torch.manual_seed(0)
    module = spec.build(lora_rank)  # real weights, on the CPU
    measured = measured_peak_above_start(module, lambda m: spec.step(m, batch))
    return {"case": name, "micro_batch": batch, "traced_bytes": traced.peak_above_weights, "measured_bytes": measured,
            "ratio": round(traced.peak_above_weights / measured, 4)}


def main() -> None:
    from refrl.models.build import ModelConfig
    from refrl.models.diffusers import tiny
    from refrl.plan.specs import model_spec
    from refrl.train.data import DataConfig

    results = []
    data = DataConfig(size=32, max_refs=2)
    tiny_dit = ModelConfig(kind="tiny-dit", width=64, depth=2, heads=2, max_refs=2)
    spec = model_spec(tiny_dit, data)
    results += [case("tiny-dit full", spec, 0, 8), case("tiny-dit lora", spec, 4, 8)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny.save_tiny_pipeline("flux2-klein", f"{tmp}/pipe")
        spec = model_spec(tiny.tiny_model_config("flux2-klein", folder), data)
        results += [case("flux2-klein twin full", spec, 0, 4), case("flux2-klein twin lora", spec, 4, 4)]
    print(json.dumps({"benchmark": "memory_plan", "device": "cpu", "results": results,
                      "worst_ratio_deviation": max(abs(r["ratio"] - 1) for r in results)}, indent=2))


if __name__ == "__main__":
    main()
