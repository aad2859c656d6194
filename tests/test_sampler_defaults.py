"""Sampler defaults from the model, and one name per sampler key.

Each backend states its sampler in one place (`sampler_defaults`): the tiny DiT today's
numbers, the diffusers backends their pipeline's ``__call__`` defaults and scheduler config.
Eval, generate, compare and RL rollouts take them for every key left unset; the old key and
flag spellings fail with one line naming the new one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refrl.config import load_config
from refrl.errors import ConfigError
from refrl.eval.config import EvalConfig
from refrl.models.build import load_policy
from refrl.models.diffusers import tiny
from refrl.models.sampler import GENERIC_SAMPLER, SamplerSettings
from refrl.sampling.settings import resolve_sampler, sampler_config
from refrl.train.grpo_config import GRPOConfig, with_model_sampler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def refrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=300)


def test_the_tiny_dit_keeps_todays_numbers():
    policy = load_policy("tiny-sft")
    assert resolve_sampler(policy) == SamplerSettings(steps=20, cfg_scale=2.0, shift=1.0)  # eval, generate, compare
    assert resolve_sampler(policy, rollout=True) == SamplerSettings(steps=10, cfg_scale=1.0, shift=1.0)  # RL
    assert resolve_sampler(policy, steps=7, shift=3.0) == SamplerSettings(steps=7, cfg_scale=2.0, shift=3.0)
    assert resolve_sampler(object()) == SamplerSettings(20, 2.0, 1.0)  # a policy stating none: the generic ones
    assert (GENERIC_SAMPLER.steps, GENERIC_SAMPLER.cfg_scale, GENERIC_SAMPLER.shift) == (20, 2.0, 1.0)


def test_rl_rollouts_take_the_models_defaults_unless_set():
    policy = load_policy("tiny-sft")
    unset = GRPOConfig()
    assert (unset.sampling.steps, unset.sampling.cfg_scale, unset.sampling.shift) == (None, None, None)
    resolved = with_model_sampler(unset, policy).sampling
    assert (resolved.steps, resolved.cfg_scale, resolved.shift) == (10, 1.0, 1.0)
    preset = load_config(GRPOConfig, CONFIGS / "tiny-cpu-grpo.yaml")  # the preset's own values stay
    s = with_model_sampler(preset, policy).sampling
    assert (s.steps, s.cfg_scale, s.shift, s.sde_steps, s.first_m) == (10, 1.0, 1.0, "random_one", 3)
    # a check that needs the steps runs once they are known: window_max_start <= steps - 2 = 8
    late = GRPOConfig(sampling={"sde_steps": "window", "window_max_start": 9})
    with pytest.raises(ConfigError, match=r"sampling.window_max_start \(9\) must be in \[0, steps - 2\] = \[0, 8\]"):
        with_model_sampler(late, policy)


@pytest.mark.parametrize("kind, steps, cfg_scale", [("flux2-klein", 50, 4.0), ("kontext", 28, 1.0),
                                                    ("qwen-edit-plus", 50, 4.0)])
def test_diffusers_backends_read_their_pipeline_and_scheduler(kind, steps, cfg_scale):
    """The pipeline's ``__call__`` defaults (FLUX.2 klein: 50 steps, guidance 4; Kontext: 28 steps,
    true CFG 1, its guidance being embedded; Qwen-Image-Edit-Plus: 50 steps, true CFG 4) and the
    scheduler's shift: fixed, or under dynamic shifting ``exp(mu)`` at the chosen steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from refrl.models.diffusers.persistence import backend_class

    pipe = tiny.tiny_pipeline(kind)
    policy = backend_class(kind)(pipe, tiny.tiny_model_config(kind, "unused"))
    d = policy.sampler_defaults()
    assert (d.steps, d.cfg_scale, d.shift, d.rollout_steps, d.rollout_cfg_scale) == (steps, cfg_scale, 1.0, 10, cfg_scale)
    assert resolve_sampler(policy) == SamplerSettings(steps, cfg_scale, 1.0)

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # a fixed shift is taken as is
    assert policy.sampler_defaults().shift == 3.0 and resolve_sampler(policy).shift == 3.0

    base, top, base_len, max_len = 0.5, 1.15, 256, 4096
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=base, max_shift=top,
                                                     base_image_seq_len=base_len, max_image_seq_len=max_len)
    assert policy.sampler_defaults().shift is None  # follows the steps and the image size
    s = resolve_sampler(policy, steps=8)
    assert s.shift == pytest.approx(policy.pipeline_shift(8))
    if kind != "flux2-klein":  # FLUX.1 / Qwen-Image: mu linear in the token count (calculate_shift)
        h, w = policy._token_grid(*policy._latent_hw(policy.image_size))
        mu = base + (top - base) / (max_len - base_len) * (h * w - base_len)
        assert s.shift == pytest.approx(math.exp(mu), rel=1e-9)
    assert resolve_sampler(policy, steps=8, shift=2.0).shift == 2.0  # a given key wins

    if kind == "flux2-klein":  # a distilled klein ignores guidance: CFG 1
        pipe.register_to_config(is_distilled=True)
        assert policy.sampler_defaults().cfg_scale == 1.0


def test_eval_presets_of_every_backend_leave_the_sampler_to_the_model():
    for name in ("eval-flux2-klein", "eval-kontext", "eval-qwen-edit-plus"):
        cfg = load_config(EvalConfig, CONFIGS / f"{name}.yaml", ["ckpt=runs/x"])
        assert cfg.suite == "manifest" and cfg.data == "data/test.jsonl" and cfg.rewards
        assert (cfg.sampling.steps, cfg.sampling.cfg_scale, cfg.sampling.shift) == (None, None, None), name
    refworld = load_config(EvalConfig, CONFIGS / "eval-refworld.yaml", ["ckpt=tiny-sft"]).sampling
    assert (refworld.steps, refworld.cfg_scale, refworld.shift) == (20, 2.0, 1.0)


def test_generate_and_compare_take_the_sampler_keys(tmp_path):
    from PIL import Image

    from refrl.data.refworld.generate import generate_refworld_to_disk

    manifest = generate_refworld_to_disk(tmp_path / "d", n=2, seed=0, split="test")
    # a 640 px target: generate still samples at the policy's 32 px (a huge target must not set the latent)
    first = json.loads(manifest.read_text().splitlines()[0])
    Image.open(manifest.parent / first["target"]).resize((640, 640)).save(manifest.parent / first["target"])
    res = refrl("generate", "--ckpt", "tiny-sft", "--manifest", str(manifest), "--out", "gen",
                "--sampling-steps", "2", "--cfg-scale", "1.5", "sampling.shift=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "gen" / "generate.json").read_text())["sampling"] == {
        "steps": 2, "cfg_scale": 1.5, "shift": 2.0}
    assert {Image.open(p).size for p in (tmp_path / "gen").glob("*.png") if p.stem != "grid"} == {(32, 32)}
    res = refrl("compare", "--ckpt", "tiny-sft", "--out", "c.png", "--n", "1", "--sampling-steps", "1",
                "--shift", "3", cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "c.png").is_file(), res.stderr[-3000:]
    assert sampler_config(["sampling.steps=4"], {"cfg_scale": 3.0}, "generate").model_dump() == {
        "steps": 4, "cfg_scale": 3.0, "shift": None}


@pytest.mark.parametrize("args, expected", [
    (["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "o", "--steps", "3"],
     "--steps was renamed: use --sampling-steps (sampler steps; --steps is the number of training steps"),
    (["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "o", "--cfg", "3"], "--cfg was renamed: use --cfg-scale"),
    (["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "o", "cfg=3"],
     "config key 'cfg' was renamed: use 'sampling.cfg_scale' (sampling.cfg_scale=3)"),
    (["eval", "--ckpt", "tiny-sft", "--suite", "refworld", "--out", "o", "steps=40"],
     "config key 'steps' was renamed: use 'sampling.steps'"),
    (["generate", "--ckpt", "tiny-sft", "--manifest", "m.jsonl", "--out", "o", "--steps", "3"],
     "--steps was renamed: use --sampling-steps"),
    (["generate", "--ckpt", "tiny-sft", "--manifest", "m.jsonl", "--out", "o", "steps=3"],
     "config key 'steps' was renamed: use 'sampling.steps'"),
    (["generate", "--ckpt", "tiny-sft", "--manifest", "m.jsonl", "--out", "o", "sampling.cfg=3"],
     "config key 'sampling.cfg': unknown key; allowed keys here: cfg_scale, shift, steps"),
    (["compare", "--ckpt", "tiny-sft", "--out", "o.png", "--cfg", "2"], "--cfg was renamed: use --cfg-scale"),
])
def test_old_sampler_spellings_fail_naming_the_new_key(tmp_path, args, expected, monkeypatch, capsys):
    if args[-2:] in (["--steps", "3"], ["--cfg", "2"]):  # a flag of each command: the installed command
        res = refrl(*args, cwd=tmp_path)
        code, stderr = res.returncode, res.stderr
    else:  # the rest through the entry point that command calls, in this process (no torch start each)
        from refrl.cli import run

        monkeypatch.chdir(tmp_path)
        code, stderr = run(list(args)), capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert expected in errors[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.png").exists()


def test_sft_steps_are_still_training_steps():
    from typer.main import get_command

    from refrl.cli import app

    root = get_command(app)
    sft_steps = next(p for p in root.commands["sft"].params if p.name == "steps")
    assert "--steps" in sft_steps.opts and not sft_steps.hidden
    for command in ("eval", "generate", "compare"):
        params = {o: p for p in root.commands[command].params for o in p.opts}
        assert not params["--sampling-steps"].hidden and params["--steps"].hidden and params["--cfg"].hidden
