"""FSDP2 sharding (``distributed.strategy=fsdp2``, docs/guides/multi-gpu.md) with 2 CPU processes (gloo).

The processes run tests/fsdp_worker.py under torchrun (a few launches, each checked by
several tests): sharded parameters, gradients and an SGD step against an unsharded
replica, full and LoRA export, a sharded SFT run killed (SIGKILL) and resumed bit-identically
by a new launch, each RL objective under sharding, and a 2-node launch (two torchrun launchers on 127.0.0.1)
that ends with the same weights as 2 processes on one node.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(mode: str, out: Path, nodes: int = 1, killed: bool = False) -> dict:
    """Run the worker as 2 processes: one launcher with 2 processes, or ``nodes`` = 2 launchers
    (node ranks 0 and 1) with 1 process each, as on two machines; returns rank 0's JSON
    (``killed``: the workers kill themselves, the launch must fail and writes none)."""
    out.mkdir(parents=True, exist_ok=True)
    torchrun_bin = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    port = free_port()
    if nodes == 1:
        commands = [[str(torchrun_bin), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]]
    else:
        commands = [[str(torchrun_bin), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(r),
                     "--master_addr", "127.0.0.1", "--master_port", str(port)] for r in range(2)]
    procs = [subprocess.Popen([*c, str(WORKER), mode, str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert (p.returncode != 0) if killed else (p.returncode == 0), err[-4000:]
    return {} if killed else json.loads((out / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> dict:
    return torchrun("units", tmp_path_factory.mktemp("units"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("train")
    torchrun("train", out, killed=True)  # the full run, then the part run SIGKILLed in step 3
    after_kill = sorted(p.name for p in (out / "part" / "checkpoints").iterdir())
    return {"after_kill": after_kill, **torchrun("resume", out)}, out


CASES = ["tiny-dit-full", "tiny-dit", "flux2-klein-full", "flux2-klein"]


@pytest.mark.parametrize("case", CASES)
def test_parameters_are_really_sharded(units, case):
    shards = units[case]["shards"]
    assert shards
    for name, s in shards.items():
        assert sum(s["local"]) == s["numel"], name  # the shards partition the parameter
        if s["dim0"] >= 2:  # split along dim 0: each process holds about half
            assert max(s["local"]) <= s["numel"] // s["dim0"] * ((s["dim0"] + 1) // 2), (name, s)
    total = sum(s["numel"] for s in shards.values())
    assert max(sum(s["local"][r] for s in shards.values()) for r in range(2)) < 0.6 * total


@pytest.mark.parametrize("case", CASES)
def test_sharded_gradients_and_sgd_step_match_the_replica(units, case):
    r = units[case]
    assert r["grads_compared"] > 0 and r["grad_abs_max"] > 1e-5  # real gradients, not all zero
    assert r["grad_max_diff"] < 1e-6
    assert r["step_max_diff"] < 1e-6


@pytest.mark.parametrize("case", CASES)
def test_export_writes_full_weights_and_a_nonempty_adapter(units, case):
    files = units[case]["files"]
    expected = {"tiny-dit-full": {"model.safetensors"}, "tiny-dit": {"model.safetensors", "adapter.safetensors"},
                "flux2-klein-full": {"diffusion_pytorch_model.safetensors"}, "flux2-klein": {"adapter.safetensors"}}
    assert set(files) == expected[case]
    for f in files.values():
        assert f["same_keys"] and f["tensors"] > 0 and f["nonzero"] > 0
        assert f["max_diff"] < 1e-6
    if "adapter.safetensors" in files:
        assert files["adapter.safetensors"]["max_diff"] < 1e-6


def dcp_state(folder: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / "dcp.pt"
    if not target.exists():
        dcp_to_torch_save(str(folder), str(target))
    return torch.load(target, weights_only=True)


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}/{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from flat(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def assert_identical(a: dict, b: dict) -> None:
    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k


def test_killed_sharded_run_resumes_bit_identically(trained):
    result, out = trained
    assert result["after_kill"] == ["step-2"]  # killed in step 3: the last checkpoint is step 2
    full, part = (out / r / "checkpoints" / "step-4" for r in ("full", "part"))
    assert (full / "dcp" / ".metadata").is_file() and not (full / "trainable.safetensors").exists()
    a, b = dcp_state(full / "dcp"), dcp_state(part / "dcp")
    assert {"model", "optim", "ema"} <= a.keys()
    assert_identical(a, b)  # weights, Adam state and EMA, to the bit
    pa, pb = (load_file(str(c / "policy" / "model.safetensors")) for c in (full, part))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    la, lb = ([json.loads(x)["loss"] for x in (out / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("full", "part"))
    assert len(la) == 4 and la == lb


def test_exported_checkpoint_policy_is_full_and_loads(trained):
    from refrl.models.build import load_policy

    _, out = trained
    ckpt = out / "full" / "checkpoints" / "step-4"
    policy = load_policy(str(ckpt / "policy"))
    ema = dcp_state(ckpt / "dcp")["ema"]
    trainable = [p for p in policy.trainable_parameters()]
    assert len(trainable) == len([k for k in ema if k.startswith("p")])
    for i, p in enumerate(trainable):  # the exported policy holds the EMA weights, unsharded
        assert p.shape == ema[f"p{i}"].shape
        assert torch.equal(p.detach(), ema[f"p{i}"].to(p.dtype))


@pytest.mark.parametrize("run", ["grpo-full-kl-copy", "nft-lora-kl-adapter", "awm-full-ema-old"])
def test_rl_objectives_sharded_match_replicas(trained, run):
    """One RL iteration of each objective, sharded and replicated (same 2 processes, same seed)."""
    _, out = trained
    ckpts = {s: out / f"{run}-{s}" / "checkpoints" / "step-1" for s in ("fsdp2", "ddp")}
    assert (ckpts["fsdp2"] / "dcp" / ".metadata").is_file() and (ckpts["ddp"] / "trainable.safetensors").is_file()
    init = load_file(str(out / "full" / "checkpoints" / "step-4" / "policy" / "model.safetensors"))
    sharded, replicated = (load_file(str(c / "policy" / "model.safetensors")) for c in ckpts.values())
    assert sharded.keys() == replicated.keys() == init.keys()
    moved = max(float((replicated[k] - init[k]).abs().max()) for k in init)
    # the iteration changed the weights (ema_decay=0: the export is the weights); a LoRA delta B A starts
    # at B = 0, so after one step the merged weights move by a second-order amount
    assert moved > (1e-6 if "lora" in run else 1e-4)
    for k in init:
        torch.testing.assert_close(sharded[k], replicated[k], rtol=0, atol=1e-6)
    # the trained weights themselves (the EMA with decay 0): replicated ema.safetensors vs the sharded dcp/
    ema_rep = load_file(str(ckpts["ddp"] / "ema.safetensors"))
    ema_sh = dcp_state(ckpts["fsdp2"] / "dcp")["ema"]
    keys = [k for k in ema_rep if not k.startswith("__")]
    assert keys and sorted(keys) == sorted(k for k in ema_sh if not k.startswith("__"))
    for k in keys:
        torch.testing.assert_close(ema_sh[k], ema_rep[k], rtol=0, atol=1e-6)
    records = [json.loads((out / f"{run}-{s}" / "metrics.jsonl").read_text().splitlines()[-1]) for s in ckpts]
    assert [r["processes"] for r in records] == [2, 2]
    assert records[0]["loss"] == pytest.approx(records[1]["loss"], rel=1e-5, abs=1e-7)


def test_two_nodes_match_one_node(trained, tmp_path):
    """The same sharded SFT run as two 1-process "nodes" (two torchrun launchers on 127.0.0.1)."""
    _, out = trained
    torchrun("node", tmp_path, nodes=2)
    one, two = (o / "full" / "checkpoints" / "step-4" for o in (out, tmp_path))
    assert_identical(dcp_state(one / "dcp"), dcp_state(two / "dcp"))
    metrics = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["processes"] for m in metrics] == [2] * 4


def test_strategy_key_is_validated():
    from refrl.config import load_config
    from refrl.errors import ConfigError
    from refrl.train.sft import SFTConfig

    assert load_config(SFTConfig, None, ["distributed.strategy=fsdp2"]).distributed.strategy == "fsdp2"
    with pytest.raises(ConfigError, match="distributed.strategy"):
        load_config(SFTConfig, None, ["distributed.strategy=zero3"])
