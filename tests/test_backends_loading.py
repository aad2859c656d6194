"""Loading the diffusers backends: by local folder or hub id (offline, from the HF cache),
one clear line naming the missing files, config errors, starting from a saved adapter
(LoRA merged into the base, kept for reloading), full fine-tune persistence."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil

import numpy as np
import pytest
import torch

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.models.build import ModelConfig, build_policy, load_policy
from refrl.models.diffusers import tiny
from refrl.models.diffusers.loading import missing_files

KIND = "kontext"  # the cheapest tiny backend; loading code is shared by all kinds


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.save_tiny_pipeline(KIND, tmp_path_factory.mktemp("pipe") / KIND)


def one_sample() -> LoadedSample:
    g = torch.Generator().manual_seed(0)
    return LoadedSample("s", "a red disc on the left", [torch.rand(3, 32, 32, generator=g)], ["subject"])


def probe(policy) -> torch.Tensor:
    x = torch.randn(1, *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    return policy.velocity(x, torch.tensor([0.6]), policy.encode_condition([one_sample()]))


def copy_without(folder, tmp_path, *removed: str):
    dst = tmp_path / "partial"
    shutil.copytree(folder, dst)
    for rel in removed:
        target = dst / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return dst


def test_missing_weights_give_one_line_naming_them(folder, tmp_path):
    partial = copy_without(folder, tmp_path, "transformer/diffusion_pytorch_model.safetensors", "text_encoder_2")
    with pytest.raises(RefrlError) as err:
        build_policy(tiny.tiny_model_config(KIND, partial))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot load {partial}: missing ")
    assert "transformer/diffusion_pytorch_model.safetensors" in msg and "text_encoder_2/" in msg
    # without the text encoders (precomputed embeddings) their folders are not needed
    assert missing_files(partial, ["transformer", "vae", "scheduler"]) == ["transformer/diffusion_pytorch_model.safetensors"]


def test_sharded_weights_name_the_missing_shard(folder, tmp_path):
    partial = copy_without(folder, tmp_path)
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (partial / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (partial / "vae" / "diffusion_pytorch_model.safetensors").rename(partial / "vae" / "model-00001-of-00002.safetensors")
    assert missing_files(partial, ["vae"]) == ["vae/model-00002-of-00002.safetensors"]
    assert missing_files(tmp_path, None) == ["model_index.json"]


def _fake_hub_cache(root, repo: str, source=None):
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<rev>/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123456789abcdef")
    snapshot = base / "snapshots" / "0123456789abcdef"
    if source is not None:
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
    return snapshot


def test_hub_id_offline_loads_from_the_cache_or_names_what_is_missing(folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(RefrlError) as err:
        build_policy(tiny.tiny_model_config(KIND, "acme/not-downloaded"))
    msg = str(err.value)
    assert "\n" not in msg and "acme/not-downloaded" in msg and "not in the local Hugging Face cache" in msg
    assert "model_index.json" in msg and "HF_HUB_OFFLINE" in msg

    snapshot = _fake_hub_cache(cache, "acme/partial", folder)
    (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(RefrlError, match=r"cannot load acme/partial \(looked in .*\): missing "
                                         r"transformer/diffusion_pytorch_model.safetensors"):
        build_policy(tiny.tiny_model_config(KIND, "acme/partial"))

    _fake_hub_cache(cache, "acme/tiny-kontext", folder)
    by_id = build_policy(tiny.tiny_model_config(KIND, "acme/tiny-kontext"))
    by_folder = build_policy(tiny.tiny_model_config(KIND, folder))
    torch.testing.assert_close(probe(by_id), probe(by_folder), atol=0, rtol=0)


def test_config_errors_name_the_key_and_allowed_values(folder):
    with pytest.raises(RefrlError, match="model.kind=kontext needs model.pretrained"):
        build_policy(ModelConfig(kind=KIND))
    with pytest.raises(RefrlError, match="model.image_size=34 must be a multiple of 4"):
        build_policy(tiny.tiny_model_config(KIND, folder, image_size=34))
    with pytest.raises(RefrlError, match=r"unknown LoRA target modules \['qkv'\]; linear layers .*'to_q'"):
        build_policy(tiny.tiny_model_config(KIND, folder, lora_rank=2, lora_targets=["to_q", "qkv"]))
    with pytest.raises(RefrlError, match="no such folder, and not a hub id"):
        build_policy(tiny.tiny_model_config(KIND, "./no/such/folder"))


def test_frozen_modules_of_a_full_finetune_stop_training(folder):
    policy = build_policy(tiny.tiny_model_config(KIND, folder, frozen=["proj_out"]))
    grads = {name: p.requires_grad for name, p in policy.transformer.named_parameters()}
    assert [n for n, g in grads.items() if not g] == ["proj_out.weight", "proj_out.bias"]
    assert sum(1 for _ in policy.trainable_parameters()) == len(grads) - 2
    with pytest.raises(RefrlError, match=r"config key 'model.frozen': 'proj_outt' names no module .*proj_out"):
        build_policy(tiny.tiny_model_config(KIND, folder, frozen=["proj_outt"]))


def test_init_from_a_saved_adapter_merges_it_into_the_reference(folder, tmp_path):
    first = build_policy(tiny.tiny_model_config(KIND, folder, lora_rank=2))
    with torch.no_grad():  # a trained-looking adapter
        for name, p in first.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    first.save_pretrained(tmp_path / "sft")
    v_sft = probe(first)
    second = build_policy(tiny.tiny_model_config(KIND, folder, lora_rank=3, init=str(tmp_path / "sft")))
    assert second.lora_config["rank"] == 3 and len(second.merged_adapters) == 1
    with second.adapter_disabled():  # the KL reference of the new stage is the SFT model
        torch.testing.assert_close(probe(second), v_sft, atol=1e-5, rtol=0)
    torch.testing.assert_close(probe(second), v_sft, atol=1e-5, rtol=0)  # new LoRA starts at zero
    second.save_pretrained(tmp_path / "grpo")
    info = json.loads((tmp_path / "grpo" / "config.json").read_text())
    assert [m["rank"] for m in info["merged_adapters"]] == [2] and info["lora"]["rank"] == 3
    reloaded = load_policy(tmp_path / "grpo")
    with reloaded.adapter_disabled():
        torch.testing.assert_close(probe(reloaded), v_sft, atol=1e-5, rtol=0)


def test_full_finetune_saves_and_reloads_the_transformer(folder, tmp_path):
    policy = build_policy(tiny.tiny_model_config(KIND, folder, lora_rank=0))
    params = list(policy.trainable_parameters())
    assert len(params) == len(list(policy.transformer.parameters()))
    with pytest.raises(NotImplementedError):
        policy.adapter_disabled().__enter__()
    with torch.no_grad():
        policy.transformer.proj_out.weight.mul_(1.5)
    policy.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "transformer" / "config.json").is_file()
    torch.testing.assert_close(probe(load_policy(tmp_path / "full")), probe(policy), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["kontext", "flux2-klein"])
def test_pipeline_shift_reproduces_the_pipeline_sigmas(kind):
    """``sampling.shift = policy.pipeline_shift(steps)`` gives the sigmas the pipeline's
    resolution-dependent schedule would use (FLUX.1 calculate_shift / FLUX.2 empirical mu)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from refrl.models.diffusers.persistence import backend_class
    from refrl.sampling.schedules import sigma_schedule

    pipe = tiny.tiny_pipeline(kind)
    policy = backend_class(kind)(pipe, tiny.tiny_model_config(kind, "unused"))
    assert policy.pipeline_shift(8) == 1.0  # the tiny scheduler has no dynamic shifting
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    steps = 8
    h, w = policy._token_grid(*policy._latent_hw(32))
    mu = policy._shift_mu(h * w, steps)
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    shift = policy.pipeline_shift(steps)
    assert shift > 1.5
    torch.testing.assert_close(sigma_schedule(steps, shift=shift), pipe.scheduler.sigmas.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", tiny.TINY_KINDS)
def test_presets_validate(kind):
    from pathlib import Path

    from refrl.config import load_config
    from refrl.train.grpo_config import GRPOConfig
    from refrl.train.sft import SFTConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    sft = load_config(SFTConfig, root / f"{kind}-sft.yaml")
    grpo = load_config(GRPOConfig, root / f"{kind}-grpo.yaml", ["data.manifest=x.jsonl"])
    assert sft.model.kind == grpo.model.kind == kind
    assert sft.model.lora_rank == grpo.model.lora_rank == 32 and sft.optim.lr == 1e-4  # DyRef's LoRA SFT
    assert grpo.model.init and grpo.model.dtype == "bfloat16" and grpo.model.gradient_checkpointing


def test_bfloat16_weights_with_float32_lora_and_velocities(folder):
    policy = build_policy(tiny.tiny_model_config(KIND, folder, dtype="bfloat16", lora_rank=2))
    assert policy.transformer.proj_out.weight.dtype == torch.bfloat16
    assert policy.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
    assert policy.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    v = probe(policy)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    reference = probe(build_policy(tiny.tiny_model_config(KIND, folder)))
    assert 0 < (v - reference).abs().max() < 0.1 * reference.abs().max()  # bf16 rounding, same model


def test_eval_generates_at_the_policys_image_size(folder, tmp_path):
    """`Policy.image_size`, not a tiny-DiT-only config read: a diffusers policy at 64 px is evaluated at 64 px."""
    from refrl.eval.config import eval_command
    from refrl.eval.runner import policy_image_size

    policy = build_policy(tiny.tiny_model_config(KIND, folder, image_size=64, lora_rank=2))
    assert policy.image_size == policy_image_size(policy) == 64
    policy.save_pretrained(tmp_path / "policy")
    res = eval_command(str(tmp_path / "policy"), "refworld", tmp_path / "eval", n=2, sampling={"steps": 1}, batch_size=2,
                       rewards="fidelity")
    assert res["size"] == [64, 64]
