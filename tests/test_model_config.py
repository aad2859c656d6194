"""The ``model:`` section: one config class per kind, the init's architecture, the backend registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from refrl.config import dump_config, load_config
from refrl.errors import ConfigError, RefrlError
from refrl.models.build import ModelConfig
from refrl.models.config import KINDS, TinyDiTModelConfig, parse_model_config
from refrl.models.diffusers import BACKENDS, DIFFUSERS_KINDS, backend
from refrl.models.diffusers.options import FORMAT, DiffusersOptions
from refrl.models.tiny_dit_config import TinyDiTArch
from refrl.train.grpo_config import GRPOConfig
from refrl.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
GRPO_CFG = CONFIGS / "tiny-cpu-grpo.yaml"
SHIPPED = json.loads((ROOT / "src/refrl/assets/tiny-sft/config.json").read_text())


def config_class(path: Path):
    if path.name.startswith("eval-"):
        from refrl.eval.config import EvalConfig

        return EvalConfig
    return SFTConfig if path.stem.endswith("-sft") else GRPOConfig


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    extra = ["ckpt=tiny-sft"] if path.name.startswith("eval-") else []  # an eval preset leaves --ckpt to the command
    cfg = load_config(config_class(path), path, extra)
    model = getattr(cfg, "model", None)
    if model is not None:
        assert model.kind == yaml.safe_load(path.read_text())["model"].get("kind", "tiny-dit")
        assert type(model) is (TinyDiTModelConfig if model.kind == "tiny-dit" else BACKENDS[model.kind].config_class)


def test_each_kind_has_only_its_own_keys():
    with pytest.raises(ConfigError, match=r"'model\.width': unknown key; allowed keys here: .*pretrained"):
        load_config(SFTConfig, None, ["model.kind=kontext", "model.width=64"])
    with pytest.raises(ConfigError, match=r"'model\.pretrained': unknown key; allowed keys here: .*width"):
        load_config(SFTConfig, None, ["model.pretrained=org/name"])
    with pytest.raises(ConfigError, match=r"'model\.diffusers\.ref_order': unknown key; allowed keys here: .*ref_attention"):
        load_config(SFTConfig, None, ["model.kind=flux2-klein", "model.diffusers.ref_order=sample"])
    with pytest.raises(ConfigError, match="unknown model kind; allowed: tiny-dit, flux2-klein, qwen-edit-plus, kontext"):
        load_config(SFTConfig, None, ["model.kind=dit-xl"])
    with pytest.raises(ConfigError, match=r"'model\.patch'.*greater than or equal to 1"):
        load_config(SFTConfig, None, ["model.patch=0"])
    with pytest.raises(ConfigError, match=r"config key 'model': .*must be a multiple of patch"):
        load_config(SFTConfig, None, ["model.patch=5"])


def test_defaults_are_declared_once():
    cfg = ModelConfig()
    assert isinstance(cfg, TinyDiTModelConfig)
    for name, field in TinyDiTArch.model_fields.items():
        assert getattr(cfg, name) == field.default and name not in TinyDiTModelConfig.__annotations__
    assert cfg.prediction == "x0" and SFTConfig().model.prediction == "x0"
    assert isinstance(ModelConfig(kind="kontext", pretrained="x"), BACKENDS["kontext"].config_class)


def test_init_records_the_architecture_of_the_checkpoint(tmp_path):
    cfg = load_config(GRPOConfig, GRPO_CFG)
    assert cfg.model.init == "tiny-sft"
    for key in ("width", "depth", "heads", "patch", "ref_patch", "image_size", "prediction"):
        assert getattr(cfg.model, key) == SHIPPED[key], key
    assert cfg.model.tie_index_words
    dump_config(cfg, tmp_path / "config.yaml")  # what a run folder records
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    assert (written["width"], written["depth"]) == (SHIPPED["width"], SHIPPED["depth"]) == (128, 5)
    # the written config loads again (its values equal the init's), and an equal explicit value is fine
    assert load_config(GRPOConfig, tmp_path / "config.yaml").model == cfg.model
    assert load_config(GRPOConfig, GRPO_CFG, ["model.width=128"]).model.width == 128


def test_init_conflict_names_key_values_and_init():
    with pytest.raises(ConfigError) as err:
        load_config(GRPOConfig, GRPO_CFG, ["model.width=64"])
    msg = str(err.value)
    assert "model.width" in msg and "64" in msg and "128" in msg and "tiny-sft" in msg and "\n" not in msg


def test_init_of_a_saved_policy_folder(tiny_policy_dir):
    cfg = load_config(GRPOConfig, GRPO_CFG, [f"model.init={tiny_policy_dir}"])
    saved = json.loads((tiny_policy_dir / "config.json").read_text())
    assert (cfg.model.width, cfg.model.depth, cfg.model.prediction) == (saved["width"], saved["depth"], saved["prediction"])
    assert not cfg.model.tie_index_words


def test_missing_init_is_left_to_build_time():
    cfg = load_config(GRPOConfig, GRPO_CFG, ["model.init=runs/not-there"])
    assert cfg.model.width == TinyDiTArch.model_fields["width"].default
    from refrl.models.build import build_policy

    with pytest.raises(RefrlError, match="checkpoint not found"):
        build_policy(cfg.model)


def test_diffusers_init_records_resolution_and_options(tmp_path):
    saved = {"format": FORMAT, "kind": "kontext", "pretrained": "org/name",
             "model": {"kind": "kontext", "image_size": 64, "ref_size": 32,
                       "diffusers": {"guidance": 2.5, "ref_order": "sample"}}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = parse_model_config({"kind": "kontext", "init": str(tmp_path), "pretrained": "org/name"})
    assert (cfg.image_size, cfg.ref_size, cfg.diffusers.ref_order, cfg.diffusers.guidance) == (64, 32, "sample", 2.5)
    with pytest.raises(ConfigError, match=r"'model\.diffusers\.ref_order': 'draft_first' conflicts with model\.init="):
        parse_model_config({"kind": "kontext", "init": str(tmp_path), "diffusers": {"ref_order": "draft_first"}})
    with pytest.raises(ConfigError, match=r"'model\.image_size': 512 conflicts"):
        parse_model_config({"kind": "kontext", "init": str(tmp_path), "image_size": 512})


def test_init_conflict_through_the_cli(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "refrl", "grpo", "-c", str(GRPO_CFG), "model.width=64",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2, res.stderr
    assert len(errors) == 1 and "model.width" in errors[0] and "64" in errors[0] and "128" in errors[0]
    assert "tiny-sft" in errors[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


# --------------------------------------------------------------------------- registry


def test_registry_is_the_one_list_of_diffusers_kinds():
    assert DIFFUSERS_KINDS == tuple(BACKENDS) and KINDS == ("tiny-dit", *BACKENDS)
    for kind, cls in BACKENDS.items():
        assert cls.kind == kind == cls.config_class.model_fields["kind"].default
        assert issubclass(cls.config_class.model_fields["diffusers"].annotation, DiffusersOptions)
        assert cls.pipeline_class_name.endswith("Pipeline")
    with pytest.raises(RefrlError, match="unknown diffusers kind 'sdxl'; allowed: flux2-klein, qwen-edit-plus, kontext"):
        backend("sdxl")


def test_docs_describe_every_backend_and_option():
    docs = (ROOT / "docs/guides/backends.md").read_text()
    for kind, cls in BACKENDS.items():
        assert f"| `{kind}` |" in docs and cls.pipeline_class_name in docs
        for option in cls.config_class.model_fields["diffusers"].annotation.model_fields:
            assert f"`{option}`" in docs, (kind, option)
