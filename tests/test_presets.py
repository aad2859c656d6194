"""Presets are package data found from any folder: ``--config NAME`` (a bare preset name,
``.yaml`` optional) or ``--config PATH`` (a file), one resolver for every command
(`refrl.presets.resolve_config`, called by `refrl.config.read_yaml`), and ``refrl configs``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from refrl.config import read_yaml
from refrl.errors import ConfigError
from refrl.presets import preset_names, preset_path, preset_summary, presets_dir, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def refrl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refrl", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def test_presets_are_package_data_and_the_repo_folder_links_to_them():
    assert presets_dir() == (ROOT / "src/refrl/configs").resolve()
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == presets_dir()
    assert os.readlink(ROOT / "configs") == "src/refrl/configs"  # relative: the link works in any checkout
    assert {"tiny-cpu-sft", "tiny-cpu-grpo", "eval-refworld", "flux2-klein-grpo"} <= set(preset_names())


def test_names_and_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grpo = presets_dir() / "tiny-cpu-grpo.yaml"
    assert resolve_config("tiny-cpu-grpo") == resolve_config("tiny-cpu-grpo.yaml") == grpo
    assert read_yaml("tiny-cpu-grpo") == read_yaml(grpo)
    (tmp_path / "tiny-cpu-grpo.yaml").write_text("seed: 3\n")  # a file of that name here: the user's file wins
    assert resolve_config("tiny-cpu-grpo.yaml") == Path("tiny-cpu-grpo.yaml")
    assert read_yaml("./tiny-cpu-grpo.yaml") == {"seed": 3}
    assert resolve_config("tiny-cpu-grpo") == grpo  # no suffix: the preset
    with pytest.raises(ConfigError, match=r"^unknown preset 'tiny-gpu-grpo' \(and no such file\); presets: "
                                          r"eval-.*, tiny-cpu-grpo, .*\(see `refrl configs`\)$"):
        resolve_config("tiny-gpu-grpo")
    with pytest.raises(ConfigError, match=r"^config file not found: configs/tiny-cpu-sft.yaml; "
                                          r"the preset of that name is --config tiny-cpu-sft$"):
        resolve_config("configs/tiny-cpu-sft.yaml")
    with pytest.raises(ConfigError, match=r"^config file not found: \./mine\.yaml$"):
        resolve_config("./mine.yaml")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="config folder is a folder"):
        resolve_config("folder")


def test_every_preset_has_a_one_line_summary():
    for name in preset_names():
        summary = preset_summary(preset_path(name))
        assert 10 < len(summary) <= 110 and "\n" not in summary, (name, summary)
        assert not summary.startswith(("refrl ", "accelerate ")), name
    assert preset_summary(preset_path("tiny-cpu-grpo")) == \
        "Stage 2 on RefWorld from the shipped SFT checkpoint, on 2 CPU cores."


def test_configs_command_lists_every_preset(tmp_path):
    res = refrl("configs", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    assert any(line.startswith("tiny-cpu-sft ") and line.endswith("on 2 CPU cores.") for line in lines)


@pytest.mark.parametrize("argv", [
    ["sft", "--config", "tiny-cpu-sft", "steps=0"],
    ["rl", "--config", "tiny-cpu-grpo.yaml", "iterations=0"],
    ["eval", "--config", "eval-refworld", "--ckpt", "tiny-sft", "--out", "ev", "batch_size=0"],
    ["weights", "list", "--config", "flux2-klein-grpo", "rewards=7"],
], ids=["sft", "rl", "eval", "weights"])
def test_every_config_command_finds_presets_from_an_empty_folder(argv, tmp_path):
    """A bare name is found from a folder without configs/: the error is about the bad value
    (so the preset was read), one line, exit 2."""
    res = refrl(*argv, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = error_lines(res)
    key = argv[-1].split("=")[0]
    assert f"'{key}'" in line and "not found" not in line and "unknown preset" not in line, line
    assert "Traceback" not in res.stderr


def test_unknown_preset_lists_the_presets(tmp_path):
    res = refrl("rl", "--config", "tiny-cpu-grop", cwd=tmp_path)
    assert res.returncode == 2
    (line,) = error_lines(res)
    assert line.startswith("error: unknown preset 'tiny-cpu-grop'") and all(n in line for n in preset_names())


def test_every_zoo_reward_of_a_preset_has_a_default_source_and_fails_offline_in_one_line(tmp_path):
    """Each zoo reward a shipped preset names loads from default hub weights (listed by `refrl
    weights`); offline without them, building it is one line naming them and the command that
    fetches them."""
    import json

    import yaml

    from refrl.rewards.zoo import ZOO
    from refrl.weights import NOT_ON_HUB, config_sources, reward_sources

    used: dict[str, dict] = {}
    for name in preset_names():
        data = yaml.safe_load(preset_path(name).read_text())
        for src in config_sources(data):
            assert src.repo_id or src.local or src.note, (name, src)
        specs = data.get("rewards") or []
        for spec in specs:
            if isinstance(spec, dict):
                used.setdefault(spec["name"], dict(spec.get("options") or {}))
            else:
                metric, _, reward = str(spec).partition("=")
                used.setdefault(reward or metric, dict((data.get("reward_options") or {}).get(metric) or {}))
    zoo = {n: o for n, o in used.items() if n in ZOO}
    assert {"siglip", "csd"} <= set(zoo)
    for name, options in zoo.items():
        sources = reward_sources(name, options)
        assert sources and all(s.repo_id and s.revision or name in NOT_ON_HUB for s in sources), name
    hub = {n: o for n, o in zoo.items() if n not in NOT_ON_HUB}
    script = ("import json, sys; from refrl.rewards.registry import build; from refrl.errors import RefrlError\n"
              "out = {}\n"
              "for name, options in json.loads(sys.argv[1]).items():\n"
              "    try:\n        build(name, **options); out[name] = 'built'\n"
              "    except RefrlError as e:\n        out[name] = str(e)\n"
              "print(json.dumps(out))")
    res = subprocess.run([sys.executable, "-c", script, json.dumps(hub)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "c")})
    assert res.returncode == 0, res.stderr[-2000:]
    for name, message in json.loads(res.stdout.splitlines()[-1]).items():
        first = reward_sources(name, hub[name])[0].repo_id
        assert "\n" not in message and f"weights '{first}' are not available locally" in message, (name, message)
        assert "`refrl weights download --config CONFIG`" in message, (name, message)
