"""Validation during training, the guard and the best checkpoint (refrl.train.validation, refrl.train.guard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from refrl.config import load_config
from refrl.errors import ConfigError, RefrlError
from refrl.runfolder.layout import resolve_checkpoint
from refrl.train.grpo import GRPOTrainer
from refrl.train.grpo_config import GRPOConfig
from refrl.train.guard import Criterion, GuardRule, evaluate_rules, passes, rule_fires

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
VOLATILE = {"seconds/validation", "seconds/rollout", "seconds/reward", "seconds/train", "samples_per_second"}


def darkness(images, samples):
    """The trained reward of these tests: 1 - mean pixel value."""
    return (1.0 - images.mean(dim=(1, 2, 3))).tolist()


def cfg_of(policy_dir: Path, *extra: str) -> GRPOConfig:
    base = [
        f"model.init={policy_dir}", "iterations=4", "groups_per_iteration=2", "group_size=4", "minibatch_size=8",
        "gradient_accumulation=1", "model.frozen=[]", "sampling.steps=3", "sampling.sde_steps=all",
        "checkpoint_every=1", "keep_last=0", "clip_range=0.2", "optim.lr=1e-2", "data.max_refs=1",
        "advantage.kind=weighted", "validation.every=1", "validation.n=4", "validation.steps=3",
        "validation.cfg_scale=1.0", "validation.metrics=psnr,bright=brightness", "validation.guard=[]",
        "validation.keep_best=null",
    ]
    return load_config(GRPOConfig, str(CONFIGS / "tiny-cpu-grpo.yaml"), base + list(extra))


def lines(run: Path, kind: str | None = "validation") -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == kind]


def train(cfg: GRPOConfig, run: Path, resume: bool = False):
    return GRPOTrainer(cfg, run, resume=resume, rewards=[darkness]).train()


# --------------------------------------------------------------------------- the guard's rules, by hand


def test_rules_fire_as_computed_by_hand():
    h = [{"s": 0.50, "g": 0.01, "t": 0.10}, {"s": 0.49, "g": 0.02, "t": 0.20}, {"s": 0.47, "g": 0.06, "t": 0.19},
         {"s": 0.47, "g": 0.04, "t": 0.20}]
    drop = GuardRule(metric="s", drop=0.02)
    assert rule_fires(drop, h[:2]) is None  # 0.50 - 0.49 = 0.01 <= 0.02
    assert "fell 0.03" in rule_fires(drop, h[:3])  # 0.50 - 0.47 = 0.03 > 0.02
    above = GuardRule(metric="g", above=0.05, action="stop")
    assert rule_fires(above, h[:2]) is None and rule_fires(above, h[:3]) and rule_fires(above, h) is None
    rise = GuardRule(metric="g", rise=0.04)
    assert rule_fires(rise, h[:2]) is None and "rose 0.05" in rule_fires(rise, h[:3])  # 0.06 - 0.01 > 0.04
    wait = GuardRule(metric="t", patience=2)
    # best before the last 2 is 0.20 (step 1); 0.19 and 0.20 do not beat it
    assert rule_fires(wait, h[:3]) is None and "not improved" in rule_fires(wait, h)
    assert rule_fires(GuardRule(metric="t", patience=2, min_delta=0.0), h[:2]) is None  # too short a history
    assert rule_fires(GuardRule(metric="g", patience=1, mode="min"), h[:2])  # 0.02 is no lower than 0.01
    verdicts = evaluate_rules([drop, above, wait], h[:3])
    assert [v.rule.kind for v in verdicts] == ["drop", "above"] and not passes(verdicts)
    assert passes(evaluate_rules([wait], h))  # patience judges progress, not the checkpoint
    assert rule_fires(drop, [*h, {"s": float("nan")}]) is None  # a NaN mean never fires


def test_rule_and_criterion_errors():
    with pytest.raises(ValueError, match="exactly one of drop, above, rise, patience"):
        GuardRule(metric="s", drop=0.1, above=0.2)
    assert Criterion.parse("min:patch_grid") == Criterion("patch_grid", "min")
    assert Criterion.parse("trained_mean") == Criterion("trained_mean", "max")
    with pytest.raises(ConfigError, match="METRIC, max:METRIC or min:METRIC"):
        Criterion.parse("best:x")
    c = Criterion("g", "min")
    assert c.better(0.1, None) and c.better(0.1, 0.2) and not c.better(0.2, 0.2) and not c.better(float("nan"), 0.2)


def test_validation_split_is_disjoint_from_train_and_test():
    from refrl.data.refworld.identities import identity_pools
    from refrl.eval.refworld import refworld_suite
    from refrl.train.validation import _subject_ids

    pools = {s: {int(i) for ids in identity_pools(s).values() for i in ids} for s in ("train", "val", "test")}
    suite = refworld_suite(24, seed=3, split="val")
    ids = _subject_ids([it.sample for it in suite.items])
    assert ids and ids <= pools["val"] and not ids & pools["train"] and not ids & pools["test"]


def test_target_psnr_by_hand():
    from refrl.data.schema import LoadedSample
    from refrl.eval.scoring import TargetPSNR

    target = torch.zeros(3, 4, 4)
    image = torch.full((3, 4, 4), 0.1)  # MSE 0.01 -> 20 dB
    s = LoadedSample(id="a", prompt="p", ref_images=[], ref_types=[], target=target)
    t = LoadedSample(id="b", prompt="p", ref_images=[], ref_types=[])
    scores = TargetPSNR()(torch.stack([image, image]), [s, t]).scores
    assert scores[0].item() == pytest.approx(20.0, abs=1e-4) and torch.isnan(scores[1])


# --------------------------------------------------------------------------- runs


def test_validation_lines_at_the_right_iterations_and_training_unchanged(tmp_path, tiny_policy_dir, brightness_reward):
    run, off = tmp_path / "run", tmp_path / "off"
    train(cfg_of(tiny_policy_dir, "validation.every=2", "validation.keep_best=bright"), run)
    val = lines(run)
    assert [r["step"] for r in val] == [0, 2, 4]
    assert {"val/darkness", "val/bright", "val/psnr", "val/trained_mean"} <= set(val[0])
    assert val[0]["trained"] == ["darkness"] and val[0]["val/trained_mean"] == val[0]["val/darkness"]
    assert val[0]["val/darkness"] == pytest.approx(1 - val[0]["val/bright"], abs=1e-6)
    assert (run / "validation" / "step-2" / "eval.json").is_file()
    # validation restores every RNG: the training lines are those of a run without it
    train(cfg_of(tiny_policy_dir, "validation.every=0", "validation.metrics=null"), off)
    a, b = lines(run, None), lines(off, None)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in VOLATILE} == {k: v for k, v in rb.items() if k not in VOLATILE}


def test_guard_stops_a_run_whose_gold_metric_falls(tmp_path, tiny_policy_dir, brightness_reward, capsys):
    run = tmp_path / "run"
    cfg = cfg_of(tiny_policy_dir, "iterations=12", "checkpoint_every=50",
                 "validation.guard=[{metric: bright, drop: 0.01, action: stop}, {metric: psnr, above: 1000}]")
    last = train(cfg, run)
    val = lines(run)
    stop_at = val[-1]["step"]
    assert 0 < stop_at < 12, [r.get("val/bright") for r in val]
    assert val[-1]["guard_stop"] == "bright drop > 0.01" and not val[-1]["guard_pass"]
    assert val[0]["val/bright"] - val[-1]["val/bright"] > 0.01
    assert all(val[0]["val/bright"] - r["val/bright"] <= 0.01 for r in val[:-1])  # it stopped at the first fall
    assert [r["step"] for r in lines(run, None)][-1] == stop_at  # no step after the stop
    assert last == run / "checkpoints" / f"step-{stop_at}"  # the final checkpoint of a clean stop
    err = capsys.readouterr().err
    assert f"guard stopped the run at step {stop_at}: bright drop > 0.01" in err


def test_best_is_the_step_the_criterion_picks(tmp_path, tiny_policy_dir, brightness_reward):
    run = tmp_path / "run"
    # the trained darkness rises; the guard fails validations whose brightness fell by > 0.004, so the
    # best passing step by trained_mean is the last validation before that
    train(cfg_of(tiny_policy_dir, "iterations=6", "validation.keep_best=trained_mean",
                 "validation.guard=[{metric: bright, drop: 0.004}]"), run)
    val = lines(run)
    passing = [r for r in val if r["guard_pass"]]
    assert 0 < len(passing) < len(val), [r["val/bright"] for r in val]
    expected = max(passing, key=lambda r: r["val/trained_mean"])
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == expected["step"] and best["value"] == expected["val/trained_mean"]
    assert "trained_mean" in best["why"] and val[-1]["best_step"] == best["step"]
    assert resolve_checkpoint(f"{run}:best") == run / "best"
    a = load_file(str(run / "best" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / f"step-{best['step']}" / "policy" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_reproduces_validation_lines(tmp_path, tiny_policy_dir, brightness_reward):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("validation.keep_best=bright", "validation.guard=[{metric: bright, patience: 1}]")
    train(cfg_of(tiny_policy_dir, *extra), full)
    train(cfg_of(tiny_policy_dir, "iterations=2", *extra), part)
    # a crashed try's validation folder past the checkpoint is redone, not reused
    (part / "validation" / "step-3").mkdir()
    train(cfg_of(tiny_policy_dir, *extra), part, resume=True)
    a, b = lines(full, None) + lines(full), lines(part, None) + lines(part)
    assert [r["step"] for r in lines(part)] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in VOLATILE} == {k: v for k, v in rb.items() if k not in VOLATILE}
    assert json.loads((full / "best.json").read_text()) == json.loads((part / "best.json").read_text())


def test_a_best_no_validation_passes_is_said_and_refused(tmp_path, tiny_policy_dir, brightness_reward, capsys):
    run = tmp_path / "run"
    train(cfg_of(tiny_policy_dir, "iterations=1", "validation.keep_best=bright",
                 "validation.guard=[{metric: psnr, above: -1}]"), run)
    assert "keep_best: no validation passed the guard" in capsys.readouterr().err
    assert json.loads((run / "best.json").read_text())["step"] is None
    with pytest.raises(RefrlError, match="no best checkpoint: no validation passed the guard"):
        resolve_checkpoint(f"{run}:best")
    res = subprocess.run([sys.executable, "-m", "refrl", "eval", "--ckpt", f"{run}:best", "--suite", "refworld",
                          "--out", str(tmp_path / "ev")], capture_output=True, text=True, env=ENV, timeout=300)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "no best checkpoint" in errors[0]


def test_run_without_keep_best_has_no_best(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(RefrlError, match="kept no best checkpoint"):
        resolve_checkpoint(f"{tmp_path / 'run'}:best")


def test_validation_sharing_training_subjects_is_warned(tmp_path, tiny_policy_dir, brightness_reward, capsys):
    GRPOTrainer(cfg_of(tiny_policy_dir, "validation.split=train"), tmp_path / "a", rewards=[darkness])
    err = capsys.readouterr().err
    assert "validation set shares" in err and "RefWorld train split" in err
    GRPOTrainer(cfg_of(tiny_policy_dir), tmp_path / "b", rewards=[darkness])
    assert "shares" not in capsys.readouterr().err


def test_unknown_guard_metric_is_one_config_error_before_training(tmp_path, tiny_policy_dir):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "refrl", "grpo", "--config", str(CONFIGS / "tiny-cpu-grpo.yaml"), "--out", str(out),
         f"model.init={tiny_policy_dir}", "model.frozen=[]", "validation.every=5", "validation.metrics=psnr",
         "validation.guard=[{metric: stlye, drop: 0.02}]"],
        capture_output=True, text=True, env=ENV, timeout=300)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "'stlye'" in errors[0] and "identity, layout, fidelity, style, psnr, trained_mean" in errors[0]
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_validation_config_errors(tiny_policy_dir):
    off = cfg_of(tiny_policy_dir, "validation.every=0", "validation.keep_best=bright")  # off: rules stay unused
    assert off.validation.every == 0 and GRPOTrainer(off, "/nonexistent/run", rewards=[darkness]).validation is None
    with pytest.raises(ConfigError, match="METRIC, max:METRIC or min:METRIC"):
        cfg_of(tiny_policy_dir, "validation.keep_best=top:bright")


def test_refworld_validation_takes_the_training_level(tmp_path, tiny_policy_dir, brightness_reward):
    trainer = GRPOTrainer(cfg_of(tiny_policy_dir, "data.curriculum=[[0.0, 0], [0.5, 1]]"), tmp_path / "a",
                          rewards=[darkness])
    suite = trainer.validation.suite
    assert suite.params["level"] == 1 and suite.params["split"] == "val"
    assert np.all([s.sample.extra["level"] == 1 for s in suite.items])


def test_report_draws_validation_curves_and_the_best_step(tmp_path):
    from refrl.eval.report import find_evals, write_report

    run = tmp_path / "run"
    (run / "validation" / "step-2").mkdir(parents=True)
    (run / "validation" / "step-2" / "eval.json").write_text(json.dumps({"suite": "refworld", "metrics": {}}))
    rows = [{"step": s, "loss": 0.1 * s, "reward/darkness": 0.5 + 0.01 * s} for s in (1, 2, 3, 4)]
    val = [{"step": s, "kind": "validation", "val/bright": 0.5 - 0.01 * s, "val/trained_mean": 0.5 + 0.01 * s,
            "guard_pass": s < 4, **({"guard": {"bright drop > 0.02": "bright fell"}, "guard_stop": "bright drop > 0.02"}
                                    if s == 4 else {})} for s in (0, 2, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + val))
    (run / "best.json").write_text(json.dumps({"step": 2, "why": "highest trained_mean (0.52) among 2"}))
    html = write_report(run).read_text()
    assert "run validation curves" in html and "run:best" in html and "highest trained_mean (0.52)" in html
    assert "stopped the run" in html
    assert find_evals(run) == {}  # validation folders are curves, not evaluations of the run


def test_sft_validates_and_keeps_its_best(tmp_path):
    from refrl.train.sft import SFTConfig, train_sft

    cfg = load_config(SFTConfig, str(CONFIGS / "tiny-cpu-sft.yaml"), [
        "model.width=32", "model.depth=1", "model.heads=2", "batch_size=2", "noise_per_condition=1", "steps=4",
        "log_every=1", "checkpoint_every=4", "optim.warmup_steps=0", "data.max_refs=2", "validation.every=2",
        "validation.n=2", "validation.steps=2", "validation.cfg_scale=1.0", "validation.metrics=psnr,patch_grid",
        "validation.keep_best=psnr"])
    run = tmp_path / "sft"
    train_sft(cfg, run)
    val = lines(run)
    assert [r["step"] for r in val] == [0, 2, 4] and "val/trained_mean" not in val[0] and val[0]["trained"] == []
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == max(val, key=lambda r: r["val/psnr"])["step"]
    assert [r["step"] for r in lines(run, None)] == [1, 2, 3, 4]
