"""Qwen-Image-Edit-Plus adapter on tiny random components: the pipeline's sampler and the
adapter's ODE rollout agree with several references; the references reach the
vision-language text encoder with the "Picture i" prompt convention.
Training, persistence and the text cache are tested for every backend in test_backends_training.py."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses

import numpy as np
import pytest
import torch

from refrl.data.refworld import RefWorld
from refrl.models.diffusers import tiny
from refrl.models.diffusers.qwen_edit_plus import QwenEditPlusPolicy, to_pil
from refrl.sampling.rollout import initial_noise, sample_ode
from refrl.sampling.schedules import sigma_schedule

KIND = "qwen-edit-plus"
ATOL = 1e-4
STEPS = 3


@pytest.fixture(scope="module")
def policy():
    return QwenEditPlusPolicy(tiny.tiny_pipeline(KIND), tiny.tiny_model_config(KIND, "unused"))


@pytest.fixture(scope="module")
def sample():
    world = RefWorld(size=32, level=0, max_refs=2, categories=["subject_bg"])
    return tiny.quantize_sample(world.sample(np.random.default_rng(4)))


def test_pipeline_sampler_and_adapter_ode_agree(policy, sample, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module

    # The pipeline fixes the reference areas (1024^2 for the VAE, 384^2 for the VL encoder);
    # the adapter makes them options. Use the tiny sizes on both sides.
    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", policy.cfg.ref_size**2)
    monkeypatch.setattr(module, "CONDITION_IMAGE_SIZE", policy.opts.vlm_image_area)
    assert sample.n_refs == 2
    noise = initial_noise(policy.latent_shape(32, 32), 7, [0])
    theirs = policy.pipe(
        image=[to_pil(r) for r in sample.ref_images], prompt=sample.prompt, height=32, width=32,
        num_inference_steps=STEPS, sigmas=sigma_schedule(STEPS)[:-1].tolist(), true_cfg_scale=1.0,
        latents=policy._pack(noise), output_type="pt",
    ).images
    ours = sample_ode(policy, [sample], steps=STEPS, cfg_scale=1.0, seed=7)
    assert ours.shape == theirs.shape == (1, 3, 32, 32) and float(ours.std()) > 1e-3
    torch.testing.assert_close(ours, theirs.float(), atol=ATOL, rtol=0)


def test_references_reach_the_text_encoder_as_numbered_pictures(policy, sample, monkeypatch):
    seen = []
    processor = policy.pipe.processor

    class Spy:
        def __call__(self, text, images=None, **kwargs):
            seen.append((list(text), None if images is None else len(images)))
            return processor(text=text, images=images, **kwargs)

    monkeypatch.setattr(policy.pipe, "processor", Spy())
    policy.text_cache._memory.clear()
    policy.encode_condition([sample, sample], drop_refs=torch.tensor([False, True]))
    (with_refs, n_with), (without, n_without) = seen
    picture = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
    assert picture.format(1) + picture.format(2) + sample.prompt in with_refs[0] and n_with == 2
    assert "Picture 1" not in without[0] and sample.prompt in without[0] and n_without is None
    # the text embedding depends on the reference pixels (the VL encoder sees them)
    other = dataclasses.replace(sample, ref_images=[1 - r for r in sample.ref_images])
    a, b = (policy.encode_condition([s]).text["embeds"] for s in (sample, other))
    assert a.shape == b.shape and (a - b).abs().max() > 1e-4
    assert policy._text_key(sample.prompt, sample.ref_images) != policy._text_key(sample.prompt, other.ref_images)
