"""Every diffusers backend, on tiny random components loaded from a saved pipeline folder:
batch-independent velocities, one SFT step, one GRPO iteration and two NFT / AWM iterations
through the trainers (LoRA only, on-policy ratio 1, zero KL to the adapter-disabled
reference at init), save/load, and precomputed text embeddings in place of the text encoder."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import json

import numpy as np
import pytest
import torch

from refrl.data.refworld import RefWorld
from refrl.errors import RefrlError
from refrl.models.build import build_policy, load_policy
from refrl.models.diffusers import tiny
from refrl.models.diffusers.common import DiffusersPolicy
from refrl.models.policy import Policy

KINDS = tiny.TINY_KINDS
SIZE = tiny.TINY_IMAGE_SIZE


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {kind: tiny.save_tiny_pipeline(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def samples():
    world = RefWorld(size=SIZE, level=0, max_refs=3, categories=["subject", "subject_bg", "refine"])
    return [tiny.quantize_sample(world.sample(np.random.default_rng(i))) for i in range(4)]


def data_config(categories):
    from refrl.train.data import DataConfig

    return DataConfig(size=SIZE, max_refs=2, categories=categories, curriculum=[(0.0, 0)])


@pytest.mark.parametrize("kind", KINDS)
def test_velocity_does_not_depend_on_the_batch(kind, folders, samples):
    policy = build_policy(tiny.tiny_model_config(kind, folders[kind]))
    assert isinstance(policy, Policy) and isinstance(policy, DiffusersPolicy)
    batch = [samples[0], tiny.quantize_sample(samples[1], n_refs=1), samples[2], samples[3]]
    cond = policy.encode_condition(batch, drop_refs=torch.tensor([False, False, True, False]))
    assert cond.n_refs.tolist() == [batch[0].n_refs, 1, 0, batch[3].n_refs]
    x = torch.randn(4, *policy.latent_shape(SIZE, SIZE))
    sigma = torch.tensor([0.9, 0.5, 0.2, 0.7])
    v = policy.velocity(x, sigma, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    for i in range(4):
        alone = policy.velocity(x[i : i + 1], sigma[i : i + 1], policy.select_condition(cond, torch.tensor([i])))
        torch.testing.assert_close(v[i : i + 1], alone, atol=1e-5, rtol=0)
    # select_condition repeats rows (GRPO groups) without changing them
    rep = policy.select_condition(cond, torch.tensor([3, 3, 0]))
    torch.testing.assert_close(policy.velocity(x[[3, 3, 0]], sigma[[3, 3, 0]], rep), v[[3, 3, 0]], atol=1e-5, rtol=0)
    # cfg_keep_refs: prompt and references dropped together keep the references (pipelines' uncond branch)
    both = torch.ones(4, dtype=torch.bool)
    assert policy.encode_condition(batch, drop_text=both, drop_refs=both).n_refs.tolist() == [s.n_refs for s in batch]
    # latents round trip through the VAE at the configured resolution
    images = torch.stack([s.target for s in batch])
    latents = policy.encode_images(images)
    assert latents.shape == (4, *policy.latent_shape(SIZE, SIZE))
    assert policy.decode(latents).shape == images.shape


@pytest.mark.parametrize("kind", KINDS)
def test_sft_step_trains_only_lora_and_reference_is_the_base(kind, folders, tmp_path):
    from refrl.train.data import SampleSource
    from refrl.train.sft import SFTConfig, sft_step

    cfg = SFTConfig(model=tiny.tiny_model_config(kind, folders[kind], lora_rank=4), batch_size=2,
                    noise_per_condition=2, data=data_config(["subject_bg"]))
    policy = build_policy(cfg.model)
    params = list(policy.trainable_parameters())
    named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert params and all(".lora_" in n for n in named) and all(p.dtype == torch.float32 for p in params)
    source = SampleSource(cfg.data, seed=0, total_steps=1)
    batch = source.batch(0, 2)
    x, sigma = torch.randn(2, *policy.latent_shape(SIZE, SIZE)), torch.tensor([0.8, 0.3])
    cond = policy.encode_condition(batch)
    with policy.adapter_disabled():
        v_ref = policy.velocity(x, sigma, cond)
    torch.testing.assert_close(policy.velocity(x, sigma, cond), v_ref, atol=0, rtol=0)  # KL = 0 at init
    loss, _ = sft_step(policy, source, cfg, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    # Only a last block's text-output projection may get no gradient (its output is never used).
    no_grad = [n for n, p in named.items() if p.grad is None]
    assert len(no_grad) < len(named) and all("to_add_out" in n for n in no_grad), no_grad
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    assert any(p.grad.abs().sum() > 0 for p in params if p.grad is not None)
    torch.optim.SGD(params, lr=1.0).step()
    v_new = policy.velocity(x, sigma, cond)
    assert (v_new - v_ref).abs().max() > 1e-6
    with policy.adapter_disabled():
        torch.testing.assert_close(policy.velocity(x, sigma, cond), v_ref, atol=1e-6, rtol=0)
    policy.save_pretrained(tmp_path / "saved")
    info = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert info["kind"] == kind and info["lora"]["rank"] == 4 and info["pretrained"] == str(folders[kind].resolve())
    loaded = load_policy(tmp_path / "saved")
    assert type(loaded) is type(policy) and loaded.has_lora
    torch.testing.assert_close(loaded.velocity(x, sigma, loaded.encode_condition(batch)), v_new, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_grpo_iteration_is_on_policy_with_zero_initial_kl(kind, folders, tmp_path):
    from refrl.train.grpo import train_grpo
    from refrl.train.grpo_config import GRPOConfig, RewardSpec, SamplingConfig
    from refrl.train.run import read_metrics

    cfg = GRPOConfig(
        model=tiny.tiny_model_config(kind, folders[kind], lora_rank=4), iterations=1, groups_per_iteration=2,
        group_size=2, minibatch_size=4, beta_kl=0.01, checkpoint_every=1,
        data=data_config(["refine"] if kind == "kontext" else ["subject_bg"]),
        sampling=SamplingConfig(steps=3, sde_steps="all"), rewards=[RewardSpec(name="fidelity")],
    )
    ckpt = train_grpo(cfg, tmp_path / "run")
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert record["ratio_first"] <= 1e-5  # rollout and training agree (the trainer also raises otherwise)
    assert record["kl"] == 0.0  # one optimizer step per iteration: the KL is measured before it
    assert np.isfinite(record["loss"]) and np.isfinite(record["reward/fidelity"])
    loaded = load_policy(ckpt)
    assert type(loaded).kind == kind and loaded.has_lora


@pytest.mark.parametrize("objective", ["nft", "awm"])
@pytest.mark.parametrize("kind", KINDS)
def test_matching_objectives_train_each_backend(kind, objective, folders, tmp_path, brightness_reward):
    """ODE rollouts with CFG, K=2 training times, velocity KL to the adapter-disabled reference.

    Brightness varies within every group (fidelity can be flat on these random models), so
    the first update is not zero and the KL of the second iteration must be positive."""
    from refrl.train.grpo import train_grpo
    from refrl.train.grpo_config import GRPOConfig, MatchingConfig, RewardSpec, SamplingConfig
    from refrl.train.run import read_metrics

    cfg = GRPOConfig(
        objective=objective, model=tiny.tiny_model_config(kind, folders[kind], lora_rank=4), iterations=2,
        groups_per_iteration=2, group_size=2, minibatch_size=4, beta_kl=0.01, checkpoint_every=2,
        data=data_config(["refine"] if kind == "kontext" else ["subject_bg"]),
        sampling=SamplingConfig(steps=3, sde_steps="none", cfg_scale=2.0), matching=MatchingConfig(k=2),
        rewards=[RewardSpec(name=brightness_reward)],
    )
    ckpt = train_grpo(cfg, tmp_path / "run")
    first, second = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert first["ratio_first"] <= 1e-5 and second["ratio_first"] <= 1e-5
    assert first["kl"] == 0.0 and second["kl"] > 0  # one optimizer step per iteration
    assert np.isfinite(first["loss"]) and np.isfinite(second["loss"]) and first["zero_std_groups"] == 0.0
    loaded = load_policy(ckpt)
    assert type(loaded).kind == kind and loaded.has_lora


@pytest.mark.parametrize("kind", KINDS)
def test_precomputed_text_embeddings_replace_the_text_encoder(kind, folders, samples, tmp_path):
    cache = tmp_path / "text"
    live = build_policy(tiny.tiny_model_config(kind, folders[kind], text_cache=str(cache)))
    assert live.precompute_text(samples[:2]) > 0
    assert live.precompute_text(samples[:2]) == 0  # all cached now
    offline = build_policy(tiny.tiny_model_config(kind, folders[kind], text_cache=str(cache),
                                                  diffusers={"load_text_encoder": False}))
    assert not offline.text_encoders and getattr(offline.pipe, "text_encoder", None) is None
    x, sigma = torch.randn(2, *live.latent_shape(SIZE, SIZE)), torch.tensor([0.6, 0.4])
    torch.testing.assert_close(offline.velocity(x, sigma, offline.encode_condition(samples[:2])),
                               live.velocity(x, sigma, live.encode_condition(samples[:2])), atol=1e-6, rtol=0)
    unseen = dataclasses.replace(samples[0], prompt="a prompt nobody precomputed")
    with pytest.raises(RefrlError, match="no precomputed text embedding for prompt 'a prompt nobody precomputed'"):
        offline.encode_condition([unseen])
