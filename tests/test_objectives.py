"""The log-prob-free RL objectives (DiffusionNFT, AWM) beside GRPO: hand-computed formulas,
the on-policy guard, one-step direction, reward climbing, TDW on training times, exact
resume with the off-policy EMA sampler, and one-line config errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from refrl.config import load_config
from refrl.train.advantages import AdvantageConfig, compute_advantages
from refrl.train.grpo import GRPOTrainer, OnPolicyError, train_grpo
from refrl.train.grpo_config import GRPOConfig
from refrl.train.objectives.awm import awm_loss, matching_log_likelihood
from refrl.train.objectives.matching import (
    forward_process,
    sample_training_times,
    schedule_position,
)
from refrl.train.objectives.nft import (
    nft_implicit_policies,
    nft_loss,
    nft_optimality_weight,
    scaled_x0_error,
)


def rl_cfg(policy_dir: Path, objective: str, *extra: str) -> GRPOConfig:
    base = [
        f"model.init={policy_dir}", f"objective={objective}", "iterations=3", "groups_per_iteration=2", "group_size=4",
        "gradient_accumulation=1", "model.frozen=[]",
        "minibatch_size=4", "sampling.steps=4", "sampling.sde_steps=none", "sampling.same_noise_in_group=false",
        "sampling.cfg_scale=2.0", "matching.k=2",
        "checkpoint_every=1", "keep_last=5", "clip_range=0.2", "optim.lr=1e-3", "data.max_refs=3", "save_rollouts=true",
        "validation.every=0",
    ]
    return load_config(GRPOConfig, "configs/tiny-cpu-grpo.yaml", base + list(extra))


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- pure formulas


def test_implicit_policies_by_hand():
    v = torch.tensor([[1.0, 2.0]], requires_grad=True)
    v_old = torch.tensor([[0.5, -1.0]], requires_grad=True)
    pos, neg = nft_implicit_policies(v, v_old, 1.0)
    torch.testing.assert_close(pos, torch.tensor([[1.0, 2.0]]))  # v+ = v
    torch.testing.assert_close(neg, torch.tensor([[0.0, -4.0]]))  # v- = 2 v_old - v
    pos, neg = nft_implicit_policies(v, v_old, 0.5)
    torch.testing.assert_close(pos, torch.tensor([[0.75, 0.5]]))  # 0.5 v + 0.5 v_old
    torch.testing.assert_close(neg, torch.tensor([[0.25, -2.5]]))  # 1.5 v_old - 0.5 v
    (pos.sum() + neg.sum()).backward()
    assert v_old.grad is None  # v_old is the sampling policy: no gradient
    torch.testing.assert_close(v.grad, torch.zeros_like(v))  # d/dv (0.5 v - 0.5 v) = 0


def test_advantage_to_optimality_weight():
    adv = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    torch.testing.assert_close(nft_optimality_weight(adv, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(nft_optimality_weight(adv, 10.0), torch.tensor([0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]))


def test_per_sample_error_scale():
    x0 = torch.zeros(3, 4)
    x0_hat = torch.stack([torch.tensor([1.0, -1.0, 2.0, 0.0]), torch.tensor([10.0, -10.0, 20.0, 0.0]),
                          torch.full((4,), 1e-7)]).requires_grad_(True)
    err = scaled_x0_error(x0_hat, x0, floor=1e-5)
    # mean sq / mean abs: 1.5 / 1 = 1.5; 150 / 10 = 15 (not 100x: the scale is per sample);
    # 1e-14 / max(1e-7, 1e-5) = 1e-9 (the floor)
    torch.testing.assert_close(err, torch.tensor([1.5, 15.0, 1e-9]), rtol=1e-5, atol=0)
    err[0].backward()
    # the scale is detached: d/dx (mean x^2 / s) = 2x / (D s) with s = 1
    torch.testing.assert_close(x0_hat.grad[0], torch.tensor([0.5, -0.5, 1.0, 0.0]))


def test_nft_loss_by_hand():
    # x0 = 0, e = 2 -> x_t = 1 at t = 0.5; v = (2, 0), v_old = (2, 1)
    x0, e, t = torch.zeros(1, 2), torch.full((1, 2), 2.0), torch.tensor([0.5])
    x_t, u = forward_process(x0, e, t)
    torch.testing.assert_close(x_t, torch.ones(1, 2))
    torch.testing.assert_close(u, torch.full((1, 2), 2.0))
    v, v_old = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    # beta = 1: x0+ = x_t - t v = (0, 1): E+ = 0.5 / 0.5 = 1; v- = (2, 2): x0- = (0, 0): E- = 0
    for a, expected in ((5.0, 1.0), (0.0, 0.5), (-5.0, 0.0), (2.5, 0.75)):
        got = nft_loss(v, v_old, x_t, x0, t, torch.tensor([a]), beta=1.0, adv_max=5.0)
        torch.testing.assert_close(got, torch.tensor([expected]))
    # beta = 0.5: v+ = (2, 0.5): E+ = 0.28125 / 0.375 = 0.75; v- = (2, 1.5): E- = 0.03125 / 0.125 = 0.25
    got = nft_loss(v, v_old, x_t, x0, t, torch.tensor([0.0]), beta=0.5, adv_max=5.0)
    torch.testing.assert_close(got, torch.tensor([(0.5 * 0.75 + 0.5 * 0.25) / 0.5]))


def test_awm_log_likelihood_and_ratio_by_hand():
    u = torch.zeros(2, 4)
    v = torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(matching_log_likelihood(v, u, t), torch.tensor([-1.5, 0.0]))
    torch.testing.assert_close(matching_log_likelihood(v, u, t, "t"), torch.tensor([-0.75, 0.0]))
    torch.testing.assert_close(matching_log_likelihood(v, u, t, "t2"), torch.tensor([-0.375, 0.0]))
    l_new, l_old = torch.tensor([-1.0, -2.0]), torch.tensor([-1.1, -2.0])
    loss, ratio, st = awm_loss(l_new, l_old, torch.tensor([1.0, -1.0]), clip_range=0.2)
    torch.testing.assert_close(ratio, torch.tensor([np.exp(0.1), 1.0], dtype=torch.float32))
    # sample 0: max(-1.105, -1.105) (inside the clip range); sample 1: max(1, 1)
    torch.testing.assert_close(loss, torch.tensor((-np.exp(0.1) + 1.0) / 2, dtype=torch.float32))


def test_training_times_and_their_schedule_positions():
    sigmas = torch.linspace(1.0, 0.0, 11)
    g = torch.Generator().manual_seed(0)
    t = sample_training_times(500, "schedule", sigmas, 0.25, 1.0, 0.0, 1.0, g)
    torch.testing.assert_close(torch.unique(t), torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]))
    u = sample_training_times(500, "uniform", sigmas, 0.1, 0.6, 0.0, 1.0, g)
    assert 0.1 <= float(u.min()) and float(u.max()) <= 0.6 and len(set(u.tolist())) == 500
    ln = sample_training_times(500, "logit_normal", sigmas, 0.2, 0.9, 0.0, 1.0, g)
    assert 0.2 <= float(ln.min()) and float(ln.max()) <= 0.9
    pos = schedule_position(torch.tensor([1.0, 0.5, 0.55, 0.05, 0.0]), sigmas)
    torch.testing.assert_close(pos[:4], torch.tensor([0.0, 5.0, 4.5, 9.5], dtype=torch.float64))
    assert 9.99 < float(pos[4]) < 10.0  # t = 0 is the end of the last step, kept inside TDW's range
    from refrl.sampling.schedules import sigma_schedule

    shifted = sigma_schedule(10, shift=3.0)
    torch.testing.assert_close(schedule_position(shifted[:10], shifted), torch.arange(10, dtype=torch.float64))


def test_tdw_weights_each_training_time():
    """SARS+TDW with per-sample times equals Customized-GRPO's advantage at each sample's own step."""
    from refrl.shaping import customized_grpo_advantages

    g = torch.Generator().manual_seed(0)
    rewards = {"layout": torch.rand(8, generator=g), "identity": torch.rand(8, generator=g)}
    group_ids = torch.arange(2).repeat_interleave(4)
    positions = torch.rand(8, 3, generator=g) * 10
    cfg = AdvantageConfig(kind="sars", tdw=True)
    res = compute_advantages(rewards, {}, {"layout": 1.0, "identity": 1.0}, group_ids, torch.ones(8), positions, 10, cfg)
    assert res.advantages.shape == (8, 3)
    for j in range(3):
        expected = customized_grpo_advantages(rewards["layout"], rewards["identity"], group_ids, positions[:, j], 10)
        torch.testing.assert_close(res.advantages[:, j], expected)
    assert not torch.allclose(res.advantages[:, 0], res.advantages[:, 1])  # the weights differ per time
    assert 0.3 <= res.metrics["tdw/w_prompt_min"] <= res.metrics["tdw/w_prompt_max"] <= 0.7


# --------------------------------------------------------------------------- one step on a tiny policy


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_advantage_sign_moves_the_matching_loss(tiny_policy_dir, objective):
    """One SGD step on one sample: a positive advantage lowers its matching loss, a negative one raises it."""
    from refrl.data.refworld import RefWorld
    from refrl.models.tiny_dit_policy import TinyDiTPolicy
    from refrl.sampling.rollout import guided_velocity

    sample = RefWorld(size=32, level=0, max_refs=1, categories=["subject"]).sample(np.random.default_rng(0))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    e = torch.randn(1, 3, 32, 32, generator=g)
    t = torch.tensor([0.6])
    x_t, u = forward_process(x0, e, t)

    def mse(policy) -> float:
        with torch.no_grad():
            v = guided_velocity(policy, x_t, t, policy.encode_condition([sample]), None, 1.0)
        return float(((v - u) ** 2).mean())

    changes = {}
    for sign in (1.0, -1.0):
        policy = TinyDiTPolicy.from_pretrained(tiny_policy_dir)
        policy.eval()
        before = mse(policy)
        cond = policy.encode_condition([sample])
        with torch.no_grad():
            v_old = policy.velocity(x_t, t, cond)
        v = policy.velocity(x_t, t, cond)
        adv = torch.tensor([sign])
        if objective == "nft":
            loss = nft_loss(v, v_old, x_t, x0, t, adv).mean()
        else:
            loss, ratio, _ = awm_loss(matching_log_likelihood(v, u, t), matching_log_likelihood(v_old, u, t), adv, 0.2)
            assert float(ratio) == 1.0
        loss.backward()
        torch.optim.SGD(list(policy.trainable_parameters()), lr=1e-2).step()
        changes[sign] = mse(policy) - before
    assert changes[1.0] < 0 < changes[-1.0], changes


# --------------------------------------------------------------------------- through the trainer


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_ratio_is_one_on_the_first_minibatch_only(tmp_path, tiny_policy_dir, objective):
    # 8 samples in minibatches of 4: the second minibatch comes after an update, so the
    # ratio there must move (the check is not trivially 1)
    train_grpo(rl_cfg(tiny_policy_dir, objective, "iterations=2", "beta_kl=0.1"), tmp_path / "run")
    recs = metrics(tmp_path / "run")
    assert all(r["ratio_first"] <= 1e-5 for r in recs)
    assert max(abs(r["ratio_mean"] - 1.0) for r in recs) > 1e-6
    assert all(r["sde_steps"] == [] for r in recs)  # ODE rollouts
    assert recs[1]["kl"] > 0
    rollout = load_file(str(tmp_path / "run/rollouts/iter-1.safetensors"))
    assert rollout["advantages"].shape == (8, 2)  # one advantage per sample and training time
    trainer_state = torch.load(tmp_path / "run/checkpoints/step-2/trainer.pt", weights_only=True)
    assert trainer_state["objective"] == {}  # on-policy: nothing beyond GRPO's state
    info = json.loads((tmp_path / "run/checkpoints/step-2/state.json").read_text())
    assert info["kind"] == objective


@pytest.mark.parametrize("objective", ["grpo", "nft", "awm"])
def test_on_policy_guard_stops_a_mismatched_run(tmp_path, tiny_policy_dir, monkeypatch, objective):
    extra = ["sampling.sde_steps=all"] if objective == "grpo" else []  # GRPO trains SDE steps
    trainer = GRPOTrainer(rl_cfg(tiny_policy_dir, objective, "iterations=1", *extra), tmp_path / "run")
    real = trainer.policy.velocity

    def noisy_when_training(x, sigma, cond):  # e.g. dropout active only with gradients on
        v = real(x, sigma, cond)
        return v + 1e-2 * torch.randn_like(v) if torch.is_grad_enabled() else v

    monkeypatch.setattr(trainer.policy, "velocity", noisy_when_training)
    with pytest.raises(OnPolicyError, match="dropout"):
        trainer.train()


@pytest.mark.parametrize(("objective", "sign"), [("nft", 1.0), ("nft", -1.0), ("awm", 1.0), ("awm", -1.0)])
def test_objectives_climb_a_simple_reward(tmp_path, tiny_policy_dir, brightness_reward, objective, sign):
    # as test_grpo_climbs_a_simple_reward, with ODE rollouts and no log-prob anywhere
    cfg = rl_cfg(
        tiny_policy_dir, objective, "iterations=8", "groups_per_iteration=4", "minibatch_size=16", "optim.lr=1e-2",
        f"rewards=[{{name: {brightness_reward}, weight: {sign}}}]", "advantage.kind=weighted", "checkpoint_every=8",
        "data.max_refs=1", "sampling.cfg_scale=1.0", "matching.k=4", "save_rollouts=false",
    )
    train_grpo(cfg, tmp_path / "run")
    means = [r["reward/brightness"] for r in metrics(tmp_path / "run")]
    assert sign * (means[-1] - means[0]) > 0.1, means


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_exact_resume_with_the_off_policy_ema_sampler(tmp_path, tiny_policy_dir, objective):
    extra = ["matching.old_policy=ema", "matching.old_ema_ramp=0.25", "matching.time_sampling=uniform"]
    full, part = tmp_path / "full", tmp_path / "part"
    train_grpo(rl_cfg(tiny_policy_dir, objective, *extra), full)
    train_grpo(rl_cfg(tiny_policy_dir, objective, "iterations=2", *extra), part)
    train_grpo(rl_cfg(tiny_policy_dir, objective, *extra), part, resume=True)
    a, b = metrics(full), metrics(part)
    volatile = {"seconds/rollout", "seconds/reward", "seconds/train", "samples_per_second"}
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in volatile} == {k: v for k, v in rb.items() if k not in volatile}
    # the EMA sampler lags the trained weights: after the first update v_old != v
    assert a[0]["ratio_first"] <= 1e-5 and a[2]["ratio_first"] > 1e-4
    for name in ("trainable.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(full / "checkpoints/step-3" / name)), load_file(str(part / "checkpoints/step-3" / name))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    sa = torch.load(full / "checkpoints/step-3/trainer.pt", weights_only=True)["objective"]["old_ema"]
    sb = torch.load(part / "checkpoints/step-3/trainer.pt", weights_only=True)["objective"]["old_ema"]
    trained = load_file(str(full / "checkpoints/step-3/trainable.safetensors"))
    assert any(not torch.equal(sa[k], trained[k]) for k in trained)  # a real lag, not a copy
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_sars_tdw_on_training_times_in_a_run(tmp_path, tiny_policy_dir):
    cfg = rl_cfg(tiny_policy_dir, "awm", "iterations=1", "advantage.kind=sars", "advantage.tdw=true", "matching.k=3",
                 "matching.time_sampling=uniform", "sampling.steps=10")
    train_grpo(cfg, tmp_path / "run")
    (rec,) = metrics(tmp_path / "run")
    assert rec["tdw/w_prompt_min"] < rec["tdw/w_prompt_max"]
    adv = load_file(str(tmp_path / "run/rollouts/iter-1.safetensors"))["advantages"]
    assert adv.shape == (8, 3) and not torch.allclose(adv[:, 0], adv[:, 1])


# --------------------------------------------------------------------------- config errors, presets


@pytest.mark.parametrize(("command", "overrides", "key"), [
    ("rl", ["objective=ppo"], "objective"),
    ("grpo", ["objective=NFT"], "objective"),
    ("rl", ["sampling.sde_steps=none"], "sampling.sde_steps"),
    ("rl", ["objective=nft", "sampling.sde_steps=ode"], "sampling.sde_steps"),
    ("rl", ["objective=nft", "matching.k=0"], "matching.k"),
    ("rl", ["objective=nft", "nft.beta=0"], "nft.beta"),
    ("rl", ["objective=awm", "awm.time_weighting=t3"], "awm.time_weighting"),
    ("rl", ["objective=awm", "matching.time_sampling=beta"], "matching.time_sampling"),
    ("rl", ["objective=awm", "matching.old_policy=old"], "matching.old_policy"),
    ("rl", ["objective=nft", "matching.t_min=0.8", "matching.t_max=0.5"], "matching.t_min"),
    ("rl", ["objective=nft", "matching.t_min=0.95", "matching.t_max=0.99"], "matching.t_min"),
    ("rl", ["objective=awm", "matching.typo=1"], "matching.typo"),
    ("rl", ["objective=awm", "sampling.sde_steps=none", "sampling.same_noise_in_group=true"], "same_noise_in_group"),
])
def test_bad_objective_options_are_one_line_errors(tmp_path, command, overrides, key):
    """Through the installed command: exit 2, one `error:` line naming the key, no traceback."""
    res = subprocess.run([sys.executable, "-m", "refrl", command, "--config", "configs/tiny-cpu-grpo.yaml",
                          "--out", str(tmp_path / "run"), *overrides], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_presets_load(objective):
    cfg = load_config(GRPOConfig, f"configs/tiny-cpu-{objective}.yaml")
    assert cfg.objective == objective and cfg.sampling.sde_steps == "none" and cfg.sampling.cfg_scale == 2.0
    assert cfg.model.init == "tiny-sft" and [r.name for r in cfg.rewards] == ["identity", "layout", "fidelity", "style"]


def test_signal_check_runs_for_a_matching_objective(tmp_path, tiny_policy_dir):
    from refrl.train.signal import measure_signal

    out = measure_signal(GRPOTrainer(rl_cfg(tiny_policy_dir, "nft", "iterations=1"), tmp_path / "run"), iterations=1)
    assert -1.0 <= out["gradient_cosine"] <= 1.0 and out["gradient_cosine"] != 0.0
    # ODE rollouts: no trained SDE step whose variance share could be measured
    assert all(np.isnan(v) for v in out["trained_step_variance_share"].values())
