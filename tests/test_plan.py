"""`refrl plan` (docs/guides/memory-plan.md): the shipped real architectures have the published
sizes; on the tiny DiT and a tiny FLUX.2 klein twin the planned weight, gradient, optimizer and
EMA bytes are the bytes of the real tensors after a real training step; the plan's verdict
and its advice; errors through the installed command. (The activation estimate against a
measured CPU step: benchmarks/memory_plan.py.)"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refrl.plan.architectures import ARCHITECTURES, parameter_count
from refrl.plan.memory import GIB, make_plan, param_bytes, state_bytes

# Parameters of the real transformers, built on the meta device from the shipped config.json
EXACT = {"flux2-klein-4b": 3_875_544_576, "flux2-klein-9b": 9_078_581_248, "flux1-kontext-dev": 11_901_408_320,
         "qwen-image-edit-2509": 20_430_401_088}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shipped_architectures_have_the_published_size(name):
    n = parameter_count(name)
    assert round(n / 1e9) == ARCHITECTURES[name].published_billions  # "4B", "9B", "12B", "20B"
    assert n == EXACT[name]


def real_state_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of the tensors a real AdamW step leaves behind, and of refrl's EMA."""
    from refrl.train.ema import EMA
    from refrl.train.optim import OptimConfig, build_optimizer

    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.randn_like(p)
    optimizer, _ = build_optimizer(trainable, OptimConfig(warmup_steps=0), 10)
    optimizer.step()
    ema = EMA([(f"p{i}", p) for i, p in enumerate(trainable)], 0.9)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {"weights": nbytes(module.parameters()), "gradients": nbytes(p.grad for p in trainable),
            "optimizer": nbytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
            "ema": nbytes(ema.shadow.values())}


@pytest.fixture(scope="module")
def twin_spec(tmp_path_factory):
    from refrl.models.diffusers import tiny
    from refrl.plan.specs import model_spec
    from refrl.train.data import DataConfig

    folder = tiny.save_tiny_pipeline("flux2-klein", tmp_path_factory.mktemp("pipe") / "flux2-klein")
    return model_spec(tiny.tiny_model_config("flux2-klein", folder), DataConfig(size=32, max_refs=2))


@pytest.fixture(scope="module")
def tiny_spec():
    from refrl.models.build import ModelConfig
    from refrl.plan.specs import model_spec
    from refrl.train.data import DataConfig

    return model_spec(ModelConfig(kind="tiny-dit", width=32, depth=2, heads=2, max_refs=2), DataConfig(size=32, max_refs=2))


@pytest.mark.parametrize("which", ["tiny", "twin"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_planned_state_bytes_equal_the_real_tensors(which, lora_rank, tiny_spec, twin_spec):
    spec = tiny_spec if which == "tiny" else twin_spec
    with torch.device("meta"):
        planned = state_bytes(spec.build(lora_rank), world=1, kl_copy=False)
    torch.manual_seed(0)
    real = real_state_bytes(spec.build(lora_rank))
    assert real["gradients"] > 0
    for key in ("weights", "gradients", "optimizer", "ema"):
        assert planned[key] == real[key], key


def test_fsdp2_shard_bytes_follow_dim0_chunks():
    p = [torch.nn.Parameter(torch.empty(5, 3)), torch.nn.Parameter(torch.empty(1, 4)), torch.nn.Parameter(torch.empty(()))]
    # ceil(5/2)=3 rows of 3, ceil(1/2)=1 row of 4, a scalar whole; float32
    assert param_bytes(p, world=2) == (3 * 3 + 1 * 4 + 1) * 4
    assert param_bytes(p, world=1) == (15 + 4 + 1) * 4


def tiny_sft_config(*extra: str):
    from refrl.config import load_config
    from refrl.train.sft import SFTConfig

    return load_config(SFTConfig, None, ["model.kind=tiny-dit", "model.width=32", "model.depth=1", "model.heads=2",
                                         "data.size=32", "data.max_refs=2", "batch_size=4", "noise_per_condition=1",
                                         *extra])


def test_plan_verdict_and_advice(tiny_spec):
    cfg = tiny_sft_config()
    plan = make_plan(cfg, tiny_spec, gpus=2, gpu_memory_gib=1.0, rl=False)
    cols = {(c["strategy"], c["finetune"]): c for c in plan["columns"]}
    assert set(cols) == {("ddp", "full"), ("ddp", "lora"), ("fsdp2", "full"), ("fsdp2", "lora")}
    assert plan["fits"] and plan["advice"] is None and plan["micro_batch"] == 2
    full, sharded = cols[("ddp", "full")]["bytes"], cols[("fsdp2", "full")]["bytes"]
    assert sharded["weights"] < full["weights"] and sharded["optimizer"] < full["optimizer"]
    assert full["activations"] == sharded["activations"] > 0  # the same micro-batch per GPU
    # the same config on a GPU a little smaller than its replicated total: FSDP2 is what fits
    limit = (cols[("ddp", "full")]["total"] + cols[("fsdp2", "full")]["total"]) / 2 / 0.9 / GIB
    small = make_plan(cfg, tiny_spec, gpus=2, gpu_memory_gib=limit, rl=False)
    assert not small["fits"] and small["advice"] == "set distributed.strategy=fsdp2"


def test_plan_command_prints_the_table(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {kind: tiny-dit, width: 32, depth: 1, heads: 2}\ndata: {size: 32, max_refs: 2}\n"
                   "batch_size: 512\nnoise_per_condition: 4\n")  # activations of 1024 rows per GPU
    refrl = Path(sys.executable).parent / "refrl"
    res = subprocess.run([str(refrl), "plan", "--config", str(cfg), "--gpus", "2", "--gpu-memory", "0.1"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for row in ("weights", "gradients", "optimizer", "ema", "activations, checkpointing", "total", "fits"):
        assert row in out
    assert "does NOT fit" in out and "to fit:" in out


def test_plan_of_an_unknown_model_is_one_error_line():
    refrl = Path(sys.executable).parent / "refrl"
    res = subprocess.run([str(refrl), "plan", "--config", "kontext-grpo", "model.pretrained=nobody/unknown-model"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nobody/unknown-model" in lines[0]
    assert "Traceback" not in res.stderr


def test_rollout_buffers_scale_with_the_samples_per_gpu(tiny_spec):
    from refrl.config import load_config
    from refrl.train.grpo_config import GRPOConfig

    cfg = load_config(GRPOConfig, None, ["model.kind=tiny-dit", "model.init=null", "model.width=32", "model.depth=1",
                                         "model.heads=2", "data.size=32", "data.max_refs=2", "groups_per_iteration=4",
                                         "group_size=4", "minibatch_size=4", "sampling.steps=5"])
    one, two = (make_plan(cfg, tiny_spec, gpus=g, gpu_memory_gib=80, rl=True) for g in (1, 2))
    buf = lambda p: p["columns"][0]["bytes"]["rollout_buffers"]  # noqa: E731
    assert buf(one) == 16 * 6 * 3 * 32 * 32 * 4  # 16 samples x 6 latents (5 steps + start) x 3x32x32 float32
    assert buf(two) == buf(one) // 2
    assert np.isfinite(one["columns"][0]["total"])


@pytest.mark.parametrize(("which", "lora_rank", "checkpointing"), [("tiny", 0, False), ("tiny", 4, False),
                                                                   ("twin", 4, True)])
def test_depth_extrapolation_equals_the_direct_trace(which, lora_rank, checkpointing, tiny_spec, twin_spec):
    """Tracing 1 and 2 blocks of each kind and extrapolating gives the trace of the whole model
    (to 0.1 %: the twin's shapes change a few hundred bytes of allocator-free temporaries)."""
    from refrl.plan.memory import trace_spec

    spec = tiny_spec if which == "tiny" else twin_spec
    if checkpointing and spec.checkpointing is None:
        pytest.skip("no gradient checkpointing in this model")
    deep = dataclasses.replace(spec, depth={k: 3 for k in spec.depth})  # more blocks than the two traced
    direct = trace_spec(deep, lora_rank, 2, checkpointing, extrapolate=False)
    assert direct.activations > 0
    extrapolated = trace_spec(deep, lora_rank, 2, checkpointing, extrapolate=True)
    for key, value in direct.as_dict().items():  # equal but for a few hundred bytes of a few MB
        assert extrapolated.as_dict()[key] == pytest.approx(value, rel=1e-3), key
