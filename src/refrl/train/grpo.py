"""Stage 2: RL for flow-matching policies, on any `Policy`: GRPO (Flow-GRPO family),
DiffusionNFT or AWM, one loop for all (``objective`` in the config).

One iteration:

1. draw ``groups_per_iteration`` conditions (a pure function of (seed, iteration))
   and repeat each ``group_size`` times; each process rolls out a contiguous
   share of the groups;
2. roll out with SDE steps where chosen (ODE elsewhere), storing x_t, x_{t+1} and
   the old log-prob (GRPO), and the final latents; every random draw is keyed by
   (seed, iteration, sample), so a trajectory does not depend on the number of processes;
3. the objective prepares its training data (nft/awm: training times and v_old, before
   any update); score with the rewards, gather everything across processes, compute
   advantages through `compute_advantages` (group norm / GDPO / SARS+TDW, DRS, DAR);
4. train with the objective's minibatch loss (`refrl.train.objectives`: PPO-clip on
   SDE steps, NFT, or AWM; + KL to the reference policy) over minibatches and inner
   epochs; on the first minibatch after a rollout the ratio must be 1 (on-policy guard).
"""

from __future__ import annotations

import copy
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from refrl.config import dump_config
from refrl.errors import RefrlError
from refrl.models.build import build_policy, check_image_size
from refrl.rewards import build as build_reward
from refrl.runfolder.files import save_safetensors
from refrl.runfolder.layout import latest_checkpoint
from refrl.runfolder.lock import lock_run_folder
from refrl.runfolder.rng import seed_everything, seeded_generator
from refrl.sampling.rollout import choose_sde_steps, encode_for_guidance, rollout_sde
from refrl.sampling.schedules import sigma_schedule
from refrl.train.advantages import compute_advantages
from refrl.train.checkpoint import (
    init_fingerprint,
    load_checkpoint,
    resume_training,
    rng_state,
    save_checkpoint,
)
from refrl.train.data import SampleSource
from refrl.train.distributed import Dist
from refrl.train.ema import EMA
from refrl.train.grpo_config import GRPOConfig
from refrl.train.objectives import build_objective
from refrl.train.optim import build_optimizer
from refrl.train.run import MetricsWriter

ON_POLICY_HELP = (
    "sampling and training disagree before any update. Usual causes: dropout or other "
    "train-mode randomness in the network, a different dtype/autocast between rollout and "
    "training, or outputs that depend on batch composition (unmasked padding of references "
    "or text). Fix the policy, or set on_policy_check=false to train anyway."
)


class OnPolicyError(RefrlError):
    pass


class GRPOTrainer:
    """Holds the policy, optimizer, rewards and the process layout of one run."""

    def __init__(self, cfg: GRPOConfig, out_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.dist = Dist(cfg.trackers, project_dir=str(self.out_dir))
        self.ckpt_root = self.out_dir / "checkpoints"
        if not resume and latest_checkpoint(self.ckpt_root) is not None:
            raise RefrlError(f"{self.out_dir} already holds checkpoints; pass --resume or choose another --out")
        if cfg.groups_per_iteration % self.dist.world or cfg.minibatch_size % self.dist.world:
            raise RefrlError(
                f"groups_per_iteration ({cfg.groups_per_iteration}) and minibatch_size ({cfg.minibatch_size}) "
                f"must be divisible by the number of processes ({self.dist.world})"
            )
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out_dir / "config.yaml")
        seed_everything(cfg.seed)
        self.policy = build_policy(cfg.model)
        check_image_size(self.policy, cfg.data.size)
        self.policy.eval()  # no train-mode randomness anywhere: the on-policy ratio must be 1
        self.named = [(f"p{i}", p) for i, p in enumerate(self.policy.trainable_parameters())]
        self.params = [p for _, p in self.named]
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg.optim, cfg.iterations)
        self.ema = EMA(self.named, cfg.ema_decay, warmup=False)
        self.source = SampleSource(cfg.data, seed=cfg.seed, total_steps=cfg.iterations)
        self.rewards = {r.name: build_reward(r.name, **r.options) for r in cfg.rewards}
        self.weights = {r.name: r.weight for r in cfg.rewards}
        self.init_sha = init_fingerprint(cfg.model.init)
        self.reference = None
        if cfg.beta_kl > 0:
            self.reference = self._make_reference()
        self.objective = build_objective(self)
        self.start = 0
        if resume:
            self._resume()
        if cfg.trackers and self.dist.is_main:
            self.dist.accelerator.init_trackers("refrl-grpo", config=cfg.model_dump(mode="json"))

    # ------------------------------------------------------------------ setup
    def _make_reference(self):
        """KL reference: the same network with the adapter off, or a frozen copy.

        ``auto`` takes the adapter when the policy has one (no extra memory) and a
        frozen copy of the initial weights for a full fine-tune.
        """
        if self.cfg.kl_reference in ("adapter", "auto"):
            try:
                with self.policy.adapter_disabled():
                    pass
                return "adapter"
            except NotImplementedError:
                if self.cfg.kl_reference == "adapter":
                    raise RefrlError(
                        "kl_reference=adapter needs a LoRA policy (model.lora_rank>0); use kl_reference=copy or auto"
                    ) from None
        ref = copy.deepcopy(self.policy)
        for p in ref.trainable_parameters():
            p.requires_grad_(False)
        return ref

    def _resume(self) -> None:
        self.start = resume_training(self.ckpt_root, self.named, self.optimizer, self.scheduler, self.ema,
                                     self.init_sha, self.cfg.model.init, self.out_dir)
        trainer_state, _, _ = load_checkpoint(latest_checkpoint(self.ckpt_root))
        self.objective.load_state_dict(trainer_state.get("objective", {}))

    def checkpoint(self, iteration: int) -> Path | None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state(), "objective": self.objective.state_dict()}
        path = None
        if self.dist.is_main:
            def export(p: Path) -> None:
                with self.ema.swapped_in():
                    self.policy.save_pretrained(p)

            path = save_checkpoint(self.ckpt_root, iteration, export, state, self.ema.state_dict(),
                                   {"data_position": iteration, "kind": self.cfg.objective, "init_sha256": self.init_sha}, trainable=dict(self.named),
                                   keep_last=self.cfg.keep_last)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ one iteration
    def rollout(self, it: int, step_noise_stream: int = 2) -> dict[str, Any]:
        """Roll out iteration ``it``'s groups and score them.

        ``step_noise_stream`` names the random stream of the SDE steps' noise; another
        value re-rolls the same starting noise with new SDE noise (``train.signal``).
        """
        cfg, sc = self.cfg, self.cfg.sampling
        g_size, n_groups = cfg.group_size, cfg.groups_per_iteration
        groups = self.source.batch(it, n_groups)
        per_rank = n_groups // self.dist.world
        local_groups = list(range(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank))
        local_samples = [groups[g] for g in local_groups]
        global_index = [g * g_size + k for g in local_groups for k in range(g_size)]
        sigmas = sigma_schedule(sc.steps, shift=sc.shift)
        sde_steps = choose_sde_steps(sc.sde_steps, sc.steps, seeded_generator(cfg.seed, it, 7), sc.window,
                                     sc.window_start, it, sc.first_m, sc.window_max_start)
        size = groups[0].target.shape[-2:] if groups[0].target is not None else (32, 32)
        shape = self.policy.latent_shape(*size)
        x0 = torch.stack([
            torch.randn(shape, generator=seeded_generator(cfg.seed, it, 1, (i // g_size) if sc.same_noise_in_group else i))
            for i in global_index
        ])
        step_noise = torch.stack([
            torch.stack([torch.randn(shape, generator=seeded_generator(cfg.seed, it, step_noise_stream, i, j)) for i in global_index])
            for j in range(len(sde_steps))
        ]) if sde_steps else torch.zeros(0)
        with torch.no_grad():
            cond, uncond = encode_for_guidance(self.policy, local_samples, sc.cfg_scale)
            rep = torch.arange(len(local_samples)).repeat_interleave(g_size)
            cond = self.policy.select_condition(cond, rep)
            uncond = None if uncond is None else self.policy.select_condition(uncond, rep)
            traj = rollout_sde(self.policy, cond, uncond, x0, sigmas, sde_steps, sc.sde_kind, sc.noise_level,
                               sc.cfg_scale, step_noise)
            images = self.policy.decode(traj["final"])
        expanded = [s for s in local_samples for _ in range(g_size)]
        t_reward = time.perf_counter()
        scores, extras = {}, {}
        calls_before = {k: getattr(r, "encoder_calls", 0) for k, r in self.rewards.items()}
        for name, reward in self.rewards.items():
            out = reward(images, expanded)
            scores[name] = self.dist.gather(out.scores.float())
            extras[name] = {k: self.dist.gather(v.float()) for k, v in out.extras.items()}
        encoder_calls = sum(getattr(r, "encoder_calls", 0) - calls_before[k] for k, r in self.rewards.items())
        reward_seconds = time.perf_counter() - t_reward
        ro = {
            "iteration": it, "groups": groups, "sde_steps": sde_steps, "sigmas": sigmas, "scores": scores,
            "extras": extras, "reward_seconds": reward_seconds, "images": self.dist.gather(images),
            "encoder_calls": encoder_calls, "final": self.dist.gather(traj["final"]),
        }
        if self.objective.needs_sde_steps:  # the log-prob-free objectives keep no per-step data
            ro.update({"latents": self.dist.gather(traj["latents"]), "next_latents": self.dist.gather(traj["next_latents"]),
                       "log_probs": self.dist.gather(traj["log_probs"])})
        return ro

    def _as_reference(self):
        """The KL reference policy and the (single-use) context it runs in: adapter off, or the frozen copy."""
        if self.reference == "adapter":
            return self.policy, self.policy.adapter_disabled()
        return self.reference, nullcontext()

    def minibatch_loss(self, ro: dict[str, Any], idx: torch.Tensor, mb_samples: list, adv: torch.Tensor,
                       loss_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]:
        """The objective's loss of the rollout samples ``idx`` (`refrl.train.objectives`).

        Returns the loss (with gradients), the ratios the on-policy guard checks (detached)
        and per-step stats.
        """
        return self.objective.minibatch_loss(ro, idx, mb_samples, adv, loss_weights)

    def train_on(self, it: int, ro: dict[str, Any], adv, loss_weights) -> dict[str, float]:
        cfg = self.cfg
        n = cfg.groups_per_iteration * cfg.group_size
        samples = [s for s in ro["groups"] for _ in range(cfg.group_size)]
        mb, local_mb = cfg.minibatch_size, cfg.minibatch_size // self.dist.world
        n_mb = n // mb
        accumulate = n_mb if cfg.gradient_accumulation == "iteration" else cfg.gradient_accumulation
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "ratio_mean": [], "ratio_max": []}
        ratio_first = float("nan")
        for epoch in range(cfg.inner_epochs):
            perm = torch.randperm(n, generator=seeded_generator(cfg.seed, it, 3, epoch))
            for m in range(n_mb):
                idx = perm[m * mb : (m + 1) * mb][self.dist.rank * local_mb : (self.dist.rank + 1) * local_mb]
                mb_samples = [samples[int(i)] for i in idx]
                if m % accumulate == 0:
                    self.optimizer.zero_grad(set_to_none=True)
                total, r, mb_stats = self.minibatch_loss(ro, idx, mb_samples, adv, loss_weights)
                for k, v in mb_stats.items():
                    stats.setdefault(k, []).extend(v)
                if epoch == 0 and m == 0:
                    ratio_first = self.dist.max_across(float((r - 1).abs().max()))
                    # an off-policy sampler (matching.old_policy=ema) makes ratio != 1 by design
                    if cfg.on_policy_check and self.objective.on_policy and ratio_first > cfg.on_policy_tol:
                        raise OnPolicyError(
                            f"on-policy check failed at iteration {it + 1}: max |ratio - 1| = {ratio_first:.3e} "
                            f"> {cfg.on_policy_tol:g}; {ON_POLICY_HELP}"
                        )
                # averaged over the accumulated minibatches, so the step size does not grow with accumulation
                (total / accumulate).backward()
                if (m + 1) % accumulate == 0:
                    self.dist.average_gradients(self.params)
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
                    self.optimizer.step()
                    self.ema.update()
                stats["loss"].append(float(total.detach()))
                stats["ratio_mean"].append(float(r.mean()))
                stats["ratio_max"].append(float(r.max()))
        self.scheduler.step()
        mean = lambda v: float(sum(v) / len(v)) if v else 0.0  # noqa: E731
        extra = {k: mean(v) for k, v in stats.items() if k not in ("loss", "kl", "ratio_mean", "ratio_max")}
        return {"loss": mean(stats["loss"]), "kl": mean(stats["kl"]), "ratio_first": ratio_first,
                "ratio_mean": mean(stats["ratio_mean"]), "ratio_max": max(stats["ratio_max"], default=1.0), **extra}

    def advantages(self, ro: dict[str, Any]):
        """Advantages and loss weights of a scored rollout (`compute_advantages` with the config's shaping)."""
        cfg = self.cfg
        group_ids = torch.arange(cfg.groups_per_iteration).repeat_interleave(cfg.group_size)
        n_refs = torch.tensor([s.n_refs for s in ro["groups"] for _ in range(cfg.group_size)])
        return compute_advantages(ro["scores"], ro["extras"], self.weights, group_ids, n_refs,
                                  self.objective.advantage_steps(ro), cfg.sampling.steps, cfg.advantage)

    def iteration(self, it: int) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        with self.objective.sampling_context():
            ro = self.rollout(it)
        t_rollout = time.perf_counter() - t0 - ro["reward_seconds"]
        t1 = time.perf_counter()
        self.objective.prepare(it, ro)  # before any update: v_old is the rollout policy's
        t_prepare = time.perf_counter() - t1
        n = cfg.groups_per_iteration * cfg.group_size
        res = self.advantages(ro)
        if cfg.save_rollouts and self.dist.is_main:
            folder = self.out_dir / "rollouts"
            folder.mkdir(exist_ok=True)
            save_safetensors({"advantages": res.advantages, "loss_weights": res.loss_weights, "images": ro["images"],
                              **{f"reward/{k}": v for k, v in ro["scores"].items()}}, folder / f"iter-{it + 1}.safetensors")
        t1 = time.perf_counter()
        train_stats = self.train_on(it, ro, res.advantages, res.loss_weights)
        self.objective.after_iteration(it)
        t_train = time.perf_counter() - t1 + t_prepare
        record: dict[str, Any] = {"step": it + 1}
        for name, sc in ro["scores"].items():
            valid = sc[~torch.isnan(sc)]
            record[f"reward/{name}"] = float(valid.mean()) if valid.numel() else float("nan")
            record[f"reward_std/{name}"] = float(valid.std()) if valid.numel() > 1 else 0.0
        combined = sum(self.weights[k] * torch.nan_to_num(v, nan=0.0) for k, v in ro["scores"].items())
        g_std = combined.view(cfg.groups_per_iteration, cfg.group_size).std(dim=1)
        record["zero_std_groups"] = float((g_std < 1e-6).float().mean())
        record.update(res.metrics)
        record.update(train_stats)
        record.update({"sde_steps": ro["sde_steps"], "encoder_calls": ro["encoder_calls"],
                       "seconds/rollout": t_rollout, "seconds/reward": ro["reward_seconds"], "seconds/train": t_train,
                       "samples_per_second": n / (time.perf_counter() - t0), "lr": self.scheduler.get_last_lr()[0]})
        return record

    def run(self) -> Path | None:
        cfg = self.cfg
        metrics = MetricsWriter(self.out_dir / "metrics.jsonl", truncate_after_step=self.start) \
            if self.dist.is_main else None
        interrupted = {"flag": False}
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
        bar = tqdm(range(self.start, cfg.iterations), initial=self.start, total=cfg.iterations, desc=cfg.objective,
                   disable=not self.dist.is_main, dynamic_ncols=True)
        path = None
        try:
            for it in bar:
                record = self.iteration(it)
                if metrics is not None:
                    metrics.write(record)
                if cfg.trackers and self.dist.is_main:
                    self.dist.accelerator.log({k: v for k, v in record.items() if isinstance(v, float | int)}, step=it + 1)
                bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3f}" for k in record if k.startswith("reward/")}
                                | {"kl": f"{record['kl']:.2e}"})
                done = it + 1
                if done % cfg.checkpoint_every == 0 or done == cfg.iterations or interrupted["flag"]:
                    path = self.checkpoint(done)
                if interrupted["flag"]:
                    raise KeyboardInterrupt
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
            if metrics is not None:
                metrics.close()
            if cfg.trackers and self.dist.is_main:
                self.dist.accelerator.end_training()
        return path or latest_checkpoint(self.ckpt_root)


def train_grpo(cfg: GRPOConfig, out_dir: str | Path, resume: bool = False) -> Path | None:
    """Run RL (``cfg.objective``: grpo, nft or awm) into ``out_dir``; returns the last checkpoint. The main
    process holds the run folder's lock (`refrl.runfolder.lock.lock_run_folder`) for the whole run."""
    # under accelerate only the main process (RANK 0) writes into the run folder
    main = int(os.environ.get("RANK", "0")) == 0
    with lock_run_folder(out_dir) if main else nullcontext():
        return GRPOTrainer(cfg, out_dir, resume=resume).run()
