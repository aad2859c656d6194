"""Stage 2: RL for flow-matching policies, on any `Policy`: GRPO (Flow-GRPO family),
DiffusionNFT or AWM, one trainer for all (``objective`` in the config), as the RL step of
the shared loop `refrl.train.loop.TrainLoop`.

One iteration:

1. draw ``groups_per_iteration`` conditions (a pure function of (seed, iteration))
   and repeat each ``group_size`` times; each process rolls out a contiguous
   share of the groups;
2. roll out with SDE steps where chosen (ODE elsewhere), storing x_t, x_{t+1} and
   the old log-prob (GRPO), and the final latents; every random draw is keyed by
   (seed, iteration, sample), so a trajectory does not depend on the number of processes;
3. the objective prepares its training data (nft/awm: training times and v_old, before
   any update); score with the rewards, gather everything across processes into a
   `Rollout`, compute advantages through `compute_advantages` (group norm / GDPO /
   SARS+TDW, DRS, DAR);
4. train with the objective's minibatch loss (`refrl.train.objectives`: PPO-clip on
   SDE steps, NFT, or AWM; + KL to the reference policy) over minibatches and inner
   epochs; on the first minibatch after a rollout the ratio must be 1 (on-policy guard).

From Python the trainer takes objects, as TRL's do: a policy, a dataset (manifest path
or samples) and rewards given as registered names, `Reward` objects or plain functions
``(images, samples) -> list[float | None]`` (`refrl.rewards.function.FunctionReward`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from refrl.errors import RefrlError
from refrl.models.policy import Policy
from refrl.rewards import Reward
from refrl.rewards import build as build_reward
from refrl.rewards.function import FunctionReward, RewardFunction
from refrl.runfolder.files import save_safetensors
from refrl.runfolder.rng import seeded_generator
from refrl.sampling.rollout import Rollout, choose_sde_steps, encode_for_guidance, rollout_sde
from refrl.sampling.schedules import sigma_schedule
from refrl.train.advantages import compute_advantages
from refrl.train.grpo_config import GRPOConfig, RewardSpec, with_model_sampler
from refrl.train.loop import Dataset, LoopSpec, TrainLoop, main_process_lock
from refrl.train.objectives import build_objective

# A reward as the trainer takes it: a registered name, a spec (name, weight, options), a
# `Reward` object, or a plain function (images, samples) -> list[float | None].
RewardLike = str | RewardSpec | Reward | RewardFunction

ON_POLICY_HELP = (
    "sampling and training disagree before any update. Usual causes: dropout or other "
    "train-mode randomness in the network, a different dtype/autocast between rollout and "
    "training, or outputs that depend on batch composition (unmasked padding of references "
    "or text). Fix the policy, or set on_policy_check=false to train anyway."
)


class OnPolicyError(RefrlError):
    pass


def resolve_rewards(given: Sequence[RewardLike], weights: Sequence[float] | None = None
                    ) -> tuple[dict[str, Reward], list[RewardSpec]]:
    """Rewards by name and the specs that describe them in ``config.yaml`` (a spec's weight wins
    over ``weights``; a plain function's spec has its name and no options)."""
    if weights is not None and len(weights) != len(given):
        raise RefrlError(f"reward_weights has {len(weights)} values for {len(given)} rewards")
    rewards: dict[str, Reward] = {}
    specs: list[RewardSpec] = []
    for i, item in enumerate(given):
        weight = 1.0 if weights is None else float(weights[i])
        if isinstance(item, str):
            item = RewardSpec(name=item, weight=weight)
        if isinstance(item, RewardSpec):
            reward, spec = build_reward(item.name, **item.options), item
        else:
            reward = item if isinstance(item, Reward) else FunctionReward(item)
            spec = RewardSpec(name=reward.name, weight=weight)
        if spec.name in rewards:
            raise RefrlError(f"rewards: each reward once, got {spec.name!r} twice")
        rewards[spec.name] = reward
        specs.append(spec)
    if not rewards:
        raise RefrlError("rewards: give at least one reward")
    return rewards, specs


class GRPOTrainer(TrainLoop):
    """The RL step of the shared loop: rollout, rewards, advantages, the objective's updates.

    ``policy``, ``dataset`` and ``rewards`` (with ``reward_weights``) replace what ``cfg``'s
    ``model``, ``data`` and ``rewards`` sections would build; ``config.yaml`` then names the
    given rewards.
    """

    cfg: GRPOConfig

    def __init__(self, cfg: GRPOConfig, out_dir: str | Path, resume: bool = False, *,
                 policy: Policy | str | None = None, dataset: Dataset | None = None,
                 rewards: Sequence[RewardLike] | None = None, reward_weights: Sequence[float] | None = None):
        self._given_rewards = (rewards, reward_weights)
        super().__init__(cfg, out_dir, resume, policy=policy, dataset=dataset)

    def loop_spec(self) -> LoopSpec:
        cfg = self.cfg
        return LoopSpec(kind=cfg.objective, total=cfg.iterations, checkpoint_every=cfg.checkpoint_every,
                        keep_last=cfg.keep_last, ema_decay=cfg.ema_decay, ema_warmup=False, train_mode=False,
                        trackers=list(cfg.trackers),
                        per_process={"groups_per_iteration": cfg.groups_per_iteration,
                                     "minibatch_size": cfg.minibatch_size})

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.cfg = with_model_sampler(self.cfg, self.policy)  # unset sampling keys: the model's; config.yaml records them
        self.source = self.sample_source()
        given, weights = self._given_rewards
        if given is None:
            self.rewards, specs = resolve_rewards(self.cfg.rewards)
        else:
            self.rewards, specs = resolve_rewards(given, weights)
            self.cfg = self.cfg.model_copy(update={"rewards": specs})
        self.weights = {r.name: r.weight for r in specs}
        self.reference = None
        if self.cfg.beta_kl > 0:
            self.reference = self._make_reference()
        self.objective = build_objective(self)

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
        return self.frozen_copy()

    def wants_frozen_copy(self) -> bool:
        if self.cfg.beta_kl <= 0 or self.cfg.kl_reference == "adapter":
            return False
        if self.cfg.kl_reference == "copy":
            return True
        try:  # auto: a copy only without an adapter
            with self.policy.adapter_disabled():
                return False
        except NotImplementedError:
            return True

    def extra_state(self) -> dict[str, Any]:
        return {"objective": self.objective.state_dict()}

    def load_extra_state(self, trainer_state: dict[str, Any]) -> None:
        self.objective.load_state_dict(trainer_state.get("objective", {}))

    # ------------------------------------------------------------------ one iteration
    def rollout(self, it: int, step_noise_stream: int = 2) -> Rollout:
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
                               sc.cfg_scale, step_noise, keep_means=self.cfg.grpo_guard.enabled)
            images = self.policy.decode(traj.final)
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
        ro = Rollout(
            iteration=it, groups=groups, group_size=g_size, sigmas=sigmas, sde_steps=sde_steps,
            final=self.dist.gather(traj.final), images=self.dist.gather(images), scores=scores, extras=extras,
            reward_seconds=reward_seconds, encoder_calls=encoder_calls,
        )
        if self.objective.needs_sde_steps:  # the log-prob-free objectives keep no per-step data
            ro.latents, ro.next_latents = self.dist.gather(traj.latents), self.dist.gather(traj.next_latents)
            ro.log_probs = self.dist.gather(traj.log_probs)
            if traj.means is not None:  # GRPO-Guard's old means
                ro.step_means = self.dist.gather(traj.means)
        return ro

    def _as_reference(self):
        """The KL reference policy and the (single-use) context it runs in: adapter off, or the frozen copy."""
        if self.reference == "adapter":
            return self.policy, self.policy.adapter_disabled()
        return self.reference, nullcontext()

    def minibatch_loss(self, ro: Rollout, idx: torch.Tensor, mb_samples: list, adv: torch.Tensor,
                       loss_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[float]]]:
        """The objective's loss of the rollout samples ``idx`` (`refrl.train.objectives`).

        Returns the loss (with gradients), the ratios the on-policy guard checks (detached)
        and per-step stats.
        """
        return self.objective.minibatch_loss(ro, idx, mb_samples, adv, loss_weights)

    def train_on(self, it: int, ro: Rollout, adv: torch.Tensor, loss_weights: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        n = cfg.groups_per_iteration * cfg.group_size
        samples = ro.samples
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
                    self.optimizer_step(loss=float(total.detach()))
                stats["loss"].append(float(total.detach()))
                stats["ratio_mean"].append(float(r.mean()))
                stats["ratio_max"].append(float(r.max()))
        mean = lambda v: float(sum(v) / len(v)) if v else 0.0  # noqa: E731
        extra = {k: mean(v) for k, v in stats.items() if k not in ("loss", "kl", "ratio_mean", "ratio_max")}
        return {"loss": mean(stats["loss"]), "kl": mean(stats["kl"]), "ratio_first": ratio_first,
                "ratio_mean": mean(stats["ratio_mean"]), "ratio_max": max(stats["ratio_max"], default=1.0), **extra}

    def advantages(self, ro: Rollout):
        """Advantages and loss weights of a scored rollout (`compute_advantages` with the config's shaping)."""
        cfg = self.cfg
        group_ids = torch.arange(cfg.groups_per_iteration).repeat_interleave(cfg.group_size)
        n_refs = torch.tensor([s.n_refs for s in ro.samples])
        return compute_advantages(ro.scores, ro.extras, self.weights, group_ids, n_refs,
                                  self.objective.advantage_steps(ro), cfg.sampling.steps, cfg.advantage)

    def step(self, it: int) -> dict[str, Any]:
        """One iteration: rollout, advantages, the objective's updates; returns its metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        with self.objective.sampling_context():
            ro = self.rollout(it)
        t_rollout = time.perf_counter() - t0 - ro.reward_seconds
        t1 = time.perf_counter()
        self.objective.prepare(it, ro)  # before any update: v_old is the rollout policy's
        t_prepare = time.perf_counter() - t1
        n = cfg.groups_per_iteration * cfg.group_size
        res = self.advantages(ro)
        if cfg.save_rollouts and self.dist.is_main:
            folder = self.out_dir / "rollouts"
            folder.mkdir(exist_ok=True)
            save_safetensors({"advantages": res.advantages, "loss_weights": res.loss_weights, "images": ro.images,
                              **{f"reward/{k}": v for k, v in ro.scores.items()}}, folder / f"iter-{it + 1}.safetensors")
        t1 = time.perf_counter()
        train_stats = self.train_on(it, ro, res.advantages, res.loss_weights)
        self.objective.after_iteration(it)
        t_train = time.perf_counter() - t1 + t_prepare
        record: dict[str, Any] = {}
        for name, sc in ro.scores.items():
            valid = sc[~torch.isnan(sc)]
            record[f"reward/{name}"] = float(valid.mean()) if valid.numel() else float("nan")
            record[f"reward_std/{name}"] = float(valid.std()) if valid.numel() > 1 else 0.0
        combined = sum(self.weights[k] * torch.nan_to_num(v, nan=0.0) for k, v in ro.scores.items())
        g_std = combined.view(cfg.groups_per_iteration, cfg.group_size).std(dim=1)
        record["zero_std_groups"] = float((g_std < 1e-6).float().mean())
        record.update(res.metrics)
        record.update(train_stats)
        record.update({"sde_steps": ro.sde_steps, "encoder_calls": ro.encoder_calls,
                       "seconds/rollout": t_rollout, "seconds/reward": ro.reward_seconds, "seconds/train": t_train,
                       "samples_per_second": n / (time.perf_counter() - t0)})
        return record

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {k.split("/")[-1]: f"{record[k]:.3f}" for k in record if k.startswith("reward/")} | {"kl": f"{record['kl']:.2e}"}


def train_grpo(cfg: GRPOConfig, out_dir: str | Path, resume: bool = False) -> Path | None:
    """Run RL (``cfg.objective``: grpo, nft or awm) into ``out_dir``; returns the last checkpoint.

    The run folder's lock is taken first, so a busy folder is refused before anything else."""
    with main_process_lock(out_dir):
        return GRPOTrainer(cfg, out_dir, resume=resume).train()
