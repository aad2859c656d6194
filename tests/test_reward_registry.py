"""The reward registry, and what every embedded reward shares: determinism, the reference
cache (one encoder call per reference in a GRPO group) and refusing bad input."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path

import pytest
import torch

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.rewards import RewardOutput, available, build, compute_rewards, register

sys.path.insert(0, str(Path(__file__).parent))
from test_rewards import NAMES, noise_like  # noqa: E402

# --------------------------------------------------------------------------- determinism and cache


def test_scores_are_deterministic(world):
    assert any({"style", "lighting", "background"} <= set(s.ref_types) for s in world[:8])  # every fitted part
    targets = torch.stack([s.target for s in world[:8]])
    images = 0.5 * noise_like(targets, seed=3) + 0.5 * targets
    for name in NAMES:
        first = build(name)
        a, b, c = first(images, world[:8]), build(name)(images, world[:8]), first(images, world[:8])
        # Bit for bit, with a warm cache or a fresh instance: an exactly resumed run replays its rewards.
        assert torch.equal(a.scores.nan_to_num(-1), c.scores.nan_to_num(-1)), name
        assert torch.equal(a.scores.nan_to_num(-1), b.scores.nan_to_num(-1)), name


def test_a_group_costs_one_encoder_call_per_reference(world):
    s = next(x for x in world if "style" in x.ref_types and x.ref_types.count("subject") >= 1)
    group = [s] * 4
    images = torch.stack([s.target] * 4)
    identity = build("identity")
    identity(images, group)
    n_subject_refs = s.ref_types.count("subject")
    assert identity.encoder_calls == n_subject_refs + 1  # one template per subject + the style map
    identity(images, group)
    assert identity.encoder_calls == n_subject_refs + 1  # second group of the same sample: all cached


def test_cache_tells_apart_samples_sharing_an_id(plain):
    a, b = plain[0], plain[1]
    impostor = LoadedSample(a.id, b.prompt, b.ref_images, b.ref_types, b.target, b.mask, b.category, b.extra)
    identity = build("identity")
    first = identity(b.target[None], [b]).scores
    identity(a.target[None], [a])
    again = identity(b.target[None], [impostor]).scores
    assert torch.equal(first, again)


# --------------------------------------------------------------------------- registry


def test_registry_lists_and_builds_every_embedded_reward():
    names = available()
    for name in NAMES:
        assert name in names
        reward = build(name)
        assert reward.name == name
    assert "dino" in names  # zoo names are listed without importing the zoo models


def test_registry_errors_name_the_allowed_values():
    with pytest.raises(RefrlError, match=r"unknown reward 'nope'.*identity.*layout"):
        build("nope")
    with pytest.raises(RefrlError, match=r"unknown option\(s\) sharpness; allowed: .*colour_weight"):
        build("identity", sharpness=2)
    with pytest.raises(RefrlError, match=r"against='x'; allowed: reference, target"):
        build("style", against="x")
    with pytest.raises(RefrlError, match=r"mapping 'cubic'; allowed: linear, exp"):
        build("patch", mapping="cubic")


def test_register_a_user_reward():
    class Constant:
        name = "constant_test"

        def __init__(self, value: float = 0.5):
            self.value = value

        def __call__(self, images, samples):
            return RewardOutput(torch.full((images.shape[0],), self.value))

    register("constant_test", Constant, overwrite=True)
    assert "constant_test" in available()
    out = compute_rewards({"c": build("constant_test", value=0.25)}, torch.zeros(2, 3, 8, 8), [None, None])
    assert torch.equal(out["c"].scores, torch.tensor([0.25, 0.25]))
    with pytest.raises(RefrlError, match=r"allowed: value"):
        build("constant_test", colour=1)
    with pytest.warns(DeprecationWarning, match="no role any more; it is ignored"):
        register("x_test", Constant, role="vibes")  # rewards lost their role; old calls still register
    assert "x_test" in available()
    with pytest.raises(RefrlError, match="already registered"):
        register("identity", Constant)
    with pytest.raises(RefrlError, match="option 'role' was removed"):
        build("identity", role="identity")


def test_bad_inputs_are_refused(world):
    reward = build("fidelity")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.zeros(1, 1, 32, 32), world[:1])
    with pytest.raises(ValueError, match="2 images but 1 samples"):
        reward(torch.zeros(2, 3, 32, 32), world[:1])
