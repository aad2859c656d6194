"""FLUX.1 Kontext adapter on tiny random components: the pipeline's sampler and the adapter's
ODE rollout agree; several references get distinct index offsets (draft first for refinement).
Training, persistence and the text cache are tested for every backend in test_backends_training.py."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from refrl.data.refworld import RefWorld
from refrl.data.schema import LoadedSample
from refrl.models.build import build_policy
from refrl.models.diffusers import tiny
from refrl.models.diffusers.kontext import KontextPolicy
from refrl.models.diffusers.qwen_edit_plus import to_pil
from refrl.models.policy import Policy
from refrl.sampling.rollout import initial_noise, sample_ode
from refrl.sampling.schedules import sigma_schedule

KIND = "kontext"
ATOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.save_tiny_pipeline(KIND, tmp_path_factory.mktemp("kontext") / "pipe")


@pytest.fixture(scope="module")
def samples():
    world = RefWorld(size=32, level=0, max_refs=2, categories=["refine", "subject"])
    return [tiny.quantize_sample(world.sample(np.random.default_rng(i))) for i in range(3)]


def test_pipeline_sampler_and_adapter_ode_agree(folder, samples):
    policy = build_policy(tiny.tiny_model_config(KIND, folder, lora_rank=4))
    assert isinstance(policy, Policy)
    one = tiny.quantize_sample(samples[0], n_refs=1)
    steps = 3
    ours = sample_ode(policy, [one], steps=steps, cfg_scale=1.0, seed=5)
    noise = initial_noise(policy.latent_shape(32, 32), 5, [0])
    pipe = policy.pipe
    theirs = pipe(
        image=to_pil(one.ref_images[0]), prompt=one.prompt, height=32, width=32, num_inference_steps=steps,
        sigmas=sigma_schedule(steps)[:-1].tolist(), guidance_scale=policy.guidance, latents=policy._pack(noise),
        max_sequence_length=policy.max_text_tokens, max_area=32 * 32, _auto_resize=False, output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert float(ours.std()) > 1e-3  # not a constant image
    torch.testing.assert_close(ours, theirs.float(), atol=ATOL, rtol=0)


def test_multi_reference_index_offsets_and_draft_first(folder, samples):
    policy = KontextPolicy(tiny.tiny_pipeline(KIND), tiny.tiny_model_config(KIND, folder))
    ids = policy.position_ids((4, 4), 2, (3, 3))
    assert ids.shape == (16 + 2 * 9, 3)
    assert ids[:16, 0].unique().tolist() == [0]
    assert ids[16:25, 0].unique().tolist() == [1] and ids[25:, 0].unique().tolist() == [2]
    assert ids[16:25, 1:].tolist() == policy.position_ids((3, 3), 0, (1, 1))[:, 1:].tolist()
    refine = LoadedSample("r", "restore", [torch.rand(3, 32, 32), torch.rand(3, 32, 32)], ["subject", "draft"])
    assert policy._reference_order(refine) == [1, 0]  # OmniRefiner: noisy 0, draft 1, reference 2
    sample_order = KontextPolicy(tiny.tiny_pipeline(KIND), tiny.tiny_model_config(
        KIND, folder, diffusers={"ref_order": "sample"}))
    assert sample_order._reference_order(refine) == [0, 1]
    # The reference order changes the velocity (the index offsets are really used).
    x = torch.randn(1, *policy.latent_shape(32, 32))
    v_draft = policy.velocity(x, torch.tensor([0.7]), policy.encode_condition([refine]))
    v_sample = sample_order.velocity(x, torch.tensor([0.7]), sample_order.encode_condition([refine]))
    assert (v_draft - v_sample).abs().max() > 1e-4
