"""SFT trainer: loss numerics, LR schedule, checkpoints, exact resume, config errors."""

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from refrl.cli import app
from refrl.config import load_config
from refrl.errors import ConfigError, RefrlError
from refrl.runfolder.layout import latest_checkpoint, list_checkpoints
from refrl.train.optim import OptimConfig, lr_factor
from refrl.train.sft import SFTConfig, flow_matching_loss, train_sft, x0_loss_weight

TINY = [
    "model.width=32", "model.depth=1", "model.heads=2", "batch_size=2", "noise_per_condition=2",
    "log_every=1", "checkpoint_every=2", "keep_last=5", "optim.warmup_steps=1", "data.max_refs=3",
    "validation.every=0",
]


def tiny_cfg(*extra: str) -> SFTConfig:
    return load_config(SFTConfig, None, TINY + list(extra))


def test_flow_matching_loss_by_hand():
    pred = torch.zeros(1, 3, 1, 2)
    target = torch.tensor([[[[1.0, 3.0]], [[1.0, 3.0]], [[1.0, 3.0]]]])  # per-pixel squared error 1 and 9
    mask = torch.tensor([[[[0.0, 1.0]]]])
    assert flow_matching_loss(pred, target, None, "none", 4.0).item() == pytest.approx(5.0)
    # weighted: weights 1 and 5 -> (1*1 + 5*9) / 6
    assert flow_matching_loss(pred, target, mask, "weighted", 4.0).item() == pytest.approx(46 / 6)
    assert flow_matching_loss(pred, target, mask, "only", 4.0).item() == pytest.approx(9.0)
    # a sample with an empty mask falls back to the plain MSE under "only"
    assert flow_matching_loss(pred, target, torch.zeros_like(mask), "only", 4.0).item() == pytest.approx(5.0)


def test_x0_weighting_is_the_clean_image_error():
    torch.manual_seed(0)
    x0, noise, x0_hat = torch.randn(3, 2, 3, 4, 4).unbind(0)
    sigma = torch.tensor([0.5, 0.02])  # the second is below the floor 0.05
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v_pred = (x_t - x0_hat) / s  # an x0-predicting model's velocity
    w = x0_loss_weight(sigma, 0.05)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.0025]))
    loss = flow_matching_loss(v_pred, noise - x0, None, "none", 0.0, sample_weight=w)
    per_sample = (x0_hat - x0).pow(2).flatten(1).mean(1) * torch.tensor([1.0, (0.05 / 0.02) ** 2])
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-4, atol=1e-5)


def test_lr_schedule_by_hand():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.0)
    assert [lr_factor(s, cfg, 8) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(6, cfg, 8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(8, cfg, 8) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, OptimConfig(warmup_steps=0, schedule="constant"), 8) == 1.0


def test_exact_resume_matches_uninterrupted(tmp_path):
    full = tmp_path / "full"
    train_sft(tiny_cfg("steps=4"), full)
    part = tmp_path / "part"
    # Interrupted run: same config, killed during step 3 (after the step-2 checkpoint).
    cfg_part = tiny_cfg("steps=4")
    from refrl.train import sft as sft_mod

    real_step = sft_mod.sft_step
    calls = {"n": 0}

    def stop_after_two(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_step(*args, **kwargs)

    sft_mod.sft_step = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            train_sft(cfg_part, part)
    finally:
        sft_mod.sft_step = real_step
    assert [p.name for p in list_checkpoints(part / "checkpoints")] == ["step-2"]
    train_sft(cfg_part, part, resume=True)

    a = load_file(str(latest_checkpoint(full / "checkpoints") / "trainable.safetensors"))
    b = load_file(str(latest_checkpoint(part / "checkpoints") / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    la = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == rb["loss"]


def test_checkpoint_layout_and_no_partial_folders(tmp_path):
    train_sft(tiny_cfg("steps=2"), tmp_path / "run")
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["ema.safetensors", "policy", "state.json", "trainable.safetensors", "trainer.pt"]
    assert (ckpt / "policy" / "model.safetensors").is_file()
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    # a leftover temp folder from a crash is never taken for a checkpoint
    (tmp_path / "run" / "checkpoints" / "step-99.tmp").mkdir()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") == ckpt


def test_python_random_is_seeded_with_the_run_seed(tmp_path):
    states = []
    for before in (1, 2):  # whatever state the process was in before the run
        random.seed(before)
        path = train_sft(tiny_cfg("steps=1"), tmp_path / f"run{before}")
        states.append(torch.load(path / "trainer.pt", weights_only=True)["rng"]["python"])
    assert states[0] == states[1]


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    train_sft(tiny_cfg("steps=3", "checkpoint_every=1", "keep_last=0"), tmp_path / "run")
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-1", "step-2", "step-3"]


def test_refuses_to_overwrite_a_run(tmp_path):
    train_sft(tiny_cfg("steps=1"), tmp_path / "run")
    with pytest.raises(RefrlError, match="--resume"):
        train_sft(tiny_cfg("steps=1"), tmp_path / "run")


def test_config_errors_name_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*allowed keys here: .*lr"):
        load_config(SFTConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"'sigma_sampling'.*'uniform' or 'logit_normal'"):
        load_config(SFTConfig, None, ["sigma_sampling=normal"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SFTConfig, None, ["steps"])


def test_cli_bad_config_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["sft", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code != 0
    assert isinstance(res.exception, RefrlError)
    assert "config file not found" in str(res.exception)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, launch):
    """Same global batch and seed: 2 gloo processes, each with half of every batch, take the step 1 process takes."""
    runs = {n: tmp_path / f"np{n}" for n in (1, 2)}
    # refine samples carry a mask: the masked loss on some processes' shares only
    launch(*[(n, ["sft", "--config", "configs/tiny-cpu-sft.yaml", "--out", str(runs[n]), *TINY, "batch_size=4",
                  "steps=2", "data.categories=[refine,subject_bg]"]) for n in runs])
    one, two = (load_file(str(runs[n] / "checkpoints/step-2/trainable.safetensors")) for n in (1, 2))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-6)
    m1, m2 = ([json.loads(x) for x in (runs[n] / "metrics.jsonl").read_text().splitlines()] for n in (1, 2))
    assert [r["processes"] for r in m1] == [1, 1] and [r["processes"] for r in m2] == [2, 2]
    for a, b in zip(m1, m2, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
