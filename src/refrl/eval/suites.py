"""Evaluation suites and the eval runner (``refrl eval``).

A suite is a list of `EvalItem`s — one image to generate each, with the sample the
policy is conditioned on, the sample the rewards compare against and the noise
stream ``(seed, noise_index)`` — plus the metrics it reports by default.

Suites: ``refworld`` (RefWorld test split, unseen identities, every category, scored
with every embedded reward), ``refine`` (RefWorld ``refine`` only: the OmniRefiner
patch reward and PSNR inside / outside the mask), ``omniref`` (`refrl.eval.omniref`)
and ``dreambench`` (`refrl.eval.dreambench`).

The runner caches generation: each image is written to ``DIR/images/<image_id>.png``
(the id made safe by `refrl.files.safe_filename`) as soon as its batch is done, and a rerun with the same checkpoint, seed, steps, cfg
and suite parameters (``DIR/eval_meta.json``) generates only the missing ones, so an
interrupted eval resumes; a cached PNG that does not decode (a torn write) is generated
again. Rewards always score the PNGs, so a resumed eval gives
exactly the numbers of an uninterrupted one. Outputs: ``eval.json`` (every metric
overall, per category, per number of references and per bucket; sample counts and
seeds), ``samples.jsonl`` (one record per image) and ``grid.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from refrl.data.schema import LoadedSample
from refrl.errors import RefrlError
from refrl.eval.scoring import MaskedPSNR, aggregate, score_images
from refrl.files import atomic_write_text, lock_run_folder, safe_filename
from refrl.models.policy import Policy
from refrl.rewards.base import Reward

log = logging.getLogger(__name__)

SUITE_NAMES = ("refworld", "omniref", "dreambench", "refine")
DEFAULT_N = {"refworld": 96, "refine": 48}
REFWORLD_SPLIT = "test"  # unseen subject identities
REFWORLD_LEVEL = 2  # the full world: patterns, textured and photo backgrounds
DEFAULT_IMAGE_SIZE = 32  # suite builders without a size: the tiny DiT's native size
REFWORLD_METRICS = ("identity", "layout", "style", "background", "fidelity", "patch")
REFINE_METRICS = ("patch", "psnr_inside", "psnr_outside")
DEFAULT_STEPS = 20  # METHODS.md: 20-40 denoising steps for evaluation
DEFAULT_CFG = 2.0
DEFAULT_BATCH_SIZE = 16
GRID_ROWS = 16

IMAGES_DIR = "images"
EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
META_FILE = "eval_meta.json"
GRID_FILE = "grid.png"


@dataclass
class EvalItem:
    """One image to generate: conditioned on ``sample``, scored against ``score_sample``
    (default: the same sample), with noise ``(seed, noise_index)``."""

    image_id: str
    sample: LoadedSample
    noise_index: int
    score_sample: LoadedSample | None = None
    record: dict[str, Any] = field(default_factory=dict)  # extra fields for samples.jsonl

    @property
    def scored(self) -> LoadedSample:
        return self.score_sample if self.score_sample is not None else self.sample

    @property
    def file_name(self) -> str:
        """``<image_id>.png``, the id made safe to use as a file name (ids come from data)."""
        return f"{safe_filename(self.image_id)}.png"


@dataclass
class Suite:
    """Items to generate, the metrics to report and what identifies the generated images."""

    name: str
    items: list[EvalItem]
    metrics: dict[str, str]  # metric name -> reward name (`refrl.rewards.build`) or builtin metric
    size: tuple[int, int]
    params: dict[str, Any]  # suite parameters that determine the images (checked on resume)
    n_samples: int
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    group_keys: tuple[str, ...] = ()  # extra aggregation keys of the records (e.g. subject)
    protocol: str = ""


# --------------------------------------------------------------------------- metric specs

BUILTIN_METRICS: dict[str, Callable[[], Reward]] = {
    "psnr_inside": lambda: MaskedPSNR("inside"),
    "psnr_outside": lambda: MaskedPSNR("outside"),
}


def parse_metric_specs(specs: str | Sequence[str]) -> dict[str, str]:
    """``"identity,subject=dino_seg"`` (or a list of such items) -> {metric: reward name}.

    ``NAME`` reports reward NAME under its own name; ``METRIC=NAME`` under ``METRIC``.
    """
    items = [s for part in ([specs] if isinstance(specs, str) else specs) for s in str(part).split(",")]
    out: dict[str, str] = {}
    for item in (s.strip() for s in items):
        if not item:
            continue
        metric, _, reward = item.partition("=")
        metric, reward = metric.strip(), (reward.strip() or metric.strip())
        if not metric or not reward:
            raise RefrlError(f"bad reward spec {item!r}; expected NAME or METRIC=NAME")
        if metric in out:
            raise RefrlError(f"metric {metric!r} given twice in the reward list")
        out[metric] = reward
    if not out:
        raise RefrlError("no rewards given; expected a comma-separated list such as identity,layout")
    return out


def parse_reward_options(texts: Sequence[str], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["csd.model_path=/m", "dino.batch_size=8"]`` -> {"csd": {...}, "dino": {...}} (values as YAML)."""
    from refrl.config import parse_override

    out: dict[str, dict[str, Any]] = {}
    for text in texts:
        keys, value = parse_override(text)
        if len(keys) != 2:
            raise RefrlError(f"reward option {text!r} must be METRIC.KEY=VALUE")
        if keys[0] not in metrics:
            raise RefrlError(f"reward option {text!r} names metric {keys[0]!r}; metrics: {', '.join(metrics)}")
        out.setdefault(keys[0], {})[keys[1]] = value
    return out


def build_metrics(metrics: Mapping[str, str], options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Reward]:
    """One `Reward` per metric: builtin metrics here, everything else through `refrl.rewards.build`."""
    options = options or {}
    out: dict[str, Reward] = {}
    for metric, reward in metrics.items():
        if reward in BUILTIN_METRICS:
            if options.get(metric):
                raise RefrlError(f"metric {metric!r} ({reward}) takes no options, got {dict(options[metric])}")
            out[metric] = BUILTIN_METRICS[reward]()
            continue
        from refrl.rewards import build

        out[metric] = build(reward, **dict(options.get(metric, {})))
    return out


# --------------------------------------------------------------------------- embedded suites


def _limited(n: int, limit: int | None) -> int:
    if n < 1 or (limit is not None and limit < 1):
        raise RefrlError(f"the number of samples must be >= 1, got n={n}, limit={limit}")
    return min(n, limit) if limit is not None else n


def refworld_suite(
    n: int = DEFAULT_N["refworld"], seed: int = 0, limit: int | None = None, size: int = DEFAULT_IMAGE_SIZE,
    level: int = REFWORLD_LEVEL, categories: Sequence[str] | None = None, name: str = "refworld",
    metrics: Sequence[str] = REFWORLD_METRICS, split: str = REFWORLD_SPLIT,
) -> Suite:
    """RefWorld test split (unseen identities), sample i a pure function of ``(seed, i)``.

    ``split="train"`` scores on identities seen in training instead: the gap to the test
    split separates what a run learned about its training subjects from what generalises.
    """
    from refrl.data.refworld import generate

    n = _limited(n, limit)
    samples = generate(n, seed, split=split, size=size, categories=categories, level=level)
    return Suite(
        name=name,
        items=[EvalItem(s.id, s, i) for i, s in enumerate(samples)],
        metrics={m: m for m in metrics},
        size=(size, size),
        params={"split": split, "level": level, "categories": list(categories) if categories else None,
                "data_seed": seed},
        n_samples=n,
        protocol=f"RefWorld {split} split{' (unseen identities)' if split == 'test' else ''}, level {level}, one image per sample",
    )


def refine_suite(n: int = DEFAULT_N["refine"], seed: int = 0, limit: int | None = None,
                 size: int = DEFAULT_IMAGE_SIZE, level: int = REFWORLD_LEVEL) -> Suite:
    """RefWorld ``refine`` tasks (OmniRefiner): patch reward and PSNR inside / outside the mask."""
    return refworld_suite(n, seed, limit, size, level, categories=["refine"], name="refine", metrics=REFINE_METRICS)


def build_suite(name: str, *, seed: int = 0, n: int | None = None, limit: int | None = None,
                size: int = DEFAULT_IMAGE_SIZE, data: str | os.PathLike | None = None,
                root: str | os.PathLike | None = None, split: str | None = None, level: int | None = None) -> Suite:
    """The suite called ``name`` (one of `SUITE_NAMES`); ``data``/``root`` locate omniref and dreambench data;
    ``split``/``level`` choose the RefWorld split and difficulty (refworld only)."""
    if name != "refworld" and (split is not None or level is not None):
        raise RefrlError(f"--split/--level apply to the refworld suite only, not {name!r}")
    if name in ("refworld", "refine"):
        if data is not None:
            raise RefrlError(f"suite {name!r} is generated in memory; it takes no --data")
        if name == "refine":
            return refine_suite(DEFAULT_N[name] if n is None else n, seed, limit, size)
        chosen = {k: v for k, v in (("split", split), ("level", level)) if v is not None}
        return refworld_suite(DEFAULT_N[name] if n is None else n, seed, limit, size, **chosen)
    if name == "omniref":
        from refrl.eval.omniref import omniref_suite

        if data is None:
            raise RefrlError("suite 'omniref' needs --data: the OmniRef-Bench metadata JSON (benchmark.json)")
        return omniref_suite(data, root=root, limit=limit, size=size)
    if name == "dreambench":
        from refrl.eval.dreambench import dreambench_suite

        if data is None:
            raise RefrlError("suite 'dreambench' needs --data: the DreamBench folder (holding dataset/)")
        return dreambench_suite(data, limit=limit, size=size)
    raise RefrlError(f"unknown suite {name!r}; allowed: {', '.join(SUITE_NAMES)}")


# --------------------------------------------------------------------------- the runner


def policy_image_size(policy: Policy) -> int:
    """The size a policy generates at natively (`Policy.image_size`)."""
    return int(policy.image_size)


def checkpoint_stamp(ckpt: str | os.PathLike) -> dict[str, Any]:
    """What identifies a checkpoint's weights: its resolved folder and newest file time."""
    from refrl.models.build import resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    mtimes = [p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()]
    return {"ckpt_path": str(path.resolve()), "ckpt_mtime_ns": max(mtimes, default=0)}


def json_clean(value: Any) -> Any:
    """NaN / inf -> None, recursively, so files are strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_clean(v) for v in value]
    return value


def _check_meta(out: Path, meta: dict[str, Any], force: bool) -> None:
    """Refuse to mix images of different generation settings in one folder (``--force`` starts over)."""
    path = out / META_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old == meta:
        return
    if not force:
        diff = [f"{k}: {old.get(k)!r} -> {meta.get(k)!r}" for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)]
        raise RefrlError(
            f"{out} holds images generated with other settings ({'; '.join(diff)}); "
            "use another --out, or --force to delete them and start over"
        )
    shutil.rmtree(out / IMAGES_DIR, ignore_errors=True)
    for name in (EVAL_FILE, SAMPLES_FILE, GRID_FILE):
        (out / name).unlink(missing_ok=True)


def _generate_missing(policy: Policy, suite: Suite, images_dir: Path, missing: list[EvalItem], seed: int,
                      steps: int, cfg: float, shift: float, batch_size: int, progress: bool) -> None:
    from refrl.data.images import save_image
    from refrl.sampling.rollout import sample_ode

    done = len(suite.items) - len(missing)
    with tqdm(total=len(suite.items), initial=done, desc=f"eval {suite.name}", unit="img", disable=not progress) as bar:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            images = sample_ode(policy, [it.sample for it in chunk], steps=steps, cfg_scale=cfg, shift=shift,
                                seed=seed, indices=[it.noise_index for it in chunk], size=suite.size)
            for it, im in zip(chunk, images, strict=True):
                save_image(im, images_dir / it.file_name)
            bar.update(len(chunk))


def _grid_rows(items: Sequence[EvalItem], images: Sequence[torch.Tensor]) -> list[list[tuple[str, torch.Tensor]]]:
    from refrl.eval.grid import sample_row

    return [sample_row(it.sample, [("output", im)], it.scored.target) for it, im in zip(items, images, strict=True)]


def run_eval(
    policy: Policy | Callable[[], Policy],
    suite: Suite,
    out_dir: str | os.PathLike,
    *,
    metrics: Mapping[str, Reward],
    ckpt: str = "",
    ckpt_stamp: Mapping[str, Any] | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    cfg: float = DEFAULT_CFG,
    shift: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    force: bool = False,
    progress: bool = True,
    reward_names: Mapping[str, str] | None = None,
    reward_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate the suite's missing images, score every image, write eval.json / samples.jsonl / grid.png.

    ``policy`` may be a zero-argument loader, called only when some image is missing.
    Holds the lock of ``out_dir`` (`refrl.files.lock_run_folder`). Returns the eval.json contents.
    """
    if batch_size < 1:
        raise RefrlError(f"batch_size must be >= 1, got {batch_size}")
    ids = [it.image_id for it in suite.items]
    if len(set(ids)) != len(ids):
        raise RefrlError(f"suite {suite.name!r} has duplicate image ids; every image needs its own id")
    with lock_run_folder(out_dir):
        return _run_eval(policy, suite, Path(out_dir), metrics=metrics, ckpt=ckpt, ckpt_stamp=ckpt_stamp, seed=seed,
                         steps=steps, cfg=cfg, shift=shift, batch_size=batch_size, force=force, progress=progress,
                         reward_names=reward_names, reward_options=reward_options)


def _cached(images_dir: Path, item: EvalItem) -> bool:
    """Whether the item's PNG is there and decodes; a torn or corrupt one is deleted (and regenerated)."""
    from refrl.data.images import ImageReadError, read_image_size

    path = images_dir / item.file_name
    if not path.is_file():
        return False
    try:
        read_image_size(path)
    except ImageReadError as e:
        log.warning("regenerating %s: %s", path, e.reason)
        path.unlink(missing_ok=True)
        return False
    return True


def _run_eval(policy, suite: Suite, out: Path, *, metrics, ckpt, ckpt_stamp, seed, steps, cfg, shift, batch_size,
              force, progress, reward_names, reward_options) -> dict[str, Any]:
    from refrl.data.images import load_image
    from refrl.eval.grid import save_grid

    images_dir = out / IMAGES_DIR
    meta = json_clean({"suite": suite.name, "ckpt": str(ckpt), **dict(ckpt_stamp or {}), "seed": seed, "steps": steps,
                       "cfg": cfg, "shift": shift, "size": list(suite.size), "params": suite.params})
    _check_meta(out, meta, force)
    images_dir.mkdir(exist_ok=True)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")

    t0 = time.perf_counter()
    missing = [it for it in suite.items if not _cached(images_dir, it)]
    if missing:
        loaded = policy() if callable(policy) and not hasattr(policy, "velocity") else policy
        _generate_missing(loaded, suite, images_dir, missing, seed, steps, cfg, shift, batch_size, progress)
    t_generate = time.perf_counter() - t0

    records: list[dict[str, Any]] = []
    first_images: list[torch.Tensor] = []
    for start in range(0, len(suite.items), batch_size):
        chunk = suite.items[start : start + batch_size]
        images = torch.stack([load_image(images_dir / it.file_name) for it in chunk])
        recs = score_images(images, [it.scored for it in chunk], metrics)
        for it, rec in zip(chunk, recs, strict=True):
            records.append({"image_id": it.image_id, **rec, "seed": seed, "noise_index": it.noise_index,
                            **it.record, "prompt": it.sample.prompt})
        first_images.extend(images[: max(0, GRID_ROWS - len(first_images))])
    t_score = time.perf_counter() - t0 - t_generate

    names = list(metrics)
    result = {
        "suite": suite.name,
        "ckpt": str(ckpt),
        "seed": seed,
        "n": suite.n_samples,
        "n_images": len(suite.items),
        "images_per_sample": len(suite.items) // max(1, suite.n_samples),
        "steps": steps,
        "cfg": cfg,
        "shift": shift,
        "size": list(suite.size),
        "protocol": suite.protocol,
        "params": suite.params,
        "rewards": dict(reward_names or {m: m for m in names}),
        "reward_options": dict(reward_options or {}),
        "generated": len(missing),
        "cached": len(suite.items) - len(missing),
        "metrics": aggregate(records, names, group_keys=suite.group_keys),
        "seconds": {"generate": round(t_generate, 3), "score": round(t_score, 3)},
    }
    atomic_write_text(out / SAMPLES_FILE, "".join(json.dumps(json_clean(r)) + "\n" for r in records))
    atomic_write_text(out / EVAL_FILE, json.dumps(json_clean(result), indent=2) + "\n")
    save_grid(_grid_rows(suite.items[:GRID_ROWS], first_images), out / GRID_FILE)
    return result
