"""FLUX.2 [klein] adapter on tiny random components: the pipelines' samplers (full and
KV-cached reference attention) and the adapter's ODE rollout agree; the reference
key/value cache gives the same velocity as recomputing the references; gradient
checkpointing does not change gradients through the cache.
Training, persistence and the text cache are tested for every backend in test_backends_training.py."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refrl.data.refworld import RefWorld
from refrl.models.diffusers import tiny
from refrl.models.diffusers.flux2_klein import Flux2KleinPolicy
from refrl.models.diffusers.qwen_edit_plus import to_pil
from refrl.sampling.rollout import initial_noise, sample_ode
from refrl.sampling.schedules import sigma_schedule

KIND = "flux2-klein"
ATOL = 1e-4
STEPS = 3


def policy_for(attention: str, cache: bool = True, checkpointing: bool = False, layers: int = 1, lora: int = 0):
    cfg = tiny.tiny_model_config(KIND, "unused", use_ref_cache=cache, gradient_checkpointing=checkpointing,
                                 diffusers={"ref_attention": attention})
    policy = Flux2KleinPolicy(tiny.tiny_pipeline(KIND, layers=layers), cfg)
    if lora:
        policy.enable_lora(lora, lora)
    return policy


@pytest.fixture(scope="module")
def sample():
    world = RefWorld(size=32, level=0, max_refs=2, categories=["subject_bg"])
    return tiny.quantize_sample(world.sample(np.random.default_rng(3)))


def at_ref_size(sample):
    """The sample with references resized to the 64 px the adapter uses, on the uint8 grid,
    and the same references as PIL images for the pipeline (which refuses smaller ones)."""
    pil = [to_pil(F.interpolate(r[None], size=(64, 64), mode="bilinear", antialias=True)[0])
           for r in sample.ref_images]
    tensors = [torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1).float() / 255 for p in pil]
    return dataclasses.replace(sample, ref_images=tensors), pil


@pytest.mark.parametrize(("attention", "cfg_scale"), [("full", 1.0), ("full", 4.0), ("causal", 1.0)])
def test_pipeline_sampler_and_adapter_ode_agree(attention, cfg_scale, sample):
    """Same noise, same sigmas: identical images. With CFG the pipeline's unconditional
    branch is the empty prompt *with* the references (the adapter's cfg_keep_refs)."""
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    policy = policy_for(attention)
    cls = Flux2KleinPipeline if attention == "full" else Flux2KleinKVPipeline
    pipe = cls(**{k: v for k, v in policy.pipe.components.items() if k != "is_distilled"})
    # The pipeline's preprocessing returns channels-last strided tensors; with the tiny random
    # VAE that layout's conv summation order alone moves latents by ~3e-4. Same values, contiguous:
    preprocess = pipe.image_processor.preprocess
    pipe.image_processor.preprocess = lambda *a, **k: preprocess(*a, **k).contiguous()
    seen, pil = at_ref_size(sample)
    noise = initial_noise(policy.latent_shape(32, 32), 2, [0])
    guidance = {} if attention == "causal" else {"guidance_scale": cfg_scale}  # the KV pipeline has no CFG
    theirs = pipe(
        image=pil, prompt=sample.prompt, height=32, width=32, num_inference_steps=STEPS,
        sigmas=sigma_schedule(STEPS)[:-1].tolist(), latents=noise, max_sequence_length=policy.max_text_tokens,
        text_encoder_out_layers=tuple(policy.opts.text_encoder_out_layers), output_type="pt", **guidance,
    ).images
    ours = sample_ode(policy, [seen], steps=STEPS, cfg_scale=cfg_scale, seed=2)
    assert ours.shape == theirs.shape == (1, 3, 32, 32) and float(ours.std()) > 1e-3
    torch.testing.assert_close(ours, theirs.float(), atol=ATOL, rtol=0)


def test_reference_cache_gives_the_velocity_of_no_cache(sample):
    cached, uncached, full = policy_for("causal", cache=True), policy_for("causal", cache=False), policy_for("full")
    batch = [sample, tiny.quantize_sample(sample, n_refs=1)]
    c_cond, u_cond = cached.encode_condition(batch), uncached.encode_condition(batch)
    assert set(c_cond.kv) == {1, 2} and not u_cond.kv
    (rows, layers) = c_cond.kv[2]
    assert rows.tolist() == [0] and len(layers) == 2 and layers[0][0].shape[1] == 2 * 8 * 8  # 2 refs x 8x8 tokens
    x = torch.randn(2, *cached.latent_shape(32, 32))
    for s in (0.95, 0.5, 0.1):
        sigma = torch.full((2,), s)
        v_cached = cached.velocity(x, sigma, c_cond)
        torch.testing.assert_close(v_cached, uncached.velocity(x, sigma, u_cond), atol=1e-5, rtol=0)
        assert (v_cached - full.velocity(x, sigma, full.encode_condition(batch))).abs().max() > 1e-4


def test_gradient_checkpointing_keeps_gradients_through_the_cache(sample):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = policy_for("causal", cache=True, checkpointing=checkpointing, layers=2, lora=2)
        with torch.no_grad():  # non-zero LoRA B so that every LoRA weight gets a gradient
            for name, p in policy.transformer.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        policy.train()
        x = torch.randn(1, *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
        cond = policy.encode_condition([sample])
        policy.velocity(x, torch.tensor([0.6]), cond).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)
