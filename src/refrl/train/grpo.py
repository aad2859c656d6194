"""Stage 2: GRPO for flow-matching policies (Flow-GRPO family), on any `Policy`.

One iteration:

1. draw ``groups_per_iteration`` conditions (a pure function of (seed, iteration))
   and repeat each ``group_size`` times; each process rolls out a contiguous
   share of the groups;
2. roll out with SDE steps where chosen (ODE elsewhere), storing x_t, x_{t+1} and
   the old log-prob; every random draw is keyed by (seed, iteration, sample),
   so a trajectory does not depend on the number of processes;
3. score with the rewards, gather everything across processes, compute
   advantages through `compute_advantages` (group norm / GDPO / SARS+TDW, DRS, DAR);
4. train with the PPO-clip loss (+ closed-form KL to the reference policy) over
   minibatches and inner epochs; on the first minibatch after a rollout the
   ratio must be 1 (on-policy guard).
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
from refrl.files import lock_run_folder, save_safetensors
from refrl.models.build import build_policy, check_image_size
from refrl.rewards import build as build_reward
from refrl.sampling.rollout import (
    choose_sde_steps,
    encode_for_guidance,
    guided_velocity,
    rollout_sde,
)
from refrl.sampling.schedules import sigma_schedule
from refrl.sampling.sde import sde_step
from refrl.train.advantages import compute_advantages
from refrl.train.checkpoint import (
    init_fingerprint,
    latest_checkpoint,
    resume_training,
    rng_state,
    save_checkpoint,
)
from refrl.train.data import SampleSource
from refrl.train.distributed import Dist
from refrl.train.ema import EMA
from refrl.train.grpo_config import GRPOConfig
from refrl.train.losses import gaussian_mean_kl, ppo_clip_loss
from refrl.train.optim import build_optimizer
from refrl.train.run import MetricsWriter, seed_everything, seeded_generator

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

    def checkpoint(self, iteration: int) -> Path | None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state()}
        path = None
        if self.dist.is_main:
            def export(p: Path) -> None:
                with self.ema.swapped_in():
                    self.policy.save_pretrained(p)

            path = save_checkpoint(self.ckpt_root, iteration, export, state, self.ema.state_dict(),
                                   {"data_position": iteration, "kind": "grpo", "init_sha256": self.init_sha}, trainable=dict(self.named),
                                   keep_last=self.cfg.keep_last)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ one iteration
    def rollout(self, it: int) -> dict[str, Any]:
        cfg, sc = self.cfg, self.cfg.sampling
        g_size, n_groups = cfg.group_size, cfg.groups_per_iteration
        groups = self.source.batch(it, n_groups)
        per_rank = n_groups // self.dist.world
        local_groups = list(range(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank))
        local_samples = [groups[g] for g in local_groups]
        global_index = [g * g_size + k for g in local_groups for k in range(g_size)]
        sigmas = sigma_schedule(sc.steps, shift=sc.shift)
        sde_steps = choose_sde_steps(sc.sde_steps, sc.steps, seeded_generator(cfg.seed, it, 7), sc.window,
                                     sc.window_start, it, sc.first_m)
        size = groups[0].target.shape[-2:] if groups[0].target is not None else (32, 32)
        shape = self.policy.latent_shape(*size)
        x0 = torch.stack([
            torch.randn(shape, generator=seeded_generator(cfg.seed, it, 1, (i // g_size) if sc.same_noise_in_group else i))
            for i in global_index
        ])
        step_noise = torch.stack([
            torch.stack([torch.randn(shape, generator=seeded_generator(cfg.seed, it, 2, i, j)) for i in global_index])
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
        return {
            "groups": groups, "sde_steps": sde_steps, "sigmas": sigmas, "scores": scores, "extras": extras,
            "latents": self.dist.gather(traj["latents"]), "next_latents": self.dist.gather(traj["next_latents"]),
            "log_probs": self.dist.gather(traj["log_probs"]), "reward_seconds": reward_seconds,
            "images": self.dist.gather(images), "encoder_calls": encoder_calls,
        }

    def _log_prob(self, policy, conds, x, x_next, sigma, sigma_next):
        """log-prob (and Gaussian mean/std) of the stored step ``x -> x_next`` under ``policy``."""
        sc = self.cfg.sampling
        v = guided_velocity(policy, x, torch.full((x.shape[0],), sigma), conds[0], conds[1], sc.cfg_scale)
        _, logp, mean, std = sde_step(sc.sde_kind, x, v, sigma, sigma_next, sc.noise_level, prev_sample=x_next)
        return logp, mean, std

    def _as_reference(self):
        """The KL reference policy and the (single-use) context it runs in: adapter off, or the frozen copy."""
        if self.reference == "adapter":
            return self.policy, self.policy.adapter_disabled()
        return self.reference, nullcontext()

    def train_on(self, it: int, ro: dict[str, Any], adv, loss_weights) -> dict[str, float]:
        cfg = self.cfg
        n = cfg.groups_per_iteration * cfg.group_size
        samples = [s for s in ro["groups"] for _ in range(cfg.group_size)]
        mb, local_mb = cfg.minibatch_size, cfg.minibatch_size // self.dist.world
        sde_steps, sigmas = ro["sde_steps"], ro["sigmas"]
        stats = {"loss": [], "kl": [], "ratio_mean": [], "ratio_max": [], "clipfrac": []}
        ratio_first = float("nan")
        for epoch in range(cfg.inner_epochs):
            perm = torch.randperm(n, generator=seeded_generator(cfg.seed, it, 3, epoch))
            for m in range(n // mb):
                idx = perm[m * mb : (m + 1) * mb][self.dist.rank * local_mb : (self.dist.rank + 1) * local_mb]
                mb_samples = [samples[int(i)] for i in idx]
                self.optimizer.zero_grad(set_to_none=True)
                total = torch.zeros(())
                ratios = []
                # the condition is encoded once per minibatch (with gradients) and shared by its steps
                conds = encode_for_guidance(self.policy, mb_samples, cfg.sampling.cfg_scale)
                ref_conds = None
                if self.reference is not None:
                    ref_policy, ctx = self._as_reference()
                    with torch.no_grad(), ctx:
                        ref_conds = encode_for_guidance(ref_policy, mb_samples, cfg.sampling.cfg_scale)
                for j, t in enumerate(sde_steps):
                    s, s_next = float(sigmas[t]), float(sigmas[t + 1])
                    x, x_next = ro["latents"][idx, j], ro["next_latents"][idx, j]
                    logp, mean, std = self._log_prob(self.policy, conds, x, x_next, s, s_next)
                    loss, st = ppo_clip_loss(logp, ro["log_probs"][idx, j], adv[idx, j], cfg.clip_range,
                                             weights=loss_weights[idx])
                    ratios.append(torch.exp(logp.detach() - ro["log_probs"][idx, j]))
                    if ref_conds is not None:
                        ref_policy, ctx = self._as_reference()
                        with torch.no_grad(), ctx:
                            _, mean_ref, _ = self._log_prob(ref_policy, ref_conds, x, x_next, s, s_next)
                        kl = gaussian_mean_kl(mean, mean_ref, std).mean()
                        loss = loss + cfg.beta_kl * kl
                        stats["kl"].append(float(kl.detach()))
                    total = total + loss / len(sde_steps)
                    stats["clipfrac"].append(float(st["clipfrac"]))
                r = torch.cat(ratios)
                if epoch == 0 and m == 0:
                    ratio_first = self.dist.max_across(float((r - 1).abs().max()))
                    if cfg.on_policy_check and ratio_first > cfg.on_policy_tol:
                        raise OnPolicyError(
                            f"on-policy check failed at iteration {it + 1}: max |ratio - 1| = {ratio_first:.3e} "
                            f"> {cfg.on_policy_tol:g}; {ON_POLICY_HELP}"
                        )
                total.backward()
                self.dist.average_gradients(self.params)
                torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
                self.optimizer.step()
                self.ema.update()
                stats["loss"].append(float(total.detach()))
                stats["ratio_mean"].append(float(r.mean()))
                stats["ratio_max"].append(float(r.max()))
        self.scheduler.step()
        mean = lambda v: float(sum(v) / len(v)) if v else 0.0  # noqa: E731
        return {"loss": mean(stats["loss"]), "kl": mean(stats["kl"]), "ratio_first": ratio_first,
                "ratio_mean": mean(stats["ratio_mean"]), "ratio_max": max(stats["ratio_max"], default=1.0),
                "clipfrac": mean(stats["clipfrac"])}

    def iteration(self, it: int) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        ro = self.rollout(it)
        t_rollout = time.perf_counter() - t0 - ro["reward_seconds"]
        n = cfg.groups_per_iteration * cfg.group_size
        group_ids = torch.arange(cfg.groups_per_iteration).repeat_interleave(cfg.group_size)
        n_refs = torch.tensor([s.n_refs for s in ro["groups"] for _ in range(cfg.group_size)])
        res = compute_advantages(ro["scores"], ro["extras"], self.weights, group_ids, n_refs, ro["sde_steps"],
                                 cfg.sampling.steps, cfg.advantage)
        if cfg.save_rollouts and self.dist.is_main:
            folder = self.out_dir / "rollouts"
            folder.mkdir(exist_ok=True)
            save_safetensors({"advantages": res.advantages, "loss_weights": res.loss_weights, "images": ro["images"],
                              **{f"reward/{k}": v for k, v in ro["scores"].items()}}, folder / f"iter-{it + 1}.safetensors")
        t1 = time.perf_counter()
        train_stats = self.train_on(it, ro, res.advantages, res.loss_weights)
        t_train = time.perf_counter() - t1
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
        bar = tqdm(range(self.start, cfg.iterations), initial=self.start, total=cfg.iterations, desc="grpo",
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
    """Run GRPO into ``out_dir``; returns the last checkpoint. The main process holds the run
    folder's lock (`refrl.files.lock_run_folder`) for the whole run."""
    # under accelerate only the main process (RANK 0) writes into the run folder
    main = int(os.environ.get("RANK", "0")) == 0
    with lock_run_folder(out_dir) if main else nullcontext():
        return GRPOTrainer(cfg, out_dir, resume=resume).run()
