"""GRPO engine: on-policy guard, exact resume, 1-vs-2-process equality, NaN rewards."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refrl.config import load_config
from refrl.models.tiny_dit_policy import TinyDiTPolicy
from refrl.runfolder.layout import latest_checkpoint
from refrl.train.grpo import GRPOTrainer, train_grpo
from refrl.train.grpo_config import GRPOConfig


def grpo_cfg(policy_dir: Path, *extra: str) -> GRPOConfig:
    base = [
        f"model.init={policy_dir}", "iterations=3", "groups_per_iteration=2", "group_size=4", "minibatch_size=4",
        "gradient_accumulation=1", "model.frozen=[]",
        # the weights these tests were written with (the preset now weights identity 2):
        # with identity at 2, Adam's first step turned a float-order difference in one near-zero
        # gradient into 5e-6, past the accumulation test's tolerance
        "rewards=[{name: identity}, {name: layout}, {name: fidelity}, {name: style, weight: 1.6}]",
        "sampling.steps=4", "sampling.sde_steps=all", "checkpoint_every=1", "keep_last=5", "clip_range=0.2",
        "optim.lr=1e-3", "data.max_refs=3", "save_rollouts=true",
        "validation.every=0",
    ]
    return load_config(GRPOConfig, "configs/tiny-cpu-grpo.yaml", base + list(extra))


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_ratio_is_one_and_training_changes_weights(tmp_path, tiny_policy_dir):
    run = tmp_path / "run"
    train_grpo(grpo_cfg(tiny_policy_dir, "iterations=2"), run)
    recs = metrics(run)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["ratio_first"] <= 1e-5
        for k in ("reward/identity", "reward/layout", "reward/fidelity", "loss", "clipfrac", "seconds/rollout",
                  "seconds/reward", "seconds/train", "samples_per_second", "zero_std_groups", "nan/identity"):
            assert k in r
    before = TinyDiTPolicy.from_pretrained(tiny_policy_dir)
    after = load_file(str(latest_checkpoint(run / "checkpoints") / "trainable.safetensors"))
    changed = [not torch.equal(p, after[f"p{i}"]) for i, p in enumerate(before.trainable_parameters())]
    assert any(changed)


def test_frozen_modules_keep_their_initial_weights(tmp_path, tiny_policy_dir):
    run = tmp_path / "run"
    train_grpo(grpo_cfg(tiny_policy_dir, "iterations=2", "model.frozen=[head, blocks.0.mlp]"), run)
    before = TinyDiTPolicy.from_pretrained(tiny_policy_dir).net.state_dict()
    ckpt = latest_checkpoint(run / "checkpoints")
    after = load_file(str(ckpt / "policy" / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("head.", "blocks.0.mlp."))]
    assert sorted(frozen) == ["blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
                              "blocks.0.mlp.fc2.weight", "head.bias", "head.weight"]
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["blocks.0.qkv.weight"], after["blocks.0.qkv.weight"])
    # the optimizer and the raw checkpoint weights hold only what trains
    assert len(load_file(str(ckpt / "trainable.safetensors"))) == len(before) - len(frozen)


def test_resume_with_another_frozen_list_names_the_keys(tmp_path, tiny_policy_dir):
    from refrl.errors import RefrlError

    run = tmp_path / "run"
    train_grpo(grpo_cfg(tiny_policy_dir, "iterations=1"), run)
    with pytest.raises(RefrlError, match=r"model\.frozen=\[\] \(now \['head'\]\); resume with the model\.frozen"):
        train_grpo(grpo_cfg(tiny_policy_dir, "iterations=2", "model.frozen=[head]"), run, resume=True)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_climbs_a_simple_reward(tmp_path, tiny_policy_dir, brightness_reward, sign):
    # The sign of the loss, the advantage and the log-prob gradient all have to be right
    # for the reward to go up; a negative weight must push it down instead.
    cfg = grpo_cfg(
        tiny_policy_dir, "iterations=8", "groups_per_iteration=4", "minibatch_size=16", "optim.lr=1e-2",
        f"rewards=[{{name: brightness, weight: {sign}}}]", "advantage.kind=weighted", "checkpoint_every=8",
        "data.max_refs=1",
    )
    run = tmp_path / "run"
    train_grpo(cfg, run)
    means = [r["reward/brightness"] for r in metrics(run)]
    assert sign * (means[-1] - means[0]) > 0.1, means


def test_exact_resume(tmp_path, tiny_policy_dir):
    full, part = tmp_path / "full", tmp_path / "part"
    train_grpo(grpo_cfg(tiny_policy_dir), full)
    train_grpo(grpo_cfg(tiny_policy_dir, "iterations=2"), part)
    # continue the stopped run to 3 iterations
    train_grpo(grpo_cfg(tiny_policy_dir), part, resume=True)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    volatile = {"seconds/rollout", "seconds/reward", "seconds/train", "samples_per_second"}
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in volatile} == {k: v for k, v in rb.items() if k not in volatile}
    wa = load_file(str(full / "checkpoints/step-3/trainable.safetensors"))
    wb = load_file(str(part / "checkpoints/step-3/trainable.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_missing_rewards_are_filled_and_counted(tmp_path, tiny_policy_dir):
    # `style` is NaN for samples without a style reference: the mean rule fills it and counts it.
    cfg = grpo_cfg(tiny_policy_dir, "iterations=1", "advantage.kind=weighted")
    assert "style" in [r.name for r in cfg.rewards]  # the preset trains it (DyRef's reward)
    train_grpo(cfg, tmp_path / "run")
    (rec,) = metrics(tmp_path / "run")
    assert rec["nan/style"] > 0
    adv = load_file(str(tmp_path / "run/rollouts/iter-1.safetensors"))["advantages"]
    assert torch.isfinite(adv).all()


@pytest.mark.slow
@pytest.mark.parametrize(("command", "extra", "iterations"), [
    ("grpo", [], 1),
    ("rl", ["objective=nft", "sampling.sde_steps=none", "sampling.same_noise_in_group=false", "sampling.cfg_scale=2.0", "matching.k=2", "beta_kl=0.1"], 2),
    ("rl", ["objective=awm", "sampling.sde_steps=none", "sampling.same_noise_in_group=false", "matching.k=2", "matching.old_policy=ema",
            "matching.old_ema_ramp=0.5", "advantage.kind=sars", "advantage.tdw=true"], 2),
])
def test_two_processes_match_one(tmp_path, tiny_policy_dir, launch, command, extra, iterations):
    """Same global batch and seed: 2 gloo processes give the same advantages and update as 1 (every objective)."""
    overrides = [
        f"model.init={tiny_policy_dir}", f"iterations={iterations}", "groups_per_iteration=2", "group_size=4", "gradient_accumulation=1",
        "minibatch_size=4", "sampling.steps=4", "clip_range=0.2", "optim.lr=1e-3", "data.max_refs=3",
        "save_rollouts=true", "validation.every=0", *extra,
    ]
    runs = {n: tmp_path / f"np{n}" for n in (1, 2)}
    launch(*[(n, [command, "--config", "configs/tiny-cpu-grpo.yaml", "--out", str(runs[n]), *overrides]) for n in runs])
    assert [r["processes"] for r in metrics(runs[2])] == [2] * iterations
    for it in range(1, iterations + 1):
        # After an update the two runs' weights differ by float rounding (~1e-6: the gradients are
        # summed in another order); a group-normalised advantage magnifies that a hundredfold.
        tol = 1e-5 if it == 1 else 1e-3
        r1 = load_file(str(runs[1] / f"rollouts/iter-{it}.safetensors"))
        r2 = load_file(str(runs[2] / f"rollouts/iter-{it}.safetensors"))
        for k in r1:
            torch.testing.assert_close(r1[k], r2[k], rtol=tol, atol=tol, equal_nan=True)  # style: NaN without a style reference
    w1 = load_file(str(runs[1] / f"checkpoints/step-{iterations}/trainable.safetensors"))
    w2 = load_file(str(runs[2] / f"checkpoints/step-{iterations}/trainable.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [["kl_reference=copy"], ["kl_reference=adapter", "model.lora_rank=4"], ["kl_reference=auto"]])
def test_kl_to_reference_is_zero_before_the_first_update(tmp_path, tiny_policy_dir, extra):
    # one minibatch per iteration: the KL of iteration 1 is measured before any update
    cfg = grpo_cfg(tiny_policy_dir, "iterations=2", "beta_kl=0.1", "minibatch_size=8", *extra)
    train_grpo(cfg, tmp_path / "run")
    first, second = metrics(tmp_path / "run")
    assert first["kl"] == pytest.approx(0.0, abs=1e-10)
    assert second["kl"] > 0


def test_kl_adapter_without_lora_is_a_clear_error(tmp_path, tiny_policy_dir):
    from refrl.errors import RefrlError

    with pytest.raises(RefrlError, match="lora_rank"):
        GRPOTrainer(grpo_cfg(tiny_policy_dir, "beta_kl=0.1", "kl_reference=adapter"), tmp_path / "run")


@pytest.mark.parametrize(("extra", "expected"), [([], "copy"), (["model.lora_rank=4"], "adapter")])
def test_kl_reference_auto_picks_adapter_for_lora_and_a_copy_otherwise(tmp_path, tiny_policy_dir, extra, expected):
    trainer = GRPOTrainer(grpo_cfg(tiny_policy_dir, "beta_kl=0.1", *extra), tmp_path / "run")
    kind = "adapter" if trainer.reference == "adapter" else "copy"
    assert kind == expected
    if expected == "copy":
        assert trainer.reference is not trainer.policy
        assert not any(p.requires_grad for p in trainer.reference.trainable_parameters())


def test_resume_refuses_a_run_started_from_other_weights(tmp_path, tiny_policy_dir):
    from refrl.errors import RefrlError

    init = tmp_path / "init"
    shutil.copytree(tiny_policy_dir, init)
    run = tmp_path / "run"
    train_grpo(grpo_cfg(init, "iterations=1"), run)
    weights = next(init.glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0  # the "retrained" init checkpoint, same name
    from safetensors.torch import save_file

    save_file(tensors, str(weights))
    with pytest.raises(RefrlError, match="different initial weights"):
        train_grpo(grpo_cfg(init, "iterations=2"), run, resume=True)


def test_missing_tracker_package_is_a_clear_error(tmp_path, tiny_policy_dir, monkeypatch):
    import importlib.util

    from refrl.errors import RefrlError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(RefrlError, match=r"refrl\[trackers\]"):
        GRPOTrainer(grpo_cfg(tiny_policy_dir, "trackers=[tensorboard]"), tmp_path / "run")


def test_a_sharding_accelerate_config_is_refused(monkeypatch):
    """FSDP / DeepSpeed configs would leave a full replica per process behind refrl's own
    gradient averaging: refused with the allowed types named (CPU accelerate turns an FSDP
    config into MULTI_CPU, so the type is faked here)."""
    import accelerate
    from accelerate.utils import DistributedType

    from refrl.errors import RefrlError
    from refrl.train.distributed import Dist

    class Sharded(accelerate.Accelerator):
        @property
        def distributed_type(self):
            return DistributedType.FSDP

    monkeypatch.setattr(accelerate, "Accelerator", Sharded)
    with pytest.raises(RefrlError, match="distributed_type=FSDP is not supported.*MULTI_GPU / MULTI_CPU"):
        Dist()


def test_gradient_accumulation_over_the_iteration_equals_one_minibatch(tmp_path, tiny_policy_dir):
    """Summing the gradients of 4 minibatches (each averaged, then /4) is the one-minibatch step."""
    one = tmp_path / "one"
    acc = tmp_path / "acc"
    train_grpo(grpo_cfg(tiny_policy_dir, "iterations=1", "minibatch_size=8"), one)
    train_grpo(grpo_cfg(tiny_policy_dir, "iterations=1", "minibatch_size=2", "gradient_accumulation=iteration"), acc)
    wa = load_file(str(one / "checkpoints/step-1/trainable.safetensors"))
    wb = load_file(str(acc / "checkpoints/step-1/trainable.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert metrics(acc)[0]["ratio_first"] <= 1e-5


def test_window_max_start_keeps_the_trained_window_early(tmp_path, tiny_policy_dir):
    from refrl.sampling.rollout import choose_sde_steps

    starts = {choose_sde_steps("window", 10, torch.Generator().manual_seed(k), 2, "random", 0, 4, 2)[0] for k in range(200)}
    assert starts == {0, 1, 2}
    cfg = grpo_cfg(tiny_policy_dir, "iterations=2", "sampling.sde_steps=window", "sampling.window=1",
                   "sampling.window_max_start=1", "checkpoint_every=2")
    train_grpo(cfg, tmp_path / "run")
    assert all(r["sde_steps"][0] <= 1 for r in metrics(tmp_path / "run"))


@pytest.mark.parametrize("override, key", [
    ("sampling.window_max_start=9", "window_max_start"),
    ("sampling.window_max_start=-1", "window_max_start"),
    ("gradient_accumulation=3", "gradient_accumulation"),
    ("gradient_accumulation=0", "gradient_accumulation"),
    ("gradient_accumulation=epoch", "gradient_accumulation"),
])
def test_bad_signal_options_are_one_line_errors(tmp_path, override, key):
    """Through the installed command: exit 2, one `error:` line naming the key, no traceback."""
    res = subprocess.run([sys.executable, "-m", "refrl", "grpo", "--config", "configs/tiny-cpu-grpo.yaml",
                          "--out", str(tmp_path / "run"), override], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


def test_signal_check_pure_parts_and_a_run(tmp_path, tiny_policy_dir):
    from refrl.train.signal import cosine, measure_signal, trained_step_share, within_group_variance

    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(2**-0.5)
    assert cosine(torch.zeros(2), torch.ones(2)) == 0.0
    # groups [1, 3] and [0, 4]: variances 1 and 4 -> 2.5
    scores = torch.tensor([1.0, 3.0, 0.0, 4.0])
    assert within_group_variance(scores, 2) == pytest.approx(2.5)
    # re-rolled differences 1, 1, 2, 0 -> mean of (d^2 / 2) = (0.5 + 0.5 + 2 + 0) / 4 = 0.75; / 2.5 = 0.3
    again = torch.tensor([2.0, 2.0, 2.0, 4.0])
    assert trained_step_share(scores, again, 2) == pytest.approx(0.3)
    cfg = grpo_cfg(tiny_policy_dir, "iterations=1", "sampling.same_noise_in_group=true",
                   "sampling.sde_steps=random_one", "sampling.first_m=2")
    out = measure_signal(GRPOTrainer(cfg, tmp_path / "run"), iterations=1)
    assert -1.0 <= out["gradient_cosine"] <= 1.0 and out["gradient_cosine"] != 0.0
    assert set(out["trained_step_variance_share"]) == {"identity", "layout", "fidelity", "style"}
    assert not (tmp_path / "run" / "checkpoints").exists()  # a check trains nothing


def test_signal_benchmark_keeps_every_set_override():
    """`benchmarks/run.py --set A --set B` passes both overrides (it once kept only the last one,
    so a measurement of `groups_per_iteration=8` silently ran the preset's 16)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).resolve().parents[1] / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.build_parser().parse_args(["--only", "grpo_signal", "--set", "groups_per_iteration=8",
                                            "--set", "gradient_accumulation=1", "sampling.steps=4"])
    assert args.set == ["groups_per_iteration=8", "gradient_accumulation=1", "sampling.steps=4"]
    assert args.only == ["grpo_signal"]
    assert bench.build_parser().parse_args([]).set == []
