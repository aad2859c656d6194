"""Ablation variants are valid configs that differ only in what the papers' claims test."""

import math

import pytest

from refrl.ablation import BUDGETS, VARIANTS, markdown_table, variant_config


@pytest.mark.parametrize("name", [v for v in VARIANTS if VARIANTS[v] is not None])
def test_every_variant_is_a_valid_config_with_the_same_budget(name):
    cfg = variant_config(name, seed=1, budget=BUDGETS["quick"], ckpt="some/ckpt")
    assert cfg.seed == 1 and cfg.model.init == "some/ckpt"
    for key in ("iterations", "groups_per_iteration", "group_size", "minibatch_size"):
        assert getattr(cfg, key) == BUDGETS["quick"][key]


def test_variants_freeze_the_recipes_modules_unless_told():
    assert variant_config("gdpo", 0, BUDGETS["quick"], "c").model.frozen == ["head"]
    assert variant_config("gdpo", 0, BUDGETS["quick"], "c", frozen=[]).model.frozen == []
    assert variant_config("gdpo", 0, BUDGETS["quick"], "c", frozen=["blocks.0"]).model.frozen == ["blocks.0"]


def test_variants_switch_exactly_their_method():
    adv = {n: variant_config(n, 0, BUDGETS["quick"], "c").advantage for n in VARIANTS if VARIANTS[n]}
    assert adv["naive"].kind == "weighted" and adv["gdpo"].kind == "gdpo"
    assert adv["sars"].kind == "sars" and not adv["sars"].tdw and adv["sars_tdw"].tdw
    assert adv["dyref_gdpo"].kind == "gdpo" and adv["dyref_gdpo"].drs is None and adv["dyref_gdpo"].dar is None
    rewards = {n: [r.name for r in variant_config(n, 0, BUDGETS["quick"], "c").rewards] for n in ("dyref_gdpo", "drs")}
    assert rewards["dyref_gdpo"] == rewards["drs"]  # the baseline differs from DRS only by DRS
    assert adv["drs"].drs is not None and adv["drs"].dar is None
    assert adv["dar"].dar is not None and adv["dar"].drs is None
    assert adv["dar_drs"].dar is not None and adv["dar_drs"].drs is not None
    refine = variant_config("refine_patch", 0, BUDGETS["quick"], "c")
    assert refine.data.categories == ["refine"] and [r.name for r in refine.rewards] == ["patch"]


def test_markdown_table_shows_mean_and_std():
    summary = {"budget": {}, "seeds": 2, "variants": {
        "sft": {"overall/identity": {"mean": 0.5, "std": 0.0, "n_seeds": 1}},
        "sars": {"overall/identity": {"mean": 0.25, "std": 0.125, "n_seeds": 2},
                 "overall/layout": {"mean": math.nan, "std": math.nan, "n_seeds": 0}},
    }}
    md = markdown_table(summary)
    assert "| sft | 0.500 |" in md
    assert "| sars | 0.250 ± 0.125 | – |" in md


def test_workers_run_jobs_in_processes_and_write_the_summary(tmp_path):
    """`refrl ablate --workers 2` (the sft row only: two evaluations, no training) through the
    installed command: the job runs in a spawned worker, its progress goes to the run's
    ablation.log, and the summary holds what that worker measured."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "abl"
    res = subprocess.run([sys.executable, "-m", "refrl", "ablate", "--quick", "--variants", "sft", "--workers", "2",
                          "--eval-n", "16", "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[1/1] sft (seed 0) done" in res.stderr
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["workers"] == 2
    assert summary["budget"]["eval_n"] == 16  # --eval-n replaces the quick budget's 48
    sft = summary["variants"]["sft"]
    evaluation = json.loads((out / "sft" / "seed0" / "eval" / "eval.json").read_text())
    assert evaluation["n"] == 16
    evaluated = evaluation["metrics"]["overall"]
    assert sft["overall/identity"]["mean"] == evaluated["identity"]["mean"]
    assert sft["overall/identity"]["n_seeds"] == 1
    assert any(k.startswith("refine_suite/") for k in sft)  # the refine suite ran in the worker too
    assert "eval refworld" in (out / "sft" / "seed0" / "ablation.log").read_text()


def test_signal_recipe_is_the_grpo_presets():
    """The quickstart and the ablation start from `SIGNAL_RECIPE`; it must stay what
    configs/tiny-cpu-grpo.yaml runs, or their numbers stop describing that preset."""
    from pathlib import Path

    from refrl.config import load_config, validate_config
    from refrl.train.grpo_config import SIGNAL_RECIPE, GRPOConfig

    preset = load_config(GRPOConfig, Path(__file__).resolve().parents[1] / "configs/tiny-cpu-grpo.yaml", [])
    recipe = validate_config(GRPOConfig, SIGNAL_RECIPE, source="SIGNAL_RECIPE")
    for key in SIGNAL_RECIPE:
        assert getattr(recipe, key) == getattr(preset, key), key
