"""``refrl ablate``: the equal-budget ablation that tests the papers' claims on RefWorld.

Variants (all from the same SFT checkpoint, same GRPO budget, same eval):

* ``sft`` — no RL (the baseline);
* Customized-GRPO family (identity + layout rewards): ``naive`` (weighted sum 1:1),
  ``gdpo``, ``sars``, ``sars_tdw``;
* DyRef family (fidelity + identity + layout, GDPO): ``dyref_gdpo`` (neither method), ``drs``,
  ``dar``, ``dar_drs``;
* OmniRefiner (``refine`` category only): ``refine_global`` (whole-image fidelity)
  vs ``refine_patch`` (patch reward).

Every run is evaluated on the RefWorld test split (unseen identities) with every
embedded reward; ``ablation.json`` holds per-seed results and mean ± std over seeds,
overall, per reference-count bucket and per category; ``ablation.md`` the table.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from refrl.config import validate_config
from refrl.errors import RefrlError
from refrl.runfolder.files import atomic_write_text
from refrl.runfolder.layout import CHECKPOINTS_DIR, latest_checkpoint
from refrl.runfolder.lock import lock_run_folder
from refrl.train.grpo_config import SIGNAL_RECIPE, GRPOConfig

ID_LAYOUT = [{"name": "identity", "weight": 1.0}, {"name": "layout", "weight": 1.0}]
DYREF = [{"name": "fidelity", "weight": 1.0}, {"name": "identity", "weight": 1.0}, {"name": "layout", "weight": 1.0}]
REFINE_DATA = {"data": {"categories": ["refine"]}}

VARIANTS: dict[str, dict[str, Any] | None] = {
    "sft": None,
    "naive": {"rewards": ID_LAYOUT, "advantage": {"kind": "weighted"}},
    "gdpo": {"rewards": ID_LAYOUT, "advantage": {"kind": "gdpo"}},
    "sars": {"rewards": ID_LAYOUT, "advantage": {"kind": "sars", "tdw": False}},
    "sars_tdw": {"rewards": ID_LAYOUT, "advantage": {"kind": "sars", "tdw": True}},
    # the DyRef family's baseline: its three rewards, GDPO, no DRS or DAR
    "dyref_gdpo": {"rewards": DYREF, "advantage": {"kind": "gdpo"}},
    "drs": {"rewards": DYREF, "advantage": {"kind": "gdpo", "drs": {"reward": "fidelity"}}},
    "dar": {"rewards": DYREF, "advantage": {"kind": "gdpo", "dar": {"reward": "fidelity"}}},
    "dar_drs": {"rewards": DYREF, "advantage": {"kind": "gdpo", "drs": {"reward": "fidelity"},
                                                "dar": {"reward": "fidelity"}}},
    "refine_global": {"rewards": [{"name": "fidelity", "weight": 1.0}], "advantage": {"kind": "weighted"},
                      **REFINE_DATA},
    "refine_patch": {"rewards": [{"name": "patch", "weight": 1.0}], "advantage": {"kind": "weighted"},
                     **REFINE_DATA},
}
BUDGETS = {
    # iterations x groups x group size, and test samples per eval (equal for every variant)
    # default: 30 GRPO runs + 38 evaluations of 192 test samples (the project's bar for an RL
    # claim), 3342 s of CPU, about 28 min on 2 cores: docs/research/ablation.md
    "default": {"iterations": 20, "groups_per_iteration": 8, "group_size": 8, "minibatch_size": 32, "eval_n": 192},
    "quick": {"iterations": 4, "groups_per_iteration": 4, "group_size": 8, "minibatch_size": 32, "eval_n": 48},
}


def frozen_or_recipes(frozen: list[str] | None) -> list[str]:
    """``model.frozen`` of every variant: ``frozen``, or the recipe's (the output head) when None."""
    return list(SIGNAL_RECIPE["model"]["frozen"] if frozen is None else frozen)


def variant_config(name: str, seed: int, budget: dict[str, Any], ckpt: str,
                   frozen: list[str] | None = None) -> GRPOConfig:
    """The GRPO config of variant ``name``: the signal recipe, the budget, then the variant's
    rewards and shaping. ``frozen`` (default: the recipe's, the output head) is `model.frozen`;
    ``[]`` trains every module, as a LoRA checkpoint needs."""
    spec = VARIANTS[name]
    if spec is None:
        raise RefrlError(f"variant {name!r} has no GRPO stage")
    data = json.loads(json.dumps(SIGNAL_RECIPE))  # a deep copy; each variant sets its rewards and shaping on top
    data.update({k: v for k, v in budget.items() if k != "eval_n"})
    data["seed"] = seed
    # the recipe's model section is replaced, not merged: `ckpt` may be any kind of policy
    data["model"] = {"init": ckpt, "frozen": frozen_or_recipes(frozen)}
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return validate_config(GRPOConfig, data, source=f"ablation variant {name}")


def _mean_std(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n_seeds": 0}
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": sd, "n_seeds": len(vals)}


def _collect(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{"overall/identity": mean, "bucket=5-7/identity": ..., "category=refine/patch": ...}."""
    flat: dict[str, float] = {}
    groups = {"overall": {"": metrics["overall"]}, "bucket": metrics.get("by_bucket", {}),
              "category": metrics.get("by_category", {})}
    for gname, entries in groups.items():
        for key, stats in entries.items():
            prefix = gname if gname == "overall" else f"{gname}={key}"
            for reward, st in stats.items():
                if isinstance(st, dict) and "mean" in st:
                    flat[f"{prefix}/{reward}"] = st["mean"]
    return flat


def run_ablation(out: str | Path, preset: str = "refworld", quick: bool = False, seeds: int = 3,
                 variants: list[str] | None = None, ckpt: str = "tiny-sft", eval_seed: int = 1234,
                 workers: int = 1, eval_n: int | None = None, frozen: list[str] | None = None) -> Path:
    """Train and evaluate every variant under ``out`` (holding its lock); returns ablation.json.

    ``eval_n`` replaces the budget's test samples per evaluation; as training resumes from
    what a run folder holds, re-running with another ``eval_n`` only re-evaluates.

    ``frozen`` is every variant's `model.frozen` (default: the recipe's, the output head).

    ``workers > 1`` runs that many (variant, seed) jobs at once in separate processes, each
    with its share of the CPU threads; every job is seeded on its own, so the results do
    not depend on the order jobs finish in.
    """
    if preset != "refworld":
        raise RefrlError(f"unknown ablation preset {preset!r}; allowed: refworld")
    names = variants or list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise RefrlError(f"unknown ablation variant(s) {unknown}; allowed: {', '.join(VARIANTS)}")
    if seeds < 1:
        raise RefrlError(f"seeds must be >= 1, got {seeds}")
    if workers < 1:
        raise RefrlError(f"workers must be >= 1, got {workers}")
    if eval_n is not None and eval_n < 1:
        raise RefrlError(f"eval_n must be >= 1, got {eval_n}")
    budget = dict(BUDGETS["quick" if quick else "default"])
    if eval_n is not None:
        budget["eval_n"] = eval_n
    frozen = frozen_or_recipes(frozen)
    with lock_run_folder(out):
        return _run_ablation(Path(out), preset, quick, seeds, names, ckpt, frozen, eval_seed, workers, budget)


def run_ablation_job(name: str, seed: int, budget: dict[str, Any], ckpt: str, frozen: list[str], eval_seed: int,
                     run_dir: Path) -> dict[str, float]:
    """Train one variant with one seed (resuming what is there), evaluate it; its flat metrics."""
    from refrl.eval.config import eval_command
    from refrl.train.grpo import train_grpo

    policy_ckpt = ckpt
    if VARIANTS[name] is not None:
        cfg = variant_config(name, seed, budget, ckpt, frozen)
        train_grpo(cfg, run_dir, resume=latest_checkpoint(run_dir / CHECKPOINTS_DIR) is not None)
        policy_ckpt = str(run_dir)
    ev = eval_command(policy_ckpt, "refworld", run_dir / "eval", n=budget["eval_n"], seed=eval_seed)
    flat = _collect(ev["metrics"])
    if name == "sft" or name.startswith("refine"):
        # OmniRefiner's claim is about masked detail: the refine suite adds PSNR inside the mask
        ev_refine = eval_command(policy_ckpt, "refine", run_dir / "eval_refine", n=budget["eval_n"], seed=eval_seed)
        flat.update({k.replace("overall/", "refine_suite/"): v for k, v in _collect(ev_refine["metrics"]).items()
                     if k.startswith("overall/")})
    return flat


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _logged_job(name: str, seed: int, budget: dict[str, Any], ckpt: str, frozen: list[str], eval_seed: int,
                run_dir: Path) -> dict[str, float]:
    """`run_ablation_job` in a worker process, its progress bars in ``run_dir/ablation.log``
    (interleaved bars of several processes on one terminal are unreadable)."""
    import contextlib

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "ablation.log", "a") as log, contextlib.redirect_stderr(log):
        return run_ablation_job(name, seed, budget, ckpt, frozen, eval_seed, run_dir)


def _run_ablation(out: Path, preset: str, quick: bool, seeds: int, names: list[str], ckpt: str, frozen: list[str],
                  eval_seed: int, workers: int, budget: dict[str, Any]) -> Path:
    console = Console(stderr=True)
    jobs = [(name, seed) for name in names for seed in range(seeds if VARIANTS[name] is not None else 1)]
    flat: dict[tuple[str, int], dict[str, float]] = {}
    t0 = time.perf_counter()
    if workers == 1:
        for name, seed in jobs:
            console.rule(f"[bold]{name} (seed {seed})")
            flat[name, seed] = run_ablation_job(name, seed, budget, ckpt, frozen, eval_seed, out / name / f"seed{seed}")
    else:
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // workers)
        console.print(f"ablation: {len(jobs)} runs, {workers} at a time ({threads} thread(s) each); "
                      f"progress of each in {out}/VARIANT/seedN/ablation.log")
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(_logged_job, name, seed, budget, ckpt, frozen, eval_seed, out / name / f"seed{seed}"):
                       (name, seed) for name, seed in jobs}
            for i, future in enumerate(as_completed(futures), 1):
                name, seed = futures[future]
                flat[name, seed] = future.result()
                console.print(f"[{i}/{len(jobs)}] {name} (seed {seed}) done, {time.perf_counter() - t0:.0f} s")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        per_seed = [flat[n, s] for n, s in jobs if n == name]
        keys = sorted({k for d in per_seed for k in d})
        results[name] = {k: _mean_std([d.get(k, float("nan")) for d in per_seed]) for k in keys}
    summary = {"preset": preset, "quick": quick, "seeds": seeds, "budget": budget, "ckpt": ckpt, "frozen": frozen,
               "eval_seed": eval_seed, "workers": workers, "seconds": time.perf_counter() - t0, "variants": results}
    atomic_write_text(out / "ablation.json", json.dumps(summary, indent=2, allow_nan=True))
    atomic_write_text(out / "ablation.md", markdown_table(summary))
    console.print(f"ablation: {out / 'ablation.md'} ({summary['seconds']:.0f} s)")
    return out / "ablation.json"


def _cell(st: dict[str, float] | None) -> str:
    if not st or st.get("mean") is None or math.isnan(st["mean"]):
        return "–"
    return f"{st['mean']:.3f} ± {st['std']:.3f}" if st.get("n_seeds", 0) > 1 else f"{st['mean']:.3f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """One table per slice (overall, buckets 1-2 / 3-4 / 5-7, refine and edit categories)."""
    variants = summary["variants"]
    rewards = ["identity", "layout", "fidelity", "style", "background", "patch"]
    slices = ["overall", "bucket=1-2", "bucket=3-4", "bucket=5-7", "category=refine", "category=edit"]
    lines = [f"Ablation on RefWorld test split; budget {summary['budget']}; seeds {summary['seeds']}; "
             f"mean ± std over seeds.", ""]
    refine_metrics = sorted({k.split("/", 1)[1] for res in variants.values() for k in res if k.startswith("refine_suite/")})
    if refine_metrics:
        lines += ["### refine suite (refine category only, masked metrics)", "",
                  "| variant | " + " | ".join(refine_metrics) + " |", "|---|" + "---|" * len(refine_metrics)]
        for name, res in variants.items():
            if any(k.startswith("refine_suite/") for k in res):
                lines.append(f"| {name} | " + " | ".join(_cell(res.get(f"refine_suite/{m}")) for m in refine_metrics) + " |")
        lines.append("")
    for sl in slices:
        lines += [f"### {sl}", "", "| variant | " + " | ".join(rewards) + " |",
                  "|---|" + "---|" * len(rewards)]
        for name, res in variants.items():
            lines.append(f"| {name} | " + " | ".join(_cell(res.get(f"{sl}/{r}")) for r in rewards) + " |")
        lines.append("")
    return "\n".join(lines)


