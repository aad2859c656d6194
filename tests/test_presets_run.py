"""Every shipped preset runs as shipped, offline, on its tiny twin (``tiny_twin=true``,
docs/guides/presets.md): one SFT step, one RL iteration, or two eval items.

Only the budget is cut (steps, iterations, group and batch sizes, sampler steps); the
objective, data source, rewards, shaping and LoRA stay the preset's. A GRPO preset whose
``model.init`` is an SFT run folder (``runs/flux2-klein-sft``) starts from the twin run of
that SFT preset, as the documented chain does. Runs in-process (one interpreter start for
all presets); `test_presets_page_chain_runs_as_written` runs the documented chain through
the ``refrl`` command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refrl.presets import preset_names, preset_path

PRESETS = preset_names()
# One step / iteration / two items: the budget overrides, per kind of preset.
SFT_BUDGET = ["steps=1", "batch_size=1", "noise_per_condition=1", "checkpoint_every=1", "log_every=1",
              "optim.warmup_steps=0"]
RL_BUDGET = ["iterations=1", "groups_per_iteration=1", "group_size=2", "minibatch_size=2", "checkpoint_every=1",
             "sampling.steps=2"]
EVAL_BUDGET = ["limit=2", "n=2", "sampling.steps=2", "batch_size=2"]


# A preset that validates during training keeps doing so, on 2 held-out samples with 2 sampler steps.
VALIDATION_BUDGET = ["validation.n=2", "validation.steps=2", "validation.batch_size=2"]


def validation_budget(data: dict) -> list[str]:
    return VALIDATION_BUDGET if (data.get("validation") or {}).get("every", 0) > 0 else []


def kind_of(name: str) -> str:
    if name.startswith("eval-"):
        return "eval"
    return "sft" if name.endswith("-sft") else "rl"


def rl_budget(data: dict) -> list[str]:
    """RL_BUDGET, adjusted where the preset's own keys need it (accumulation, SDE windows)."""
    extra = list(RL_BUDGET)
    if data.get("gradient_accumulation", 1) > 1:
        extra.append("gradient_accumulation=1")
    sampling = data.get("sampling") or {}
    if "first_m" in sampling:
        extra.append("sampling.first_m=2")
    if "window" in sampling:
        extra.append("sampling.window=1")
    if isinstance(data.get("matching"), dict):
        extra.append("matching.k=1")
    return extra


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty folder with the manifests the GPU presets name (data/train.jsonl, val, test), as a user has."""
    from refrl.data.refworld import generate_refworld_to_disk

    root = tmp_path_factory.mktemp("presets")
    for split in ("train", "val", "test"):
        generate_refworld_to_disk(root / "data", n=4, seed=0, split=split, size=32)
    return root


@pytest.fixture(autouse=True)
def _in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("REFRL_TWIN_DIR", str(workdir / "twins"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def without_dreamsim(name: str, data: dict) -> list[str]:
    """Overrides that drop the dreamsim reward where its package is not installed.

    DreamSim builds its architecture from the ``dreamsim`` package (refrl[zoo]), which needs a
    torchvision that does not install beside this machine's CPU torch; without it the preset
    still runs, with its other rewards, so its backend, sampler and shaping are exercised."""
    import importlib.util

    if "dreamsim" not in reward_names(data) or importlib.util.find_spec("dreamsim") is not None:
        return []
    if kind_of(name) == "eval":
        kept = [s for s in data["rewards"] if not str(s).endswith("dreamsim")]
        options = {m: o for m, o in (data.get("reward_options") or {}).items() if f"{m}=dreamsim" not in data["rewards"]}
        return [f"rewards=[{', '.join(kept)}]", f"reward_options={options}"]
    kept = [r for r in data["rewards"] if r["name"] != "dreamsim"]
    return ["rewards=[" + ", ".join(f"{{name: {r['name']}, weight: {r['weight']}}}" for r in kept) + "]"]


def run_preset(name: str) -> Path:
    """Run preset ``name`` on its twin into runs/NAME (once per module); returns the run folder."""
    out = Path("runs") / name
    if (out / "done").is_file():
        return out
    from refrl.twin import load_config

    data = yaml.safe_load(preset_path(name).read_text())
    kind = kind_of(name)
    cut = without_dreamsim(name, data)
    if kind == "sft":
        from refrl.train.sft import SFTConfig, train_sft

        train_sft(load_config(SFTConfig, name, ["tiny_twin=true", *SFT_BUDGET, *validation_budget(data), *cut]), out)
    elif kind == "rl":
        from refrl.train.grpo import train_grpo
        from refrl.train.grpo_config import GRPOConfig

        init = (data.get("model") or {}).get("init") or ""
        if init.startswith("runs/"):
            run_preset(Path(init).name)  # the SFT run the preset starts from
        train_grpo(load_config(GRPOConfig, name, ["tiny_twin=true", *rl_budget(data), *validation_budget(data), *cut]),
                   out)
    else:
        from refrl.eval.config import evaluate, load_eval_config

        flags = {"ckpt": data.get("ckpt") or eval_checkpoint(name)}
        evaluate(load_eval_config(name, ["tiny_twin=true", *EVAL_BUDGET, *cut], flags), out)
    (out / "done").write_text("")
    return out


def eval_checkpoint(name: str) -> str:
    """An eval preset of a backend (``eval-flux2-klein...``) evaluates that backend's twin SFT run."""
    from refrl.models.diffusers.tiny import TINY_KINDS

    for kind in TINY_KINDS:
        if kind in name:
            return str(run_preset(f"{kind}-sft"))
    return "tiny-sft"


def reward_names(data: dict) -> set[str]:
    """The reward names a preset uses (training: [{name: ...}]; eval: [METRIC=NAME, ...])."""
    specs = data.get("rewards") or []
    specs = specs.split(",") if isinstance(specs, str) else specs
    return {s["name"] if isinstance(s, dict) else str(s).partition("=")[2].strip() or str(s).strip() for s in specs}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_on_its_tiny_twin(name):
    import json

    out = run_preset(name)
    if kind_of(name) == "eval":
        result = json.loads((out / "eval.json").read_text())
        assert result["n_images"] == 2
        return
    from refrl.train.run import read_metrics

    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]  # training records, not validation
    assert len(records) == 1 and records[0]["step"] == 1
    assert all(v == v for k, v in records[0].items() if k.startswith("loss") and isinstance(v, float))  # not NaN
    saved = yaml.safe_load((out / "config.yaml").read_text())
    preset = yaml.safe_load(preset_path(name).read_text())
    # what the twin changes is only the model's weights source and sizes (and zoo reward backbones)
    assert saved["model"].get("kind", "tiny-dit") == preset["model"].get("kind", "tiny-dit")
    if kind_of(name) == "rl":
        kept = [r for r in preset["rewards"] if not (without_dreamsim(name, preset) and r["name"] == "dreamsim")]
        assert [r["name"] for r in saved["rewards"]] == [r["name"] for r in kept]
        assert [r["weight"] for r in saved["rewards"]] == [r["weight"] for r in kept]
        for r in kept:
            assert f"reward/{r['name']}" in records[0], r["name"]


def test_twin_key_is_checked():
    from refrl.errors import ConfigError
    from refrl.train.sft import SFTConfig
    from refrl.twin import load_config

    with pytest.raises(ConfigError, match="config key 'tiny_twin': must be true or false"):
        load_config(SFTConfig, "tiny-cpu-sft", ["tiny_twin=maybe"])
    cfg = load_config(SFTConfig, "flux2-klein-sft", ["tiny_twin=true"])
    assert Path(cfg.model.pretrained).is_relative_to(Path(os.environ["REFRL_TWIN_DIR"]))
    assert cfg.model.image_size == cfg.data.size == 32 and cfg.model.dtype == "float32"
    real = load_config(SFTConfig, "flux2-klein-sft", ["tiny_twin=false"])
    assert real.model.pretrained == "black-forest-labs/FLUX.2-klein-base-4B"


def test_presets_page_chain_runs_as_written(workdir, tmp_path):
    """docs/guides/presets.md's twin chain (data, SFT, RL, eval, report of a GPU preset),
    its commands run as written through the ``refrl`` command, from an empty folder."""
    import re

    page = (Path(__file__).resolve().parents[1] / "docs/guides/presets.md").read_text()
    block = re.search(r"## Trying a GPU preset.*?```bash\n(.*?)```", page, re.S).group(1)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    res = subprocess.run(["bash", "-e", "-c", block], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "runs/flux2-klein-grpo/eval/eval.json").is_file()
    assert (tmp_path / "runs/flux2-klein-grpo/report.html").is_file()
    assert "subject" in res.stdout and "scored" in res.stdout
