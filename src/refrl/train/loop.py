"""The one training loop of refrl: SFT and every RL objective are steps of it.

`TrainLoop` owns what every run shares, in the shape of a torchtune recipe:

* the run folder: refusing one that holds checkpoints (unless resuming), its lock,
  ``config.yaml``, ``metrics.jsonl`` (every line records ``processes``);
* accelerate (`refrl.train.distributed.Dist`): processes, gathers, trackers;
* the policy (built from ``cfg.model`` or handed over as an object), the optimizer and
  LR schedule, the EMA of the trainable weights;
* checkpoints (`refrl.train.checkpoint`) and exact resume;
* SIGINT (finish the step, checkpoint, stop), the progress bar, tracker logging.

A trainer subclass fills in:

* ``loop_spec()``: what differs between trainers (total steps, checkpoint period, ...);
* ``setup()``: its own objects (data source, rewards, objective), after the policy,
  optimizer and EMA exist;
* ``step(i)``: one step (SFT) or iteration (RL): forward, backward, one or more
  `optimizer_step` calls; returns the metrics of the step (the loop adds ``step``, ``lr``
  and ``processes`` and steps the LR schedule once per step);
* optionally ``extra_state`` / ``load_extra_state`` (more state for exact resume) and
  ``postfix`` (what the progress bar shows).
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from refrl.config import dump_config
from refrl.data.schema import LoadedSample
from refrl.errors import Interrupted, RefrlError
from refrl.models.build import ModelConfig, build_policy, check_image_size
from refrl.models.policy import Policy
from refrl.runfolder.layout import latest_checkpoint
from refrl.runfolder.lock import lock_run_folder
from refrl.runfolder.rng import seed_everything
from refrl.train.checkpoint import (
    check_same_init,
    init_fingerprint,
    load_checkpoint,
    load_trainable,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from refrl.train.data import DataConfig, SampleSource
from refrl.train.dcp import load_sharded, save_sharded_checkpoint
from refrl.train.distributed import Dist
from refrl.train.ema import EMA
from refrl.train.finite import FiniteGuard
from refrl.train.optim import build_optimizer
from refrl.train.resume_check import check_same_model
from refrl.train.run import MetricsWriter
from refrl.train.sharding import build_sharding, release
from refrl.train.validation import build_validation

# What a trainer takes as its data besides the config's `data` section: a manifest path, or samples.
Dataset = str | Path | Sequence[LoadedSample]


def main_process_lock(out_dir: str | Path) -> AbstractContextManager[Any]:
    """The run folder's lock (`refrl.runfolder.lock.lock_run_folder`, re-entrant) in the main process; nothing in
    the others (under accelerate only RANK 0 writes into the run folder)."""
    return lock_run_folder(out_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()


@dataclass(frozen=True)
class LoopSpec:
    """What differs between the trainers that share `TrainLoop`."""

    kind: str  # state.json's "kind", the progress bar's label, the tracker project's suffix
    total: int  # steps (SFT) or iterations (RL)
    checkpoint_every: int
    keep_last: int
    ema_decay: float
    ema_warmup: bool  # min(decay, (1 + n) / (10 + n)) early on (SFT from scratch); RL starts from trained weights
    train_mode: bool  # policy.train() for SFT; RL stays in eval(): no train-mode randomness, the ratio must be 1
    log_every: int = 1
    trackers: list[str] = field(default_factory=list)
    # config values that each process takes an equal share of: name -> value
    per_process: dict[str, int] = field(default_factory=dict)


class TrainLoop:
    """The shared skeleton of a training run; see the module docstring for the subclass's part.

    ``cfg`` needs ``seed``, ``model``, ``data`` and ``optim`` sections. ``policy`` replaces the
    one ``cfg.model`` describes (then no init fingerprint guards resume); ``dataset`` (a
    manifest path or a list of samples) replaces ``cfg.data``'s source.
    """

    def __init__(self, cfg: Any, out_dir: str | Path, resume: bool = False, *, policy: Policy | str | None = None,
                 dataset: Dataset | None = None):
        # A checkpoint name becomes model.init and a manifest path data.manifest: config.yaml records
        # them, and the sections are validated again (an init brings its architecture along).
        if isinstance(policy, str):
            given = cfg.model.model_dump(exclude_unset=True)
            if cfg.model.init is not None:  # the architecture keys came from the init this one replaces
                for key in type(cfg.model).init_fields:
                    given.pop(key, None)
            model = ModelConfig(**{**given, "init": policy})
            cfg = cfg.model_copy(update={"model": model})
            policy = None
        if isinstance(dataset, str | Path):
            data = DataConfig(**{**cfg.data.model_dump(exclude_unset=True), "source": "manifest",
                                 "manifest": str(dataset)})
            cfg = cfg.model_copy(update={"data": data})
            dataset = None
        self.cfg = cfg
        self.spec = spec = self.loop_spec()
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.resume = resume
        self.history: list[dict[str, Any]] = []  # the metrics records of this process's run, in order
        self.dist = Dist(spec.trackers, project_dir=str(self.out_dir))
        self._check_run_folder()  # before any model is built: a refused folder costs nothing
        uneven = {k: v for k, v in spec.per_process.items() if v % self.dist.world}
        if uneven:
            names = " and ".join(f"{k} ({v})" for k, v in spec.per_process.items())
            raise RefrlError(f"{names} must be divisible by the number of processes ({self.dist.world})")
        seed_everything(cfg.seed)
        self.policy: Policy = policy if policy is not None else build_policy(cfg.model)
        check_image_size(self.policy, cfg.data.size)
        if spec.train_mode:
            self.policy.train()
        else:
            self.policy.eval()
        self.sharding = build_sharding(cfg, self.dist)  # distributed.strategy=fsdp2 (refrl.train.sharding)
        self._frozen = None
        if self.sharding is not None:  # a frozen copy (KL reference) cannot be taken once sharded
            self._frozen = self.sharding.shard_frozen_copy(self.policy) if self.wants_frozen_copy() else None
            self.sharding.shard(self.policy)
        self.named = [(f"p{i}", p) for i, p in enumerate(self.policy.trainable_parameters())]
        self.params = [p for _, p in self.named]
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg.optim, spec.total)
        self.finite = FiniteGuard(self.dist, cfg.optim.nonfinite_limit, self.ckpt_root)  # refrl.train.finite
        self.ema = EMA(self.named, spec.ema_decay, warmup=spec.ema_warmup)
        self.init_sha = init_fingerprint(cfg.model.init) if policy is None else None
        self._dataset = None if dataset is None else list(dataset)
        self.start = 0
        self.setup()
        self.validation = build_validation(self)  # validation.every > 0 (refrl.train.validation)

    # ------------------------------------------------------------------ the subclass's part
    def loop_spec(self) -> LoopSpec:
        raise NotImplementedError

    def setup(self) -> None:
        """Build the trainer's own objects (data source, rewards, objective)."""

    def step(self, i: int) -> dict[str, Any]:
        """Run step ``i`` (0-based) and return its metrics."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """State beyond weights, optimizer, schedule, RNG and EMA that exact resume needs (in ``trainer.pt``)."""
        return {}

    def load_extra_state(self, trainer_state: dict[str, Any]) -> None:
        pass

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {}

    def wants_frozen_copy(self) -> bool:
        """Whether `frozen_copy` will be called (asked before the policy is sharded)."""
        return False

    def frozen_copy(self) -> Policy:
        """A frozen copy of the policy as built (e.g. the KL reference of a full fine-tune)."""
        if self._frozen is not None:
            return self._frozen
        ref = copy.deepcopy(self.policy)
        for p in ref.trainable_parameters():
            p.requires_grad_(False)
        return ref

    # ------------------------------------------------------------------ helpers for steps
    def sample_source(self, need_target: str | None = None) -> SampleSource:
        """Batches from the given dataset, else from ``cfg.data`` (a pure function of (seed, step))."""
        return SampleSource(self.cfg.data, seed=self.cfg.seed, total_steps=self.spec.total, need_target=need_target,
                            samples=self._dataset)

    def optimizer_step(self, loss: float | None = None) -> float:
        """Average the gradients over processes, clip them, step the optimizer, update the EMA.

        A non-finite ``loss`` (this process's, when given) or gradient skips the step
        (`refrl.train.finite.FiniteGuard`). Returns the gradient norm before clipping.
        """
        if self.sharding is None:  # FSDP2 reduces (averages) gradients itself, in backward
            self.dist.average_gradients(self.params)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        if not self.finite.step_ok(norm, loss, self.params, step=self.scheduler.last_epoch + 1):
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        self.optimizer.step()
        self.ema.update()
        return float(norm)

    def logs_at(self, done: int) -> bool:
        """Whether the step that brings the count to ``done`` writes a metrics line."""
        return done % self.spec.log_every == 0 or done == self.spec.total

    # ------------------------------------------------------------------ run folder, checkpoints
    def _check_run_folder(self) -> None:
        last = latest_checkpoint(self.ckpt_root)
        if last is not None and not self.resume:
            raise RefrlError(f"{self.out_dir} already holds checkpoints; pass --resume to continue or choose another --out")
        if last is None and self.resume:
            raise RefrlError(f"--resume: no checkpoint under {self.ckpt_root}")

    def _load_latest(self) -> int:
        """Load the latest checkpoint into this trainer (weights, optimizer, schedule, RNG, EMA, extra state);
        returns its step. Refuses a run started from other weights than ``model.init`` holds now."""
        check_same_model(self.out_dir, self.cfg.model)  # a changed model.width is named, not a weight mismatch
        last = latest_checkpoint(self.ckpt_root)
        trainer_state, ema_state, info = load_checkpoint(last)
        check_same_init(info, self.init_sha, self.cfg.model.init, self.out_dir)
        if self.sharding is not None:  # weights, optimizer and EMA from the sharded checkpoint
            load_sharded(last, self.sharding.root, self.optimizer, self.ema)
        else:
            load_trainable(self.named, last)
            self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        set_rng_state(trainer_state["rng"])
        if ema_state is not None:
            self.ema.load_state_dict(ema_state)
        self.load_extra_state(trainer_state)
        return int(info["step"])

    def checkpoint(self, done: int) -> Path | None:
        """Write ``checkpoints/step-<done>`` (main process; the loadable policy carries the EMA weights)."""
        self.finite.check_saveable(self.params, self.ema.shadow.values(), done)  # never a non-finite checkpoint
        if self.sharding is not None:
            return save_sharded_checkpoint(self, done)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state(), **self.extra_state()}
        path = None
        if self.dist.is_main:
            def export(folder: Path) -> None:
                with self.ema.swapped_in():
                    self.policy.save_pretrained(folder)

            path = save_checkpoint(
                self.ckpt_root, done, export, state, self.ema.state_dict(),
                {"data_position": done, "kind": self.spec.kind, "init_sha256": self.init_sha},
                trainable=dict(self.named), keep_last=self.spec.keep_last,
            )
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path | None:
        """Train into the run folder; returns the last checkpoint. The main process holds the folder's
        lock (`refrl.runfolder.lock.lock_run_folder`) for the whole run; only it writes there."""
        with main_process_lock(self.out_dir):
            self._check_run_folder()  # again, now that this process holds the folder
            try:
                if self.resume:
                    self.start = self._load_latest()
                if self.dist.is_main:
                    dump_config(self.cfg, self.out_dir / "config.yaml")
                return self._loop()
            finally:
                if self.sharding is not None:  # a clean exit: free model, optimizer, mesh, then the process group
                    release(self, keep=("cfg", "spec", "out_dir", "ckpt_root", "history", "start"))

    def _log_line(self, line: dict[str, Any], metrics: MetricsWriter | None, trackers: bool) -> None:
        """Write a line that is not a step's (a validation) into metrics.jsonl and the trackers."""
        if metrics is not None:
            metrics.write(line)
        if trackers:
            self.dist.accelerator.log({k: v for k, v in line.items() if isinstance(v, float | int)}, step=line["step"])

    def _loop(self) -> Path | None:
        spec, main = self.spec, self.dist.is_main
        # lines after the checkpoint (all of them in a fresh run) are redone, so every step is logged once
        metrics = MetricsWriter(self.out_dir / "metrics.jsonl", truncate_after_step=self.start) if main else None
        trackers = bool(spec.trackers) and main
        if trackers:
            from refrl.train.trackers import flat_config  # TensorBoard's hparams take scalars only

            self.dist.accelerator.init_trackers(f"refrl-{spec.kind}", config=flat_config(self.cfg.model_dump(mode="json")))
        interrupted = {"flag": False}

        def on_sigint(signum, frame):  # finish the step, save, then stop
            interrupted["flag"] = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        bar = tqdm(range(self.start, spec.total), initial=self.start, total=spec.total, desc=spec.kind,
                   disable=not main, dynamic_ncols=True)
        path = None
        try:
            if self.validation is not None:  # validation lines go where training lines go
                self.validation.begin(self.start, lambda line: self._log_line(line, metrics, trackers))
            for i in bar:
                record = self.step(i)
                self.scheduler.step()
                done = i + 1
                record = {"step": done, **record, "lr": self.scheduler.get_last_lr()[0], "processes": self.dist.world,
                          "skipped_nonfinite": self.finite.pop_skipped()}
                self.history.append(record)
                bar.set_postfix(self.postfix(record))
                if self.logs_at(done):
                    if metrics is not None:
                        metrics.write(record)
                    if trackers:
                        self.dist.accelerator.log({k: v for k, v in record.items() if isinstance(v, float | int)},
                                                  step=done)
                # every process stops at the same step, or the others would wait at a barrier forever
                stop = self.dist.max_across(float(interrupted["flag"])) > 0
                guard_stop = False  # a guard rule with action=stop (refrl.train.guard)
                if self.validation is not None and self.validation.due(done):
                    guard_stop = self.dist.max_across(float(self.validation.validate(done))) > 0
                if done % spec.checkpoint_every == 0 or done == spec.total or stop or guard_stop:
                    path = self.checkpoint(done)
                if stop:
                    raise Interrupted(f"interrupted: stopped after step {done} of {spec.total} and saved "
                                      f"{path or latest_checkpoint(self.ckpt_root)}; to continue, run the same "
                                      "command with --resume")
                if guard_stop:
                    break
            if self.validation is not None:
                self.validation.finish()
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
            if metrics is not None:
                metrics.close()
            if trackers:
                self.dist.accelerator.end_training()
        return path or latest_checkpoint(self.ckpt_root)
