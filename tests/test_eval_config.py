"""`EvalConfig`: ``refrl eval`` from a YAML preset and ``key=value`` overrides; its flags are overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refrl.config import load_config
from refrl.errors import ConfigError
from refrl.eval.config import EvalConfig
from refrl.eval.runner import DEFAULT_BATCH_SIZE, EVAL_FILE, SUITE_NAMES

PRESET = Path(__file__).resolve().parents[1] / "configs" / "eval-refworld.yaml"


sys.path.insert(0, str(Path(__file__).parent))
from test_eval import _main  # noqa: E402


def test_preset_and_overrides():
    cfg = load_config(EvalConfig, PRESET, ["ckpt=tiny-sft", "sampling.steps=40", "reward_options.dino.checkpoint=/m"])
    assert (cfg.suite, cfg.n, cfg.sampling.steps, cfg.sampling.cfg_scale, cfg.split, cfg.level) == (
        "refworld", 96, 40, 2.0, "test", 2)
    assert cfg.reward_options == {"dino": {"checkpoint": "/m"}}
    defaults = EvalConfig(ckpt="tiny-sft", suite="refine")  # sampler keys unset: the model's
    assert (defaults.sampling.steps, defaults.sampling.cfg_scale, defaults.sampling.shift) == (None, None, None)
    assert defaults.batch_size == DEFAULT_BATCH_SIZE


@pytest.mark.parametrize("override, expected", [
    ("stepz=3", "config key 'stepz': unknown key; allowed keys here: batch_size, ckpt, data"),
    ("sampling.stepz=3", "config key 'sampling.stepz': unknown key; allowed keys here: cfg_scale, shift, steps"),
    ("split=dev", "config key 'split': Input should be 'train', 'val' or 'test'"),
    ("level=3", "config key 'level': Input should be less than or equal to 2"),
    ("sampling.steps=0", "config key 'sampling.steps': Input should be greater than or equal to 1"),
    ("steps=40", "config key 'steps' was renamed: use 'sampling.steps' (sampling.steps=40)"),
    ("cfg=3", "config key 'cfg' was renamed: use 'sampling.cfg_scale' (sampling.cfg_scale=3)"),
    ("shift=3", "config key 'shift' was renamed: use 'sampling.shift' (sampling.shift=3)"),
    ("suite=bogus", "unknown suite 'bogus'; allowed: " + ", ".join(SUITE_NAMES)),
])
def test_bad_keys_and_values_are_one_line_errors(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(EvalConfig, PRESET, ["ckpt=tiny-sft", override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_cli_runs_a_preset_with_flags_and_overrides(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    argv = ["eval", "-c", str(PRESET), "--ckpt", "tiny-sft", "--out", str(out), "n=2", "--sampling-steps", "1",
            "rewards=fidelity", "--batch-size", "2"]
    assert _main(monkeypatch, argv) == 0
    ev = json.loads((out / EVAL_FILE).read_text())
    assert (ev["suite"], ev["n"], ev["rewards"]) == ("refworld", 2, {"fidelity": "fidelity"})
    assert ev["sampling"] == {"steps": 1, "cfg_scale": 2.0, "shift": 1.0}  # the flag, then the preset
    assert ev["size"] == [32, 32]  # the policy's image size


def test_cli_bad_override_is_one_error_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "refrl", "eval", "-c", str(PRESET), "--ckpt", "tiny-sft",
                          "--out", str(tmp_path / "ev"), "guidance=3"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr
    assert "'guidance': unknown key; allowed keys here:" in errors[0] and "sampling" in errors[0]
