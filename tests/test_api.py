"""The Python API: trainers that take a policy, a dataset and plain reward functions."""

import math

import numpy as np
import pytest
import torch
import yaml

import refrl
from refrl.data.refworld import RefWorld
from refrl.data.refworld.generate import generate_refworld_to_disk
from refrl.errors import RefrlError
from refrl.rewards.function import FunctionReward
from refrl.train.grpo import resolve_rewards

SMALL_RL = dict(iterations=1, groups_per_iteration=2, group_size=2, minibatch_size=4, checkpoint_every=1,
                sampling={"steps": 3, "sde_steps": "all"}, data={"max_refs": 2})


def samples(n: int, categories=("subject_bg",)):
    world = RefWorld(size=32, categories=list(categories), max_refs=2, level=0)
    return [world.sample(np.random.default_rng([7, i]), index=i) for i in range(n)]


def test_function_reward_turns_lists_into_scores():
    batch = samples(2)
    images = torch.rand(2, 3, 32, 32)

    def half(images, samples):
        return [0.5, None]

    out = FunctionReward(half)(images, batch)
    assert out.scores.dtype == torch.float32 and out.scores[0] == 0.5 and math.isnan(out.scores[1])
    assert FunctionReward(half).name == "half" and FunctionReward(half, name="h").name == "h"
    tensor_out = FunctionReward(lambda im, s: im.mean(dim=(1, 2, 3)), name="mean")(images, batch)
    torch.testing.assert_close(tensor_out.scores, images.mean(dim=(1, 2, 3)))
    with pytest.raises(RefrlError, match="1 scores for 2 samples"):
        FunctionReward(lambda im, s: [1.0], name="short")(images, batch)
    with pytest.raises(RefrlError, match="expected a float or None"):
        FunctionReward(lambda im, s: ["good", 1.0], name="words")(images, batch)
    with pytest.raises(RefrlError, match="needs a name"):
        FunctionReward(lambda im, s: [1.0, 1.0])


def test_rewards_mix_functions_names_and_weights():
    def bright(images, samples):
        return images.mean(dim=(1, 2, 3)).tolist()

    rewards, specs = resolve_rewards([bright, "layout"], [2.0, 0.5])
    assert list(rewards) == ["bright", "layout"] and isinstance(rewards["bright"], FunctionReward)
    assert [(s.name, s.weight) for s in specs] == [("bright", 2.0), ("layout", 0.5)]
    with pytest.raises(RefrlError, match="twice"):
        resolve_rewards([bright, bright])
    with pytest.raises(RefrlError, match="2 values for 1 rewards"):
        resolve_rewards([bright], [1.0, 2.0])
    with pytest.raises(RefrlError, match="unknown reward"):
        resolve_rewards(["no-such-reward"])


def test_rl_trainer_takes_a_policy_a_dataset_and_a_function(tmp_path, tiny_policy_dir):
    data = samples(3)
    seen: set[str] = set()

    def bright(images, batch):
        seen.update(s.id for s in batch)
        return images.mean(dim=(1, 2, 3)).tolist()

    policy = refrl.load_policy(tiny_policy_dir)
    trainer = refrl.GRPOTrainer(refrl.GRPOConfig(**SMALL_RL), tmp_path / "run", policy=policy, dataset=data,
                                rewards=[bright, "layout"], reward_weights=[1.0, 0.5])
    assert trainer.policy is policy
    path = trainer.train()
    assert path == tmp_path / "run" / "checkpoints" / "step-1"
    (record,) = trainer.history
    assert {"reward/bright", "reward/layout", "processes"} <= set(record) and record["processes"] == 1
    assert seen and seen <= {s.id for s in data}  # groups come from the given samples only
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["rewards"] == [{"name": "bright", "weight": 1.0, "options": {}},
                                {"name": "layout", "weight": 0.5, "options": {}}]
    assert refrl.read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["step"] == 1


def test_a_manifest_path_and_a_checkpoint_name_are_recorded_in_the_config(tmp_path, tiny_policy_dir):
    manifest = generate_refworld_to_disk(tmp_path / "data", n=3, seed=0, categories=["subject_bg"], max_refs=2)
    cfg = refrl.SFTConfig(steps=1, batch_size=2, noise_per_condition=1, checkpoint_every=1)
    trainer = refrl.SFTTrainer(cfg, tmp_path / "run", policy=str(tiny_policy_dir), dataset=manifest)
    trainer.train()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["init"] == str(tiny_policy_dir)
    assert saved["data"]["source"] == "manifest" and saved["data"]["manifest"] == str(manifest)
    assert trainer.history[0]["processes"] == 1 and math.isfinite(trainer.history[0]["loss"])


def test_an_empty_dataset_is_a_clear_error(tmp_path, tiny_policy_dir):
    with pytest.raises(RefrlError, match="no samples"):
        refrl.GRPOTrainer(refrl.GRPOConfig(**SMALL_RL), tmp_path / "run", policy=str(tiny_policy_dir), dataset=[],
                          rewards=["layout"])
