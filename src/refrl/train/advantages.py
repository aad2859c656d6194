"""The advantage hook of the GRPO trainer: rewards in, per-timestep advantages and
per-sample loss weights out.

Everything here composes the pure functions of `refrl.shaping` from config:

* ``weighted``: ``r = Σ w_k r_k`` then group-normalize (group or global std);
* ``gdpo``: per-reward group normalization, weighted sum, batch normalization (DyRef);
* ``sars``: Customized-GRPO's synergy-aware shaping of a prompt and an identity
  reward, with TDW weights at the real denoising index of each trained step (GRPO's
  SDE steps, shared by all samples; or, for the log-prob-free objectives, each
  sample's own training times as positions on the rollout schedule); any further
  rewards are added as a GDPO term (their weights apply).

DRS (DyRef) rescales one named reward before aggregation using each sample's
number of references; DAR (DyRef) turns the raw, pre-DRS similarity into
per-group loss weights. Missing rewards (NaN) follow ``nan_rule`` and are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from refrl.config import StrictModel
from refrl.shaping import (
    customized_grpo_advantages,
    dar_group_weights,
    drs_transform,
    fill_missing,
    gdpo_combine,
    group_normalize,
    sars_categories,
    tdw_weights,
    weighted_sum,
)


class DRSConfig(StrictModel):
    reward: str = Field("fidelity", description="the similarity reward DRS rescales")
    tau: float = Field(0.65, description="threshold of sigmoid(k (s - tau))")
    k_mode: Literal["increase", "decrease", "const"] = Field("increase", description="k from the reference count n")


class DARConfig(StrictModel):
    reward: str = Field("fidelity", description="its raw similarity (extra raw_similarity if present) drives the weights")
    gamma: float = Field(2.0, description="w = (1 - mean similarity)^gamma")
    w_min: float = Field(0.5, description="lowest group weight")
    w_max: float = Field(5.0, description="highest group weight")
    ref_count_beta: float | None = Field(None, description="optional factor (n/3)^beta (off in the released code)")


class AdvantageConfig(StrictModel):
    kind: Literal["weighted", "gdpo", "sars"] = Field(
        "weighted", description="weighted sum then group norm; GDPO (DyRef); SARS (Customized-GRPO)"
    )
    std: Literal["group", "global"] = Field("group", description="normalize by the group's std or the batch's")
    eps: float = Field(1e-4, gt=0, description="added to the std")
    clip: float = Field(5.0, gt=0, description="advantages clipped to +-clip")
    nan_rule: Literal["mean", "exclude"] = Field(
        "mean", description="a reward that does not apply (NaN): the mean of its valid values, or left out"
    )
    # Customized-GRPO (kind=sars)
    prompt_reward: str = Field("layout", description="sars: the prompt-following reward (h)")
    identity_reward: str = Field("identity", description="sars: the identity reward (d)")
    sars_gamma: float = Field(0.4, description="sars: bonus scale gamma")
    sars_mode: Literal["tanh", "min", "max", "harmonic", "tanh_only"] = Field("tanh", description="sars: the bonus form")
    tdw: bool = Field(False, description="sars: time-aware weights of the two rewards by trained step (TDW)")
    fixed_weights: tuple[float, float] = Field((1.0, 1.0), description="sars without tdw: weights of (prompt, identity)")
    # DyRef
    drs: DRSConfig | None = Field(None, description="DyRef's discriminative reward scaling; off when unset")
    dar: DARConfig | None = Field(None, description="DyRef's difficulty-aware reweighting; off when unset")


@dataclass
class AdvantageResult:
    advantages: torch.Tensor  # (N, S): one advantage per sample and trained step (or training time)
    loss_weights: torch.Tensor  # (N,)
    metrics: dict[str, float] = field(default_factory=dict)


def compute_advantages(
    rewards: dict[str, torch.Tensor],
    extras: dict[str, dict[str, torch.Tensor]],
    weights: dict[str, float],
    group_ids: torch.Tensor,
    n_refs: torch.Tensor,
    step_indices: list[int] | torch.Tensor,
    num_steps: int,
    cfg: AdvantageConfig,
) -> AdvantageResult:
    """Advantages of a gathered batch. ``rewards[k]`` (N,) may hold NaN (not applicable).

    ``step_indices``: the trained denoising steps, shared by every sample (a list of S ints),
    or a (N, S) tensor of per-sample (possibly fractional) step positions, where TDW is
    evaluated per sample.
    """
    per_sample = isinstance(step_indices, torch.Tensor)
    n, s = group_ids.shape[0], (step_indices.shape[1] if per_sample else len(step_indices))
    metrics: dict[str, float] = {}
    rewards = {k: v.float() for k, v in rewards.items()}

    raw_for_dar = None
    if cfg.dar is not None:
        src = extras.get(cfg.dar.reward, {}).get("raw_similarity", rewards.get(cfg.dar.reward))
        if src is None:
            raise KeyError(f"advantage.dar.reward={cfg.dar.reward!r} is not a configured reward ({sorted(rewards)})")
        raw_for_dar = fill_missing(src.float(), "mean")[0]
    if cfg.drs is not None:
        if cfg.drs.reward not in rewards:
            raise KeyError(f"advantage.drs.reward={cfg.drs.reward!r} is not a configured reward ({sorted(rewards)})")
        rewards[cfg.drs.reward] = drs_transform(rewards[cfg.drs.reward], n_refs, cfg.drs.tau, cfg.drs.k_mode)

    filled: dict[str, torch.Tensor] = {}
    for k, r in rewards.items():
        filled[k], n_missing = fill_missing(r, cfg.nan_rule)
        metrics[f"nan/{k}"] = float(n_missing)

    if cfg.kind == "weighted":
        if cfg.nan_rule == "exclude":
            # Excluded rewards contribute nothing to the sum for that sample.
            total = sum(weights[k] * torch.nan_to_num(filled[k], nan=0.0) for k in filled)
        else:
            total = weighted_sum(filled, weights)
        adv = group_normalize(total, group_ids, std=cfg.std, eps=cfg.eps).clamp(-cfg.clip, cfg.clip)
        advantages = adv[:, None].expand(n, s).clone()
    elif cfg.kind == "gdpo":
        adv = gdpo_combine(filled, weights, group_ids, clip=cfg.clip)
        advantages = adv[:, None].expand(n, s).clone()
    else:
        for key in (cfg.prompt_reward, cfg.identity_reward):
            if key not in filled:
                raise KeyError(f"advantage.kind=sars needs reward {key!r}; configured: {sorted(filled)}")
        r_h = fill_missing(filled[cfg.prompt_reward], "mean")[0]
        r_d = fill_missing(filled[cfg.identity_reward], "mean")[0]
        columns = list(step_indices.T) if per_sample else list(step_indices)
        cols = [
            customized_grpo_advantages(
                r_h, r_d, group_ids, step_index=t, num_steps=num_steps, gamma=cfg.sars_gamma,
                mode=cfg.sars_mode, use_tdw=cfg.tdw, clip=cfg.clip, fixed_weights=cfg.fixed_weights,
            )
            for t in columns
        ]
        advantages = torch.stack(cols, 1)
        # Rewards beyond the SARS pair (e.g. DyRef's fidelity, after DRS) join as GDPO
        # terms, so both papers' shaping can act in one run.
        others = {k: v for k, v in filled.items() if k not in (cfg.prompt_reward, cfg.identity_reward)}
        if others:
            extra = gdpo_combine(others, {k: weights[k] for k in others}, group_ids, clip=cfg.clip)
            advantages = (advantages + extra[:, None]).clamp(-cfg.clip, cfg.clip)
        a_h = group_normalize(r_h, group_ids, eps=1e-8)
        a_d = group_normalize(r_d, group_ids, eps=1e-8)
        metrics.update({f"sars/{k}": v for k, v in sars_categories(a_h, a_d).items()})
        if cfg.tdw and per_sample:
            w_h, _ = tdw_weights(step_indices, num_steps)
            metrics.update({"tdw/w_prompt_mean": float(w_h.mean()), "tdw/w_prompt_min": float(w_h.min()),
                            "tdw/w_prompt_max": float(w_h.max())})
        elif cfg.tdw:
            for t in step_indices:
                w_h, _ = tdw_weights(t, num_steps)
                metrics[f"tdw/w_prompt@{t}"] = float(w_h)

    loss_weights = torch.ones(n)
    if raw_for_dar is not None:
        d = cfg.dar
        loss_weights = dar_group_weights(
            raw_for_dar, group_ids, d.gamma, d.w_min, d.w_max, d.ref_count_beta,
            n_refs if d.ref_count_beta is not None else None,
        ).float()
        metrics.update({"dar/w_mean": float(loss_weights.mean()), "dar/w_min": float(loss_weights.min()),
                        "dar/w_max": float(loss_weights.max())})
    a = advantages
    metrics.update({"adv/mean": float(a.mean()), "adv/std": float(a.std()) if a.numel() > 1 else 0.0,
                    "adv/abs_max": float(a.abs().max())})
    return AdvantageResult(advantages.float(), loss_weights, metrics)
