"""The eval runner (``refrl eval``): build a suite by name, generate its images, score them.

Suites: ``refworld`` and ``refine`` (`refrl.eval.refworld`), ``manifest`` (any manifest,
`refrl.eval.manifest_suite`), ``omniref`` (`refrl.eval.omniref`) and ``dreambench``
(`refrl.eval.dreambench`); what a suite is:
`refrl.eval.suite`; which rewards score it: `refrl.eval.metrics`.

The runner caches generation: each image is written to ``DIR/images/<image_id>.png``
(the id made safe by `refrl.runfolder.files.safe_filename`) as soon as its batch is done, and a rerun with the same checkpoint, seed, sampler
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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from refrl.errors import RefrlError
from refrl.eval.processes import Processes, batches
from refrl.eval.refworld import DEFAULT_N, refine_suite, refworld_suite
from refrl.eval.scoring import aggregate, score_images
from refrl.eval.suite import DEFAULT_IMAGE_SIZE, EvalItem, Suite
from refrl.models.policy import Policy
from refrl.models.sampler import SamplerSettings
from refrl.rewards.base import Reward
from refrl.runfolder.files import atomic_write_text
from refrl.runfolder.layout import resolve_checkpoint
from refrl.runfolder.lock import lock_run_folder
from refrl.sampling.settings import resolve_sampler

log = logging.getLogger(__name__)

SUITE_NAMES = ("refworld", "manifest", "omniref", "dreambench", "refine")
DEFAULT_BATCH_SIZE = 16
GRID_ROWS = 16

IMAGES_DIR = "images"
EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
META_FILE = "eval_meta.json"
GRID_FILE = "grid.png"


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
    if name == "manifest":
        from refrl.eval.manifest_suite import manifest_suite

        if data is None:
            raise RefrlError("suite 'manifest' needs --data: a JSONL manifest (see `refrl data validate`)")
        if root is not None:
            raise RefrlError("suite 'manifest' takes no --root: image paths are relative to the manifest's folder")
        return manifest_suite(data, limit=limit, size=size)
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


def _generate(policy: Policy, suite: Suite, images_dir: Path, missing: list[EvalItem], seed: int,
              sampler: SamplerSettings, batch_size: int, progress: bool, procs: Processes) -> None:
    """Generate this process's batches of ``missing`` (batch k: process k mod N) into ``images_dir``."""
    from refrl.data.images import save_image
    from refrl.sampling.rollout import sample_ode

    mine = [chunk for k, chunk in enumerate(batches(missing, batch_size)) if procs.share(k)]
    done = len(suite.items) - len(missing)
    with tqdm(total=len(suite.items), initial=done, desc=f"eval {suite.name}", unit="img",
              disable=not progress or not procs.is_main) as bar:
        for chunk in mine:
            images = sample_ode(policy, [it.sample for it in chunk], steps=sampler.steps, cfg_scale=sampler.cfg_scale,
                                shift=sampler.shift, seed=seed, indices=[it.noise_index for it in chunk],
                                size=suite.size)
            for it, im in zip(chunk, images, strict=True):
                save_image(im, images_dir / it.file_name)
            bar.update(min(len(chunk) * procs.world, bar.total - bar.n))  # the main process's view of all


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
    steps: int | None = None,
    cfg_scale: float | None = None,
    shift: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    force: bool = False,
    progress: bool = True,
    reward_names: Mapping[str, str] | None = None,
    reward_options: Mapping[str, Any] | None = None,
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Generate the suite's missing images, score every image, write eval.json / samples.jsonl / grid.png.

    ``steps`` / ``cfg_scale`` / ``shift`` left None are the policy's
    (`refrl.sampling.settings.resolve_sampler`). ``policy`` may be a zero-argument loader, called
    only when some image is missing or a sampler value must come from the model. Under
    ``accelerate launch`` (``processes=refrl.eval.processes.current()``) the batches are
    split across the processes and the main one writes the files; every process returns the
    eval.json contents. Without ``processes`` it runs in this process alone. The main process
    holds the lock of ``out_dir`` (`refrl.runfolder.lock.lock_run_folder`).
    """
    if batch_size < 1:
        raise RefrlError(f"batch_size must be >= 1, got {batch_size}")
    ids = [it.image_id for it in suite.items]
    if len(set(ids)) != len(ids):
        raise RefrlError(f"suite {suite.name!r} has duplicate image ids; every image needs its own id")
    procs = processes or Processes()
    loaded: list[Policy] = []

    def get_policy() -> Policy:
        if not loaded:
            loaded.append(policy() if callable(policy) and not hasattr(policy, "velocity") else policy)
        return loaded[0]

    given = SamplerSettings(steps, cfg_scale, shift) if None not in (steps, cfg_scale, shift) else None
    sampler = given or resolve_sampler(get_policy(), steps, cfg_scale, shift)
    with ExitStack() as held:  # the main process holds the folder's lock; the others write nothing there
        procs.run(lambda: held.enter_context(lock_run_folder(out_dir)), main_only=True)
        return _run_eval(get_policy, suite, Path(out_dir), metrics=metrics, ckpt=ckpt, ckpt_stamp=ckpt_stamp,
                         seed=seed, sampler=sampler, batch_size=batch_size, force=force, progress=progress,
                         reward_names=reward_names, reward_options=reward_options, procs=procs)


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


def _prepare(suite: Suite, out: Path, meta: dict[str, Any], force: bool) -> list[int]:
    """Main process: check and write the cache's settings; the positions of the items to generate."""
    _check_meta(out, meta, force)
    (out / IMAGES_DIR).mkdir(exist_ok=True)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return [i for i, it in enumerate(suite.items) if not _cached(out / IMAGES_DIR, it)]


def _score(suite: Suite, images_dir: Path, metrics: Mapping[str, Reward], seed: int, batch_size: int,
           procs: Processes) -> list[tuple[int, list[dict[str, Any]]]]:
    """This process's scored batches (batch k: process k mod N) as (k, records)."""
    from refrl.data.images import load_image

    out = []
    for k, chunk in enumerate(batches(suite.items, batch_size)):
        if not procs.share(k):
            continue
        images = torch.stack([load_image(images_dir / it.file_name) for it in chunk])
        recs = score_images(images, [it.scored for it in chunk], metrics)
        out.append((k, [{"image_id": it.image_id, **rec, "seed": seed, "noise_index": it.noise_index,
                         **it.record, "prompt": it.sample.prompt} for it, rec in zip(chunk, recs, strict=True)]))
    return out


def _run_eval(get_policy: Callable[[], Policy], suite: Suite, out: Path, *, metrics, ckpt, ckpt_stamp, seed,
              sampler: SamplerSettings, batch_size, force, progress, reward_names, reward_options,
              procs: Processes) -> dict[str, Any]:
    from refrl.data.images import load_image
    from refrl.eval.grid import save_grid

    images_dir = out / IMAGES_DIR
    # the cache's settings keep their first names, so folders evaluated before still resume
    meta = json_clean({"suite": suite.name, "ckpt": str(ckpt), **dict(ckpt_stamp or {}), "seed": seed,
                       "steps": sampler.steps, "cfg": sampler.cfg_scale, "shift": sampler.shift,
                       "size": list(suite.size), "params": suite.params})
    missing_at = procs.broadcast(procs.run(lambda: _prepare(suite, out, meta, force), main_only=True))
    missing = [suite.items[i] for i in missing_at]

    t0 = time.perf_counter()
    if missing:
        procs.run(lambda: _generate(get_policy(), suite, images_dir, missing, seed, sampler, batch_size, progress,
                                    procs))
    t_generate = time.perf_counter() - t0

    scored = procs.run(lambda: _score(suite, images_dir, metrics, seed, batch_size, procs))
    records = [r for _, recs in sorted(b for part in procs.gather(scored) for b in part) for r in recs]
    t_score = time.perf_counter() - t0 - t_generate

    names = list(metrics)
    summary = aggregate(records, names, group_keys=suite.group_keys)
    result = {
        "suite": suite.name,
        "ckpt": str(ckpt),
        "seed": seed,
        "n": suite.n_samples,
        "n_images": len(suite.items),
        "images_per_sample": len(suite.items) // max(1, suite.n_samples),
        "sampling": sampler.as_dict(),
        "size": list(suite.size),
        "protocol": suite.protocol,
        "params": suite.params,
        "rewards": dict(reward_names or {m: m for m in names}),
        "reward_options": dict(reward_options or {}),
        "scored": {m: summary["overall"][m]["n"] for m in names},
        "generated": len(missing),
        "cached": len(suite.items) - len(missing),
        "metrics": summary,
        "processes": procs.world,
        "seconds": {"generate": round(t_generate, 3), "score": round(t_score, 3)},
    }

    def write() -> None:
        atomic_write_text(out / SAMPLES_FILE, "".join(json.dumps(json_clean(r)) + "\n" for r in records))
        atomic_write_text(out / EVAL_FILE, json.dumps(json_clean(result), indent=2) + "\n")
        first = suite.items[:GRID_ROWS]
        save_grid(_grid_rows(first, [load_image(images_dir / it.file_name) for it in first]), out / GRID_FILE)

    procs.run(write, main_only=True)
    return result
