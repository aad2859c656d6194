"""Validation during training: every N steps, score the EMA policy on a held-out set.

``validation.every: N`` makes a run (SFT or RL) generate a held-out suite with the eval
sampler and score it through the code of ``refrl eval`` (`refrl.eval.runner.run_eval`), into
``RUN/validation/step-N/`` (``eval.json``, ``samples.jsonl``, ``grid.png``, the images). It
scores two kinds of metric:

* the rewards the run trains (the trainer's own `Reward` objects, Python functions included),
  and their weighted mean ``trained_mean``;
* gold metrics the run does not train: by default on RefWorld every embedded reward,
  ``patch_grid`` (the dot-grid artefact) and ``psnr`` to the ground-truth target; on other
  suites the suite's own metrics and ``patch_grid``; or any list of zoo rewards, ``remote:``
  rewards and builtin metrics (``validation.metrics``).

Each validation is one line of ``metrics.jsonl`` with ``"kind": "validation"`` and the means
as ``val/<metric>``; the guard (`refrl.train.guard`) reads them, flags or stops the run, and
``keep_best`` exports the best EMA policy that passes the guard to ``RUN/best`` (``--ckpt
RUN:best``), with ``best.json``. Validation saves and restores every RNG, so training is the
same with it on or off; its state is read back from ``metrics.jsonl`` on resume, so a resumed
run writes the same validation lines as an uninterrupted one. Guide: docs/guides/validation.md.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from tqdm.auto import tqdm

from refrl.config import StrictModel
from refrl.errors import ConfigError
from refrl.runfolder.files import atomic_dir, atomic_write_text
from refrl.runfolder.layout import BEST_DIR, BEST_FILE
from refrl.train.guard import (
    Criterion,
    GuardRule,
    check_rule_metrics,
    evaluate_rules,
    passes,
)

LINE_KIND = "validation"  # the "kind" of a validation line in metrics.jsonl
PREFIX = "val/"  # validation means are "val/<metric>"
TRAINED_MEAN = "trained_mean"
VALIDATION_DIR = "validation"  # RUN/validation/step-N: the eval folders
DEFAULT_N = 32
DEFAULT_BATCH_SIZE = 16
GOLD_EXTRAS = ("patch_grid", "psnr")  # besides the suite's metrics: the dot grid, PSNR to the target


class ValidationConfig(StrictModel):
    """The ``validation:`` section of the SFT and RL configs (off unless ``every`` > 0)."""

    every: int = Field(0, ge=0, description="steps (SFT) or iterations (RL) between validations; 0 = off")
    at_start: bool = Field(True, description="also validate the starting weights (step 0): the guard's reference")
    suite: str = Field("refworld", description="a suite of refrl eval (refworld, manifest, omniref, dreambench, refine)")
    data: str | None = Field(None, description="the suite's data (a manifest, benchmark.json, the DreamBench folder)")
    split: Literal["train", "val", "test"] = Field("val", description="refworld: the split (val: subjects seen neither "
                                                   "in training nor in the test split)")
    level: int | None = Field(None, ge=0, le=2, description="refworld: difficulty (default: the training data's last)")
    categories: list[str] | None = Field(None, description="refworld: categories (default: the training data's)")
    n: int = Field(DEFAULT_N, ge=1, description="held-out samples (suites read from data: the first n)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the samples (refworld) and of the noise; the same at every validation")
    steps: int | None = Field(None, ge=1, description="ODE steps (default: the policy's eval sampler, as refrl eval)")
    cfg_scale: float | None = Field(None, ge=0, description="classifier-free guidance scale (default: the policy's)")
    shift: float | None = Field(None, gt=0, description="time shift of the sigma schedule (default: the policy's)")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)
    metrics: str | list[str] | None = Field(
        None, description="gold metrics: NAME or METRIC=REWARD, comma-separated or a list (default: the suite's "
        "metrics, patch_grid and psnr); the trained rewards are always scored",
    )
    reward_options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per gold metric, its options")
    guard: list[GuardRule] = Field(default_factory=list, description="rules on the validation metrics (refrl.train.guard)")
    keep_best: str | None = Field(None, description="keep the best validated policy in RUN/best: METRIC, max:METRIC or "
                                  "min:METRIC, among validations that pass the guard")

    @model_validator(mode="after")
    def _check_keep_best(self) -> ValidationConfig:
        # every=0 turns validation off, guard and keep_best with it (a preset's rules stay as written)
        if self.keep_best:
            Criterion.parse(self.keep_best)
        return self


def warn(message: str) -> None:
    """A warning line on stderr that does not break the progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _subject_ids(samples) -> set[int]:
    """RefWorld subject identities of samples (``extra.subjects[].identity``); empty for other data."""
    out: set[int] = set()
    for s in samples:
        for subj in (s.extra or {}).get("subjects") or []:
            if isinstance(subj, dict) and isinstance(subj.get("identity"), int):
                out.add(int(subj["identity"]))
    return out


def subject_overlap(train_data: Any, trainer_samples: list | None, val_samples: list) -> tuple[set[int], str]:
    """Subject identities the validation samples share with the training data, and what the training data is."""
    val_ids = _subject_ids(val_samples)
    if not val_ids:
        return set(), ""
    if trainer_samples is not None:
        return val_ids & _subject_ids(trainer_samples), "the given dataset"
    if train_data.source == "refworld":
        from refrl.data.refworld.identities import identity_pools

        pool = {int(i) for ids in identity_pools(train_data.split).values() for i in ids.tolist()}
        return val_ids & pool, f"the RefWorld {train_data.split} split"
    from refrl.data.manifest import load_manifest

    return val_ids & _subject_ids(load_manifest(Path(train_data.manifest), size=train_data.size)), train_data.manifest


class Validation:
    """A run's validation: the held-out suite, its metrics, the guard's history and the best checkpoint.

    Built by `refrl.train.loop.TrainLoop` (`build_validation`) on every process; only the main
    process generates, scores and writes.
    """

    def __init__(self, trainer: Any, cfg: ValidationConfig):
        from refrl.eval.metrics import build_metrics, parse_metric_specs
        from refrl.eval.refworld import REFWORLD_METRICS, refworld_suite
        from refrl.eval.runner import build_suite

        self.trainer, self.cfg = trainer, cfg
        data = trainer.cfg.data
        size = int(data.size)
        if cfg.suite == "refworld":
            level = cfg.level if cfg.level is not None else int(data.curriculum[-1][1])
            categories = cfg.categories if cfg.categories is not None else data.categories
            self.suite = refworld_suite(cfg.n, cfg.seed, None, size, level, categories=categories, name="refworld",
                                        metrics=REFWORLD_METRICS, split=cfg.split)
        else:
            # generated suites draw n samples; the others take the first n of their data
            sized = {"n": cfg.n} if cfg.suite == "refine" else {"limit": cfg.n}
            self.suite = build_suite(cfg.suite, seed=cfg.seed, size=size, data=cfg.data, **sized)
        trained: dict[str, Any] = dict(getattr(trainer, "rewards", None) or {})
        self.weights: dict[str, float] = {k: float(w) for k, w in (getattr(trainer, "weights", None) or {}).items()}
        gold = (parse_metric_specs(cfg.metrics) if cfg.metrics
                else {**dict(self.suite.metrics), **{m: m for m in GOLD_EXTRAS}})
        gold = {m: r for m, r in gold.items() if m not in trained}
        options = {m: dict(o) for m, o in self.suite.reward_options.items() if m in gold}
        for metric, opts in cfg.reward_options.items():
            if metric not in gold:
                raise ConfigError(f"validation.reward_options: metric {metric!r} is not a gold metric; "
                                  f"gold metrics: {', '.join(gold)}")
            options.setdefault(metric, {}).update(opts)
        self.metrics = {**trained, **build_metrics(gold, options)}
        self.reward_names = {**{m: m for m in trained}, **gold}
        self.trained = list(trained)
        self.names = [*self.metrics] + ([TRAINED_MEAN] if self.trained else [])
        check_rule_metrics(cfg.guard, self.names)
        self.criterion = Criterion.parse(cfg.keep_best) if cfg.keep_best else None
        if self.criterion is not None:
            check_rule_metrics([GuardRule(metric=self.criterion.metric, above=0.0)], self.names, "validation.keep_best")
        shared, what = subject_overlap(data, trainer._dataset, [it.sample for it in self.suite.items])
        if shared:
            from refrl.data.refworld.identities import decode_identity

            named = ", ".join(decode_identity(i).describe() for i in sorted(shared)[:3])
            warn(f"validation set shares {len(shared)} subject identities with the training data ({what}), e.g. "
                 f"{named}; its numbers measure seen subjects (RefWorld: validation.split=val is disjoint from train)")
        self.history: list[dict[str, Any]] = []  # the validation lines of this run, oldest first
        self.best: dict[str, Any] | None = None
        self.stopped: str | None = None

    # ------------------------------------------------------------------ the loop's part
    @property
    def out_dir(self) -> Path:
        return self.trainer.out_dir

    def due(self, done: int) -> bool:
        return self.cfg.every > 0 and done % self.cfg.every == 0

    def begin(self, start: int, write: Callable[[dict[str, Any]], None]) -> None:
        """Restore the history from metrics.jsonl (its lines up to ``start``), then validate step 0 in a fresh run.
        ``write`` puts a validation line into metrics.jsonl (and the trackers)."""
        from refrl.runfolder.layout import METRICS_FILE
        from refrl.train.run import read_metrics

        self._write = write
        records = read_metrics(self.out_dir / METRICS_FILE) if self.trainer.dist.is_main and start > 0 else []
        self.history = [r for r in records if r.get("kind") == LINE_KIND and r.get("step", 0) <= start]
        self.best = None
        for i in range(len(self.history)):
            self._track_best(self.history[: i + 1], export=False)
        folder = self.out_dir / VALIDATION_DIR
        if self.trainer.dist.is_main and folder.is_dir():  # images of steps to redo (a crashed try's) go
            for old in folder.glob("step-*"):
                suffix = old.name[len("step-"):]
                if suffix.isdigit() and int(suffix) >= start + (start > 0):
                    shutil.rmtree(old, ignore_errors=True)
        if start == 0:
            if self.trainer.dist.is_main:
                for name in (BEST_DIR, BEST_FILE):
                    path = self.out_dir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if self.cfg.at_start:
                self.validate(0)

    def validate(self, done: int) -> bool:
        """Validate the EMA policy after step ``done``: write the line, apply the guard, keep the best.
        Returns whether a rule stops the run (main process; False elsewhere)."""
        if not self.trainer.dist.is_main:
            return False
        from refrl.eval.runner import run_eval
        from refrl.train.checkpoint import rng_state, set_rng_state

        t0 = time.perf_counter()
        policy, was_training = self.trainer.policy, bool(getattr(self.trainer.policy, "training", False))
        state = rng_state()
        try:
            if hasattr(policy, "eval"):
                policy.eval()
            with self.trainer.ema.swapped_in():
                res = run_eval(policy, self.suite, self.out_dir / VALIDATION_DIR / f"step-{done}",
                               metrics=self.metrics, ckpt=f"step-{done}", seed=self.cfg.seed, steps=self.cfg.steps,
                               cfg_scale=self.cfg.cfg_scale, shift=self.cfg.shift, batch_size=self.cfg.batch_size, force=True,
                               progress=False, reward_names=self.reward_names)
        finally:
            set_rng_state(state)
            if was_training:
                policy.train()
        overall = res["metrics"]["overall"]
        values: dict[str, Any] = {m: overall[m]["mean"] for m in self.metrics}
        if self.trained:
            values[TRAINED_MEAN] = trained_mean(values, self.trained, self.weights)
        line: dict[str, Any] = {"step": done, "kind": LINE_KIND, **{PREFIX + k: v for k, v in values.items()},
                                "val_n": res["n"], "trained": self.trained}
        verdicts = evaluate_rules(self.cfg.guard, [*map(_values_of, self.history), values])
        line["guard_pass"] = passes(verdicts)
        if verdicts:
            line["guard"] = {v.rule.describe(): v.message for v in verdicts}
        stops = [v for v in verdicts if v.stops]
        if stops:
            line["guard_stop"] = stops[0].rule.describe()
        line["seconds/validation"] = round(time.perf_counter() - t0, 3)
        self.history.append(line)
        self._track_best(self.history, export=True)
        if self.best is not None:
            line["best_step"] = self.best["step"]
        self._write(line)
        for v in verdicts:
            if not v.stops:
                warn(f"guard at step {done}: {v.rule.describe()}: {v.message}")
        if stops:
            self.stopped = f"guard stopped the run at step {done}: {stops[0].rule.describe()}: {stops[0].message}"
        return bool(stops)

    def finish(self) -> None:
        """After the last step: say so when ``keep_best`` found no validation that passes the guard."""
        if not self.trainer.dist.is_main:
            return
        if self.stopped:
            tqdm.write(self.stopped, file=sys.stderr)
        if self.criterion is not None and self.best is None:
            reason = (f"no validation passed the guard ({len(self.history)} validations; criterion "
                      f"{self.criterion.describe()})" if self.history else "the run made no validation")
            atomic_write_text(self.out_dir / BEST_FILE, json.dumps({"step": None, "reason": reason}, indent=2) + "\n")
            warn(f"keep_best: {reason}; {self.out_dir}:best does not exist")

    # ------------------------------------------------------------------ the best checkpoint
    def _track_best(self, history: list[dict[str, Any]], export: bool) -> None:
        if self.criterion is None:
            return
        line = history[-1]
        value = line.get(PREFIX + self.criterion.metric)
        if not line.get("guard_pass", True):
            return
        if self.criterion.better(value, None if self.best is None else self.best["value"]):
            self.best = {"step": line["step"], "criterion": self.criterion.describe(), "metric": self.criterion.metric,
                         "mode": self.criterion.mode, "value": value}
            if export:
                self._export_best(line)

    def _export_best(self, line: dict[str, Any]) -> None:
        """Write the EMA policy to RUN/best and say which step and why in best.json (atomically)."""
        trainer, best = self.trainer, dict(self.best or {})
        with atomic_dir(self.out_dir / BEST_DIR) as tmp, trainer.ema.swapped_in():
            trainer.policy.save_pretrained(tmp)
        candidates = sum(1 for h in self.history if h.get("guard_pass", True))
        best["why"] = (f"{best['criterion']} ({best['value']:.4g}) among {candidates} validations that passed the guard "
                       f"(of {len(self.history)}), on {self.suite.protocol or self.suite.name}, n={self.suite.n_samples}")
        best["metrics"] = {k[len(PREFIX):]: v for k, v in line.items() if k.startswith(PREFIX)}
        atomic_write_text(self.out_dir / BEST_FILE, json.dumps(best, indent=2) + "\n")


def _values_of(line: Mapping[str, Any]) -> dict[str, Any]:
    return {k[len(PREFIX):]: v for k, v in line.items() if k.startswith(PREFIX)}


def trained_mean(values: Mapping[str, float | None], trained: list[str], weights: Mapping[str, float]) -> float:
    """``sum_k w_k m_k / sum_k w_k`` over the trained rewards with a finite mean ``m_k`` (weights: the run's)."""
    pairs = [(float(weights.get(k, 1.0)), float(values[k])) for k in trained
             if values.get(k) is not None and math.isfinite(float(values[k]))]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if pairs and total else float("nan")


def build_validation(trainer: Any) -> Validation | None:
    """The run's `Validation`, or None when its config has validation off."""
    cfg = getattr(trainer.cfg, "validation", None)
    if cfg is None or cfg.every <= 0:
        return None
    return Validation(trainer, cfg)
